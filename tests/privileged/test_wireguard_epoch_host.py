"""WireGuard key epoch rotation across three daemons, counted packet by packet (wireguard-go).

A new ``sealnet:rotation`` in wireguard mode changes ``wireguard.keyEpoch``
in the agents' config, which rolls the DaemonSet: each agent is stopped
(SIGTERM, the datapath stays) and started again with the new epoch, one node
after the other. UDP runs between pods on every node pair (a ring, one flow
per pair) at 100 packets per second through the whole rotation and every
sequence number is accounted for.

Properties asserted:
- nothing is lost and the underlay carries only WireGuard between node IPs
  (ports 51871 and, for the new key's interface, 51872);
- a node that has not rolled yet is reached over the old key pair: the
  rolled nodes keep the previous interface and advertise the previous key
  past the grace period, name it behind in their metrics, and move to the
  new interface as soon as it rolls;
- an agent killed (SIGKILL) mid-rotation comes back on the same two key
  pairs, without touching the sessions;
- afterwards every node has one interface, holding a new key pair that its
  Node advertises, and no previous key.
Each prints the time from the first node's restart to the last peer's egress
switch and the packets counted. The kernel module does the same in
tests/lab/test_daemon_wireguard_lab.py.
"""

from __future__ import annotations

import signal
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import pytest

from lab.capture import Capture, classify
from lab.topology import API_IP, Cluster
from lab.udpflow import Flow
from tests.agents import DaemonCluster
from tests.wgcluster import wireguard_only

pytestmark = pytest.mark.privileged

RATE = 100
GRACE = 3.0
PUBKEY, EPOCH, PREVIOUS = ("sealnet.io/wireguard-public-key", "sealnet.io/wireguard-key-epoch",
                           "sealnet.io/wireguard-previous-key")


@pytest.fixture
def d(tmp_path: Path) -> Iterator[DaemonCluster]:
    with Cluster(nodes=3, name="wep", api_address=True) as c, \
            DaemonCluster(c, tmp_path, mode="wireguard", backend="userspace", rotation_grace=GRACE) as dc:
        dc.register_all()
        dc.start_all()
        dc.wait_ready_all()
        for i in range(3):
            dc.wait(f"node {i} on epoch 0 with 2 peers", lambda i=i: egress(dc, i) == {0.0: 2})
        yield dc


def egress(d: DaemonCluster, i: int) -> dict[float, int]:
    """Epoch -> number of peers whose routes use that epoch's interface, from node i's metrics."""
    out: dict[float, int] = {}
    for k, v in d.metrics(i).items():
        if k.startswith("sealnet_wireguard_peer_egress_epoch{"):
            out[v] = out.get(v, 0) + 1
    return out


def links(d: DaemonCluster, i: int) -> set[str]:
    node = d.c.nodes[i]
    return {name for name in d.ifnames(i)
            if d.c.run(node.ns, "ip", "link", "show", name, check=False).returncode == 0}


def roll(d: DaemonCluster, i: int, epoch: int) -> None:
    """The DaemonSet's rolling update on node i: SIGTERM, start with the new keyEpoch, ready."""
    assert d.stop(i, signal.SIGTERM) == 0
    d.epochs[i] = epoch
    d.start(i)
    d.wait_ready(i)


class Counted:
    """A capture on the underlay and a 100 pps UDP flow on every node pair, around a rotation."""

    def __init__(self, d: DaemonCluster) -> None:
        self.d, self.stack = d, ExitStack()

    def __enter__(self) -> "Counted":
        d = self.d
        self.cap = self.stack.enter_context(Capture(d.c.underlay_ns, d.c.bridge, bpf=f"not host {API_IP}",
                                                    directory=str(d.tmp)))
        pods = [n.pods[0] for n in d.c.nodes]
        self.flows = [self.stack.enter_context(Flow(pods[i].ns, pods[(i + 1) % 3].ns, str(pods[(i + 1) % 3].ip),
                                                    port=5001 + i, rate=RATE)) for i in range(3)]
        time.sleep(1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def check(self, switched_after: float, what: str) -> None:
        results = [f.result for f in self.flows]
        print(f"\n{what}: last egress switch {switched_after:.1f} s after the first node's restart; "
              + "; ".join(str(r) for r in results))
        for r in results:
            assert r is not None and r.lost == 0 and r.sent > RATE, str(r)
        summary = classify(self.cap.packets())
        assert wireguard_only(summary, {str(n.ip) for n in self.d.c.nodes}) == [], str(summary)
        ports = {p["UDP"].sport for p in summary.raw if p.haslayer("UDP")}
        assert ports == {51871, 51872}, ports  # both key pairs carried traffic


def test_rolling_epoch_change_loses_nothing(d: DaemonCluster) -> None:
    old = {i: d.annotations(i)[PUBKEY] for i in range(3)}
    with Counted(d) as counted:
        started = time.monotonic()
        roll(d, 0, 1)
        assert d.annotations(0)[PREVIOUS] == f"0 51871 {old[0]}"
        roll(d, 1, 1)
        # 0 and 1 talk over their new keys; node 2 has not rolled and is reached over the old pair.
        for i in (0, 1):
            d.wait(f"node {i}: node 1/0 on epoch 1, node 2 on epoch 0",
                   lambda i=i: egress(d, i) == {1.0: 1, 0.0: 1}, timeout=30)
        time.sleep(GRACE + 1)
        for i in (0, 1):
            assert links(d, i) == set(d.ifnames(i)), "previous interface retired with a peer behind"
            assert d.metrics(i)["sealnet_wireguard_rotation_peers_behind"] == 1.0
            assert PREVIOUS in d.annotations(i)
        assert egress(d, 2) == {0.0: 2}
        roll(d, 2, 1)
        switched = d.wait("every peer on epoch 1", lambda: all(egress(d, i) == {1.0: 2} for i in range(3)),
                          timeout=60) and time.monotonic() - started
        finish_end_state(d, old)
    counted.check(switched, "rolling epoch change 0 -> 1")


def test_agent_killed_mid_rotation_keeps_both_key_pairs(d: DaemonCluster) -> None:
    old = {i: d.annotations(i)[PUBKEY] for i in range(3)}
    with Counted(d) as counted:
        started = time.monotonic()
        roll(d, 0, 1)
        roll(d, 1, 1)
        d.wait("0 and 1 on their new keys", lambda: egress(d, 0) == {1.0: 1, 0.0: 1}, timeout=30)
        new0 = d.annotations(0)[PUBKEY]
        before = d.c.run(d.c.nodes[0].ns, "wg", "show", "all", "dump").stdout
        d.kill(0)
        d.start(0)
        d.wait_ready(0)
        assert d.annotations(0)[PUBKEY] == new0 and d.annotations(0)[PREVIOUS] == f"0 51871 {old[0]}"
        after = d.c.run(d.c.nodes[0].ns, "wg", "show", "all", "dump").stdout
        # Same key pairs and peers on both interfaces (interface, private key / peer key, endpoint, IPs).
        assert sorted(line.split("\t")[:5] for line in before.splitlines()) == \
            sorted(line.split("\t")[:5] for line in after.splitlines())
        roll(d, 2, 1)
        switched = d.wait("every peer on epoch 1", lambda: all(egress(d, i) == {1.0: 2} for i in range(3)),
                          timeout=60) and time.monotonic() - started
        finish_end_state(d, old)
    counted.check(switched, "epoch change with a kill -9 mid-rotation")


def finish_end_state(d: DaemonCluster, old: dict[int, str]) -> None:
    """One interface per node after the grace period: the new key, advertised; no previous key."""
    d.wait("previous interfaces retired", lambda: all(len(links(d, i)) == 1 and PREVIOUS not in d.annotations(i)
                                                       for i in range(3)), timeout=GRACE + 30)
    for i in range(3):
        (iface,) = links(d, i)
        assert iface == d.ifnames(i)[1]
        key = d.c.run(d.c.nodes[i].ns, "wg", "show", iface, "public-key").stdout.strip()
        ann = d.annotations(i)
        assert ann[PUBKEY] == key and ann[EPOCH] == "1" and key not in old.values()
        assert d.metrics(i)["sealnet_wireguard_rotation_peers_behind"] == 0.0
    time.sleep(1)
