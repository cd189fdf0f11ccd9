"""The lab's pure parts: packet classification (kernel control traffic told
apart from payload), counter deltas, the VM runner's refusal to pass when the
lab is missing or ran nothing."""

from __future__ import annotations

import ipaddress
from collections import Counter
from pathlib import Path

import pytest
from scapy.layers.igmp import IGMP, IGMPv3_MR, IGMPv3_MR_Group
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6MLDMultAddrRec,
    ICMPv6MLReport2,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    RouterAlert,
)
from scapy.layers.ipsec import ESP
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet, Raw
from scapy.utils import rdpcap, wrpcap

from lab import capture, vm
from lab.capture import classify, read_summary
from lab.counters import delta, parse_xfrm_stat


def test_classify_sorts_pod_esp_wireguard_and_other_traffic() -> None:
    packets = [
        Ether() / IP(src="10.244.1.10", dst="10.244.2.10") / ICMP(),
        Ether() / IP(src="172.18.0.2", dst="172.18.0.3") / ESP(spi=0x51200033, seq=7),
        Ether() / IP(src="172.18.0.3", dst="172.18.0.2") / UDP(sport=51871, dport=51871),
        Ether() / IP(src="172.18.0.3", dst="172.18.0.2") / TCP(dport=4240),
        Ether() / ARP(),
    ]
    seen = classify(packets)
    assert [p.kind for p in seen.packets] == ["plaintext", "esp", "wireguard", "other"]
    assert seen.spis() == {("172.18.0.2", "172.18.0.3"): {0x51200033}}
    assert seen.packets[1].seq == 7
    assert str(seen) == "esp=1, other=1, plaintext=1, wireguard=1"


NODE, PEER, POD, POD2 = "172.18.0.2", "172.18.0.3", "10.244.1.10", "10.244.2.10"
HBH_RA = IPv6ExtHdrHopByHop(options=[RouterAlert()])  # MLD's Router Alert (RFC 3810 section 5)


def frame(packet: Packet) -> Packet:
    """An Ethernet frame dissected afresh, as rdpcap hands it over (fixed MACs: scapy would resolve them)."""
    return Ether(bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / packet))


def mld_report(src: str = "fe80::1", hlim: int = 1) -> Packet:
    return IPv6(src=src, dst="ff02::16", hlim=hlim) / HBH_RA / ICMPv6MLReport2(
        records=[ICMPv6MLDMultAddrRec(rtype=4, dst="ff02::1:ff00:1")])


#: (packet, kind): what a capture read back from a pcap would hold.
CASES = [
    # The kernel's own link-local control messages.
    pytest.param(IP(src="0.0.0.0", dst="224.0.0.22", ttl=1) / IGMPv3_MR(
        records=[IGMPv3_MR_Group(rtype=4, maddr="224.0.0.251")]), "control", id="igmpv3-report-unspecified-src"),
    pytest.param(IP(src=NODE, dst="224.0.0.251", ttl=1) / IGMP(type=0x16, gaddr="224.0.0.251"), "control",
                 id="igmpv2-report-link-local-group-from-node"),
    pytest.param(IP(src=NODE, dst="224.0.0.2", ttl=1) / IGMP(type=0x17, gaddr="224.0.0.251"), "control",
                 id="igmpv2-leave-to-all-routers"),
    pytest.param(mld_report(), "control", id="mldv2-report"),
    pytest.param(mld_report(src="::"), "control", id="mldv2-report-before-link-local-address"),
    pytest.param(IPv6(src="::", dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt="fe80::1"), "control",
                 id="nd-ns-duplicate-address-detection"),
    pytest.param(IPv6(src="fe80::1", dst="fe80::2", hlim=255) / ICMPv6ND_NS(tgt="fe80::2"), "control",
                 id="nd-ns-unicast-link-local"),
    pytest.param(IPv6(src="fe80::1", dst="ff02::2", hlim=255) / ICMPv6ND_RS(), "control", id="nd-rs"),
    pytest.param(IPv6(src="fe80::1", dst="ff02::1", hlim=255) / ICMPv6ND_RA(), "control", id="nd-ra"),
    # Look-alikes that are not the kernel's link-local chatter.
    pytest.param(IP(src=NODE, dst="239.1.1.1", ttl=1) / IGMP(type=0x16, gaddr="239.1.1.1"), "other",
                 id="igmp-report-routable-group"),
    pytest.param(IP(src=NODE, dst="224.0.0.251", ttl=1) / IGMP(type=0x16, gaddr="224.0.0.252"), "other",
                 id="igmp-report-to-another-group"),
    pytest.param(IP(src=NODE, dst="224.0.0.251", ttl=1) / IGMPv3_MR(), "other", id="igmpv3-report-not-to-22"),
    pytest.param(IP(src=NODE, dst="224.0.0.251", ttl=64) / IGMP(type=0x16, gaddr="224.0.0.251"), "other",
                 id="igmp-ttl-not-1"),
    pytest.param(IP(src="192.0.2.1", dst="224.0.0.22", ttl=1) / IGMPv3_MR(), "other", id="igmp-from-non-node"),
    pytest.param(IP(src=NODE, dst="224.0.0.22", ttl=1, proto=2) / (b"\x13" + bytes(7)), "other",
                 id="igmp-unknown-type"),
    pytest.param(IP(src=POD, dst="224.0.0.22", ttl=1) / IGMPv3_MR(), "plaintext", id="igmp-from-pod"),
    pytest.param(IP(src=NODE, dst="224.0.0.251", ttl=255) / UDP(sport=5353, dport=5353), "other", id="mdns-udp"),
    pytest.param(IPv6(src="fe80::1", dst="ff02::fb", hlim=255) / UDP(sport=5353, dport=5353), "other",
                 id="mdns-udp-ipv6"),
    pytest.param(IPv6(src="fe80::1", dst="ff02::1", hlim=64) / ICMPv6EchoRequest(), "other", id="icmpv6-echo"),
    pytest.param(IPv6(src="fe80::1", dst="ff02::1:ff00:2", hlim=64) / ICMPv6ND_NS(tgt="fe80::2"), "other",
                 id="nd-hop-limit-not-255"),
    pytest.param(mld_report(hlim=64), "other", id="mld-hop-limit-not-1"),
    pytest.param(mld_report(src="2001:db8::1"), "other", id="mld-global-src"),
    pytest.param(IPv6(src="fe80::1", dst="2001:db8::2", hlim=255) / ICMPv6ND_NS(tgt="2001:db8::2"), "other",
                 id="nd-to-global-dst"),
    pytest.param(IPv6(src="fe80::1", dst="ff02::16", hlim=1) / IPv6ExtHdrFragment() / ICMPv6MLReport2(), "other",
                 id="mld-fragment"),
    # Payload, as before, and now over IPv6 too.
    pytest.param(IP(src=POD, dst=POD2) / UDP(sport=40000, dport=53), "plaintext", id="pod-udp-in-clear"),
    pytest.param(IP(src=NODE, dst=POD2) / TCP(dport=80), "plaintext", id="node-to-pod-tcp"),
    pytest.param(IP(src=NODE, dst=PEER) / IP(src=POD, dst=POD2) / ICMP(), "plaintext", id="pod-in-ipip"),
    pytest.param(IPv6(src="2001:db8::1", dst="2001:db8::2") / IP(src=POD, dst=POD2) / ICMP(), "plaintext",
                 id="pod-in-ipv6"),
    pytest.param(IPv6(src="::ffff:10.244.1.10", dst="2001:db8::2") / UDP(), "plaintext", id="ipv4-mapped-pod"),
    pytest.param(IP(src=NODE, dst=PEER) / ICMP(type=3, code=1) / IP(src=POD, dst=POD2) / UDP(), "other",
                 id="icmp-error-quoting-pod-header"),
    pytest.param(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=40000, dport=80), "other",
                 id="ipv6-udp-global"),
    pytest.param(IPv6(src="fe80::1", dst="fe80::2") / TCP(dport=4240), "other", id="ipv6-tcp-link-local"),
    pytest.param(IPv6(src="2001:db8::1", dst="2001:db8::2") / ESP(spi=0x51200033, seq=3), "esp", id="esp-ipv6"),
    pytest.param(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=51871, dport=51871), "wireguard",
                 id="wireguard-ipv6"),
]


@pytest.mark.parametrize("packet, kind", CASES)
def test_classify_tells_kernel_control_from_payload(packet: Packet, kind: str) -> None:
    seen = classify([frame(packet)])
    assert [p.kind for p in seen.packets] == [kind], packet.summary()
    assert (seen.packets[0].detail is not None) == (kind == "control")


def test_ipv6_pod_network_is_plaintext_when_given() -> None:
    pod6 = frame(IPv6(src="fd00:10:244:1::10", dst="2001:db8::2") / UDP(dport=53))
    assert classify([pod6]).kinds() == {"other"}
    assert classify([pod6], pod_net6=ipaddress.IPv6Network("fd00:10:244::/48")).kinds() == {"plaintext"}


def test_kinds_and_count_leave_out_only_control() -> None:
    frames = [frame(p.values[0]) for p in CASES]
    expected = Counter(p.values[1] for p in CASES)
    seen = classify(frames)
    controls = expected.pop("control")
    assert seen.count() == expected
    assert seen.kinds() == set(expected) == {"other", "plaintext", "esp", "wireguard"}
    assert seen.count(control=True) == expected + Counter(control=controls)
    assert seen.kinds(control=True) == set(expected) | {"control"}
    assert len(seen.control()) == controls and len(seen.payload()) == sum(expected.values())
    assert len(seen.packets) == len(seen.raw) == len(CASES)  # control packets are kept, only not counted
    assert str(seen).startswith("esp=1, other=") and f"; control={controls} not counted (" in str(seen)

    only_control = classify(frames[:2])
    assert only_control.kinds() == set() and only_control.count() == Counter()
    assert str(only_control) == ("no payload packets; control=2 not counted "
                                 "(IGMP v2 report, IGMP v3 report)")
    assert str(classify([])) == "no IP packets"


#: Frames at the edges of what read_summary reads from headers alone (beside CASES).
HEADER_EDGES = [
    pytest.param(IP(src=NODE, dst=PEER) / ESP(spi=0x51200033, seq=2**32 - 1, data=b"c" * 40), id="esp"),
    pytest.param(IP(src=NODE, dst=PEER, options=IPOption_Router_Alert()) / ESP(spi=0x51200034, seq=9),
                 id="esp-ip-options"),
    pytest.param(IP(src=NODE, dst=PEER, flags="MF") / ESP(spi=0x51200035, seq=1), id="esp-first-fragment"),
    pytest.param(IP(src=NODE, dst=PEER, frag=3, proto=50) / Raw(b"\x00" * 16), id="esp-later-fragment"),
    pytest.param(IP(src=NODE, dst=PEER, proto=50) / Raw(b"\x00" * 5), id="esp-header-cut-short"),
    pytest.param(IP(src=POD, dst=PEER) / ESP(spi=0x51200036, seq=1), id="esp-from-a-pod-address"),
    pytest.param(IP(src=NODE, dst=PEER) / UDP(sport=51872, dport=51872) / Raw(b"\x04" * 32),
                 id="wireguard-second-port"),
    pytest.param(IP(src=NODE, dst=PEER) / UDP(sport=40000, dport=51871), id="wireguard-one-end"),
    pytest.param(IP(src=NODE, dst=PEER) / UDP(sport=51871, dport=4789) / VXLAN()
                 / Ether(src="02:00:00:00:00:03", dst="02:00:00:00:00:04") / IP(src=POD, dst=POD2) / UDP(),
                 id="pod-in-vxlan-from-the-wireguard-port"),
    pytest.param(IP(src=NODE, dst=PEER) / UDP(sport=40000, dport=8472), id="udp-other-port"),
]


def test_reading_headers_alone_gives_what_scapy_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_summary and classify(rdpcap(...)) agree on every frame; only ESP and WireGuard skip scapy."""
    padded = Ether(bytes(frame(IP(src=NODE, dst=PEER) / ESP(spi=0x51200037, seq=4))) + b"\x00" * 12)
    frames = [frame(p.values[0]) for p in CASES + HEADER_EDGES] + [frame(ARP()), padded]
    path = str(tmp_path / "mixed.pcap")
    wrpcap(path, frames)
    dissected: list[bytes] = []

    def counting_ether(data: bytes) -> Packet:
        dissected.append(data)
        return Ether(data)

    monkeypatch.setattr(capture, "Ether", counting_ether)
    fast = read_summary(path)
    # unfragmented IPv4 ESP (with and without IP options, with Ethernet padding) and UDP on a WireGuard port
    assert len(frames) - len(dissected) == 5
    slow = classify(rdpcap(path))
    assert fast.packets == slow.packets
    assert [bytes(r) for r in fast.raw] == [bytes(r) for r in slow.raw]
    assert len(frames) - len(dissected) == 0  # reading raw dissected the rest, each once
    edges = [(p.kind, p.spi, p.seq, p.sport) for p in fast.packets[len(CASES):]]
    assert edges == [
        ("esp", 0x51200033, 2**32 - 1, None), ("esp", 0x51200034, 9, None), ("esp", 0x51200035, 1, None),
        ("other", None, None, None), ("other", None, None, None), ("plaintext", None, None, None),
        ("wireguard", None, None, 51872), ("wireguard", None, None, 40000), ("plaintext", None, None, None),
        ("other", None, None, None), ("esp", 0x51200037, 4, None),
    ]
    assert [p[ESP].seq for p in fast.esp_packets(spi=lambda spi: spi in (0x51200034, 0x51200037))] == [9, 4]


def test_wireguard_only_skips_control_packets() -> None:
    from tests.wgcluster import wireguard_only  # the harness imports the agent: only this test needs it

    frames = [frame(p) for p in (
        IP(src="0.0.0.0", dst="224.0.0.22", ttl=1) / IGMPv3_MR(),
        mld_report(),
        IP(src=NODE, dst=PEER) / UDP(sport=51871, dport=51871),
    )]
    assert wireguard_only(classify(frames), {NODE, PEER}) == []
    leak = frames + [frame(IP(src=NODE, dst="224.0.0.251", ttl=255) / UDP(sport=5353, dport=5353))]
    assert wireguard_only(classify(leak), {NODE, PEER}) == [f"other {NODE} -> 224.0.0.251 proto 17"]


def test_wireguard_problems_name_the_frame_to_show() -> None:
    from tests.wgcluster import wireguard_problems

    frames = [frame(p) for p in (
        IP(src=NODE, dst=PEER) / UDP(sport=51871, dport=51871),
        IP(src=NODE, dst=PEER) / UDP(sport=51871, dport=4000),
        mld_report(),
        IP(src=NODE, dst=PEER) / UDP(sport=5001, dport=5001) / b"in clear",
    )]
    summary = classify(frames)
    problems = wireguard_problems(summary, {NODE, PEER})
    assert [i for i, _ in problems] == [1, 3]
    assert problems[0][1] == f"wireguard with unexpected ends {NODE}:51871 -> {PEER}:4000"
    assert summary.raw[problems[1][0]][UDP].dport == 5001


def test_xfrm_stat_parsing_and_delta() -> None:
    before = parse_xfrm_stat("XfrmInNoStates            \t0\nXfrmInStateProtoError   \t2\n")
    after = parse_xfrm_stat("XfrmInNoStates            \t3\nXfrmInStateProtoError   \t2\n")
    assert before == {"XfrmInNoStates": 0, "XfrmInStateProtoError": 2}
    assert delta(before, after) == {"XfrmInNoStates": 3}


def test_lab_run_fails_with_a_clear_message_when_qemu_is_missing(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(vm.shutil, "which", lambda name: None)
    assert vm.main(["run"]) == 1
    err = capsys.readouterr().err
    assert "qemu-system-x86_64 (Debian qemu-system-x86)" in err and "scripts/install-deps" in err
    assert vm.main(["run", "--optional"]) == 0
    assert "kernel lab SKIPPED" in capsys.readouterr().out


def test_junit_counts_and_guest_script(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    report.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1"/></testsuites>')
    assert vm._junit_counts(report) == (5, 1, 0, 1)
    assert vm._junit_counts(tmp_path / "absent.xml") == (0, 0, 0, 0)
    script = vm.guest_script(["tests/lab/test_seed.py", "-k", "esp and not wg"], tmp_path)
    assert "modprobe \"$m\"" in script and "esp4" in script and "wireguard" in script
    assert "-m kernel_lab" in script and "'esp and not wg'" in script


def test_a_bare_lab_run_collects_every_kernel_lab_test(tmp_path: Path) -> None:
    """``python -m lab run`` (what CI runs) collects only tests/lab: a kernel_lab test
    anywhere else would never run, in the lab or on the host."""
    script = vm.guest_script([], tmp_path)
    assert "-m kernel_lab" in script and script.rstrip().splitlines()[-2].rstrip().endswith("tests/lab")
    tests = Path(vm.ROOT) / "tests"
    marker = "pytest.mark." + "kernel_lab"  # split, so that this file does not match itself
    outside = [str(p.relative_to(tests)) for p in tests.rglob("*.py")
               if "lab" not in p.relative_to(tests).parts[:1] and p.name != "conftest.py"
               and marker in p.read_text()]
    assert outside == [], f"kernel_lab tests outside {vm.LAB_TESTS}: {outside}"
