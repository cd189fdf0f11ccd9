"""Capture underlay traffic and say what crossed the wire.

A capture runs tcpdump inside a namespace (usually the underlay's, on the
bridge, where every packet between nodes passes) and reads the pcap back
with scapy. :func:`classify` sorts every IPv4 and IPv6 packet into one of:

- ``plaintext``: pod traffic in clear (a pod address as source or destination
  of the packet or of an IP header it encapsulates), the thing transparent
  encryption must make disappear;
- ``esp``: ESP, with its SPI and sequence number;
- ``wireguard``: UDP to or from the WireGuard port;
- ``control``: link-local control traffic the kernel sends on its own, with
  no payload in it: IGMP membership messages to 224.0.0.0/24, ICMPv6
  Neighbor Discovery and MLD between link-local addresses (see
  :func:`control_kind` for the exact rules);
- ``other``: anything else (node-to-node traffic in clear, mDNS, IPv6 between
  global addresses, ...).

Control packets stay in :attr:`Summary.packets` and :attr:`Summary.raw` but
:meth:`Summary.kinds` and :meth:`Summary.count` leave them out, so that
``kinds() == {"esp"}`` still means "nothing but ESP payload crossed"; whether
an IGMP report happened to go out during the test does not change that.

Usage::

    with Capture(cluster.underlay_ns, cluster.bridge) as cap:
        cluster.ping(a, b)
    summary = cap.summary(pod_net=POD_SUPERNET)   # classify(cap.packets(), ...), faster
    assert summary.kinds() == {"esp"}

A rotation test captures tens of thousands of ESP frames, and scapy's
dissection costs about 0.4 ms a frame on the host and ten times that under
the lab's TCG, minutes per capture. :func:`read_summary` therefore reads the
headers of the frames whose kind they alone decide (unfragmented IPv4 ESP,
and UDP to or from a WireGuard port, between addresses outside the pod
network) and hands every other frame to scapy and :func:`classify`; the
result is the same (tests/unit/test_lab_tools.py compares the two on every
kind of frame), and :attr:`Summary.raw` dissects a frame only when asked.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import signal
import struct
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Iterator, Optional, Union, overload

from scapy.layers.inet import IP, UDP  # type: ignore[import-untyped]
from scapy.layers.inet6 import (  # type: ignore[import-untyped]
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import ESP  # type: ignore[import-untyped]
from scapy.layers.l2 import Ether  # type: ignore[import-untyped]
from scapy.config import conf  # type: ignore[import-untyped]
from scapy.packet import Packet as ScapyPacket  # type: ignore[import-untyped]
from scapy.utils import RawPcapReader, rdpcap  # type: ignore[import-untyped]

from lab.topology import POD_SUPERNET, UNDERLAY

WIREGUARD_PORT = 51871
#: sealnet's WireGuard ports: the interface's and, during a key epoch
#: rotation, the second interface's (port + 1; agent.wireguard.epochs).
WIREGUARD_PORTS = (WIREGUARD_PORT, WIREGUARD_PORT + 1)


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

    def summary(self, **classify_args: object) -> "Summary":
        """``classify(self.packets(), **classify_args)``, without dissecting every ESP and WireGuard frame."""
        return read_summary(self.path, **classify_args)  # type: ignore[arg-type]


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@dataclass(frozen=True)
class Seen:
    """One classified IP packet (for IPv6, ``proto`` is the upper-layer protocol after extension headers)."""

    kind: str
    src: str
    dst: str
    spi: Optional[int] = None
    seq: Optional[int] = None
    proto: int = 0
    #: For ``control`` packets, which message it is ("IGMP v3 report", "ND neighbor solicitation", ...).
    detail: Optional[str] = None
    #: For ``wireguard`` packets, the UDP ports.
    sport: Optional[int] = None
    dport: Optional[int] = None


class Frames(Sequence[ScapyPacket]):
    """Captured frames, each kept as bytes until it is read and then dissected by scapy (once)."""

    def __init__(self) -> None:
        self._items: list[Union[bytes, ScapyPacket]] = []

    def append(self, item: Union[bytes, ScapyPacket]) -> None:
        self._items.append(item)

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> ScapyPacket: ...

    @overload
    def __getitem__(self, index: slice) -> list[ScapyPacket]: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[ScapyPacket, list[ScapyPacket]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        item = self._items[index]
        if isinstance(item, bytes):
            item = self._items[index] = Ether(item)
        return item

    def __iter__(self) -> Iterator[ScapyPacket]:
        return (self[i] for i in range(len(self)))


@dataclass
class Summary:
    packets: list[Seen] = field(default_factory=list)
    #: The frame of each packet, in the same order.
    raw: Frames = field(default_factory=Frames)

    def kinds(self, control: bool = False) -> set[str]:
        """Kinds seen; ``control`` packets only when asked for (see the module docstring)."""
        return {p.kind for p in self.packets if control or p.kind != "control"}

    def count(self, control: bool = False) -> Counter[str]:
        return Counter(p.kind for p in self.packets if control or p.kind != "control")

    def control(self) -> list[Seen]:
        """The kernel's own link-local control packets, which :meth:`kinds` and :meth:`count` leave out."""
        return [p for p in self.packets if p.kind == "control"]

    def payload(self) -> list[Seen]:
        """Every packet but the control ones: what tests asserting on addresses should look at."""
        return [p for p in self.packets if p.kind != "control"]

    def spis(self) -> dict[tuple[str, str], set[int]]:
        """ESP SPIs seen per (outer src, outer dst)."""
        out: dict[tuple[str, str], set[int]] = {}
        for p in self.packets:
            if p.kind == "esp" and p.spi is not None:
                out.setdefault((p.src, p.dst), set()).add(p.spi)
        return out

    def esp_packets(self, spi: Optional[Callable[[int], bool]] = None) -> list[ScapyPacket]:
        """The ESP frames, dissected; only those whose SPI ``spi`` accepts, if given."""
        return [self.raw[i] for i, p in enumerate(self.packets)
                if p.kind == "esp" and (spi is None or (p.spi is not None and spi(p.spi)))]

    def __str__(self) -> str:
        counted = ", ".join(f"{k}={v}" for k, v in sorted(self.count().items()))
        control = self.control()
        if not control:
            return counted or "no IP packets"
        details = Counter(p.detail for p in control)
        listed = ", ".join(f"{d} x{n}" if n > 1 else str(d) for d, n in sorted(details.items()))
        return f"{counted or 'no payload packets'}; control={len(control)} not counted ({listed})"


# -- kernel control traffic ---------------------------------------------------
#
# A namespace's interfaces talk on their own as soon as they are up: the
# kernel reports its multicast memberships (IGMP, RFC 3376 section 5; MLD,
# RFC 3810 section 6), solicits routers and checks its IPv6 addresses for
# duplicates (Neighbor Discovery, RFC 4861 section 6.3.7 and RFC 4862 section
# 5.4). When such a message falls inside a capture, it says nothing about
# whether pod or node payload crossed in clear, so it gets a kind of its own.
# The rules below are the ones those RFCs give the sender; a packet that bends
# any of them (a routable group, a global source, a hop limit a router would
# have decremented, a fragment) is not the kernel's link-local chatter and
# stays ``other``.

#: The Local Network Control Block: never forwarded by routers (RFC 5771 section 4).
LINK_LOCAL_GROUPS = ipaddress.IPv4Network("224.0.0.0/24")
_ALL_SYSTEMS = ipaddress.IPv4Address("224.0.0.1")
_ALL_ROUTERS = ipaddress.IPv4Address("224.0.0.2")
_IGMPV3_ROUTERS = ipaddress.IPv4Address("224.0.0.22")
_UNSPECIFIED4 = ipaddress.IPv4Address("0.0.0.0")
#: Link-local scope multicast (RFC 4291 section 2.7): all-nodes, all-routers, solicited-node, MLDv2 routers.
LINK_LOCAL_MULTICAST6 = ipaddress.IPv6Network("ff02::/16")

_IGMP_PROTO = 2
_ICMPV6_NH = 58
_IGMP_TYPES = {0x11: "query", 0x12: "v1 report", 0x16: "v2 report", 0x17: "leave", 0x22: "v3 report"}
# RFC 4861 section 4: RS, RA, NS, NA, Redirect; always sent with hop limit 255 (section 6.1.1, 7.1.1).
_ND_TYPES = {133: "router solicitation", 134: "router advertisement", 135: "neighbor solicitation",
             136: "neighbor advertisement", 137: "redirect"}
# RFC 2710 (MLDv1: query, report, done) and RFC 3810 (MLDv2 report); always hop limit 1 (RFC 3810 section 5).
_MLD_TYPES = {130: "query", 131: "v1 report", 132: "done", 143: "v2 report"}
_IPV6_EXTENSIONS = (IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting, IPv6ExtHdrFragment)

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _igmp_destination_fits(kind: int, group: ipaddress.IPv4Address, dst: ipaddress.IPv4Address) -> bool:
    """Where each IGMP message goes, by RFC."""
    if kind in (0x12, 0x16):  # reports go to the group reported (RFC 2236 section 2)
        return dst == group
    if kind == 0x17:  # leaves go to all-routers (RFC 2236 section 3)
        return dst == _ALL_ROUTERS
    if kind == 0x22:  # v3 reports go to all IGMPv3-capable routers (RFC 3376 section 4.2.14)
        return dst == _IGMPV3_ROUTERS
    # queries: general ones to all-systems, group-specific ones to the group (RFC 3376 section 4.1.12)
    return dst in (_ALL_SYSTEMS, group)


def _igmp_control(ip: ScapyPacket, node_net: ipaddress.IPv4Network) -> Optional[str]:
    if ip.proto != _IGMP_PROTO or ip.ttl != 1 or ip.frag or ip.flags.MF:  # TTL 1: RFC 3376 section 4
        return None
    src, dst = ipaddress.IPv4Address(ip.src), ipaddress.IPv4Address(ip.dst)
    # 0.0.0.0 is what a report carries before the interface has an address (RFC 3376 section 4.2.13).
    if dst not in LINK_LOCAL_GROUPS or not (src == _UNSPECIFIED4 or src in node_net):
        return None
    # Read the message from the bytes: scapy dissects IGMP only when scapy.layers.igmp is loaded.
    message = bytes(ip.payload)
    if len(message) < 8 or message[0] not in _IGMP_TYPES:
        return None
    if not _igmp_destination_fits(message[0], ipaddress.IPv4Address(message[4:8]), dst):
        return None
    return f"IGMP {_IGMP_TYPES[message[0]]}"


def _upper_layer(ip6: ScapyPacket) -> tuple[int, ScapyPacket, list[type]]:
    """An IPv6 packet's upper-layer protocol number and layer, past its extension headers (listed)."""
    nh, layer, extensions = ip6.nh, ip6.payload, []
    while isinstance(layer, _IPV6_EXTENSIONS):
        extensions.append(type(layer))
        nh, layer = layer.nh, layer.payload
    return nh, layer, extensions


def _icmpv6_control(ip6: ScapyPacket) -> Optional[str]:
    nh, layer, extensions = _upper_layer(ip6)
    # MLD rides behind a Hop-by-Hop Router Alert (RFC 3810 section 5); nothing else may come before it.
    if nh != _ICMPV6_NH or set(extensions) - {IPv6ExtHdrHopByHop}:
        return None
    src, dst = ipaddress.IPv6Address(ip6.src), ipaddress.IPv6Address(ip6.dst)
    # Unspecified source: duplicate address detection (RFC 4862 section 5.4.2, RFC 3810 section 5.2.13).
    if not (src.is_link_local or src.is_unspecified) or not (dst.is_link_local or dst in LINK_LOCAL_MULTICAST6):
        return None
    message = bytes(layer)
    if not message:
        return None
    if message[0] in _ND_TYPES and ip6.hlim == 255:
        return f"ND {_ND_TYPES[message[0]]}"
    if message[0] in _MLD_TYPES and ip6.hlim == 1:
        return f"MLD {_MLD_TYPES[message[0]]}"
    return None


def control_kind(outer: ScapyPacket, node_net: ipaddress.IPv4Network = UNDERLAY) -> Optional[str]:
    """What kernel control message an IP/IPv6 packet is, or None if it is not one.

    - IGMP (TTL 1, not fragmented) from 0.0.0.0 or a ``node_net`` address to a
      group in 224.0.0.0/24, of a known type and to the address that type
      goes to: a report to the group itself, a v3 report to 224.0.0.22, a
      leave to 224.0.0.2, a query to 224.0.0.1 or the group;
    - ICMPv6 Neighbor Discovery (types 133-137, hop limit 255) or MLD (130,
      131, 132, 143, hop limit 1, possibly behind a Hop-by-Hop header) from a
      link-local or the unspecified address to a link-local address or ff02::/16.
    """
    if isinstance(outer, IPv6):
        return _icmpv6_control(outer)
    return _igmp_control(outer, node_net)


# -- classification -----------------------------------------------------------


def _network_headers(pkt: ScapyPacket) -> list[ScapyPacket]:
    """The IPv4/IPv6 headers of a frame, outermost first, encapsulated ones (IPIP, 4in6, VXLAN, ...) after.

    The headers an ICMP error quotes (scapy's IPerror, IPerror6) are not
    among them: they are a copy of a packet's start, not a packet carried.
    """
    return [layer for layer in pkt.iterpayloads() if type(layer) in (IP, IPv6)]


def _is_pod(address: str, pod_net: ipaddress.IPv4Network, pod_net6: Optional[ipaddress.IPv6Network]) -> bool:
    addr: Address = ipaddress.ip_address(address)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped in pod_net
        return pod_net6 is not None and addr in pod_net6
    return addr in pod_net


def classify(
    packets: Iterable[ScapyPacket],
    pod_net: ipaddress.IPv4Network = POD_SUPERNET,
    wireguard_ports: Collection[int] = WIREGUARD_PORTS,
    *,
    pod_net6: Optional[ipaddress.IPv6Network] = None,
    node_net: ipaddress.IPv4Network = UNDERLAY,
) -> Summary:
    """Sort every IPv4 and IPv6 packet of a capture (non-IP frames such as ARP are ignored).

    ``pod_net6`` is the pods' IPv6 network, if they have one; without it no
    IPv6 packet is ``plaintext`` by address (an IPv4-mapped pod address still
    is), and any IPv6 packet that is not ESP, WireGuard or control is ``other``,
    which fails a test asserting ``kinds() == {"esp"}`` just the same.
    ``node_net`` holds the node addresses IGMP may come from.
    """
    summary = Summary()
    for pkt in packets:
        seen = _classify_one(pkt, pod_net, wireguard_ports, pod_net6, node_net)
        if seen is not None:
            summary.packets.append(seen)
            summary.raw.append(pkt)
    return summary


def _classify_one(pkt: ScapyPacket, pod_net: ipaddress.IPv4Network, wireguard_ports: Collection[int],
                  pod_net6: Optional[ipaddress.IPv6Network], node_net: ipaddress.IPv4Network) -> Optional[Seen]:
    headers = _network_headers(pkt)
    if not headers:
        return None
    outer = headers[0]
    if isinstance(outer, IPv6):
        proto = _upper_layer(outer)[0]
    else:
        proto = outer.proto
    esp = pkt.getlayer(ESP)
    udp = pkt.getlayer(UDP)
    if any(_is_pod(h.src, pod_net, pod_net6) or _is_pod(h.dst, pod_net, pod_net6) for h in headers):
        return Seen("plaintext", outer.src, outer.dst, proto=proto)
    if (detail := control_kind(outer, node_net)) is not None:
        return Seen("control", outer.src, outer.dst, proto=proto, detail=detail)
    if esp is not None:
        return Seen("esp", outer.src, outer.dst, spi=esp.spi, seq=esp.seq, proto=proto)
    if udp is not None and (udp.sport in wireguard_ports or udp.dport in wireguard_ports):
        return Seen("wireguard", outer.src, outer.dst, proto=proto, sport=udp.sport, dport=udp.dport)
    return Seen("other", outer.src, outer.dst, proto=proto)


# -- reading a capture ------------------------------------------------------------

_DLT_EN10MB = 1
_ETHERTYPE_IPV4 = b"\x08\x00"
_ETHER_LEN = 14
_PROTO_ESP, _PROTO_UDP = 50, 17
_ESP_HEADER = struct.Struct("!II")  # SPI, sequence number
_UDP_PORTS = struct.Struct("!HH")  # source, destination


def _udp_payload_left_raw(sport: int, dport: int) -> bool:
    """Whether scapy leaves the payload between these ports undissected (with its VXLAN layer loaded, 4789
    it would not)."""
    return UDP(sport=sport, dport=dport).guess_payload_class(b"\x00" * 8) is conf.raw_layer


def _header_seen(frame: bytes, pod_net: ipaddress.IPv4Network, wireguard_ports: Collection[int],
                 raw_ports: dict[tuple[int, int], bool]) -> Optional[Seen]:
    """The Seen of an Ethernet frame read from its IPv4 and ESP or UDP headers alone, or None.

    Only frames whose kind those headers decide are read here: IPv4, not a
    fragment, neither address in the pod network, carrying ESP or UDP to or
    from a WireGuard port, with the whole upper-layer header inside the
    packet's total length, and (for UDP) ports scapy binds no layer to. Nothing
    inside them is dissected by scapy either (ESP and WireGuard payload is
    ciphertext; neither is IGMP or ICMPv6).
    """
    if len(frame) < _ETHER_LEN + 20 or frame[12:14] != _ETHERTYPE_IPV4:
        return None
    version_ihl = frame[_ETHER_LEN]
    ihl = (version_ihl & 0x0F) * 4
    total = int.from_bytes(frame[16:18], "big")
    if version_ihl >> 4 != 4 or ihl < 20 or int.from_bytes(frame[20:22], "big") & 0x3FFF:  # MF or an offset
        return None
    start = _ETHER_LEN + ihl
    if total < ihl + 8 or len(frame) < start + 8:
        return None
    src, dst = ipaddress.IPv4Address(frame[26:30]), ipaddress.IPv4Address(frame[30:34])
    if src in pod_net or dst in pod_net:
        return None
    proto = frame[23]
    if proto == _PROTO_ESP:
        spi, seq = _ESP_HEADER.unpack_from(frame, start)
        return Seen("esp", str(src), str(dst), spi=spi, seq=seq, proto=proto)
    if proto == _PROTO_UDP:
        sport, dport = _UDP_PORTS.unpack_from(frame, start)
        if sport not in wireguard_ports and dport not in wireguard_ports:
            return None
        if (sport, dport) not in raw_ports:  # scapy's bindings, asked once per pair of ports in a capture
            raw_ports[sport, dport] = _udp_payload_left_raw(sport, dport)
        if raw_ports[sport, dport]:
            return Seen("wireguard", str(src), str(dst), proto=proto, sport=sport, dport=dport)
    return None


def read_summary(
    path: str,
    pod_net: ipaddress.IPv4Network = POD_SUPERNET,
    wireguard_ports: Collection[int] = WIREGUARD_PORTS,
    *,
    pod_net6: Optional[ipaddress.IPv6Network] = None,
    node_net: ipaddress.IPv4Network = UNDERLAY,
) -> Summary:
    """``classify(rdpcap(path), ...)``, reading ESP and WireGuard frames from their headers (see the module docstring)."""
    with RawPcapReader(path) as reader:
        if reader.linktype != _DLT_EN10MB:  # not Ethernet (tcpdump -i any): scapy reads it all
            return classify(rdpcap(path), pod_net, wireguard_ports, pod_net6=pod_net6, node_net=node_net)
        summary, raw_ports = Summary(), dict[tuple[int, int], bool]()
        for frame, _meta in reader:
            seen = _header_seen(frame, pod_net, wireguard_ports, raw_ports)
            if seen is None:
                pkt = Ether(frame)
                seen = _classify_one(pkt, pod_net, wireguard_ports, pod_net6, node_net)
                if seen is None:
                    continue
                summary.packets.append(seen)
                summary.raw.append(pkt)
            else:
                summary.packets.append(seen)
                summary.raw.append(frame)
        return summary
