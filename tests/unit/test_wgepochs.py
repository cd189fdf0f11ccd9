"""WireGuard key epoch rotation without loss (agent.wireguard.epochs and its edges).

Properties asserted:
- ``slot_names``: the rotation interface is the first with its last 0 made
  1 (or ``1`` appended) on the next port; a name or port that leaves no room
  is a ConfigError naming the field, the value and what is allowed;
- ``plan_ring``: each of our interfaces is paired with the peer's key of
  its own epoch (endpoint on that key's port); a peer that advertises both
  keys keeps its routes on the previous interface (behind, pending, with a
  persistent keepalive on its new-interface peer) until a handshake on the
  current interface is recorded, then its routes move there and the
  keepalive goes, while its old peer stays configured; a peer only on the
  old epoch is behind but not pending; a peer with no epoch in common is
  paired with our current interface on the cluster's port; a peer without a
  usable key is rejected (fail closed: no peer, no tunnel route, its
  unreachable route stays); every tunnel route names its peer's egress
  device, exactly one per destination; no previous slot, one interface;
- ``load_ring``: first start makes a slot-0 pair; an epoch change keeps the
  old pair in ``wireguard-key-previous.json`` and puts the new one on the
  other slot; a restart returns the same two pairs; another epoch waits
  while a previous pair is kept; ``retire_previous`` forgets it and the
  next rotation goes back to the first slot; both files are 0600; the two
  pairs of a ring never share a slot;
- annotations: ``format_previous`` / ``parse_wireguard`` round trip (and
  feed ``plan_ring``); a bad epoch, port or previous-key annotation is a
  problem naming the annotation and its value, never an exception;
- the keepalive reaches both backends (UAPI text and WG_CMD_SET_DEVICE, byte
  for byte what pyroute2 sends), is read back, and clearing it (0) is sent;
- route keys include the device, so moving a peer's route to the other
  interface is one replace (an add), never a delete; the rtnetlink codec
  names each route's device and writes RTA_OIF by ``Route.dev``.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import pytest
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # type: ignore[import-untyped]

from agent.cluster import annotations as ann
from agent.errors import ConfigError, KernelError
from agent.kernel.wgroutes import Routing, diff_routes, route_key, route_of_key
from agent.kernel.wguapi import parse_get, uapi_peer
from agent.model import Node
from agent.wireguard.epochs import KEEPALIVE, PeerKey, RingPlan, Slot, plan_ring, slot_names
from agent.wireguard.keys import KEY_FILE, PREVIOUS_FILE, load_or_create, load_ring, retire_previous
from agent.wireguard.plan import (
    DEFAULT_PORT, FALLBACK_METRIC, FWMARK, ROUTE_TABLE, RTPROT_SEALNET, InterfaceConfig, Peer, PeerChange, PeerState,
    Route, Settings, diff_peers,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network

WG0, WG1 = "sealnet_wg0", "sealnet_wg1"


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def node(i: int) -> Node:
    return Node(name=f"node-{i}", ips=(ip(f"172.18.0.{i + 1}"),), pod_cidrs=(net(f"10.244.{i}.0/24"),))


# Our ring mid-rotation: epoch 5 on slot 0, epoch 6 (current) on slot 1.
LOCAL = node(0)
OLD = Slot(WG0, 51871, 5, key(200))
NEW = Slot(WG1, 51872, 6, key(201))
OWN_KEYS = [PeerKey(NEW.public_key, 6, 51872), PeerKey(OLD.public_key, 5, 51871)]


def new_key(i: int) -> str:
    return key(60 + i)


def old_key(i: int) -> str:
    return key(50 + i)


def rolled(i: int) -> list[PeerKey]:
    """Peer i mid-rotation as well: epoch 6 on :51872, epoch 5 kept on :51871."""
    return [PeerKey(new_key(i), 6, 51872), PeerKey(old_key(i), 5, 51871)]


def old_only(i: int) -> list[PeerKey]:
    return [PeerKey(old_key(i), 5, 51871)]


def ring(peers: Sequence[tuple[Node, Sequence[PeerKey]]], handshakes: Optional[dict[tuple[str, str], float]] = None,
         current: Slot = NEW, previous: Optional[Slot] = OLD, settings: Settings = Settings()) -> RingPlan:
    return plan_ring(LOCAL, [(LOCAL, OWN_KEYS), *peers], current, previous, handshakes or {}, settings)


def iface(p: RingPlan, name: str) -> InterfaceConfig:
    (config,) = [c for c in p.interfaces if c.interface == name]
    return config


def peers_of(p: RingPlan, name: str) -> dict[str, Peer]:
    return {peer.node: peer for peer in iface(p, name).peers}


def tunnel(dst: str, dev: str) -> Route:
    return Route(net(dst), ROUTE_TABLE, "unicast", None, dev=dev)


def unreachable(dst: str) -> Route:
    return Route(net(dst), ROUTE_TABLE, "unreachable", None, FALLBACK_METRIC)


def unicast(p: RingPlan) -> set[Route]:
    return {r for r in p.routes if r.type == "unicast"}


# -- slot_names ------------------------------------------------------------------


@pytest.mark.parametrize("interface, port, second", [
    ("sealnet_wg0", 51871, ("sealnet_wg1", 51872)),
    ("wg", 51820, ("wg1", 51821)),
    ("wg5", 1000, ("wg51", 1001)),
    ("abcdefghijklmn0", 65534, ("abcdefghijklmn1", 65535)),  # 15 characters ending in 0: room by replacing
    ("abcdefghijklmn", 51871, ("abcdefghijklmn1", 51872)),   # 14 characters: room by appending
])
def test_slot_names(interface: str, port: int, second: tuple[str, int]) -> None:
    assert slot_names(interface, port) == ((interface, port), second)


def test_slot_names_long_interface_is_config_error_naming_field_value_and_limit() -> None:
    name = "abcdefghijklmno"  # 15 characters, not ending in 0: the second would be 16
    with pytest.raises(ConfigError) as e:
        slot_names(name, 51871)
    text = str(e.value)
    assert "config.wireguard.interface" in text and repr(name) in text
    assert "15 characters" in text and "at most 14" in text and "end the name in 0" in text


def test_slot_names_last_port_is_config_error_naming_field_value_and_rule() -> None:
    with pytest.raises(ConfigError) as e:
        slot_names("sealnet_wg0", 65535)
    text = str(e.value)
    assert "config.wireguard.port" in text and "65535" in text and "port + 1" in text


# -- plan_ring -------------------------------------------------------------------


def test_each_interface_is_paired_with_the_peers_key_of_its_epoch() -> None:
    p = ring([(node(1), rolled(1))])
    assert [(c.interface, c.listen_port, c.public_key) for c in p.interfaces] == \
        [(WG1, 51872, NEW.public_key), (WG0, 51871, OLD.public_key)]
    new, old = peers_of(p, WG1)["node-1"], peers_of(p, WG0)["node-1"]
    assert (new.public_key, new.endpoint) == (new_key(1), (ip("172.18.0.2"), 51872))
    assert (old.public_key, old.endpoint) == (old_key(1), (ip("172.18.0.2"), 51871))
    assert new.allowed_ips == old.allowed_ips == (net("10.244.1.0/24"),)
    # The local node is never its own peer, on either interface.
    assert all("node-0" not in peers_of(p, c.interface) for c in p.interfaces)
    assert p.rejected == ()


def test_rolled_peer_stays_on_previous_interface_until_a_handshake_on_the_current_one() -> None:
    waiting = ring([(node(1), rolled(1))])
    assert waiting.egress == {"node-1": WG0}
    assert (waiting.behind, waiting.pending) == (("node-1",), ("node-1",))
    # The keepalive that starts the handshake: on the new interface's peer only.
    assert peers_of(waiting, WG1)["node-1"].keepalive == KEEPALIVE
    assert peers_of(waiting, WG0)["node-1"].keepalive == 0
    assert unicast(waiting) == {tunnel("10.244.1.0/24", WG0)}
    assert unreachable("10.244.1.0/24") in waiting.routes

    # A handshake of the old pair, or "no handshake yet" (0), is no proof that the new keys work.
    for handshakes in ({(WG0, old_key(1)): 1700000000.0}, {(WG1, new_key(1)): 0.0},
                       {(WG1, old_key(1)): 1700000000.0}):
        assert ring([(node(1), rolled(1))], handshakes).egress == {"node-1": WG0}, handshakes

    moved = ring([(node(1), rolled(1))], {(WG1, new_key(1)): 1700000000.0})
    assert moved.egress == {"node-1": WG1}
    assert (moved.behind, moved.pending) == ((), ())
    assert peers_of(moved, WG1)["node-1"].keepalive == 0
    assert unicast(moved) == {tunnel("10.244.1.0/24", WG1)}
    assert unreachable("10.244.1.0/24") in moved.routes
    # The old session stays up until the previous interface retires (late packets still arrive).
    assert peers_of(moved, WG0)["node-1"].public_key == old_key(1)


def test_peer_only_on_the_old_epoch_stays_on_previous_interface_and_is_not_pending() -> None:
    p = ring([(node(1), old_only(1))])
    assert "node-1" not in peers_of(p, WG1)
    assert peers_of(p, WG0)["node-1"].public_key == old_key(1)
    assert peers_of(p, WG0)["node-1"].keepalive == 0
    assert p.egress == {"node-1": WG0}
    assert (p.behind, p.pending) == (("node-1",), ())
    assert unicast(p) == {tunnel("10.244.1.0/24", WG0)}


def test_peer_that_already_dropped_its_old_key_is_on_the_current_interface_at_once() -> None:
    p = ring([(node(1), [PeerKey(new_key(1), 6, 51872)])])
    assert "node-1" not in peers_of(p, WG0)
    assert peers_of(p, WG1)["node-1"].keepalive == 0
    assert p.egress == {"node-1": WG1}
    assert (p.behind, p.pending) == ((), ())


@pytest.mark.parametrize("keys", [
    [PeerKey(key(71))],                     # an agent before epochs (or static mode): key only
    [PeerKey(key(71), 9, 51871)],           # an epoch we hold neither side of
])
def test_peer_with_no_epoch_in_common_is_paired_with_our_current_interface(keys: list[PeerKey]) -> None:
    p = ring([(node(1), keys)])
    assert peers_of(p, WG1)["node-1"].public_key == key(71)
    assert "node-1" not in peers_of(p, WG0)
    assert p.egress == {"node-1": WG1}
    assert (p.behind, p.pending) == ((), ())
    assert peers_of(p, WG1)["node-1"].keepalive == 0


def test_peer_without_an_advertised_port_is_reached_on_the_clusters_port() -> None:
    # ``sealnet.io/wireguard-port`` absent means the cluster's port (annotations docstring;
    # parse_wireguard drops a bad port to the same meaning). The cluster's port is
    # Settings.port, not the port of whichever of our slots the key is paired with.
    legacy = ring([(node(1), [PeerKey(key(71))]), (node(2), [PeerKey(new_key(2), 6, None)])],
                  settings=Settings(port=DEFAULT_PORT))
    assert peers_of(legacy, WG1)["node-1"].endpoint == (ip("172.18.0.2"), DEFAULT_PORT)
    assert peers_of(legacy, WG1)["node-2"].endpoint == (ip("172.18.0.3"), DEFAULT_PORT)


@pytest.mark.parametrize("keys, reason", [
    ([], "missing"),
    ([PeerKey("not-a-key", 6, 51872)], "'not-a-key'"),
    ([PeerKey(NEW.public_key, 6, 51872)], "own key"),
])
def test_peer_without_a_usable_key_is_rejected_fail_closed(keys: list[PeerKey], reason: str) -> None:
    p = ring([(node(1), rolled(1)), (node(3), keys)])
    assert [r.node for r in p.rejected] == ["node-3"]
    assert reason in p.rejected[0].reason
    assert all("node-3" not in peers_of(p, c.interface) for c in p.interfaces)
    assert "node-3" not in p.egress and "node-3" not in p.behind and "node-3" not in p.pending
    assert not any(r.dst == net("10.244.3.0/24") for r in unicast(p))
    assert unreachable("10.244.3.0/24") in p.routes
    # The good peer next to it is planned as ever.
    assert p.egress == {"node-1": WG0}


def test_bad_new_key_keeps_the_peer_on_its_old_pair_without_keepalive() -> None:
    p = ring([(node(1), [PeerKey("not-a-key", 6, 51872), PeerKey(old_key(1), 5, 51871)])])
    assert p.egress == {"node-1": WG0}
    assert (p.behind, p.pending) == (("node-1",), ())
    assert "node-1" not in peers_of(p, WG1)
    assert unicast(p) == {tunnel("10.244.1.0/24", WG0)}


def test_every_tunnel_route_names_its_peers_egress_device_once() -> None:
    peers = [
        (node(1), rolled(1)),                    # waiting for the handshake: wg0
        (node(2), rolled(2)),                    # handshake done: wg1
        (node(3), old_only(3)),                  # not rolled: wg0
        (node(4), [PeerKey(key(74))]),           # no epoch: wg1
    ]
    p = ring(peers, {(WG1, new_key(2)): 1700000000.0}, settings=Settings(node_encryption=True))
    assert p.egress == {"node-1": WG0, "node-2": WG1, "node-3": WG0, "node-4": WG1}
    assert (p.behind, p.pending) == (("node-1", "node-3"), ("node-1",))
    src = ip("172.18.0.1")  # nodeEncryption: the local node IP as source, node IPs through the tunnel too
    expected = set()
    for i, dev in ((1, WG0), (2, WG1), (3, WG0), (4, WG1)):
        expected |= {Route(net(f"10.244.{i}.0/24"), ROUTE_TABLE, "unicast", src, dev=dev),
                     Route(net(f"172.18.0.{i + 1}/32"), ROUTE_TABLE, "unicast", src, dev=dev)}
    assert unicast(p) == expected
    # One route per (dst, metric): the kernel could not hold two through different devices.
    assert len({r.key for r in p.routes}) == len(p.routes)
    assert {r for r in p.routes if r.type == "unreachable"} == {unreachable(f"10.244.{i}.0/24") for i in (1, 2, 3, 4)}
    # Both interfaces mark their own UDP and share the policy rules.
    assert {c.fwmark for c in p.interfaces} == {FWMARK}
    assert iface(p, WG0).rules == iface(p, WG1).rules and iface(p, WG1).rules


def test_without_a_previous_slot_one_interface_and_the_peers_key_of_our_epoch() -> None:
    # We have not rotated yet (epoch 5, slot 0) but the peer has: it still has our epoch's key.
    ahead = ring([(node(1), rolled(1))], current=OLD, previous=None)
    assert [c.interface for c in ahead.interfaces] == [WG0]
    peer = peers_of(ahead, WG0)["node-1"]
    assert (peer.public_key, peer.endpoint, peer.keepalive) == (old_key(1), (ip("172.18.0.2"), 51871), 0)
    assert ahead.egress == {"node-1": WG0}
    assert (ahead.behind, ahead.pending) == ((), ())
    assert unicast(ahead) == {tunnel("10.244.1.0/24", WG0)}

    # We have retired our previous pair (epoch 6 only, slot 1); the peer still shows both.
    done = ring([(node(1), rolled(1))], current=NEW, previous=None)
    assert [c.interface for c in done.interfaces] == [WG1]
    assert peers_of(done, WG1)["node-1"].public_key == new_key(1)
    assert done.egress == {"node-1": WG1} and done.behind == ()


# -- load_ring / retire_previous ----------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def stored(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def test_first_start_makes_one_pair_on_slot_0(tmp_path: Path) -> None:
    r = load_ring(tmp_path, epoch=5)
    assert (r.current.epoch, r.current.slot, r.previous, r.waiting) == (5, 0, None, None)
    assert mode(tmp_path / KEY_FILE) == 0o600
    assert not (tmp_path / PREVIOUS_FILE).exists()
    assert stored(tmp_path / KEY_FILE)["publicKey"] == r.current.public_key


def test_epoch_change_keeps_the_old_pair_and_puts_the_new_one_on_the_other_slot(tmp_path: Path) -> None:
    first = load_ring(tmp_path, epoch=5).current
    r = load_ring(tmp_path, epoch=6)
    assert r.previous is not None and r.waiting is None
    assert (r.previous.public_key, bytes(r.previous.private), r.previous.epoch, r.previous.slot) == \
        (first.public_key, bytes(first.private), 5, 0)
    assert (r.current.epoch, r.current.slot) == (6, 1)
    assert r.current.public_key != first.public_key
    assert mode(tmp_path / KEY_FILE) == mode(tmp_path / PREVIOUS_FILE) == 0o600
    assert (stored(tmp_path / PREVIOUS_FILE)["publicKey"], stored(tmp_path / PREVIOUS_FILE)["slot"]) == \
        (first.public_key, 0)
    assert (stored(tmp_path / KEY_FILE)["publicKey"], stored(tmp_path / KEY_FILE)["slot"]) == \
        (r.current.public_key, 1)


def test_restart_at_the_same_epoch_returns_both_pairs_unchanged(tmp_path: Path) -> None:
    load_ring(tmp_path, epoch=5)
    r = load_ring(tmp_path, epoch=6)
    for again in (load_ring(tmp_path, epoch=6), load_ring(tmp_path)):  # declared or not: what is stored
        assert again.previous is not None and r.previous is not None
        assert (again.current.public_key, bytes(again.current.private), again.current.slot) == \
            (r.current.public_key, bytes(r.current.private), 1)
        assert (again.previous.public_key, bytes(again.previous.private), again.previous.slot) == \
            (r.previous.public_key, bytes(r.previous.private), 0)


def test_a_new_epoch_waits_while_the_previous_pair_is_kept(tmp_path: Path) -> None:
    load_ring(tmp_path, epoch=5)
    r = load_ring(tmp_path, epoch=6)
    files = {n: (tmp_path / n).read_bytes() for n in (KEY_FILE, PREVIOUS_FILE)}
    later = load_ring(tmp_path, epoch=7)
    assert later.waiting == 7
    assert later.previous is not None and r.previous is not None
    assert (later.current.public_key, later.current.epoch) == (r.current.public_key, 6)
    assert (later.previous.public_key, later.previous.epoch) == (r.previous.public_key, 5)
    assert {n: (tmp_path / n).read_bytes() for n in files} == files


def test_retire_previous_then_the_next_rotation_alternates_back(tmp_path: Path) -> None:
    load_ring(tmp_path, epoch=5)
    r6 = load_ring(tmp_path, epoch=6)
    retire_previous(tmp_path)
    assert not (tmp_path / PREVIOUS_FILE).exists()
    retire_previous(tmp_path)  # nothing to retire: no error
    after = load_ring(tmp_path, epoch=6)
    assert after.previous is None and after.current.public_key == r6.current.public_key
    r7 = load_ring(tmp_path, epoch=7)
    assert (r7.current.epoch, r7.current.slot, r7.waiting) == (7, 0, None)
    assert r7.previous is not None
    assert (r7.previous.public_key, r7.previous.epoch, r7.previous.slot) == (r6.current.public_key, 6, 1)
    assert mode(tmp_path / PREVIOUS_FILE) == 0o600


def test_crash_between_the_two_writes_reads_as_one_pair_and_the_rotation_resumes(tmp_path: Path) -> None:
    old = load_ring(tmp_path, epoch=5).current
    # The previous file written, the key file not yet replaced: two copies of the old pair.
    (tmp_path / PREVIOUS_FILE).write_bytes((tmp_path / KEY_FILE).read_bytes())
    os.chmod(tmp_path / PREVIOUS_FILE, 0o600)
    same = load_ring(tmp_path, epoch=5)
    assert same.previous is None and same.current.public_key == old.public_key
    r = load_ring(tmp_path, epoch=6)
    assert r.previous is not None and r.previous.public_key == old.public_key
    assert (r.current.epoch, r.current.slot) == (6, 1)


def test_unusable_previous_file_is_ignored_and_logged_without_the_key(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    load_ring(tmp_path, epoch=5)
    r = load_ring(tmp_path, epoch=6)
    assert r.previous is not None
    secret = base64.b64encode(bytes(r.previous.private)).decode()
    os.chmod(tmp_path / PREVIOUS_FILE, 0o644)
    with caplog.at_level(logging.ERROR):
        again = load_ring(tmp_path, epoch=6)
    assert again.previous is None and again.current.public_key == r.current.public_key
    assert str(tmp_path / PREVIOUS_FILE) in caplog.text and "0644" in caplog.text
    assert secret not in caplog.text and bytes(r.previous.private).hex() not in caplog.text


def test_load_or_create_replaces_the_pair_without_keeping_a_previous(tmp_path: Path) -> None:
    first = load_or_create(tmp_path, epoch=5)
    second = load_or_create(tmp_path, epoch=6)
    assert second.public_key != first.public_key and second.slot == first.slot == 0
    assert not (tmp_path / PREVIOUS_FILE).exists()


def test_the_two_pairs_of_a_ring_never_share_a_slot_after_a_regeneration(tmp_path: Path) -> None:
    # Mid-rotation (previous on slot 0, current on slot 1), the key file goes bad and the
    # operator allows regeneration. Each slot is one interface (slot_names), so a ring
    # whose two pairs claim the same slot would put both keys on one interface.
    load_ring(tmp_path, epoch=5)
    load_ring(tmp_path, epoch=6)
    os.chmod(tmp_path / KEY_FILE, 0o644)
    for r in (load_ring(tmp_path, epoch=6, allow_regeneration=True), load_ring(tmp_path, epoch=6)):
        assert r.previous is None or r.previous.slot != r.current.slot, (r.current.slot, r.previous.slot)


# -- annotations -----------------------------------------------------------------------


def test_format_previous_and_parse_wireguard_round_trip_into_plan_ring() -> None:
    annotations = {
        ann.WIREGUARD_PUBLIC_KEY: new_key(1), ann.WIREGUARD_KEY_EPOCH: "6", ann.WIREGUARD_PORT: "51872",
        ann.WIREGUARD_PREVIOUS: ann.format_previous(5, 51871, old_key(1)),
    }
    assert annotations[ann.WIREGUARD_PREVIOUS] == f"5 51871 {old_key(1)}"
    keys, problems = ann.parse_wireguard(annotations)
    assert problems == []
    assert keys == (PeerKey(new_key(1), 6, 51872), PeerKey(old_key(1), 5, 51871))
    p = ring([(node(1), keys)])
    assert peers_of(p, WG1)["node-1"].endpoint == (ip("172.18.0.2"), 51872)
    assert peers_of(p, WG0)["node-1"].endpoint == (ip("172.18.0.2"), 51871)
    assert ann.WIREGUARD_PORT in ann.OURS and ann.WIREGUARD_PREVIOUS in ann.OURS


@pytest.mark.parametrize("annotations, keys", [
    ({}, ()),
    ({ann.WIREGUARD_PUBLIC_KEY: key(9)}, (PeerKey(key(9)),)),
    ({ann.WIREGUARD_PUBLIC_KEY: key(9), ann.WIREGUARD_KEY_EPOCH: "0"}, (PeerKey(key(9), 0),)),
    ({ann.WIREGUARD_PUBLIC_KEY: key(9), ann.WIREGUARD_KEY_EPOCH: str(2**31 - 1), ann.WIREGUARD_PORT: "65535"},
     (PeerKey(key(9), 2**31 - 1, 65535),)),
])
def test_parse_wireguard_well_formed(annotations: dict[str, str], keys: tuple[PeerKey, ...]) -> None:
    assert ann.parse_wireguard(annotations) == (keys, [])


CURRENT = {ann.WIREGUARD_PUBLIC_KEY: key(9), ann.WIREGUARD_KEY_EPOCH: "6", ann.WIREGUARD_PORT: "51872"}


@pytest.mark.parametrize("annotation, value, keys", [
    (ann.WIREGUARD_PORT, "0", (PeerKey(key(9), 6, None),)),
    (ann.WIREGUARD_PORT, "65536", (PeerKey(key(9), 6, None),)),
    (ann.WIREGUARD_PORT, "-1", (PeerKey(key(9), 6, None),)),
    (ann.WIREGUARD_PORT, "5187x", (PeerKey(key(9), 6, None),)),
    (ann.WIREGUARD_KEY_EPOCH, "six", (PeerKey(key(9), None, 51872),)),
    (ann.WIREGUARD_KEY_EPOCH, "-3", (PeerKey(key(9), None, 51872),)),
    (ann.WIREGUARD_KEY_EPOCH, str(2**31), (PeerKey(key(9), None, 51872),)),
    (ann.WIREGUARD_PREVIOUS, "5 51871", (PeerKey(key(9), 6, 51872),)),
    (ann.WIREGUARD_PREVIOUS, f"x 51871 {key(8)}", (PeerKey(key(9), 6, 51872),)),
    (ann.WIREGUARD_PREVIOUS, f"5 0 {key(8)}", (PeerKey(key(9), 6, 51872),)),
    (ann.WIREGUARD_PREVIOUS, f"5 65536 {key(8)}", (PeerKey(key(9), 6, 51872),)),
    (ann.WIREGUARD_PREVIOUS, f"{2**31} 51871 {key(8)}", (PeerKey(key(9), 6, 51872),)),
    (ann.WIREGUARD_PREVIOUS, f"5 51871 {key(8)} extra", (PeerKey(key(9), 6, 51872),)),
])
def test_parse_wireguard_bad_value_is_a_problem_naming_annotation_and_value(
        annotation: str, value: str, keys: tuple[PeerKey, ...]) -> None:
    got, problems = ann.parse_wireguard({**CURRENT, annotation: value})
    assert got == keys  # the current key still used (without the bad field); a bad previous dropped
    assert len(problems) == 1
    assert f"annotation {annotation}={value!r}" in problems[0]
    assert "expected" in problems[0]


@pytest.mark.parametrize("annotation, value", [
    # str.isdigit() is true for these, int() refuses them: one garbled Node annotation
    # must be a problem on that Node, not an exception out of the Node watch.
    (ann.WIREGUARD_KEY_EPOCH, "\u00b2"),
    (ann.WIREGUARD_PORT, "5187\u00b9"),
    (ann.WIREGUARD_PREVIOUS, f"\u00b2 51871 {key(8)}"),
])
def test_parse_wireguard_non_ascii_digits_are_a_problem_not_an_exception(annotation: str, value: str) -> None:
    _, problems = ann.parse_wireguard({**CURRENT, annotation: value})
    assert len(problems) == 1 and annotation in problems[0] and repr(value) in problems[0]


# -- keepalive in both backends ----------------------------------------------------------

PEER_RAW = bytes([0x11]) * 32
PEER_B64 = base64.b64encode(PEER_RAW).decode()
ENDPOINT = (ip("172.18.0.3"), 51872)


def test_uapi_peer_sends_keepalive_and_its_clearing() -> None:
    add = PeerChange("add", PEER_B64, ENDPOINT, (net("10.244.2.0/24"),), keepalive=KEEPALIVE)
    assert uapi_peer(add) == (f"public_key={PEER_RAW.hex()}\nendpoint=172.18.0.3:51872\n"
                              f"persistent_keepalive_interval={KEEPALIVE}\nreplace_allowed_ips=true\n"
                              "allowed_ip=10.244.2.0/24\n")
    # 0 turns it off: it must be sent, not taken for "unchanged".
    clear = PeerChange("update", PEER_B64, keepalive=0)
    assert uapi_peer(clear) == f"public_key={PEER_RAW.hex()}\nupdate_only=true\npersistent_keepalive_interval=0\n"
    assert "keepalive" not in uapi_peer(PeerChange("update", PEER_B64, ENDPOINT))


def test_parse_get_reads_keepalive_per_peer() -> None:
    reply = (f"listen_port=51872\npublic_key={PEER_RAW.hex()}\nendpoint=172.18.0.3:51872\n"
             f"persistent_keepalive_interval={KEEPALIVE}\nallowed_ip=10.244.2.0/24\n"
             f"public_key={'22' * 32}\npersistent_keepalive_interval=0\nerrno=0\n\n")
    state = parse_get(reply, WG1)
    assert state.peers[PEER_B64].keepalive == KEEPALIVE
    assert state.peers[base64.b64encode(bytes([0x22]) * 32).decode()].keepalive == 0


def test_diff_peers_turns_keepalive_on_and_off_alone() -> None:
    want = Peer(PEER_B64, ENDPOINT, (net("10.244.2.0/24"),), "node-2")
    have = PeerState(PEER_B64, ENDPOINT, frozenset(want.allowed_ips))
    assert diff_peers([want], {PEER_B64: have}) == []
    on = Peer(PEER_B64, ENDPOINT, want.allowed_ips, "node-2", keepalive=KEEPALIVE)
    assert diff_peers([on], {PEER_B64: have}) == [PeerChange("update", PEER_B64, None, None, "node-2", KEEPALIVE)]
    have_on = PeerState(PEER_B64, ENDPOINT, frozenset(want.allowed_ips), keepalive=KEEPALIVE)
    assert diff_peers([on], {PEER_B64: have_on}) == []
    assert diff_peers([want], {PEER_B64: have_on}) == [PeerChange("update", PEER_B64, None, None, "node-2", 0)]
    assert diff_peers([on], {}) == [PeerChange("add", PEER_B64, ENDPOINT, want.allowed_ips, "node-2", KEEPALIVE)]


def test_kernel_keepalive_is_byte_for_byte_what_pyroute2_sends_and_is_read_back() -> None:
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST  # type: ignore[import-untyped]
    from pyroute2.netlink.generic.wireguard import (  # type: ignore[import-untyped]
        WG_CMD_GET_DEVICE, WG_CMD_SET_DEVICE, WG_GENL_VERSION, WGPEER_F_UPDATE_ONLY, wgmsg,
    )

    from agent.kernel.wireguard import encode_set_peers, parse_get_device

    for value in (KEEPALIVE, 0):
        change = PeerChange("update", PEER_B64, ENDPOINT, None, keepalive=value)
        m = wgmsg()
        m["cmd"], m["version"] = WG_CMD_SET_DEVICE, WG_GENL_VERSION
        m["attrs"] = [["WGDEVICE_A_IFNAME", WG1], ["WGDEVICE_A_PEERS", [{"attrs": [
            ["WGPEER_A_PUBLIC_KEY", PEER_B64], ["WGPEER_A_FLAGS", WGPEER_F_UPDATE_ONLY],
            ["WGPEER_A_ENDPOINT", {"addr": "172.18.0.3", "port": 51872}],
            ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", value]]}]]]
        m["header"].update(type=27, flags=NLM_F_REQUEST | NLM_F_ACK, sequence_number=9, pid=0)
        m.encode()
        assert encode_set_peers(27, 9, WG1, [change]) == bytes(m.data), value

    answer = wgmsg()
    answer["cmd"], answer["version"] = WG_CMD_GET_DEVICE, 1
    answer["attrs"] = [["WGDEVICE_A_IFNAME", WG1], ["WGDEVICE_A_LISTEN_PORT", 51872], ["WGDEVICE_A_PEERS", [
        {"attrs": [["WGPEER_A_PUBLIC_KEY", PEER_B64], ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", KEEPALIVE]]},
        {"attrs": [["WGPEER_A_PUBLIC_KEY", base64.b64encode(bytes([0x22]) * 32).decode()]]},
    ]]]
    answer["header"]["type"], answer["header"]["flags"] = 30, 2
    answer.encode()
    state = parse_get_device([bytes(answer.data)], WG1)
    assert state.peers[PEER_B64].keepalive == KEEPALIVE
    assert state.peers[base64.b64encode(bytes([0x22]) * 32).decode()].keepalive == 0


# -- routes through two devices -------------------------------------------------------------


@pytest.mark.parametrize("route", [
    tunnel("10.244.1.0/24", WG0),
    tunnel("10.244.1.0/24", WG1),
    Route(net("fd00:1::/64"), ROUTE_TABLE, "unicast", ip("fd00::1"), dev=WG1),
    tunnel("10.244.1.0/24", ""),
    unreachable("10.244.1.0/24"),
])
def test_route_key_round_trips_with_the_device(route: Route) -> None:
    assert route_of_key(route_key(route), ROUTE_TABLE) == route


def test_route_key_tells_devices_apart_for_tunnel_routes_only() -> None:
    assert route_key(tunnel("10.244.1.0/24", WG0)) != route_key(tunnel("10.244.1.0/24", WG1))
    assert route_key(tunnel("10.244.1.0/24", WG0))[-1] == WG0
    # An unreachable route has no device, whatever Route.dev says.
    stray = Route(net("10.244.1.0/24"), ROUTE_TABLE, "unreachable", None, FALLBACK_METRIC, dev=WG0)
    assert route_key(stray) == route_key(unreachable("10.244.1.0/24"))


def test_moving_a_route_to_the_other_device_is_one_replace_never_a_delete() -> None:
    have = {route_key(r) for r in (tunnel("10.244.1.0/24", WG0), unreachable("10.244.1.0/24"),
                                   tunnel("10.244.2.0/24", WG0), tunnel("10.244.3.0/24", WG1))}
    want = [tunnel("10.244.1.0/24", WG1), unreachable("10.244.1.0/24"), tunnel("10.244.2.0/24", WG0)]
    add, delete = diff_routes(want, have, ROUTE_TABLE)
    assert add == [tunnel("10.244.1.0/24", WG1)]
    assert delete == [tunnel("10.244.3.0/24", WG1)]  # a peer gone: deleted, device and all


class FakeRouteSocket:
    """A NETLINK_ROUTE socket: answers a dump with ``dump``, acks every write."""

    def __init__(self, dump: Sequence[bytes] = ()) -> None:
        self.dump = list(dump)
        self.requests: list[bytes] = []
        self.queue: list[bytes] = []
        self.read_fd, self.write_fd = os.pipe()
        os.write(self.write_fd, b"x")  # poll() always sees it readable

    def send(self, data: bytes) -> int:
        pos, out = 0, b""
        while pos < len(data):
            length, _, flags, seq, _ = struct.unpack_from("=IHHII", data, pos)
            self.requests.append(data[pos:pos + length])
            if flags & 0x300 == 0x300:  # NLM_F_DUMP
                out += b"".join(a[:8] + struct.pack("=I", seq) + a[12:] for a in self.dump)
                out += struct.pack("=IHHIIi", 20, 3, 2, seq, 0, 0)  # NLMSG_DONE
            elif flags & 4:  # NLM_F_ACK
                out += struct.pack("=IHHIIi", 36, 2, 0x100, seq, 0, 0) + data[pos:pos + 16]
            pos += (length + 3) & ~3
        self.queue.append(out)
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.queue.pop(0)

    def fileno(self) -> int:
        return self.read_fd

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


@pytest.fixture
def kernel() -> Iterator[FakeRouteSocket]:
    sock = FakeRouteSocket()
    yield sock
    sock.close()


def route_answer(dst: str, dst_len: int, oif: Optional[int], rtype: int = 1, metric: int = 100) -> bytes:
    m = rtmsg()
    m["family"], m["dst_len"], m["table"], m["proto"], m["type"] = socket.AF_INET, dst_len, 252, RTPROT_SEALNET, rtype
    m["scope"] = 253 if rtype == 1 else 0
    attrs: list[list[Any]] = [["RTA_TABLE", ROUTE_TABLE], ["RTA_PRIORITY", metric], ["RTA_DST", dst]]
    if oif is not None:
        attrs.append(["RTA_OIF", oif])
    m["attrs"] = attrs
    m["header"]["type"], m["header"]["flags"] = 24, 2  # RTM_NEWROUTE, NLM_F_MULTI
    m.encode()
    return bytes(m.data)


def test_routes_dump_names_each_routes_device_and_skips_other_devices(kernel: FakeRouteSocket) -> None:
    kernel.dump = [
        route_answer("10.244.1.0", 24, 7),
        route_answer("10.244.2.0", 24, 8),
        route_answer("10.244.3.0", 24, 9),                                # through a device not ours: absent
        route_answer("10.244.1.0", 24, None, rtype=7, metric=FALLBACK_METRIC),
    ]
    with Routing(sock=kernel) as routing:
        have = routing.routes(ROUTE_TABLE, {7: WG0, 8: WG1})
    assert have == {route_key(r) for r in (tunnel("10.244.1.0/24", WG0), tunnel("10.244.2.0/24", WG1),
                                           unreachable("10.244.1.0/24"))}


def test_apply_writes_each_route_through_its_device(kernel: FakeRouteSocket) -> None:
    with Routing(sock=kernel) as routing:
        assert routing.apply({WG0: 7, WG1: 8}, [tunnel("10.244.1.0/24", WG0), tunnel("10.244.2.0/24", WG1),
                                                unreachable("10.244.2.0/24")], [], [], []) == []
    oifs = {}
    for data in kernel.requests:
        m = rtmsg(data)
        m.decode()
        oifs[m.get_attr("RTA_DST"), m["type"]] = m.get_attr("RTA_OIF")
    assert oifs == {("10.244.1.0", 1): 7, ("10.244.2.0", 1): 8, ("10.244.2.0", 7): None}


def test_apply_refuses_a_route_through_an_unknown_device_by_name(kernel: FakeRouteSocket) -> None:
    with Routing(sock=kernel) as routing:
        with pytest.raises(KernelError) as e:
            routing.apply({WG0: 7}, [tunnel("10.244.2.0/24", WG1)], [], [], [])
    assert WG1 in str(e.value) and WG0 in str(e.value)
    assert kernel.requests == []  # nothing half-written
