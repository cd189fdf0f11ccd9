"""WireGuard devices: kernel (generic netlink) and userspace (wireguard-go UAPI).

Both backends speak the same small interface, so one reconcile drives either::

    backend, created = open_backend("sealnet_wg0", "auto", ipr)
    state = backend.read()                       # DeviceState: public key, port, fwmark, peers
    backend.set_device(private_key=pair.private, listen_port=51871, fwmark=0)
    failures = backend.apply_peers(changes)      # wgplan.PeerChange list; [] when all applied
    backend.name                                 # "kernel" | "userspace"

- ``KernelBackend``: the ``wireguard`` link type and pyroute2's WireGuard
  generic netlink family. Peers go in batches (many peers per
  WG_CMD_SET_DEVICE message) rather than pyroute2's one peer per request.
- ``UserspaceBackend`` (agent.kernel.wguapi): wireguard-go, spawned as ``wireguard-go <ifname>``
  when the interface is missing, configured through its UAPI socket
  ``/var/run/wireguard/<ifname>.sock`` (``get=1`` / ``set=1``, key=value
  lines, keys in hex). That directory is shared by every network namespace
  of the host, so an interface name must be unique across namespaces;
  a socket served from another namespace is refused, not adopted.

``open_backend`` adopts an existing interface as it is (restart: no
teardown); with ``auto`` a missing one is created as a kernel link if the
kernel can, else by wireguard-go. Private keys go to the device and nowhere
else: reading a device reports its public key only.
"""

from __future__ import annotations

import base64
import errno as errnos
import ipaddress
import logging
import os
import socket
import struct
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence

from pyroute2 import WireGuard
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, SOL_NETLINK
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_SET_DEVICE, WG_GENL_VERSION, WGPEER_F_REMOVE_ME, WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY, wgmsg,
)

from agent.errors import ConfigError, KernelError
from agent.kernel.wguapi import UserspaceBackend, socket_path, spawn_wireguard_go
from agent.model import IPNetwork, KeyMaterial
from agent.wireguard.plan import DeviceState, PeerChange, PeerFailure, PeerState

log = logging.getLogger(__name__)
# pyroute2 logs every message it parses at DEBUG ("message %s"), and the
# kernel's WG_CMD_GET_DEVICE reply carries the device's private key: never
# let those lines through, whatever --log-level says.
_pyroute2_log = logging.getLogger("pyroute2")
_pyroute2_log.setLevel(max(_pyroute2_log.level, logging.INFO))

NETLINK_CAP_ACK = 10  # error replies echo only the header: a refused request never carries the key back
PEERS_PER_MESSAGE = 256  # ~30 KiB per message, far below the socket buffer


class Backend(Protocol):
    name: str
    interface: str

    def read(self) -> DeviceState: ...

    def set_device(self, private_key: Optional[KeyMaterial] = None, listen_port: Optional[int] = None,
                   fwmark: Optional[int] = None) -> None: ...

    def apply_peers(self, changes: Sequence[PeerChange]) -> list[PeerFailure]: ...

    def close(self) -> None: ...


# -- selection -----------------------------------------------------------------


def link_kind(ipr: Any, ifname: str) -> Optional[str]:
    """The link's IFLA_INFO_KIND ('' when it has none), None when it does not exist."""
    index = ipr.link_lookup(ifname=ifname)
    if not index:
        return None
    return str(ipr.get_links(index[0])[0].get(("linkinfo", "kind")) or "")


def detect(ipr: Any, ifname: str) -> Optional[str]:
    """'kernel', 'userspace' or None (no such link); ConfigError for a foreign link."""
    kind = link_kind(ipr, ifname)
    if kind is None:
        return None
    if kind == "wireguard":
        return "kernel"
    if kind == "tun" and os.path.exists(socket_path(ifname)):
        return "userspace"
    raise ConfigError(
        f"--interface: {ifname} exists and is a {kind or 'typeless'} link, not a WireGuard device; "
        f"choose another name or delete it"
    )


def open_backend(ifname: str, choice: str, ipr: Any, wireguard_go: str = "wireguard-go") -> tuple[Backend, bool]:
    """The backend for ``ifname`` and whether the interface was created now."""
    if choice not in ("auto", "kernel", "userspace"):
        raise ConfigError(f"--backend: {choice!r} is not one of auto, kernel, userspace")
    found = detect(ipr, ifname)
    if found is not None:
        if choice not in ("auto", found):
            raise ConfigError(
                f"--backend {choice}: {ifname} already exists as a {found} WireGuard device; "
                f"use --backend {found} or auto, or delete the interface"
            )
        backend: Backend = KernelBackend(ifname) if found == "kernel" else UserspaceBackend(ifname)
        log.info("wireguard interface adopted interface=%s backend=%s", ifname, found)
        return backend, False
    if choice in ("auto", "kernel"):
        try:
            ipr.link("add", ifname=ifname, kind="wireguard")
            log.info("wireguard interface created interface=%s backend=kernel", ifname)
            return KernelBackend(ifname), True
        except NetlinkError as e:
            if choice == "kernel" or e.code not in (errnos.EOPNOTSUPP, errnos.ENOENT, errnos.ENODEV):
                raise KernelError(f"cannot create WireGuard link {ifname}: {os.strerror(e.code)}"
                                  f"{' (no wireguard kernel module?)' if e.code == errnos.EOPNOTSUPP else ''}",
                                  e.code) from e
            log.info("kernel WireGuard unavailable (%s); using wireguard-go", os.strerror(e.code))
    spawn_wireguard_go(ifname, ipr, wireguard_go)
    log.info("wireguard interface created interface=%s backend=userspace", ifname)
    return UserspaceBackend(ifname), True


# -- kernel --------------------------------------------------------------------


class KernelBackend:
    """Kernel WireGuard through generic netlink (pyroute2's ``wireguard`` family)."""

    name = "kernel"

    def __init__(self, ifname: str) -> None:
        self.interface = ifname
        try:
            self._wg = WireGuard()
        except NetlinkError as e:
            raise KernelError(f"wireguard generic netlink family unavailable: {os.strerror(e.code)}", e.code) from e
        self._wg.asyncore.socket.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self._genl: Optional[socket.socket] = None  # peer writes, opened on first use
        self._seq = 0

    def close(self) -> None:
        if self._genl is not None:
            self._genl.close()
        self._wg.close()

    def read(self) -> DeviceState:
        try:
            msgs = self._wg.info(self.interface)
        except NetlinkError as e:
            raise KernelError(f"wireguard get {self.interface}: {os.strerror(e.code)}", e.code) from e
        # pyroute2 carries the request; its per-attribute lookups would cost
        # ~0.1 ms a peer, so the answers' bytes are walked here instead.
        return parse_get_device((_raw(m) for m in msgs), self.interface)

    def set_device(self, private_key: Optional[KeyMaterial] = None, listen_port: Optional[int] = None,
                   fwmark: Optional[int] = None) -> None:
        attrs: list[list[Any]] = [["WGDEVICE_A_IFNAME", self.interface]]
        if private_key is not None:
            attrs.append(["WGDEVICE_A_PRIVATE_KEY", base64.b64encode(bytes(private_key))])
        if listen_port is not None:
            attrs.append(["WGDEVICE_A_LISTEN_PORT", listen_port])
        if fwmark is not None:
            attrs.append(["WGDEVICE_A_FWMARK", fwmark])
        what = ", ".join(n for n, v in (("private key", private_key), ("port", listen_port), ("fwmark", fwmark))
                         if v is not None)
        try:
            self._send(attrs)
        except NetlinkError as e:
            raise KernelError(f"wireguard set {self.interface} ({what}): {os.strerror(e.code)}", e.code) from e

    def apply_peers(self, changes: Sequence[PeerChange]) -> list[PeerFailure]:
        failures: list[PeerFailure] = []
        for start in range(0, len(changes), PEERS_PER_MESSAGE):
            batch = changes[start:start + PEERS_PER_MESSAGE]
            if not self._set_peers(batch):
                continue
            # The kernel stops at the first bad peer of a message; redo
            # the batch peer by peer so each failure is named and the
            # others still apply (re-applying the applied ones is a no-op).
            for change in batch:
                code = self._set_peers([change])
                if code:
                    failures.append(PeerFailure(change, os.strerror(code)))
        return failures

    def _set_peers(self, changes: Sequence[PeerChange]) -> int:
        """One WG_CMD_SET_DEVICE with ``changes``; the kernel's errno, 0 when applied.

        Encoded here, byte for byte what pyroute2 would send, and sent on a
        plain generic netlink socket: pyroute2's encoder costs ~0.1 ms a peer,
        more than the kernel's work."""
        if self._genl is None:
            self._genl = _genl_socket()
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        data = encode_set_peers(self._wg.prid, self._seq, self.interface, changes)
        try:
            self._genl.send(data)
            return _ack(self._genl, self._seq)
        except OSError as e:
            raise KernelError(f"wireguard set {self.interface} peers: {e.strerror or e}", e.errno) from e

    def _send(self, attrs: list[list[Any]]) -> None:
        msg = wgmsg()
        msg["cmd"] = WG_CMD_SET_DEVICE
        msg["version"] = WG_GENL_VERSION
        msg["attrs"] = attrs
        tuple(self._wg.nlm_request(msg, msg_type=self._wg.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK))


# -- WG_CMD_SET_DEVICE with peers ----------------------------------------------

WGDEVICE_A_IFNAME = 2
NETLINK_GENERIC = 16  # linux/netlink.h (not in every Python socket module)
WGPEER_A_FLAGS = 3
NLA_F_NESTED = 0x8000
NLMSG_ERROR = 2
_NLHDR = struct.Struct("=IHHII")
_SOCKADDR_IN = struct.Struct("=H2s4s8x")     # family, port (network order), address, zero
_SOCKADDR_IN6 = struct.Struct("=H2sI16sI")   # family, port, flowinfo, address, scope id


def _attr(atype: int, payload: bytes) -> bytes:
    return _NLA.pack(4 + len(payload), atype) + payload + b"\0" * (-len(payload) % 4)


def encode_set_peers(family_id: int, seq: int, ifname: str, changes: Sequence[PeerChange]) -> bytes:
    """One WG_CMD_SET_DEVICE request (NLM_F_REQUEST | NLM_F_ACK) changing ``changes``.

    The layout is pyroute2's (checked byte for byte in the unit tests):
    array entries numbered from 1, each flagged NLA_F_NESTED."""
    peers = b"".join(_attr(NLA_F_NESTED | i, _peer_attrs(c)) for i, c in enumerate(changes, 1))
    body = (bytes([WG_CMD_SET_DEVICE, WG_GENL_VERSION, 0, 0]) + _attr(WGDEVICE_A_IFNAME, ifname.encode() + b"\0")
            + _attr(NLA_F_NESTED | WGDEVICE_A_PEERS, peers))
    return _NLHDR.pack(16 + len(body), family_id, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def _peer_attrs(change: PeerChange) -> bytes:
    out = _attr(WGPEER_A_PUBLIC_KEY, base64.b64decode(change.public_key))
    if change.op == "remove":
        return out + _attr(WGPEER_A_FLAGS, _U32.pack(WGPEER_F_REMOVE_ME))
    flags = WGPEER_F_UPDATE_ONLY if change.op == "update" else 0
    if change.allowed_ips is not None:
        flags |= WGPEER_F_REPLACE_ALLOWEDIPS
    out += _attr(WGPEER_A_FLAGS, _U32.pack(flags))
    if change.endpoint is not None:
        ip, port = change.endpoint
        if ip.version == 4:
            out += _attr(WGPEER_A_ENDPOINT, _SOCKADDR_IN.pack(socket.AF_INET, _BE16.pack(port), ip.packed))
        else:
            out += _attr(WGPEER_A_ENDPOINT, _SOCKADDR_IN6.pack(socket.AF_INET6, _BE16.pack(port), 0, ip.packed, 0))
    if change.keepalive is not None:
        out += _attr(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, _U16.pack(change.keepalive))
    if change.allowed_ips is not None:
        out += _attr(NLA_F_NESTED | WGPEER_A_ALLOWEDIPS, b"".join(
            _attr(NLA_F_NESTED | i, _attr(WGALLOWEDIP_A_FAMILY, _U16.pack(socket.AF_INET if n.version == 4
                                                                          else socket.AF_INET6))
                  + _attr(WGALLOWEDIP_A_IPADDR, n.network_address.packed)
                  + _attr(WGALLOWEDIP_A_CIDR_MASK, bytes([n.prefixlen])))
            for i, n in enumerate(change.allowed_ips, 1)))
    return out


def _genl_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
    try:
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors echo the header only, never the request
        sock.settimeout(ACK_TIMEOUT)
    except OSError:
        sock.close()
        raise
    return sock


ACK_TIMEOUT = 30.0


def _ack(sock: Any, seq: int) -> int:
    """Wait for the answer to request ``seq``: 0 or the errno."""
    while True:
        data = sock.recv(1 << 16)
        offset = 0
        while offset + 20 <= len(data):
            length, mtype, _, rseq, _ = _NLHDR.unpack_from(data, offset)
            if length < 16:
                break
            if mtype == NLMSG_ERROR and rseq == seq:
                return -int(struct.unpack_from("=i", data, offset + 16)[0])
            offset += (length + 3) & ~3


# -- WG_CMD_GET_DEVICE answers -------------------------------------------------

WGDEVICE_A_PUBLIC_KEY, WGDEVICE_A_LISTEN_PORT, WGDEVICE_A_FWMARK, WGDEVICE_A_PEERS = 4, 6, 7, 8
WGPEER_A_PUBLIC_KEY, WGPEER_A_ENDPOINT, WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL = 1, 4, 5
WGPEER_A_LAST_HANDSHAKE_TIME = 6
WGPEER_A_RX_BYTES, WGPEER_A_TX_BYTES, WGPEER_A_ALLOWEDIPS = 7, 8, 9
WGALLOWEDIP_A_FAMILY, WGALLOWEDIP_A_IPADDR, WGALLOWEDIP_A_CIDR_MASK = 1, 2, 3
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
GENL_HEADER = 20  # nlmsghdr (16) + genlmsghdr (4)
_NLA = struct.Struct("=HH")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_TIMESPEC = struct.Struct("=qq")  # struct __kernel_timespec
_BE16 = struct.Struct(">H")


def _raw(msg: Any) -> bytes:
    """One answer's bytes out of pyroute2's message (a view into the datagram it came in)."""
    offset = msg.offset or 0
    return bytes(msg.data[offset:offset + msg["header"]["length"]])


def _nlas(data: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of the attributes in data[pos:end]."""
    while pos + 4 <= end:
        alen, atype = _NLA.unpack_from(data, pos)
        if alen < 4:
            return
        yield atype & NLA_TYPE_MASK, pos + 4, min(pos + alen, end)
        pos += (alen + 3) & ~3


def parse_get_device(messages: Iterable[bytes], ifname: str) -> DeviceState:
    """The device in a WG_CMD_GET_DEVICE dump: one netlink message's bytes each.

    A large device comes in several messages; a peer's allowed IPs may
    continue in the next one under the same public key (with nothing else).
    Only what the state holds is decoded; the private key attribute is
    skipped, never read."""
    public: Optional[str] = None
    port = fwmark = 0
    peers: dict[str, list[Any]] = {}  # key -> [endpoint, allowed IPs, handshake, rx, tx, keepalive]
    for data in messages:
        for atype, start, end in _nlas(data, GENL_HEADER, len(data)):
            if atype == WGDEVICE_A_PEERS:
                for _, pstart, pend in _nlas(data, start, end):
                    _peer(data, pstart, pend, peers)
            elif atype == WGDEVICE_A_PUBLIC_KEY:
                public = base64.b64encode(data[start:end]).decode("ascii")
            elif atype == WGDEVICE_A_LISTEN_PORT:
                port = _U16.unpack_from(data, start)[0]
            elif atype == WGDEVICE_A_FWMARK:
                fwmark = _U32.unpack_from(data, start)[0]
    return DeviceState("kernel", ifname, public, port, fwmark, {
        k: PeerState(k, v[0], frozenset(v[1]), v[2], v[3], v[4], v[5]) for k, v in peers.items()
    })


def _peer(data: bytes, pos: int, end: int, peers: dict[str, list[Any]]) -> None:
    attrs = {atype: (start, stop) for atype, start, stop in _nlas(data, pos, end)}
    span = attrs.get(WGPEER_A_PUBLIC_KEY)
    if span is None:
        return
    key = _key_of(data[span[0]:span[1]])
    entry = peers.get(key)
    if entry is None:
        entry = peers[key] = [None, set(), 0.0, 0, 0, 0]
    span = attrs.get(WGPEER_A_ENDPOINT)
    if span is not None:
        endpoint = _endpoint(data[span[0]:span[1]])
        if endpoint is not None:
            entry[0] = endpoint
    span = attrs.get(WGPEER_A_LAST_HANDSHAKE_TIME)
    if span is not None and span[1] - span[0] >= 16:
        sec, nsec = _TIMESPEC.unpack_from(data, span[0])
        entry[2] = sec + nsec / 1e9
    span = attrs.get(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL)
    if span is not None:
        entry[5] = _U16.unpack_from(data, span[0])[0]
    span = attrs.get(WGPEER_A_RX_BYTES)
    if span is not None:
        entry[3] = _U64.unpack_from(data, span[0])[0]
    span = attrs.get(WGPEER_A_TX_BYTES)
    if span is not None:
        entry[4] = _U64.unpack_from(data, span[0])[0]
    span = attrs.get(WGPEER_A_ALLOWEDIPS)
    if span is not None:
        for _, astart, aend in _nlas(data, span[0], span[1]):
            family = addr = cidr = None
            for atype, start, stop in _nlas(data, astart, aend):
                if atype == WGALLOWEDIP_A_FAMILY:
                    family = _U16.unpack_from(data, start)[0]
                elif atype == WGALLOWEDIP_A_IPADDR:
                    addr = data[start:stop]
                elif atype == WGALLOWEDIP_A_CIDR_MASK:
                    cidr = data[start]
            if family in (socket.AF_INET, socket.AF_INET6) and addr is not None and cidr is not None:
                entry[1].add(_allowed(addr, cidr))


_MEMO_MAX = 1 << 17
_keys: dict[bytes, str] = {}
_networks: dict[tuple[bytes, int], IPNetwork] = {}


def _key_of(raw: bytes) -> str:
    key = _keys.get(raw)
    if key is None:
        if len(_keys) >= _MEMO_MAX:
            _keys.clear()
        key = _keys[raw] = base64.b64encode(raw).decode("ascii")
    return key


def _allowed(addr: bytes, cidr: int) -> IPNetwork:
    net = _networks.get((addr, cidr))
    if net is None:
        if len(_networks) >= _MEMO_MAX:
            _networks.clear()
        net = _networks[(addr, cidr)] = ipaddress.ip_network((ipaddress.ip_address(addr), cidr), strict=False)
    return net


def _endpoint(raw: bytes) -> Optional[tuple[Any, int]]:
    """A sockaddr_in / sockaddr_in6; None for none (port 0)."""
    if len(raw) < 8:
        return None
    family = _U16.unpack_from(raw, 0)[0]
    port = _BE16.unpack_from(raw, 2)[0]
    if not port:
        return None
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        return ipaddress.IPv6Address(raw[8:24]), port
    return None
