"""Capture underlay traffic and say what crossed the wire.

A capture runs tcpdump inside a namespace (usually the underlay's, on the
bridge, where every packet between nodes passes) and reads the pcap back
with scapy. :func:`classify` sorts every IP packet into one of:

- ``plaintext``: pod traffic in clear (a pod address as source or destination),
  the thing transparent encryption must make disappear;
- ``esp``: ESP between node IPs, with its SPI and sequence number;
- ``wireguard``: UDP to or from the WireGuard port;
- ``other``: anything else (node-to-node traffic in clear, ...).

Usage::

    with Capture(cluster.underlay_ns, cluster.bridge) as cap:
        cluster.ping(a, b)
    summary = classify(cap.packets(), pod_net=POD_SUPERNET)
    assert summary.kinds() == {"esp"}
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

from scapy.layers.inet import IP, UDP  # type: ignore[import-untyped]
from scapy.layers.ipsec import ESP  # type: ignore[import-untyped]
from scapy.packet import Packet as ScapyPacket  # type: ignore[import-untyped]
from scapy.utils import rdpcap  # type: ignore[import-untyped]

from lab.topology import POD_SUPERNET

WIREGUARD_PORT = 51871


class Capture:
    """tcpdump in a namespace for the duration of a ``with`` block."""

    def __init__(self, ns: str, dev: str, bpf: str = "", directory: Optional[str] = None) -> None:
        self.ns, self.dev, self.bpf = ns, dev, bpf
        # In the lab, captures land in the run's results directory and come
        # back to the host with the JUnit report (lab-results/latest/).
        keep = directory or os.environ.get("SEALNET_LAB_RESULTS")
        fd, self.path = tempfile.mkstemp(suffix=".pcap", prefix=f"{ns}-{dev}-", dir=keep)
        os.close(fd)
        if not keep:  # a scratch capture: gone when the test process ends
            atexit.register(_remove, self.path)
        self._proc: Optional[subprocess.Popen[bytes]] = None

    def __enter__(self) -> "Capture":
        argv = ["ip", "netns", "exec", self.ns, "tcpdump", "-i", self.dev, "-n", "-U", "--immediate-mode", "-s", "0",
                "-w", self.path]
        if self.bpf:
            argv.append(self.bpf)
        self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # tcpdump says "listening on ..." once the socket is open; without
        # waiting for it, the first packets of a test are lost.
        assert self._proc.stderr is not None
        line = self._proc.stderr.readline().decode(errors="replace")
        if "listening on" not in line:
            self._proc.kill()
            raise RuntimeError(f"tcpdump in {self.ns} on {self.dev} did not start: {line.strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._proc is None:
            return
        time.sleep(0.2)  # let the last packets of the test reach the buffer
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def packets(self) -> list[ScapyPacket]:
        return list(rdpcap(self.path))


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@dataclass(frozen=True)
class Seen:
    """One classified IP packet."""

    kind: str
    src: str
    dst: str
    spi: Optional[int] = None
    seq: Optional[int] = None
    proto: int = 0


@dataclass
class Summary:
    packets: list[Seen] = field(default_factory=list)
    raw: list[ScapyPacket] = field(default_factory=list)

    def kinds(self) -> set[str]:
        return {p.kind for p in self.packets}

    def count(self) -> Counter[str]:
        return Counter(p.kind for p in self.packets)

    def spis(self) -> dict[tuple[str, str], set[int]]:
        """ESP SPIs seen per (outer src, outer dst)."""
        out: dict[tuple[str, str], set[int]] = {}
        for p in self.packets:
            if p.kind == "esp" and p.spi is not None:
                out.setdefault((p.src, p.dst), set()).add(p.spi)
        return out

    def esp_packets(self) -> list[ScapyPacket]:
        return [r for r in self.raw if ESP in r]

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.count().items())) or "no IP packets"


def classify(
    packets: Iterable[ScapyPacket],
    pod_net: ipaddress.IPv4Network = POD_SUPERNET,
    wireguard_port: int = WIREGUARD_PORT,
) -> Summary:
    """Sort every IP packet of a capture (non-IP frames such as ARP are ignored)."""
    summary = Summary()
    for pkt in packets:
        if IP not in pkt:
            continue
        ip = pkt[IP]
        src, dst = ipaddress.ip_address(ip.src), ipaddress.ip_address(ip.dst)
        if src in pod_net or dst in pod_net:
            seen = Seen("plaintext", ip.src, ip.dst, proto=ip.proto)
        elif ESP in ip:
            seen = Seen("esp", ip.src, ip.dst, spi=ip[ESP].spi, seq=ip[ESP].seq, proto=ip.proto)
        elif UDP in ip and wireguard_port in (ip[UDP].sport, ip[UDP].dport):
            seen = Seen("wireguard", ip.src, ip.dst, proto=ip.proto)
        else:
            seen = Seen("other", ip.src, ip.dst, proto=ip.proto)
        summary.packets.append(seen)
        summary.raw.append(pkt)
    return summary
