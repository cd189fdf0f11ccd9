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
from pathlib import Path
from typing import Iterator

import pytest

from lab.topology import Cluster
from tests.agents import DaemonCluster
from tests.wgepochs import PREVIOUS, PUBKEY, Counted, egress, finish_end_state, links

pytestmark = pytest.mark.privileged

RATE = 100
GRACE = 3.0


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


def roll(d: DaemonCluster, i: int, epoch: int) -> None:
    """The DaemonSet's rolling update on node i: SIGTERM, start with the new keyEpoch, ready."""
    assert d.stop(i, signal.SIGTERM) == 0
    d.epochs[i] = epoch
    d.start(i)
    d.wait_ready(i)


def test_rolling_epoch_change_loses_nothing(d: DaemonCluster) -> None:
    old = {i: d.annotations(i)[PUBKEY] for i in range(3)}
    with Counted(d, RATE) as counted:
        started = time.monotonic()
        roll(d, 0, 1)
        assert d.annotations(0)[PREVIOUS] == f"0 51871 {old[0]}"
        roll(d, 1, 1)
        # 0 and 1 talk over their new keys; node 2 has not rolled and is reached over the old pair.
        for i in (0, 1):
            d.wait(f"node {i}: node 1/0 on epoch 1, node 2 on epoch 0",
                   lambda i=i: egress(d, i) == {1.0: 1, 0.0: 1}, timeout=30)
        line = d.status(0, "--mode", "wireguard", "--interface", d.ifname(0))
        assert d.ifnames(0)[0] in line and d.ifnames(0)[1] in line and "key epoch rotation in progress" in line, line
        time.sleep(GRACE + 1)
        for i in (0, 1):
            assert links(d, i) == set(d.ifnames(i)), "previous interface retired with a peer behind"
            assert d.metrics(i)["sealnet_wireguard_rotation_peers_behind"] == 1.0
            assert PREVIOUS in d.annotations(i)
        assert egress(d, 2) == {0.0: 2}
        roll(d, 2, 1)
        switched = d.wait("every peer on epoch 1", lambda: all(egress(d, i) == {1.0: 2} for i in range(3)),
                          timeout=60) and time.monotonic() - started
        finish_end_state(d, old, GRACE)
    counted.check(switched, "rolling epoch change 0 -> 1")


def test_agent_killed_mid_rotation_keeps_both_key_pairs(d: DaemonCluster) -> None:
    old = {i: d.annotations(i)[PUBKEY] for i in range(3)}
    with Counted(d, RATE) as counted:
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
        finish_end_state(d, old, GRACE)
    counted.check(switched, "epoch change with a kill -9 mid-rotation")
