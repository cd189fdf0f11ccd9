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
  unchanged; /metrics answers with SA sequence numbers and xfrm_stat.

Not yet proven here (see the issue note): drift repair, a refused keys file,
restart under counted traffic, a peer reboot and a deleted Node in the lab;
their host counterparts are in tests/privileged/test_daemon_*_host.py.
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Iterator

import pytest

from lab.capture import Capture, classify
from lab.counters import delta, xfrm_stat
from lab.topology import API_IP, Cluster
from tests.agents import DaemonCluster

pytestmark = [pytest.mark.kernel_lab, pytest.mark.timeout(1800)]

KEY = "5c7dc606a6e901eb92accc3063c5259ddca19049"
KEYS = f"3+ rfc4106(gcm(aes)) {KEY} 128\n"
ERRORS = ("XfrmInNoStates", "XfrmInStateProtoError", "XfrmInStateSeqError", "XfrmOutNoStates")


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonCluster]:
    tmp: Path = tmp_path_factory.mktemp("daemon-ipsec")
    with Cluster(nodes=3, name="dip", api_address=True) as c, \
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
    summary = classify(cap.packets())
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
