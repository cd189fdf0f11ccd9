# The sealnet node agent image: `docker build -t sealnet-agent:dev .`
# (kind: `kind load docker-image sealnet-agent:dev`). It carries the agent and
# its run-time needs only, not the Pulumi program.
#
# The base is pinned; override it with --build-arg BASE_IMAGE=... (a mirror,
# or a digest: python:3.11.7-slim-bookworm@sha256:...).
ARG BASE_IMAGE=python:3.11.7-slim-bookworm
FROM ${BASE_IMAGE}

# iproute2 and wireguard-tools: `ip xfrm` and `wg` for debugging on the node
# (kubectl exec); wireguard-go: the userspace fallback when the node's kernel
# has no WireGuard module. The IPsec datapath needs nothing beyond the kernel.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 wireguard-tools wireguard-go \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sealnet
COPY requirements-agent.txt .
RUN pip install --no-cache-dir -r requirements-agent.txt
COPY agent/ agent/
# The root filesystem is read-only in the pod: compile now, never at run time.
RUN python -m compileall -q agent
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

# Root with NET_ADMIN only (the DaemonSet drops every other capability).
USER 0
# metrics, health (TCP); WireGuard listens on 51871/udp in wireguard mode.
EXPOSE 9878/tcp 9879/tcp 51871/udp
# The DaemonSet's command is `python -m agent run --config /etc/sealnet/config.json`.
ENTRYPOINT ["python", "-m", "agent"]
CMD ["run", "--config", "/etc/sealnet/config.json"]
