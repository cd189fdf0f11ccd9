"""Benchmark: one daemon (``python -m agent run``) serving N peers from the fake API server.

For each N, in a throwaway network namespace: the fake API server (the
tests' fixture, real HTTP) holds the local Node and N peer Nodes with
WireGuard public keys; one agent process runs in WireGuard mode on the
wireguard-go backend (the host has no ESP, so the IPsec daemon cannot be
measured here; bench/xfrm_policies.py measures its kernel writes). Measured:

- start -> ready: process start until /readyz answers 200 (list + first pass);
- event -> programmed: one Node added through the API until the agent logs
  the end of the pass that configured it (log timestamps, ms);
- burst: 1000 Nodes (or N if fewer) get a new public key at once; the
  passes it cost and their summed work (the agent's own duration_ms);
- idle: RSS and CPU of the agent process over ``--idle`` seconds (a resync
  pass included when the period allows).

    sudo .venv/bin/python bench/daemon_nodes.py                   # N = 100 1000 5000, idle 60 s
    sudo .venv/bin/python bench/daemon_nodes.py --n 100 1000 --idle 30 --resync 20
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402

from lab.netns import http_get, listening_socket  # noqa: E402
from tests.fakeapi import FakeApiServer, node_object  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NS = "sbench"
IFNAME = "sbenchwg0"
LOCAL_IP = "172.31.0.1"
PASS = re.compile(r"^(\S+ \S+) \w+ agent.cluster.loop reconciled reasons=(\S+) duration_ms=([\d.]+)")


def pubkey() -> str:
    raw = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def peer(i: int, key: str) -> dict:
    ip = f"172.31.{1 + i // 250}.{1 + i % 250}"
    return node_object(f"peer-{i}", ip, f"10.{100 + i // 250}.{i % 250}.0/24", boot_id=f"boot-{i}",
                       annotations={"sealnet.io/wireguard-public-key": key})


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def passes(log: Path, since: float) -> list[tuple[float, str, float]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = PASS.match(line)
        if m:
            ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if ts >= since:
                out.append((ts, m.group(2), float(m.group(3))))
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_one(n: int, idle: float, resync: float, tmp: Path) -> dict:
    sh("ip", "netns", "add", NS)
    try:
        sh("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", NS, "ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
        sh("ip", "netns", "exec", NS, "ip", "addr", "add", f"{LOCAL_IP}/16", "dev", "ul0")
        for dev in ("ul0", "ul1"):
            sh("ip", "netns", "exec", NS, "ip", "link", "set", dev, "up")
        with FakeApiServer(sock=listening_socket(NS, "127.0.0.1", 6443)) as api:
            api.add_node(node_object("local", LOCAL_IP, "10.99.0.0/24", boot_id="boot-local"))
            for i in range(n):
                api.add_node(peer(i, pubkey()))
            kubeconfig = api.kubeconfig(tmp / "kubeconfig", server="http://127.0.0.1:6443")
            config = tmp / "config.json"
            config.write_text(json.dumps({
                "mode": "wireguard", "nodeEncryption": False, "perNodeKeys": True, "spiPrefix": 5,
                "rotationGracePeriod": 300, "logLevel": "debug", "metricsPort": 9878, "healthPort": 9879,
                "stateDir": str(tmp / "state"), "keysFile": None, "allowKeyRegeneration": False,
                "resyncPeriod": resync, "nodeGracePeriod": 60,
                "wireguard": {"interface": IFNAME, "port": 51871, "keyEpoch": 0, "backend": "userspace"}}))
            log = tmp / "agent.log"
            start = time.time()
            with open(log, "wb") as out:
                proc = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-m", "agent", "run",
                                         "--config", str(config), "--node", "local", "--kubeconfig",
                                         str(kubeconfig)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            try:
                while True:
                    try:
                        if http_get(NS, "127.0.0.1", 9879, "/readyz")[0] == 200:
                            break
                    except OSError:
                        pass
                    if proc.poll() is not None or time.time() - start > 600:
                        raise RuntimeError(f"agent did not get ready: {log.read_text()[-2000:]}")
                    time.sleep(0.05)
                ready = time.time() - start
                time.sleep(1.0)
                # One Node event -> the pass that programmed it.
                t0 = time.time()
                api.add_node(peer(n, pubkey()))
                while not [p for p in passes(log, t0) if "node" in p[1]]:
                    time.sleep(0.01)
                event_ms = ([p for p in passes(log, t0) if "node" in p[1]][0][0] - t0) * 1000
                time.sleep(1.0)
                # A burst: 1000 Nodes (or all) get a new public key.
                burst_n = min(1000, n)
                keys = [pubkey() for _ in range(burst_n)]
                t1 = time.time()
                for i in range(burst_n):
                    api.update_node(f"peer-{i}", lambda o, k=keys[i]: o["metadata"]["annotations"].update(
                        {"sealnet.io/wireguard-public-key": k}))
                time.sleep(3.0)
                burst = [p for p in passes(log, t1) if p[1] != "resync"]
                # Idle.
                c0, w0 = cpu_seconds(proc.pid), time.time()
                time.sleep(idle)
                cpu = (cpu_seconds(proc.pid) - c0) / (time.time() - w0) * 100
                rss = rss_mb(proc.pid)
                idle_passes = passes(log, w0)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        return {"n": n, "ready_s": ready, "event_ms": event_ms, "burst_nodes": burst_n,
                "burst_passes": len(burst), "burst_work_s": sum(p[2] for p in burst) / 1000,
                "idle_cpu_pct": cpu, "idle_rss_mb": rss,
                "resync_ms": max((p[2] for p in idle_passes), default=float("nan"))}
    finally:
        subprocess.run(["ip", "netns", "exec", NS, "ip", "link", "del", IFNAME], capture_output=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle measurement")
    parser.add_argument("--resync", type=float, default=30.0, help="the agent's resyncPeriod during the run")
    args = parser.parse_args()
    rows = []
    for n in args.n:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run_one(n, args.idle, args.resync, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f"daemon, WireGuard (wireguard-go), host; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| N peers | start -> ready | Node event -> programmed | burst: Nodes, passes, work | "
          "resync pass (idle) | idle CPU | idle RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['n']} | {r['ready_s']:.2f} s | {r['event_ms']:.0f} ms | {r['burst_nodes']}, "
              f"{r['burst_passes']}, {r['burst_work_s']:.2f} s | {r['resync_ms']:.0f} ms | "
              f"{r['idle_cpu_pct']:.2f} % | {r['idle_rss_mb']:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
