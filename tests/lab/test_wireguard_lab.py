"""WireGuard mode on a kernel with the WireGuard module (kernel lab VM).

The same cluster as tests/privileged/test_wireguard_userspace.py, with the
kernel backend chosen by ``--backend auto``. Properties asserted:

- auto picks the kernel; every pod reaches every other pod and the underlay
  carries only UDP 51871<->51871 between node IPs (no pod address, no ping
  payload pattern in clear);
- a re-apply (restart) adopts the kernel interface and changes nothing;
  sessions and a running stream survive it;
- asking for userspace on an existing kernel interface is refused;
- a static key rotation (new epoch on one node, every agent re-applies at
  once): the traffic gap is measured from a 200 datagram/s stream and written
  to the lab results; nothing goes out in clear meanwhile;
- a mixed pair (one node kernel, one node wireguard-go) with nodeEncryption
  interoperates: pods and node-to-node TCP to the health port 4240 work, the
  TCP appears inside the kernel node's WireGuard interface and not on the
  underlay, WireGuard's own UDP is not looped into the tunnel, and the
  fwmark, rule and routes are as planned on both backends;
- 1000 peers reconcile into a kernel interface (batched netlink, multi-message
  dumps) and read back equal to the plan; a re-run changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from lab.capture import Capture, classify
from lab.topology import Cluster
from lab.udpflow import Flow
from tests.privileged.test_wireguard_userspace import HEALTH_CLIENT, HEALTH_SERVER, PATTERN
from tests.wgcluster import REPO, WgCluster, session_problems, wireguard_only

pytestmark = pytest.mark.kernel_lab


def record(name: str, data: dict[str, Any]) -> None:
    """Keep a measured figure with the lab run's results (and show it in the log)."""
    print(f"\n{name}: {json.dumps(data)}")
    results = os.environ.get("SEALNET_LAB_RESULTS")
    if results:
        Path(results, f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


@pytest.fixture(scope="module")
def wg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WgCluster]:
    for module in ("wireguard", "tun"):  # tun: /dev/net/tun for wireguard-go
        subprocess.run(["modprobe", module], check=False)
    with Cluster(nodes=3, name="wgk") as c, WgCluster(c, tmp_path_factory.mktemp("wgk"), "auto") as wg:
        wg.publish_keys()
        wg.apply_all()
        yield wg


def test_auto_picks_kernel_and_pods_are_encrypted(wg: WgCluster) -> None:
    assert [wg.link_kind(i) for i in range(3)] == ["wireguard"] * 3
    st = wg.status(0)
    assert (st["backend"], st["peers"], st["port"], st["mtu"], st["publicKey"]) == (
        "kernel", 2, 51871, 1420, wg.keys["node-1"])
    with wg.underlay_capture() as cap:
        failed = wg.ping_all(count=2, pattern=PATTERN)
    assert failed == []
    packets = cap.packets()
    summary = classify(packets)
    assert summary.count()["wireguard"] >= 12, summary
    assert wireguard_only(summary, {str(n.ip) for n in wg.c.nodes}) == []
    assert not [p for p in packets if bytes.fromhex(PATTERN) * 2 in bytes(p)]
    line = wg.agent(wg.c.nodes[0].ns, "status", "--mode", "wireguard", "--interface", wg.ifnames[0]).stdout
    assert line.strip().endswith("Port: 51871, Peers: 2, backend kernel)]")


def test_reapply_adopts_kernel_interface_without_disturbing(wg: WgCluster) -> None:
    assert wg.ping_all(count=1) == []
    before = wg.peers(0)
    a, b = wg.c.nodes[0].pods[0], wg.c.nodes[1].pods[0]
    with Flow(a.ns, b.ns, str(b.ip), rate=200) as flow:
        time.sleep(0.5)
        lines = wg.apply_all()
        time.sleep(0.5)
    assert flow.result is not None and flow.result.lost == 0, flow.result
    for line in lines:
        assert "backend kernel, peers 2 (+0 ~0 -0), routes +0 -0, rules +0 -0" in line, line
    assert session_problems(before, wg.peers(0)) == []


def test_userspace_requested_on_kernel_interface_is_refused(wg: WgCluster) -> None:
    argv = ["apply", "--mode", "wireguard", "--node", "node-1", "--nodes", str(wg.nodes_file),
            "--state-dir", str(wg.state_dirs[0]), "--interface", wg.ifnames[0], "--backend", "userspace"]
    proc = wg.agent(wg.c.nodes[0].ns, *argv, check=False)
    assert proc.returncode == 2
    assert f"{wg.ifnames[0]} already exists as a kernel WireGuard device" in proc.stderr


def test_static_key_rotation_gap_kernel(wg: WgCluster) -> None:
    # Last user of the module's cluster: it changes node-1's key.
    c = wg.c
    old = dict(wg.keys)
    assert wg.ping_all(count=1) == []
    a, b = c.nodes[0].pods[0], c.nodes[1].pods[0]
    with wg.underlay_capture() as cap:
        with Flow(a.ns, b.ns, str(b.ip), rate=200) as flow:
            time.sleep(1)
            # node-1 makes its new pair and publishes it; then every agent
            # applies the new description at once, as they would on seeing
            # the new annotation.
            new = wg.publish_keys(epochs={0: 1})
            wall = wg.apply_parallel(extra={0: ["--key-epoch", "1"]})
            time.sleep(3)
    result = flow.result
    assert result is not None
    assert new["node-1"] != old["node-1"] and new["node-2"] == old["node-2"]
    assert new["node-1"] in wg.peers(1) and old["node-1"] not in wg.peers(1)
    assert c.ping(a, b, count=2)
    assert "plaintext" not in cap.summary().kinds()
    record("wireguard-rotation-kernel", {"gap_ms": result.gap_ms, "lost": result.lost, "sent": result.sent,
                                          "applies_wall_s": round(wall, 2)})
    # The gap is the time for every agent to apply (TCG makes that slow)
    # plus one handshake; it must end, not last.
    assert result.gap_ms < 60000, result


def test_mixed_pair_with_node_encryption(tmp_path: Path) -> None:
    """node-1 kernel, node-2 wireguard-go, nodeEncryption on: they interoperate, node traffic is tunnelled."""
    with Cluster(nodes=2, name="wgmx") as c, WgCluster(c, tmp_path, ["kernel", "userspace"],
                                                       node_encryption=True) as wg:
        wg.publish_keys()
        wg.apply_all()
        assert [wg.link_kind(i) for i in range(2)] == ["wireguard", "tun"]
        n1, n2 = c.nodes
        server = subprocess.Popen(["ip", "netns", "exec", n2.ns, sys.executable, "-c", HEALTH_SERVER],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "listening"
            with wg.underlay_capture() as under, Capture(n1.ns, wg.ifnames[0], directory=str(tmp_path)) as inner:
                reply = c.run(n1.ns, sys.executable, "-c", HEALTH_CLIENT.format(ip=n2.ip), timeout=120).stdout
                failed = wg.ping_all(count=2)
        finally:
            server.kill()
            server.wait()
        assert failed == [] and reply.strip() == "ok"
        tunnel = inner.summary()
        health = [p for p, raw in zip(tunnel.packets, tunnel.raw)
                  if "TCP" in raw and 4240 in (raw["TCP"].sport, raw["TCP"].dport)]
        assert {(p.src, p.dst) for p in health} == {(str(n1.ip), str(n2.ip)), (str(n2.ip), str(n1.ip))}
        assert tunnel.count()["wireguard"] == 0, "WireGuard's own UDP was routed into the tunnel (loop)"
        underlay = under.summary()
        assert wireguard_only(underlay, {str(n1.ip), str(n2.ip)}) == []
        assert underlay.count()["wireguard"] >= 8
        for i, node in enumerate(c.nodes):
            assert c.run(node.ns, "wg", "show", wg.ifnames[i], "fwmark").stdout.strip() == "0x5e"
            assert "not from all fwmark 0x5e lookup 51871 proto 94" in c.run(node.ns, "ip", "rule").stdout
        route = c.run(n1.ns, "ip", "route", "get", str(n2.ip)).stdout
        assert f"dev {wg.ifnames[0]} table 51871 src {n1.ip}" in route
        marked = c.run(n1.ns, "ip", "route", "get", str(n2.ip), "mark", "0x5e").stdout
        assert f"dev {n1.dev}" in marked, "WireGuard's own packets must leave through the underlay"


def test_thousand_peers_into_kernel_interface() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "wireguard_peers.py"), "--backend", "kernel",
                           "--n", "1000", "--methods", "sealnet", "--verify", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])[0]
    assert row["peers_ok"] and row["verified"] and row["added"] == 1000
    assert row["noop_changes"] == 0
    assert row["one_change"] == [1, 2, 2]  # one peer updated; its new CIDR's 2 routes added, the old 2 removed
    record("wireguard-1000-peers-kernel", {k: row[k] for k in ("wall_s", "work_s", "peers_s", "noop_s",
                                                                "one_change_s", "rss_mib")})
