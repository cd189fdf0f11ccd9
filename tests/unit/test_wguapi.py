"""wireguard-go's UAPI text protocol (agent.kernel.wguapi), against replies it really sent.

Properties asserted:
- a ``get=1`` reply (captured from wireguard-go 0.0.20220316) parses into
  the device's public key (derived from its private key line, which is not
  kept), port, fwmark and peers with endpoint, allowed IPs and counters;
- a peer change renders as the lines wireguard-go expects: hex keys,
  ``update_only`` for updates, ``replace_allowed_ips`` only when the allowed
  IPs are set, ``remove=true``, IPv6 endpoints in brackets;
- parsing is memoized without aliasing: the same reply twice gives equal
  states, IPv6 and IPv4 endpoints and allowed IPs alike;
- the kernel backend's WG_CMD_GET_DEVICE answers (encoded by pyroute2, two
  messages in one datagram, a peer's allowed IPs continued in the second)
  parse into the same state, without the private key;
- its WG_CMD_SET_DEVICE peer requests are byte for byte what pyroute2 sends
  for the same changes (add, update of endpoint or allowed IPs, remove,
  IPv4 and IPv6), and a refused batch is redone one peer per message, so
  exactly the bad peer is named.
"""

from __future__ import annotations

import base64
import ipaddress
import socket
from typing import Any

import pytest

from agent.kernel.wguapi import format_endpoint, parse_endpoint, parse_get, uapi_peer
from agent.wireguard.keys import public_key_of
from agent.wireguard.plan import PeerChange

PRIVATE = bytes(range(1, 33))
PEER = bytes([0x11]) * 32
PEER_B64 = base64.b64encode(PEER).decode()

GET_REPLY = (
    f"private_key={PRIVATE.hex()}\n"
    "listen_port=51871\n"
    "fwmark=94\n"
    f"public_key={PEER.hex()}\n"
    f"preshared_key={'0' * 64}\n"
    "protocol_version=1\n"
    "endpoint=172.18.0.3:51871\n"
    "last_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=500000000\n"
    "tx_bytes=348\n"
    "rx_bytes=404\n"
    "persistent_keepalive_interval=0\n"
    "allowed_ip=10.244.2.0/24\n"
    "allowed_ip=172.18.0.3/32\n"
    f"public_key={'22' * 32}\n"
    "protocol_version=1\n"
    "last_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\n"
    "tx_bytes=0\n"
    "rx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    "errno=0\n\n"
)


def test_parse_get_reply() -> None:
    state = parse_get(GET_REPLY, "wg0")
    assert state.public_key == public_key_of(PRIVATE)
    assert (state.backend, state.interface, state.listen_port, state.fwmark) == ("userspace", "wg0", 51871, 94)
    assert set(state.peers) == {PEER_B64, base64.b64encode(bytes([0x22]) * 32).decode()}
    peer = state.peers[PEER_B64]
    assert peer.endpoint == (ipaddress.ip_address("172.18.0.3"), 51871)
    assert peer.allowed_ips == {ipaddress.ip_network("10.244.2.0/24"), ipaddress.ip_network("172.18.0.3/32")}
    assert (peer.rx_bytes, peer.tx_bytes, peer.last_handshake) == (404, 348, 1700000000.5)
    quiet = state.peers[base64.b64encode(bytes([0x22]) * 32).decode()]
    assert quiet.endpoint is None and quiet.allowed_ips == frozenset()
    assert PRIVATE.hex() not in repr(state)


def test_parse_get_fresh_device_has_no_key() -> None:
    state = parse_get("listen_port=41663\nerrno=0\n\n", "wg0")
    assert state.public_key is None and state.peers == {} and state.listen_port == 41663


def test_render_add_update_remove() -> None:
    allowed = (ipaddress.ip_network("10.244.2.0/24"), ipaddress.ip_network("fd00:2::/64"))
    endpoint = (ipaddress.ip_address("172.18.0.3"), 51871)
    assert uapi_peer(PeerChange("add", PEER_B64, endpoint, allowed)) == (
        f"public_key={PEER.hex()}\nendpoint=172.18.0.3:51871\nreplace_allowed_ips=true\n"
        "allowed_ip=10.244.2.0/24\nallowed_ip=fd00:2::/64\n"
    )
    assert uapi_peer(PeerChange("update", PEER_B64, endpoint, None)) == (
        f"public_key={PEER.hex()}\nupdate_only=true\nendpoint=172.18.0.3:51871\n"
    )
    assert uapi_peer(PeerChange("remove", PEER_B64)) == f"public_key={PEER.hex()}\nremove=true\n"


def test_endpoints_round_trip() -> None:
    for text in ("172.18.0.3:51871", "[fd00::3]:51871"):
        assert format_endpoint(parse_endpoint(text)) == text


def test_parse_get_ipv6_and_repeated_reply_are_equal() -> None:
    reply = (f"listen_port=51871\npublic_key={PEER.hex()}\nendpoint=[fd00::3]:51871\n"
             "allowed_ip=fd00:2::/64\nallowed_ip=10.244.2.0/24\nallowed_ip=172.18.0.3/32\n"
             f"public_key={'33' * 32}\nendpoint=172.18.0.4:51872\nallowed_ip=10.244.3.0/24\nerrno=0\n\n")
    first, again = parse_get(reply, "wg0"), parse_get(reply, "wg0")
    assert first == again and first.peers == again.peers
    peer = first.peers[PEER_B64]
    assert peer.endpoint == (ipaddress.ip_address("fd00::3"), 51871)
    assert peer.allowed_ips == {ipaddress.ip_network(n) for n in ("fd00:2::/64", "10.244.2.0/24", "172.18.0.3/32")}
    other = first.peers[base64.b64encode(bytes([0x33]) * 32).decode()]
    assert other.endpoint == (ipaddress.ip_address("172.18.0.4"), 51872)
    assert other.allowed_ips == {ipaddress.ip_network("10.244.3.0/24")}


def test_parse_get_rejects_host_bits_like_ipaddress() -> None:
    with pytest.raises(ValueError):
        parse_get(f"public_key={PEER.hex()}\nallowed_ip=10.244.2.1/24\nerrno=0\n\n", "wg0")


# -- the kernel backend's genetlink answers ---------------------------------------


def test_kernel_get_device_answers() -> None:
    from pyroute2.netlink.generic.wireguard import WG_CMD_GET_DEVICE, wgmsg

    from agent.kernel.wireguard import _raw, parse_get_device

    b64 = lambda raw: base64.b64encode(raw)  # noqa: E731  (pyroute2 takes keys in base64)

    def allowed(family: int, addr: str, cidr: int) -> dict[str, Any]:
        return {"attrs": [["WGALLOWEDIP_A_FAMILY", family],
                          ["WGALLOWEDIP_A_IPADDR", ipaddress.ip_address(addr).packed],
                          ["WGALLOWEDIP_A_CIDR_MASK", cidr]]}

    def message(attrs: list[list[Any]]) -> bytes:
        m = wgmsg()
        m["cmd"], m["version"], m["attrs"] = WG_CMD_GET_DEVICE, 1, attrs
        m["header"]["type"], m["header"]["flags"] = 30, 2
        m.encode()
        return bytes(m.data)

    first = message([
        ["WGDEVICE_A_IFINDEX", 7], ["WGDEVICE_A_IFNAME", "wg0"],
        ["WGDEVICE_A_PRIVATE_KEY", b64(PRIVATE)], ["WGDEVICE_A_PUBLIC_KEY", b64(public_raw())],
        ["WGDEVICE_A_LISTEN_PORT", 51871], ["WGDEVICE_A_FWMARK", 94],
        ["WGDEVICE_A_PEERS", [
            {"attrs": [["WGPEER_A_PUBLIC_KEY", b64(PEER)],
                       ["WGPEER_A_ENDPOINT", {"addr": "172.18.0.3", "port": 51871}],
                       ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1700000000, "tv_nsec": 500000000}],
                       ["WGPEER_A_RX_BYTES", 404], ["WGPEER_A_TX_BYTES", 348],
                       ["WGPEER_A_ALLOWEDIPS", [allowed(socket.AF_INET, "10.244.2.0", 24)]]]},
            {"attrs": [["WGPEER_A_PUBLIC_KEY", b64(bytes([0x22]) * 32)],
                       ["WGPEER_A_ENDPOINT", {"addr": "fd00::4", "port": 51872, "flowinfo": 0, "scope_id": 0}],
                       ["WGPEER_A_ALLOWEDIPS", [allowed(socket.AF_INET6, "fd00:4::", 64)]]]},
        ]],
    ])
    # The next message continues the first peer's allowed IPs, and adds a peer without endpoint.
    second = message([
        ["WGDEVICE_A_IFINDEX", 7], ["WGDEVICE_A_IFNAME", "wg0"],
        ["WGDEVICE_A_PEERS", [
            {"attrs": [["WGPEER_A_PUBLIC_KEY", b64(PEER)],
                       ["WGPEER_A_ALLOWEDIPS", [allowed(socket.AF_INET, "172.18.0.3", 32)]]]},
            {"attrs": [["WGPEER_A_PUBLIC_KEY", b64(bytes([0x33]) * 32)]]},
        ]],
    ])
    datagram = first + second
    msgs = []
    for offset in (0, len(first)):  # as pyroute2's marshal hands them over: views into one datagram
        m = wgmsg(datagram, offset=offset)
        m.decode()
        msgs.append(m)
    state = parse_get_device((_raw(m) for m in msgs), "wg0")
    assert (state.backend, state.interface, state.public_key, state.listen_port, state.fwmark) == \
        ("kernel", "wg0", public_key_of(PRIVATE), 51871, 94)
    peer = state.peers[PEER_B64]
    assert peer.endpoint == (ipaddress.ip_address("172.18.0.3"), 51871)
    assert peer.allowed_ips == {ipaddress.ip_network("10.244.2.0/24"), ipaddress.ip_network("172.18.0.3/32")}
    assert (peer.rx_bytes, peer.tx_bytes, peer.last_handshake) == (404, 348, 1700000000.5)
    v6 = state.peers[base64.b64encode(bytes([0x22]) * 32).decode()]
    assert v6.endpoint == (ipaddress.ip_address("fd00::4"), 51872)
    assert v6.allowed_ips == {ipaddress.ip_network("fd00:4::/64")}
    quiet = state.peers[base64.b64encode(bytes([0x33]) * 32).decode()]
    assert quiet.endpoint is None and quiet.allowed_ips == frozenset()
    assert len(state.peers) == 3
    assert PRIVATE.hex() not in repr(state) and base64.b64encode(PRIVATE).decode() not in repr(state)


def public_raw() -> bytes:
    return base64.b64decode(public_key_of(PRIVATE))


def pyroute2_peer(change: PeerChange) -> dict[str, Any]:
    """The peer as pyroute2's WireGuard message class takes it (the agent's former encoding, the oracle)."""
    from pyroute2.netlink.generic.wireguard import WGPEER_F_REMOVE_ME, WGPEER_F_REPLACE_ALLOWEDIPS, WGPEER_F_UPDATE_ONLY

    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", change.public_key]]
    if change.op == "remove":
        return {"attrs": attrs + [["WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME]]}
    flags = (WGPEER_F_UPDATE_ONLY if change.op == "update" else 0) | \
        (WGPEER_F_REPLACE_ALLOWEDIPS if change.allowed_ips is not None else 0)
    attrs.append(["WGPEER_A_FLAGS", flags])
    if change.endpoint is not None:
        ep: dict[str, Any] = {"addr": str(change.endpoint[0]), "port": change.endpoint[1]}
        if change.endpoint[0].version == 6:
            ep.update(flowinfo=0, scope_id=0)
        attrs.append(["WGPEER_A_ENDPOINT", ep])
    if change.allowed_ips is not None:
        attrs.append(["WGPEER_A_ALLOWEDIPS", [
            {"attrs": [["WGALLOWEDIP_A_FAMILY", socket.AF_INET if n.version == 4 else socket.AF_INET6],
                       ["WGALLOWEDIP_A_IPADDR", n.network_address.packed],
                       ["WGALLOWEDIP_A_CIDR_MASK", n.prefixlen]]} for n in change.allowed_ips]])
    return {"attrs": attrs}


CHANGES = [
    PeerChange("add", PEER_B64, (ipaddress.ip_address("172.18.0.3"), 51871),
               (ipaddress.ip_network("10.244.2.0/24"), ipaddress.ip_network("fd00:2::/64"))),
    PeerChange("update", PEER_B64, (ipaddress.ip_address("fd00::3"), 51872), None),
    PeerChange("update", PEER_B64, None, (ipaddress.ip_network("10.9.0.0/16"),)),
    PeerChange("update", PEER_B64, None, ()),
    PeerChange("remove", PEER_B64),
]


def test_kernel_set_peers_is_byte_for_byte_what_pyroute2_sends() -> None:
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.generic.wireguard import WG_CMD_SET_DEVICE, WG_GENL_VERSION, wgmsg

    from agent.kernel.wireguard import encode_set_peers

    for changes in [[c] for c in CHANGES] + [CHANGES]:
        m = wgmsg()
        m["cmd"], m["version"] = WG_CMD_SET_DEVICE, WG_GENL_VERSION
        m["attrs"] = [["WGDEVICE_A_IFNAME", "sealnet_wg0"], ["WGDEVICE_A_PEERS", [pyroute2_peer(c) for c in changes]]]
        m["header"].update(type=27, flags=NLM_F_REQUEST | NLM_F_ACK, sequence_number=9, pid=0)
        m.encode()
        assert encode_set_peers(27, 9, "sealnet_wg0", changes) == bytes(m.data), changes


class FakeGenl:
    """A generic netlink socket that refuses every message holding a peer with ``bad`` allowed IPs."""

    def __init__(self, bad: str) -> None:
        self.bad = ipaddress.ip_network(bad).network_address.packed
        self.sent: list[bytes] = []
        self.answers: list[bytes] = []

    def send(self, data: bytes) -> int:
        import struct
        self.sent.append(data)
        seq = struct.unpack_from("=I", data, 8)[0]
        code = 22 if self.bad in data else 0
        self.answers.append(struct.pack("=IHHIIi", 36, 2, 0x100, seq, 0, -code) + data[:16])
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.answers.pop(0)

    def close(self) -> None:
        pass


def test_kernel_apply_peers_redoes_a_refused_batch_peer_by_peer() -> None:
    from agent.kernel import wireguard

    backend = wireguard.KernelBackend.__new__(wireguard.KernelBackend)
    backend.interface, backend._seq = "wg0", 0
    backend._wg = type("WG", (), {"prid": 27})()
    backend._genl = FakeGenl("10.0.6.0/24")  # type: ignore[assignment]
    changes = [PeerChange("add", base64.b64encode(i.to_bytes(2, "big") * 16).decode(),
                          (ipaddress.ip_address("172.18.0.3"), 51871), (ipaddress.ip_network(f"10.{i >> 8}.{i & 255}.0/24"),),
                          f"node-{i}")
               for i in range(wireguard.PEERS_PER_MESSAGE + 10)]
    failures = backend.apply_peers(changes)
    assert [(f.change.node, f.reason) for f in failures] == [("node-6", "Invalid argument")]
    # One message per batch; the refused first batch again one peer per message.
    assert len(backend._genl.sent) == 2 + wireguard.PEERS_PER_MESSAGE  # type: ignore[attr-defined]
