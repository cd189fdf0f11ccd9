"""The lab's pure parts: packet classification, counter deltas, the VM
runner's refusal to pass when the lab is missing or ran nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.ipsec import ESP
from scapy.layers.l2 import ARP, Ether

from lab import vm
from lab.capture import classify
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
