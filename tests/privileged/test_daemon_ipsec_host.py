"""The IPsec daemon on a kernel that refuses its SAs (this host has no ESP): fail closed, stay up.

Properties asserted:
- the agents keep running when the kernel refuses changes: /healthz 200,
  /readyz 503 naming the refusal, failures counted by stage, retried;
- pod traffic is dropped, never sent in clear: the policies are in, the SAs
  they need are not (XfrmOutNoStates), nothing crosses the underlay;
- the keys file is still watched: a bad one is refused with an Event, and
  no key material reaches the agents' logs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.capture import Capture
from lab.topology import API_IP, Cluster
from tests.agents import DaemonCluster

pytestmark = pytest.mark.privileged

KEY = "5c7dc606a6e901eb92accc3063c5259ddca19049"
KEYS = f"3+ rfc4106(gcm(aes)) {KEY} 128\n"


def test_refused_sas_fail_closed_and_agent_stays_up(tmp_path: Path) -> None:
    with Cluster(nodes=2, name="dih", api_address=True) as c, \
            DaemonCluster(c, tmp_path, mode="ipsec", keys=KEYS, resync=1.0, secrets=[KEY]) as d:
        d.register_all()
        d.start_all()
        d.wait("kernel refusals counted", lambda: d.metrics(0)['sealnet_agent_reconcile_failures_total{stage="kernel"}']
               >= 2)
        status, body = d.http(0, "/readyz")
        assert status == 503 and "kernel change(s) refused" in body and "add sa" in body
        assert d.http(0, "/healthz") == (200, "ok\n")
        a, b = c.nodes[0].pods[0], c.nodes[1].pods[0]
        with Capture(c.underlay_ns, c.bridge, bpf=f"not host {API_IP}", directory=str(tmp_path)) as cap:
            assert not c.ping(a, b, count=2, timeout=1)
        assert cap.summary().count()["plaintext"] == 0
        assert "sealnet.io/ipsec-keys" not in d.annotations(0), "keys advertised without their SAs"
        events = len(d.api.created_events())
        d.write_keys(f"4+ rfc4106(gcm(aes)) {KEY[:-1]} 128\n", nodes=[0])
        d.wait("an Event for the refused keys file",
               lambda: [e for e in d.api.created_events()[events:] if e["reason"] == "KeysFileRefused"])
        assert all(proc.poll() is None for proc in d.procs.values())
