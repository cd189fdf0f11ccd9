"""The daemon (``python -m agent run``) in WireGuard mode on the host, wireguard-go backend.

Three agents as real processes in their node namespaces, driven only by the
fake Kubernetes API server on the underlay and their config files.

Properties asserted:
- each agent generates its key pair, publishes the public key on its own
  Node (and only there), configures its peers from the others' annotations,
  and turns ready; all pod pairs reach each other and the underlay carries
  only WireGuard between node IPs;
- a node registered later joins: the others add it as a peer, its pods are
  reached; a node deleted from the API loses its peer on the others after
  the grace period;
- SIGTERM exits 0 and leaves the datapath: pods still reach each other with
  the agent gone, and a new agent adopts the interface without touching the
  peers' sessions;
- an API server that goes away leaves the datapath as it is; the agent
  counts watch restarts and recovers when it returns;
- /healthz, /readyz and /metrics answer with the numbers.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Iterator

import pytest

from lab.capture import Capture
from lab.topology import API_IP, Cluster
from tests.agents import DaemonCluster
from tests.wgcluster import wireguard_only

pytestmark = pytest.mark.privileged

PUBKEY = "sealnet.io/wireguard-public-key"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[DaemonCluster]:
    with Cluster(nodes=4, name="dwg", api_address=True) as c, \
            DaemonCluster(c, tmp_path, mode="wireguard", backend="userspace", grace=2.0) as d:
        for i in range(3):
            d.register(i)
            d.start(i)
        d.wait_ready_all()
        yield d


def peers(d: DaemonCluster, i: int) -> set[str]:
    out = d.c.run(d.c.nodes[i].ns, "wg", "show", d.ifname(i), "peers").stdout
    return set(out.split())


def node_ips(d: DaemonCluster, n: int) -> set[str]:
    return {str(node.ip) for node in d.c.nodes[:n]}


def test_agents_publish_keys_and_encrypt(cluster: DaemonCluster) -> None:
    d = cluster
    keys = [d.wait(f"{d.c.nodes[i].name} publishes its key", lambda i=i: d.annotations(i).get(PUBKEY))
            for i in range(3)]
    assert len(set(keys)) == 3
    for i in range(3):
        want = {k for j, k in enumerate(keys) if j != i}
        d.wait(f"peers of node {i}", lambda i=i, want=want: peers(d, i) == want)
    # Each agent patched its own Node only.
    for name, _, body in d.api.patches:
        assert set(body["metadata"]["annotations"]) <= {PUBKEY, "sealnet.io/wireguard-key-epoch",
                                                        "sealnet.io/wireguard-port",
                                                        "sealnet.io/wireguard-previous-key"}
    assert {name for name, _, _ in d.api.patches} == {n.name for n in d.c.nodes[:3]}
    pods = [n.pods[0] for n in d.c.nodes[:3]]
    # The agents' own API traffic (to 172.18.0.1) is not pod or node payload.
    with Capture(d.c.underlay_ns, d.c.bridge, bpf=f"not host {API_IP}", directory=str(d.tmp)) as cap:
        failed = [(a.ns, b.ns) for a in pods for b in pods if a is not b and not d.c.ping(a, b, count=2)]
    assert failed == []
    summary = cap.summary()
    assert wireguard_only(summary, node_ips(d, 3)) == []
    assert summary.count()["wireguard"] >= 12
    status, body = d.http(0, "/healthz")
    assert status == 200 and body == "ok\n"
    m = d.metrics(0)
    assert m["sealnet_agent_ready"] == 1.0
    assert m['sealnet_agent_peers{state="served"}'] == 2.0
    assert m['sealnet_agent_reconciles_total{result="ok"}'] >= 1
    assert m[f'sealnet_wireguard_peers{{interface="{d.ifname(0)}"}}'] == 2.0
    assert f'sealnet_wireguard_handshake_age_seconds{{interface="{d.ifname(0)}",peer="node-2"}}' in m
    assert m["sealnet_wireguard_rotation_peers_behind"] == 0.0


def test_node_joins_later_and_deleted_node_is_removed(cluster: DaemonCluster) -> None:
    d = cluster
    d.register(3)
    d.start(3)
    d.wait_ready(3)
    for i in range(4):
        d.wait(f"node {i} has 3 peers", lambda i=i: len(peers(d, i)) == 3)
    new, old = d.c.nodes[3].pods[0], d.c.nodes[0].pods[0]
    assert d.wait("pods of the new node reachable", lambda: d.c.ping(old, new) and d.c.ping(new, old))
    d.stop(3)
    d.api.delete_node(d.c.nodes[3].name)
    for i in range(3):
        d.wait(f"node {i} drops the deleted node", lambda i=i: len(peers(d, i)) == 2, timeout=20)


def test_sigterm_leaves_datapath_and_restart_adopts(cluster: DaemonCluster) -> None:
    d = cluster
    for i in range(3):
        d.wait(f"peers of node {i}", lambda i=i: len(peers(d, i)) == 2)
    a, b = d.c.nodes[0].pods[0], d.c.nodes[1].pods[0]
    assert d.wait("pods reachable", lambda: d.c.ping(a, b) and d.c.ping(b, a))
    before = d.c.run(d.c.nodes[0].ns, "wg", "show", d.ifname(0), "dump").stdout
    assert d.stop(0, signal.SIGTERM) == 0
    assert "stopped node=node-1" in d.log(0)
    assert d.c.ping(a, b, count=3) and d.c.ping(b, a, count=3), "datapath gone with the agent"
    d.start(0)
    d.wait_ready(0)
    after = d.c.run(d.c.nodes[0].ns, "wg", "show", d.ifname(0), "dump").stdout
    # Same private key, same peers (public key, endpoint, allowed IPs) after the restart.
    assert before.splitlines()[0] == after.splitlines()[0]
    strip = [line.split("\t")[:4] for line in before.splitlines()[1:]]
    assert sorted(strip) == sorted(line.split("\t")[:4] for line in after.splitlines()[1:])
    assert "wireguard peer add" not in d.log(0).split("starting node=node-1")[-1]


def test_api_server_away_keeps_datapath(cluster: DaemonCluster) -> None:
    d = cluster
    for i in range(3):
        d.wait(f"peers of node {i}", lambda i=i: len(peers(d, i)) == 2)
    d.api.set_unavailable(True)
    d.wait("watch restarts counted",
           lambda: sum(v for k, v in d.metrics(1).items() if k.startswith("sealnet_agent_watch_restarts_total")) > 0)
    a, c = d.c.nodes[1].pods[0], d.c.nodes[2].pods[0]
    assert d.c.ping(a, c, count=3) and d.c.ping(c, a, count=3)
    assert all(len(peers(d, i)) == 2 for i in range(3))
    assert d.http(1, "/readyz")[0] == 200
    d.api.set_unavailable(False)
    d.api.wait_for_watches(3, timeout=60)
    d.register(3)  # a change after recovery arrives through the new watch
    # node-4 has no agent, so no public key: blocked (unreachable routes), never in clear.
    d.wait("node-4 seen after the API came back",
           lambda: d.metrics(1)['sealnet_agent_peers{state="blocked"}'] == 1, timeout=60)
