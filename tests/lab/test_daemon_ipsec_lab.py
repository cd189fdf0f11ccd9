"""The daemon (``python -m agent run``) in IPsec mode on a real kernel, end to end.

Agents are real processes in their node namespaces of the lab cluster,
driven only by the fake Kubernetes API server on the underlay and by their
mounted files (config, the keys Secret as the kubelet swaps it). One cluster
for the module: a new Python process costs a minute or more under TCG, so
agents are started as few times as the properties allow.

Properties asserted:
- three agents list the Nodes, program the mesh, publish the installed key
  IDs on their own Node and turn ready; all pod pairs reach each other with
  only ESP on the underlay, one SPI per sender, XFRM error counters
  unchanged; /metrics answers with SA sequence numbers and xfrm_stat;
- an SA deleted by hand comes back within the resync period;
- a bad keys file is refused: the last good keys stay in use (ESP goes on),
  the metric says so and an Event is recorded on the Node;
- an agent killed (SIGKILL) and restarted under counted UDP traffic loses no
  packet and sends none in clear (it adopts the SAs: sequence numbers go on);
  a node registered meanwhile joins;
- a peer reboot (new boot ID) re-keys that pair only, never in clear; the
  packets lost in the swap are counted and printed (bounded by watch latency);
- a deleted Node's SAs and policies are removed after the grace period;
- SIGTERM exits 0 and leaves the datapath in place.
"""

from __future__ import annotations

import ipaddress
import signal
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from agent.kernel.xfrm import Xfrm
from lab.capture import Capture
from lab.counters import delta, xfrm_stat
from lab.topology import API_IP, Cluster
from lab.udpflow import Flow
from tests.agents import DaemonCluster

pytestmark = [pytest.mark.kernel_lab, pytest.mark.timeout(1800)]

KEY = "5c7dc606a6e901eb92accc3063c5259ddca19049"
KEYS = f"3+ rfc4106(gcm(aes)) {KEY} 128\n"
ERRORS = ("XfrmInNoStates", "XfrmInStateProtoError", "XfrmInStateSeqError", "XfrmOutNoStates")
RATE = 200


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonCluster]:
    tmp: Path = tmp_path_factory.mktemp("daemon-ipsec")
    with Cluster(nodes=4, name="dip", api_address=True) as c, \
            DaemonCluster(c, tmp, mode="ipsec", keys=KEYS, resync=2.0, grace=3.0, secrets=[KEY]) as dc:
        for i in range(3):
            dc.register(i)
        start = time.monotonic()
        for i in range(3):
            dc.start(i)
        dc.wait_ready_all()
        print(f"\n3 agents ready {time.monotonic() - start:.1f} s after start")
        yield dc


def underlay(d: DaemonCluster) -> Capture:
    # The agents' API traffic (to 172.18.0.1) is not pod or node payload.
    return Capture(d.c.underlay_ns, d.c.bridge, bpf=f"not host {API_IP}", directory=str(d.tmp))


def sas(d: DaemonCluster, i: int) -> list:
    with Xfrm.open(netns=d.c.nodes[i].ns) as x:
        return x.dump_sas()


def errors(d: DaemonCluster, n: int = 3) -> dict[str, dict[str, int]]:
    return {d.c.nodes[i].ns: xfrm_stat(d.c.nodes[i].ns) for i in range(n)}


def no_new_errors(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {ns: {k: v for k, v in delta(before[ns], after[ns]).items() if k in ERRORS} for ns in before
            if any(k in ERRORS for k in delta(before[ns], after[ns]))}


def test_mesh_ready_encrypted_and_observable(d: DaemonCluster) -> None:
    for i in range(3):
        assert d.wait(f"node {i} publishes its keys", lambda i=i: d.annotations(i).get("sealnet.io/ipsec-keys")) == "3"
    before = errors(d)
    pods = [n.pods[0] for n in d.c.nodes[:3]]
    with underlay(d) as cap:
        failed = [(a.ns, b.ns) for a in pods for b in pods if a is not b and not d.c.ping(a, b, count=2)]
    assert failed == []
    summary = cap.summary()
    assert summary.kinds() == {"esp"}, str(summary)
    for (src, _), spis in summary.spis().items():
        low = int(ipaddress.ip_address(src)) & 0xFFFFFF
        assert spis == {0x5 << 28 | low << 4 | 3}
    assert no_new_errors(before, errors(d)) == {}
    m = d.metrics(0)
    assert m["sealnet_agent_ready"] == 1.0 and m['sealnet_agent_peers{state="served"}'] == 2.0
    assert m['sealnet_ipsec_keys_installed{key_id="3"}'] == 1.0 and m["sealnet_ipsec_current_key_id"] == 3.0
    assert m['sealnet_ipsec_peer_egress_key_id{peer="node-2"}'] == 3.0
    seq = [v for k, v in m.items() if k.startswith("sealnet_ipsec_sa_sequence{")]
    assert len(seq) == 4 and max(seq) >= 4  # 2 peers x (in, out), pings counted
    assert 'sealnet_xfrm_stat{counter="XfrmInNoStates"}' in m
    assert d.http(0, "/healthz") == (200, "ok\n")


def test_drift_repaired_and_bad_keys_file_refused(d: DaemonCluster) -> None:
    node = d.c.nodes[0]
    # An inbound SA: re-added, its fresh replay state accepts the peer's
    # sequence numbers as they go on. (An outbound SA deleted by hand comes
    # back counting from 1 and the peer's replay window drops it until it
    # passes the old count: see the README's limits.)
    victim = next(sa for sa in sas(d, 0) if sa.dst == node.ip and sa.src == d.c.nodes[1].ip)
    d.c.run(node.ns, "ip", "xfrm", "state", "delete", "dst", str(victim.dst), "proto", "esp",
            "spi", hex(victim.spi))
    start = time.monotonic()
    d.wait("the deleted SA comes back", lambda: any(s.spi == victim.spi and s.dst == victim.dst for s in sas(d, 0)),
           timeout=15)
    print(f"\nSA deleted by hand restored in {time.monotonic() - start:.1f} s (resync {d.resync:g} s)")

    a, b = d.c.nodes[0].pods[0], d.c.nodes[1].pods[0]
    assert d.c.ping(a, b, count=3) and d.c.ping(b, a, count=3), "traffic after the repair"
    events_before = len(d.api.created_events())
    d.write_keys(f"4+ rfc4106(gcm(aes)) {KEY[:-1]} 128\n", nodes=[0])  # odd hex: refused
    try:
        _bad_keys_file_refused(d, events_before)
    finally:
        d.write_keys(KEYS, nodes=[0])
    d.wait("keys file good again", lambda: d.metrics(0)["sealnet_ipsec_keys_file_valid"] == 1.0, timeout=30)


def _bad_keys_file_refused(d: DaemonCluster, events_before: int) -> None:
    d.wait("keys file refused", lambda: d.metrics(0)["sealnet_ipsec_keys_file_valid"] == 0.0, timeout=30)
    event = d.wait("an Event on node-1", lambda: [e for e in d.api.created_events()[events_before:]
                                                  if e.get("reason") == "KeysFileRefused"], timeout=30)[0]
    assert event["involvedObject"]["name"] == "node-1" and "last good keys" in event["message"]
    a, b = d.c.nodes[0].pods[0], d.c.nodes[1].pods[0]
    with underlay(d) as cap:
        assert d.c.ping(a, b, count=3) and d.c.ping(b, a, count=3)
    summary = cap.summary()
    assert summary.kinds() == {"esp"} and all(spi & 0xF == 3 for spis in summary.spis().values() for spi in spis)


def test_restart_under_traffic_and_join(d: DaemonCluster) -> None:
    a = d.c.nodes[0].pods[0]
    before = errors(d)
    with Xfrm.open(netns=d.c.nodes[0].ns) as x:
        seq_before = {k: c.oseq64 for k, c in x.dump_sa_counters().items() if c.oseq64}
    cap, result, restarted = d.restart_under_traffic(0, join=3, rate=RATE)
    print(f"\nagent restart under traffic: ready {restarted:.1f} s after start; {result}")
    assert result.lost == 0 and result.sent > RATE, str(result)
    summary = cap.summary()
    assert summary.kinds() == {"esp"}, str(summary)
    assert no_new_errors(before, errors(d)) == {}
    with Xfrm.open(netns=d.c.nodes[0].ns) as x:
        seq_after = {k: c.oseq64 for k, c in x.dump_sa_counters().items()}
    # Adopted, not re-added: a re-added SA would count from 1 again (and the peer's replay window drop it).
    assert seq_before and all(seq_after.get(k, 0) >= v for k, v in seq_before.items()), (seq_before, seq_after)
    assert "delete_sa" not in d.log(0).split("starting node=node-1")[-1]
    new = d.c.nodes[3].pods[0]
    assert d.wait("the new node's pods reachable", lambda: d.c.ping(a, new) and d.c.ping(new, a), timeout=60)
    assert d.annotations(3).get("sealnet.io/ipsec-keys") == "3"


def test_peer_reboot_rekeys_never_in_clear(d: DaemonCluster) -> None:
    a, b = d.c.nodes[0].pods[0], d.c.nodes[1].pods[0]
    third = {sa for sa in sas(d, 0) if d.c.nodes[2].ip in (sa.src, sa.dst)}
    with underlay(d) as cap, Flow(a.ns, b.ns, str(b.ip), rate=RATE) as flow:
        time.sleep(1)
        d.api.update_node(d.c.nodes[1].name, lambda n: n["status"]["nodeInfo"].update(bootID=str(uuid.uuid4())))
        time.sleep(4)
    result = flow.result
    assert result is not None
    print(f"\npeer reboot (new boot ID), re-key under traffic: {result}")
    assert cap.summary().kinds() == {"esp"}
    assert result.received > 0 and result.longest_gap * (1000 / RATE) < 3000, str(result)
    # Only the rebooted peer's pair was re-keyed: node-3's SAs (keys included) are untouched.
    assert third and third == {sa for sa in sas(d, 0) if d.c.nodes[2].ip in (sa.src, sa.dst)}
    assert d.c.ping(a, b, count=2) and d.c.ping(b, a, count=2)


def test_deleted_node_cleaned_up_and_sigterm_keeps_datapath(d: DaemonCluster) -> None:
    gone = d.c.nodes[3]
    d.kill(3)
    d.api.delete_node(gone.name)
    start = time.monotonic()
    d.wait("the deleted node's SAs removed", lambda: not [s for s in sas(d, 0) if gone.ip in (s.src, s.dst)],
           timeout=30)
    print(f"\ndeleted node cleaned up {time.monotonic() - start:.1f} s after the DELETE (grace {d.grace:g} s)")
    with Xfrm.open(netns=d.c.nodes[0].ns) as x:
        assert not [p for p in x.dump_policies() if gone.pod_cidr in (p.src, p.dst)]
    for i in range(3):
        assert d.stop(i, signal.SIGTERM) == 0
    a, b = d.c.nodes[0].pods[0], d.c.nodes[2].pods[0]
    with underlay(d) as cap:
        assert d.c.ping(a, b, count=2) and d.c.ping(b, a, count=2)
    assert cap.summary().kinds() == {"esp"}
