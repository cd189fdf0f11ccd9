"""The daemon (``python -m agent run``) in WireGuard mode on a real kernel (the wireguard module).

Agents are real processes in their node namespaces, driven only by the
fake Kubernetes API server on the underlay and their config files; the
backend is ``auto``, which must pick the kernel module here.

Properties asserted:
- each agent makes its key pair, publishes the public key on its own Node,
  configures the others as peers on a kernel WireGuard interface and turns
  ready; all pod pairs reach each other and the underlay carries only
  WireGuard between node IPs;
- an agent killed (SIGKILL) and restarted under counted UDP traffic loses no
  packet and sends none in clear: the interface, its key and its peers stay;
  a node registered meanwhile joins and its pods are reached;
- a deleted Node's peer is removed after the grace period;
- /metrics reports the handshake age of each peer;
- a key epoch change (``sealnet:rotation`` in wireguard mode) under counted
  UDP on every node pair loses nothing and sends nothing in clear: each
  agent brings its new key pair up on a second kernel interface beside the
  old one, moves each peer's routes once both sides advertise the new key,
  and retires the old pair after the grace period. The three agents restart
  together here (the DaemonSet rolls one node at a time; the host test
  tests/privileged/test_wireguard_epoch_host.py rolls them one by one):
  under TCG an agent start takes a minute or more, and together is also the
  harder case, every node mid-rotation at once.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from lab.capture import Capture
from lab.topology import API_IP, Cluster
from tests.agents import DaemonCluster
from tests.wgcluster import wireguard_only
from tests.wgepochs import Counted, egress, finish_end_state

pytestmark = [pytest.mark.kernel_lab, pytest.mark.timeout(1800)]

PUBKEY = "sealnet.io/wireguard-public-key"
RATE = 200
ROTATION_GRACE = 10.0


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonCluster]:
    tmp: Path = tmp_path_factory.mktemp("daemon-wg")
    with Cluster(nodes=4, name="dwl", api_address=True) as c, \
            DaemonCluster(c, tmp, mode="wireguard", backend="auto", resync=2.0, grace=3.0,
                           rotation_grace=ROTATION_GRACE) as dc:
        for i in range(3):
            dc.register(i)
        start = time.monotonic()
        for i in range(3):
            dc.start(i)
        dc.wait_ready_all()
        print(f"\n3 WireGuard agents ready {time.monotonic() - start:.1f} s after start")
        yield dc


def peers(d: DaemonCluster, i: int) -> set[str]:
    return set(d.c.run(d.c.nodes[i].ns, "wg", "show", d.ifname(i), "peers").stdout.split())


def underlay(d: DaemonCluster) -> Capture:
    return Capture(d.c.underlay_ns, d.c.bridge, bpf=f"not host {API_IP}", directory=str(d.tmp))


def test_kernel_interfaces_keys_published_and_encrypted(d: DaemonCluster) -> None:
    keys = [d.wait(f"node {i} key", lambda i=i: d.annotations(i).get(PUBKEY)) for i in range(3)]
    for i in range(3):
        kind = d.c.run(d.c.nodes[i].ns, "ip", "-d", "-o", "link", "show", d.ifname(i)).stdout
        assert " wireguard " in kind, kind
        d.wait(f"peers of node {i}", lambda i=i: peers(d, i) == {k for j, k in enumerate(keys) if j != i})
    pods = [n.pods[0] for n in d.c.nodes[:3]]
    with underlay(d) as cap:
        failed = [(a.ns, b.ns) for a in pods for b in pods if a is not b and not d.c.ping(a, b, count=2)]
    assert failed == []
    summary = cap.summary()
    assert wireguard_only(summary, {str(n.ip) for n in d.c.nodes[:3]}) == [], str(summary)
    m = d.metrics(0)
    assert m["sealnet_agent_ready"] == 1.0 and m[f'sealnet_wireguard_peers{{interface="{d.ifname(0)}"}}'] == 2.0
    ages = [v for k, v in m.items() if k.startswith("sealnet_wireguard_handshake_age_seconds{")]
    assert len(ages) == 2 and all(0 <= a < 120 for a in ages), ages


def test_restart_under_traffic_and_join(d: DaemonCluster) -> None:
    a = d.c.nodes[0].pods[0]
    before = d.c.run(d.c.nodes[0].ns, "wg", "show", d.ifname(0), "public-key").stdout
    cap, result, restarted = d.restart_under_traffic(0, join=3, rate=RATE)
    print(f"\nWireGuard agent restart under traffic: ready {restarted:.1f} s after start; {result}")
    assert result.lost == 0 and result.sent > RATE, str(result)
    summary = cap.summary()
    assert wireguard_only(summary, {str(n.ip) for n in d.c.nodes}) == [], str(summary)
    assert d.c.run(d.c.nodes[0].ns, "wg", "show", d.ifname(0), "public-key").stdout == before
    new = d.c.nodes[3].pods[0]
    assert d.wait("the new node's pods reachable", lambda: d.c.ping(a, new) and d.c.ping(new, a), timeout=60)


def test_deleted_node_peer_removed(d: DaemonCluster) -> None:
    gone = d.c.nodes[3]
    key = d.annotations(3)[PUBKEY]
    d.kill(3)
    d.api.delete_node(gone.name)
    start = time.monotonic()
    for i in range(3):
        d.wait(f"node {i} drops the deleted node's peer", lambda i=i: key not in peers(d, i), timeout=30)
    print(f"\ndeleted node's peer removed {time.monotonic() - start:.1f} s after the DELETE (grace {d.grace:g} s)")


def test_epoch_change_under_traffic_loses_nothing(d: DaemonCluster) -> None:
    old = {i: d.annotations(i)[PUBKEY] for i in range(3)}
    # Alone (-k epoch) this test may come straight after the fixture, before every first handshake.
    d.wait("every peer on epoch 0", lambda: all(egress(d, i) == {0.0: 2} for i in range(3)), timeout=120)
    with Counted(d, rate=100) as counted:
        started = time.monotonic()
        for i in range(3):  # the config now says keyEpoch 1: every agent restarts with it
            assert d.stop(i, signal.SIGTERM) == 0
            d.epochs[i] = 1
        for i in range(3):
            d.start(i)
        d.wait_ready_all()
        ready = time.monotonic() - started
        switched = d.wait("every peer on epoch 1", lambda: all(egress(d, i) == {1.0: 2} for i in range(3)),
                          timeout=120) and time.monotonic() - started
        for i in range(3):
            kind = d.c.run(d.c.nodes[i].ns, "ip", "-d", "-o", "link", "show", d.ifnames(i)[1]).stdout
            assert " wireguard " in kind, kind
        finish_end_state(d, old, ROTATION_GRACE)
        retired = time.monotonic() - started
    print(f"\nkernel WireGuard epoch 0 -> 1: agents ready {ready:.1f} s, previous pairs retired {retired:.1f} s "
          f"after the restart (grace {ROTATION_GRACE:g} s)")
    counted.check(switched, "kernel WireGuard epoch change 0 -> 1")
