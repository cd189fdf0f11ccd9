"""Test harness: ``python -m agent run`` on every node of a lab.topology.Cluster.

Each agent is a real daemon process in its node's namespace, driven only by
what a real one is driven by: the fake Kubernetes API server (tests.fakeapi)
on the underlay at 172.18.0.1, which it reaches through its kubeconfig, and
its mounted files (config document; the keys Secret as a kubelet-style
volume, tests.kubelet). Its HTTP endpoints are reached inside the node's
namespace (lab.netns). Every agent log is checked for key material before a
test reads it: the IPsec keys given, and in WireGuard mode every private key
the agents kept in their state dirs (collected at each stop, kill and
readiness, so keys retired by a rotation are checked too).

    with Cluster(nodes=3, name="d1", api_address=True) as c, \\
         DaemonCluster(c, tmp_path, mode="ipsec", keys=LINE) as d:
        d.register_all(); d.start_all(); d.wait_ready_all()
        d.annotations(0)["sealnet.io/ipsec-keys"]   # "3"
        d.metrics(0)["sealnet_agent_ready"]         # 1.0
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from lab.capture import Capture
from lab.netns import http_get, listening_socket
from lab.topology import API_IP, Cluster, LabNode
from tests.fakeapi import FakeApiServer, node_object
from lab.udpflow import Flow
from tests.kubelet import SecretVolume
from agent.wireguard.epochs import slot_names
from agent.wireguard.keys import KEY_FILE, PREVIOUS_FILE

REPO = Path(__file__).resolve().parents[1]
HEALTH_PORT, METRICS_PORT = 9879, 9878
API_PORT = 6443
WG_PORT = 51871
#: A new agent process: a second on the host; in the lab VM (TCG, the
#: checkout over 9p) its imports alone can take a minute or two.
START_TIMEOUT = 400.0 if os.environ.get("SEALNET_IN_LAB") == "1" else 30.0


class DaemonCluster:
    def __init__(self, cluster: Cluster, tmp: Path, mode: str = "ipsec", keys: Optional[str] = None,
                 node_encryption: bool = False, resync: float = 2.0, grace: float = 3.0,
                 backend: str = "auto", secrets: Sequence[str] = (), rotation_grace: float = 300) -> None:
        assert cluster.api_address, "the cluster needs api_address=True (the fake API on the underlay)"
        self.c, self.tmp, self.mode = cluster, tmp, mode
        self.node_encryption, self.resync, self.grace, self.backend = node_encryption, resync, grace, backend
        self.rotation_grace = rotation_grace
        #: WireGuard key epoch per node, written into its config at each start
        self.epochs = [0] * len(cluster.nodes)
        self.secrets = list(secrets)
        self.api = FakeApiServer(sock=listening_socket(cluster.underlay_ns, str(API_IP), API_PORT))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.dirs = [tmp / node.name for node in cluster.nodes]
        self.volumes = [SecretVolume(d / "keys") for d in self.dirs]
        self.kubeconfig = tmp / "kubeconfig"
        if keys is not None:
            self.write_keys(keys)

    def __enter__(self) -> "DaemonCluster":
        self.api.start()
        self.api.kubeconfig(self.kubeconfig, server=f"http://{API_IP}:{API_PORT}")
        return self

    def __exit__(self, *exc: object) -> None:
        for i in list(self.procs):
            self.kill(i)
        if self.mode == "wireguard":
            for i, node in enumerate(self.c.nodes):
                for name in self.ifnames(i):
                    self.c.run(node.ns, "ip", "link", "del", name, check=False)
        self.api.stop()
        keep = os.environ.get("SEALNET_LAB_RESULTS")
        for i, node in enumerate(self.c.nodes):
            text = self.log(i)
            self.assert_no_secret(text)
            if keep and text:  # brought back to the host with the lab's results
                Path(keep, f"agent-{self.c.name}-{node.name}.log").write_text(text)

    # -- inputs ----------------------------------------------------------------

    def ifname(self, i: int) -> str:
        # wireguard-go's UAPI sockets share one directory per host: names must differ.
        return f"sw{self.c.name}{i + 1}"

    def ifnames(self, i: int) -> tuple[str, str]:
        """Both interfaces of a key epoch rotation (agent.wireguard.epochs.slot_names)."""
        return tuple(name for name, _ in slot_names(self.ifname(i), WG_PORT))  # type: ignore[return-value]

    def config(self, i: int) -> dict[str, Any]:
        return {
            "mode": self.mode, "nodeEncryption": self.node_encryption, "perNodeKeys": True, "spiPrefix": 5,
            "rotationGracePeriod": self.rotation_grace, "logLevel": "debug", "metricsPort": METRICS_PORT,
            "healthPort": HEALTH_PORT, "stateDir": str(self.dirs[i] / "state"),
            "keysFile": str(self.volumes[i].path("keys")) if self.mode == "ipsec" else None,
            "allowKeyRegeneration": False, "resyncPeriod": self.resync, "nodeGracePeriod": self.grace,
            "wireguard": {"interface": self.ifname(i), "port": WG_PORT, "keyEpoch": self.epochs[i],
                          "backend": self.backend},
        }

    def write_keys(self, text: str, nodes: Optional[Sequence[int]] = None) -> None:
        """The keys Secret changed: each node's kubelet swaps its volume."""
        for i in nodes if nodes is not None else range(len(self.c.nodes)):
            self.volumes[i].write({"keys": text})

    def node_object(self, node: LabNode, boot_id: Optional[str] = None) -> dict[str, Any]:
        return node_object(node.name, str(node.ip), str(node.pod_cidr), boot_id or node.boot_id)

    def register(self, i: int) -> None:
        self.api.add_node(self.node_object(self.c.nodes[i]))

    def register_all(self) -> None:
        for i in range(len(self.c.nodes)):
            self.register(i)

    # -- processes -------------------------------------------------------------

    def start(self, i: int) -> None:
        node = self.c.nodes[i]
        path = self.dirs[i] / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.config(i), indent=1))
        log = open(self.dirs[i] / "agent.log", "ab")
        cmd = ["ip", "netns", "exec", node.ns, sys.executable, "-m", "agent", "run", "--config", str(path),
               "--node", node.name, "--kubeconfig", str(self.kubeconfig)]
        self.procs[i] = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        log.close()

    def start_all(self) -> None:
        for i in range(len(self.c.nodes)):
            self.start(i)

    def stop(self, i: int, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        proc = self.procs.pop(i)
        proc.send_signal(sig)
        rc = proc.wait(timeout=timeout)
        self._collect_private_keys()
        return rc

    def kill(self, i: int) -> None:
        proc = self.procs.pop(i, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        self._collect_private_keys()

    def _collect_private_keys(self) -> None:
        """Every WireGuard private key in the state dirs (base64 and hex) joins the secrets."""
        for d in self.dirs:
            for name in (KEY_FILE, PREVIOUS_FILE):
                try:
                    raw = base64.b64decode(json.loads((d / "state" / name).read_text())["privateKey"])
                except (OSError, ValueError, KeyError):
                    continue
                for form in (base64.b64encode(raw).decode(), raw.hex()):
                    if form not in self.secrets:
                        self.secrets.append(form)

    def log(self, i: int) -> str:
        path = self.dirs[i] / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def redact(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "<redacted>") if s else text
        return text

    def assert_no_secret(self, text: str) -> None:
        self._collect_private_keys()
        # Not `assert secret not in text`: pytest would print both operands.
        leaked = sum(1 for s in self.secrets if s and s in text)
        assert leaked == 0, f"{leaked} key(s) appeared in agent output"

    # -- observing -------------------------------------------------------------

    def http(self, i: int, path: str, port: int = HEALTH_PORT) -> tuple[int, str]:
        node = self.c.nodes[i]
        return http_get(node.ns, str(node.ip), port, path)

    def metrics(self, i: int) -> dict[str, float]:
        """``/metrics`` as {'name{labels}': value} (the text format, parsed plainly)."""
        status, body = self.http(i, "/metrics", METRICS_PORT)
        assert status == 200, body
        out = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def status(self, i: int, *argv: str) -> str:
        """``python -m agent status ARGV`` on node i, as an operator runs it there (stdout; no key in it)."""
        cmd = ["ip", "netns", "exec", self.c.nodes[i].ns, sys.executable, "-m", "agent", "status", *argv]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=START_TIMEOUT,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        self.assert_no_secret(proc.stdout + proc.stderr)
        return proc.stdout

    def annotations(self, i: int) -> dict[str, str]:
        meta = self.api.get_node(self.c.nodes[i].name)["metadata"]
        return dict(meta.get("annotations") or {})

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
            except (OSError, AssertionError, KeyError) as e:
                last = e
            else:
                if last:
                    return last
            self._check_alive()
            time.sleep(interval)
        tails = "".join(f"\n--- {self.c.nodes[i].name} log tail ---\n{self.redact(self.log(i)[-1500:])}"
                        for i in self.procs)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r}){tails}")

    def _check_alive(self) -> None:
        for i, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"agent on {self.c.nodes[i].name} exited {proc.returncode}: "
                                     f"{self.log(i)[-3000:]}")

    def ready(self, i: int) -> bool:
        return self.http(i, "/readyz")[0] == 200

    def wait_ready(self, i: int, timeout: Optional[float] = None) -> None:
        self.wait(f"{self.c.nodes[i].name} ready", lambda: self.ready(i), timeout or START_TIMEOUT, 0.5)
        self._collect_private_keys()

    def wait_ready_all(self, timeout: Optional[float] = None) -> None:
        for i in self.procs:
            self.wait_ready(i, timeout)

    def restart_under_traffic(self, i: int, join: int, rate: float) -> tuple[Any, Any, float]:
        """Kill agent ``i`` (SIGKILL) and start it again while node ``join`` registers and starts,
        under counted UDP from node ``i``'s pod to the next node's; (capture, flow result, s to ready)."""
        a, b = self.c.nodes[i].pods[0], self.c.nodes[(i + 1) % len(self.c.nodes)].pods[0]
        self.register(join)
        with Capture(self.c.underlay_ns, self.c.bridge, bpf=f"not host {API_IP}", directory=str(self.tmp)) as cap, \
                Flow(a.ns, b.ns, str(b.ip), rate=rate) as flow:
            time.sleep(1)
            self.kill(i)
            start = time.monotonic()
            self.start(i)
            self.start(join)
            self.wait_ready(i)
            restarted = time.monotonic() - start
            self.wait_ready(join)
            time.sleep(2)
        assert flow.result is not None
        return cap, flow.result, restarted

    def ping_all(self, count: int = 2) -> list[tuple[str, str]]:
        """Every pod pings every other pod; the (src, dst) pairs that failed."""
        failed = []
        for a in self.c.pods():
            for b in self.c.pods():
                if a is not b and not self.c.ping(a, b, count=count):
                    failed.append((a.ns, b.ns))
        return failed
