# The sealnet node agent image (`docker build -t sealnet-agent:dev .`).
# It carries only the agent and its runtime dependencies, not the Pulumi program.
FROM python:3.11-slim-bookworm
# wireguard-go is the userspace fallback when the node's kernel has no
# WireGuard module; the IPsec datapath needs nothing beyond the kernel.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wireguard-go \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/sealnet
COPY requirements.txt .
RUN grep -v -i '^pulumi' requirements.txt > agent-requirements.txt \
 && pip install --no-cache-dir -r agent-requirements.txt
COPY agent/ agent/
USER 0
ENTRYPOINT ["python", "-m", "agent"]
