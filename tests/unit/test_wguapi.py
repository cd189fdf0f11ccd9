"""wireguard-go's UAPI text protocol (agent.kernel.wguapi), against replies it really sent.

Properties asserted:
- a ``get=1`` reply (captured from wireguard-go 0.0.20220316) parses into
  the device's public key (derived from its private key line, which is not
  kept), port, fwmark and peers with endpoint, allowed IPs and counters;
- a peer change renders as the lines wireguard-go expects: hex keys,
  ``update_only`` for updates, ``replace_allowed_ips`` only when the allowed
  IPs are set, ``remove=true``, IPv6 endpoints in brackets.
"""

from __future__ import annotations

import base64
import ipaddress

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
