"""Zero-drop IPsec key rotation across three daemons, counted packet by packet.

Three ``python -m agent run`` processes (the lab cluster's nodes), driven by
the fake API server and by their keys Secret volumes, which the test updates
the way each node's kubelet does (one node after the other). UDP runs
between pods on every node pair at 100 packets per second through each
rotation; every sequence number is accounted for.

Rotations, in order (each asserted: 0 lost, nothing in clear on the
underlay, XfrmInNoStates / XfrmInStateProtoError unchanged on every node,
and afterwards only the new key's SAs in the kernels):
1. as the Pulumi program writes it (previous line + current, key ID + 1),
   across the 14 -> 15 step, with one agent killed mid-rotation and
   restarted;
2. the seed's exam: a one-line Secret with a fresh key and key ID + 1, no
   previous line, across the 15 -> 1 wrap;
3. two rotations within the grace period (1 -> 2 -> 3).
The captured ESP after the last rotation is decrypted by scapy with per-pair
keys derived here independently (a sample spread through the capture, on
every node pair). Each prints the time from the Secret change
to the last peer's egress switch and the packets counted.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import Packet

from agent.kernel.xfrm import Xfrm
from lab.capture import Capture
from lab.counters import delta, xfrm_stat
from lab.esp import decrypt
from lab.topology import API_IP, Cluster, LabNode
from lab.udpflow import Flow
from tests.agents import DaemonCluster

pytestmark = [pytest.mark.kernel_lab, pytest.mark.timeout(2400)]

RATE = 100
GRACE = 8.0
WATCHED = ("XfrmInNoStates", "XfrmInStateProtoError")
#: Post-rotation ESP packets decrypted per node pair, spread through the capture.
DECRYPT_SAMPLE = 50
KEYS = {i: os.urandom(20) for i in range(1, 16)}


def line(key_id: int) -> str:
    return f"{key_id}+ rfc4106(gcm(aes)) {KEYS[key_id].hex()} 128"


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonCluster]:
    tmp: Path = tmp_path_factory.mktemp("rotation")
    with Cluster(nodes=3, name="rot", api_address=True) as c, \
            DaemonCluster(c, tmp, mode="ipsec", keys=line(14) + "\n", resync=5.0, rotation_grace=GRACE,
                          secrets=[k.hex() for k in KEYS.values()]) as dc:
        dc.register_all()
        dc.start_all()
        dc.wait_ready_all()
        for i in range(3):
            dc.wait("key 14 advertised", lambda i=i: dc.annotations(i).get("sealnet.io/ipsec-keys") == "14")
        yield dc


def egress(d: DaemonCluster, i: int) -> set[float]:
    return {v for k, v in d.metrics(i).items() if k.startswith("sealnet_ipsec_peer_egress_key_id{")}


def kernel_key_ids(d: DaemonCluster, i: int) -> set[int]:
    with Xfrm.open(netns=d.c.nodes[i].ns) as x:
        return {sa.spi & 0xF for sa in x.dump_sas() if sa.spi >> 28 == 0x5}


def rotate(d: DaemonCluster, texts: list[str], final: int, kill: int | None = None) -> Capture:
    """Write each keys text (kubelet by kubelet) under counted traffic; wait for the end state."""
    pods = [n.pods[0] for n in d.c.nodes]
    before = {n.ns: xfrm_stat(n.ns) for n in d.c.nodes}
    with ExitStack() as stack:
        cap = stack.enter_context(Capture(d.c.underlay_ns, d.c.bridge, bpf=f"not host {API_IP}",
                                          directory=str(d.tmp)))
        flows = [stack.enter_context(Flow(pods[i].ns, pods[(i + 1) % 3].ns, str(pods[(i + 1) % 3].ip),
                                          port=5001 + i, rate=RATE)) for i in range(3)]
        time.sleep(1)
        start = time.monotonic()
        for n, text in enumerate(texts):
            for i in range(3):
                d.write_keys(text, nodes=[i])
                if kill == i and n == 0:
                    d.kill(i)
                    d.start(i)
            if n + 1 < len(texts):
                time.sleep(GRACE / 4)  # the next rotation comes well within the grace period
        if kill is not None:
            d.wait_ready(kill)
        switched = d.wait("every egress on the new key", lambda: all(egress(d, i) == {final} for i in range(3)),
                          timeout=600) and time.monotonic() - start
        d.wait("old keys dropped everywhere", lambda: all(
            d.annotations(i).get("sealnet.io/ipsec-keys") == str(final) and kernel_key_ids(d, i) == {final}
            for i in range(3)), timeout=GRACE * 4 + 120)
        time.sleep(1)
    results = [f.result for f in flows]
    print(f"\nrotation to key {final}: last egress switch {switched:.1f} s after the Secret change; "
          + "; ".join(str(r) for r in results))
    for r in results:
        assert r is not None and r.lost == 0 and r.sent > RATE, str(r)
    summary = cap.summary()
    assert summary.kinds() == {"esp"}, str(summary)
    after = {n.ns: xfrm_stat(n.ns) for n in d.c.nodes}
    grew = {ns: {k: v for k, v in delta(before[ns], after[ns]).items() if k in WATCHED} for ns in before}
    assert all(not g for g in grew.values()), grew
    return cap


def pair_key(key: bytes, src: LabNode, dst: LabNode) -> bytes:
    material = key + src.ip.packed + dst.ip.packed + src.boot_id[:36].encode() + dst.boot_id[:36].encode()
    return hashlib.sha256(material).digest()[: len(key)]


def test_rotation_as_the_program_writes_it_with_a_restart(d: DaemonCluster) -> None:
    rotate(d, [line(14) + "\n" + line(15) + "\n"], final=15, kill=1)


def test_one_line_secret_across_the_wrap(d: DaemonCluster) -> None:
    rotate(d, [line(1) + "\n"], final=1)


def test_two_rotations_within_the_grace_period(d: DaemonCluster) -> None:
    cap = rotate(d, [line(1) + "\n" + line(2) + "\n", line(2) + "\n" + line(3) + "\n"], final=3)
    by_ip = {str(n.ip): n for n in d.c.nodes}
    post = cap.summary().esp_packets(spi=lambda spi: spi & 0xF == 3)
    by_pair: dict[tuple[str, str], list[Packet]] = {}
    for pkt in post:
        by_pair.setdefault((pkt[IP].src, pkt[IP].dst), []).append(pkt)
    flows = {(str(d.c.nodes[i].ip), str(d.c.nodes[(i + 1) % 3].ip)) for i in range(3)}
    assert flows <= set(by_pair), sorted(by_pair)
    decrypted = 0
    for (src, dst), pkts in by_pair.items():  # a sample through the capture: scapy decrypts slowly under TCG
        for pkt in pkts[:: max(1, len(pkts) // DECRYPT_SAMPLE)]:
            inner = decrypt(pkt, pair_key(KEYS[3], by_ip[src], by_ip[dst]), icv_bits=128, esn=True)
            assert UDP in inner and inner[IP].dst in {str(n.pods[0].ip) for n in d.c.nodes}
            decrypted += 1
    print(f"scapy decrypted {decrypted} of {len(post)} post-rotation ESP packets ({len(by_pair)} node pairs) "
          "with independently derived key-3 pair keys")


def test_the_programs_rotation_reaches_the_nodes(d: DaemonCluster) -> None:
    """`pulumi up` at rotation N, then N+1 (the mock engine): the Secrets reach every node; the
    cluster ends on the key ID the program exports."""
    import base64

    from tests.components.harness import run_program, unwrap

    def secret(rotation: int) -> tuple[str, int]:
        run = run_program({"rotation": rotation}, stack_file=True)  # the dev stack, as `pulumi up` runs it
        assert run.error is None, run.error
        data = unwrap(run.one("kubernetes:core/v1:Secret").inputs["data"])
        text = base64.b64decode(data["keys"]).decode()
        d.secrets += [part for ln in text.splitlines() for part in ln.split() if len(part) >= 32]
        return text, int(run.stack_outputs["keyId"])

    # Rotations 4 and 5 (key IDs 4+5, then 5+6): IDs the nodes have not used, so
    # no key ID comes back with other bytes (which every agent refuses).
    first, first_id = secret(4)
    rotate(d, [first], final=first_id)
    second, second_id = secret(5)
    assert second.splitlines()[0] == first.splitlines()[-1], "the previous key must be byte-identical"
    rotate(d, [second], final=second_id)
    assert second_id == 6 and all(d.annotations(i)["sealnet.io/ipsec-keys"] == "6" for i in range(3))
