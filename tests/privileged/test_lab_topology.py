"""The lab's building blocks on the host kernel (no ESP needed).

- the topology routes every pod pair host-gw style over the underlay, in clear;
- the classifier sees that pod traffic as plaintext;
- the UDP flow accounts for every datagram: none lost on a clean path, and
  exactly the ones dropped while an XFRM block policy stood (which also moves
  XfrmOutPolBlock), with the gap measured.
"""

from __future__ import annotations

import itertools
import time

import pytest

from lab.capture import Capture
from lab.counters import delta, xfrm_stat
from lab.topology import Cluster
from lab.udpflow import Flow

pytestmark = pytest.mark.privileged


def test_pods_reach_each_other_host_gw_style_in_clear() -> None:
    with Cluster(nodes=3, pods_per_node=2, name="tp") as c:
        with Capture(c.underlay_ns, c.bridge) as cap:
            pairs = list(itertools.permutations(c.pods(), 2))
            reach = {(a.ns, b.ns): c.ping(a, b) for a, b in pairs}
        assert all(reach.values()), reach
        route = c.run(c.nodes[0].ns, "ip", "route", "get", str(c.nodes[1].pods[0].ip)).stdout
        assert f"via {c.nodes[1].ip}" in route
        seen = cap.summary()
        # Same-node pairs never touch the underlay; the 24 cross-node pairs do.
        cross = sum(1 for a, b in pairs if a.node != b.node)
        assert seen.count()["plaintext"] == 2 * cross, seen
        assert len(c.description()["nodes"]) == 3
        assert len({n.boot_id for n in c.nodes}) == 3


def test_flow_counts_exactly_the_datagrams_a_block_policy_drops() -> None:
    with Cluster(nodes=2, name="tf") as c:
        a, b = c.nodes[0].pods[0], c.nodes[1].pods[0]
        node = c.nodes[0]
        with Flow(a.ns, b.ns, str(b.ip), rate=500) as clean:
            time.sleep(1)
        assert clean.result is not None and clean.result.sent > 300
        assert clean.result.lost == 0 and clean.result.longest_gap == 0, clean.result

        before = xfrm_stat(node.ns)
        with Flow(a.ns, b.ns, str(b.ip), rate=500) as blocked:
            time.sleep(0.5)
            c.run(node.ns, "ip", "xfrm", "policy", "add", "src", str(node.pod_cidr), "dst",
                  str(c.nodes[1].pod_cidr), "dir", "fwd", "action", "block")
            time.sleep(0.5)
            c.run(node.ns, "ip", "xfrm", "policy", "del", "src", str(node.pod_cidr), "dst",
                  str(c.nodes[1].pod_cidr), "dir", "fwd")
            time.sleep(0.5)
        r = blocked.result
        assert r is not None
        # A forwarded packet that hits a block policy counts as XfrmInPolBlock
        # (__xfrm_policy_check for XFRM_POLICY_FWD).
        moved = delta(before, xfrm_stat(node.ns))
        assert r.lost > 100 and r.received > 300, r
        assert moved == {"XfrmInPolBlock": r.lost}, (r, moved)
        assert r.longest_gap == r.lost  # one contiguous outage
        assert 300 <= r.gap_ms <= 1500, r
