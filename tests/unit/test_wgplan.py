"""The WireGuard planner (agent.wireguard.plan): node list -> interface config, and the peer diff.

Named table cases (kilo's topology_test style). Properties asserted:
- one peer per other node: endpoint = first node IP and the cluster port,
  allowed IPs = pod CIDRs (+ node IPs with nodeEncryption);
- routes for those in our table via the interface, with the local node IP as
  source only with nodeEncryption, and below each peer pod CIDR's route an
  unreachable one (fail closed when the device goes away); rules: ``from <local podCIDR>`` without,
  ``not fwmark`` with nodeEncryption (and the device fwmark set);
- missing, malformed, own and duplicate keys, and clashing CIDRs, reject the
  peer with a log line naming the nodes; rejected peers' pod CIDRs are only
  unreachable (strict), never their node IPs, never our own CIDRs;
- MTU = underlay - 80, with the IPv6/IPv4 minimums enforced;
- the diff touches only peers that differ, and only the fields that differ;
- the route diff adds what is missing, replaces in place a route whose
  type or source changed (never deleting it first) and deletes only what is
  gone; the rtnetlink codec (pyroute2's message classes as the oracle) asks
  the kernel for our table and protocol only, keeps only our routes through
  our device and our rules, writes requests in batches with one ack asked
  per batch, and names each refused write with the kernel's text while
  "already as wanted" answers (EEXIST, ENOENT, ESRCH) are not failures.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
from typing import Any, Optional

import pytest

from agent.errors import ConfigError
from agent.model import Node
from agent.wireguard.plan import (
    FALLBACK_METRIC, FWMARK, OVERHEAD, ROUTE_METRIC, ROUTE_TABLE, RULE_PRIORITY, Peer, PeerChange, PeerState, Route, Rule, Settings,
    diff_peers, find_local, mtu_for, plan,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


OWN = key(1)


def node(i: int, pubkey: Optional[str] = "auto", cidrs: Optional[list[str]] = None, ips: Optional[list[str]] = None) -> Node:
    return Node(
        name=f"node-{i}",
        ips=tuple(ip(a) for a in (ips or [f"172.18.0.{i + 1}"])),
        pod_cidrs=tuple(net(c) for c in (cidrs if cidrs is not None else [f"10.244.{i}.0/24"])),
        wireguard_public_key=key(i) if pubkey == "auto" else pubkey,
    )


THREE = [node(1), node(2), node(3)]


def route(dst: str, src: Optional[str] = None) -> Route:
    """A tunnel route (metric ROUTE_METRIC)."""
    return Route(net(dst), ROUTE_TABLE, "unicast", ip(src) if src else None, ROUTE_METRIC)


def fallback(*dsts: str) -> set[Route]:
    """The fail-closed unreachable routes below the tunnel routes."""
    return {Route(net(d), ROUTE_TABLE, "unreachable", None, FALLBACK_METRIC) for d in dsts}


CASES: dict[str, dict[str, Any]] = {
    "three nodes, pod traffic only": dict(
        nodes=THREE, settings=Settings(),
        peers=[Peer(key(2), (ip("172.18.0.3"), 51871), (net("10.244.2.0/24"),)),
               Peer(key(3), (ip("172.18.0.4"), 51871), (net("10.244.3.0/24"),))],
        routes={route("10.244.2.0/24"), route("10.244.3.0/24")} | fallback("10.244.2.0/24", "10.244.3.0/24"),
        rules={Rule(4, RULE_PRIORITY, ROUTE_TABLE, src=net("10.244.1.0/24"))},
        fwmark=0, rejected=[],
    ),
    "nodeEncryption adds node IPs, sources and the not-fwmark rule": dict(
        nodes=THREE, settings=Settings(node_encryption=True, port=51000),
        peers=[Peer(key(2), (ip("172.18.0.3"), 51000), (net("10.244.2.0/24"), net("172.18.0.3/32"))),
               Peer(key(3), (ip("172.18.0.4"), 51000), (net("10.244.3.0/24"), net("172.18.0.4/32")))],
        routes={route("10.244.2.0/24", "172.18.0.2"), route("172.18.0.3/32", "172.18.0.2"),
                route("10.244.3.0/24", "172.18.0.2"), route("172.18.0.4/32", "172.18.0.2")}
        | fallback("10.244.2.0/24", "10.244.3.0/24"),
        rules={Rule(4, RULE_PRIORITY, ROUTE_TABLE, not_fwmark=FWMARK)},
        fwmark=FWMARK, rejected=[],
    ),
    "missing key: rejected, its pods unreachable": dict(
        nodes=[node(1), node(2), node(3, pubkey=None)], settings=Settings(),
        peers=[Peer(key(2), (ip("172.18.0.3"), 51871), (net("10.244.2.0/24"),))],
        routes={route("10.244.2.0/24")} | fallback("10.244.2.0/24", "10.244.3.0/24"),
        rules={Rule(4, RULE_PRIORITY, ROUTE_TABLE, src=net("10.244.1.0/24"))},
        fwmark=0, rejected=[("node-3", "wireguardPublicKey missing")],
    ),
    "malformed key": dict(
        nodes=[node(1), node(2, pubkey="not-a-key"), node(3)], settings=Settings(),
        peers=[Peer(key(3), (ip("172.18.0.4"), 51871), (net("10.244.3.0/24"),))],
        routes={route("10.244.3.0/24")} | fallback("10.244.2.0/24", "10.244.3.0/24"),
        rules={Rule(4, RULE_PRIORITY, ROUTE_TABLE, src=net("10.244.1.0/24"))},
        fwmark=0, rejected=[("node-2", "'not-a-key' is not 44 characters")],
    ),
    "duplicate key: both rejected, node IPs never blocked": dict(
        nodes=[node(1), node(2, pubkey=key(9)), node(3, pubkey=key(9)), node(4)],
        settings=Settings(node_encryption=True),
        peers=[Peer(key(4), (ip("172.18.0.5"), 51871), (net("10.244.4.0/24"), net("172.18.0.5/32")))],
        routes={route("10.244.4.0/24", "172.18.0.2"), route("172.18.0.5/32", "172.18.0.2")}
        | fallback("10.244.2.0/24", "10.244.3.0/24", "10.244.4.0/24"),
        rules={Rule(4, RULE_PRIORITY, ROUTE_TABLE, not_fwmark=FWMARK)},
        fwmark=FWMARK,
        rejected=[("node-2", f"{key(9)} is also the key of node-3"), ("node-3", f"{key(9)} is also the key of node-2")],
    ),
    "peer with our own key": dict(
        nodes=[node(1), node(2, pubkey=OWN)], settings=Settings(),
        peers=[], routes=fallback("10.244.2.0/24"),
        rules={Rule(4, RULE_PRIORITY, ROUTE_TABLE, src=net("10.244.1.0/24"))},
        fwmark=0, rejected=[("node-2", "is the local node node-1's own key")],
    ),
    "duplicate pod CIDR: both rejected and blocked": dict(
        nodes=[node(1), node(2, cidrs=["10.244.9.0/24"]), node(3, cidrs=["10.244.9.0/24"])], settings=Settings(),
        peers=[], routes=fallback("10.244.9.0/24"),
        rules={Rule(4, RULE_PRIORITY, ROUTE_TABLE, src=net("10.244.1.0/24"))},
        fwmark=0,
        rejected=[("node-2", "10.244.9.0/24 is also claimed by node-3"), ("node-3", "also claimed by node-2")],
    ),
    "pod CIDR overlapping ours: rejected, our pods not blocked": dict(
        nodes=[node(1), node(2, cidrs=["10.244.0.0/16"]), node(3)], settings=Settings(),
        peers=[Peer(key(3), (ip("172.18.0.4"), 51871), (net("10.244.3.0/24"),))],
        routes={route("10.244.3.0/24")} | fallback("10.244.3.0/24"),
        rules={Rule(4, RULE_PRIORITY, ROUTE_TABLE, src=net("10.244.1.0/24"))},
        fwmark=0, rejected=[("node-2", "10.244.0.0/16 overlaps the local node node-1's 10.244.1.0/24")],
    ),
    "IPv6 nodes and pods": dict(
        nodes=[node(1, cidrs=["fd00:10:244:1::/64"], ips=["fd00::2"]),
               node(2, cidrs=["fd00:10:244:2::/64"], ips=["fd00::3"])],
        settings=Settings(node_encryption=True),
        peers=[Peer(key(2), (ip("fd00::3"), 51871), (net("fd00::3/128"), net("fd00:10:244:2::/64")))],
        routes={route("fd00:10:244:2::/64", "fd00::2"), route("fd00::3/128", "fd00::2")}
        | fallback("fd00:10:244:2::/64"),
        rules={Rule(6, RULE_PRIORITY, ROUTE_TABLE, not_fwmark=FWMARK)},
        fwmark=FWMARK, rejected=[],
    ),
    "dual stack pods, IPv4 endpoint": dict(
        nodes=[node(1, cidrs=["10.244.1.0/24", "fd00:10:244:1::/64"]),
               node(2, cidrs=["10.244.2.0/24", "fd00:10:244:2::/64"])],
        settings=Settings(),
        peers=[Peer(key(2), (ip("172.18.0.3"), 51871), (net("10.244.2.0/24"), net("fd00:10:244:2::/64")))],
        routes={route("10.244.2.0/24"), route("fd00:10:244:2::/64")}
        | fallback("10.244.2.0/24", "fd00:10:244:2::/64"),
        rules={Rule(4, RULE_PRIORITY, ROUTE_TABLE, src=net("10.244.1.0/24")),
               Rule(6, RULE_PRIORITY, ROUTE_TABLE, src=net("fd00:10:244:1::/64"))},
        fwmark=0, rejected=[],
    ),
    "alone: nothing to do": dict(
        nodes=[node(1)], settings=Settings(), peers=[], routes=set(), rules=set(), fwmark=0, rejected=[],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan(name: str, caplog: pytest.LogCaptureFixture) -> None:
    case = CASES[name]
    caplog.set_level(logging.INFO)
    local = case["nodes"][0]
    config = plan(local, case["nodes"], OWN, case["settings"])
    assert list(config.peers) == case["peers"]
    assert config.routes == case["routes"]
    assert config.rules == case["rules"]
    assert config.fwmark == case["fwmark"]
    assert config.listen_port == case["settings"].port
    assert config.public_key == OWN
    assert [r.node for r in config.rejected] == [n for n, _ in case["rejected"]]
    for (name_, reason), rejected in zip(case["rejected"], config.rejected):
        assert reason in rejected.reason
        # the log line names the node and says it is not configured
        assert any(f"node={name_}" in r.getMessage() and "not configured" in r.getMessage()
                   and r.levelno == logging.ERROR for r in caplog.records)
    # a rejected node's key never reaches the device
    rejected_keys = {n.wireguard_public_key for n in case["nodes"] if n.name in {r.node for r in config.rejected}}
    assert not rejected_keys & {p.public_key for p in config.peers}


def test_plan_is_deterministic_in_node_order() -> None:
    a = plan(THREE[0], THREE, OWN)
    b = plan(THREE[0], list(reversed(THREE)), OWN)
    assert a == b


def test_peer_node_name_is_for_logs_not_identity() -> None:
    assert Peer(key(2), (ip("172.18.0.3"), 1), ()) == Peer(key(2), (ip("172.18.0.3"), 1), (), node="x")


@pytest.mark.parametrize("underlay, ipv6, expected", [(1500, False, 1420), (9001, False, 8921), (1500, True, 1420),
                                                      (700, False, 620)])
def test_mtu_is_underlay_minus_80(underlay: int, ipv6: bool, expected: int) -> None:
    assert OVERHEAD == 80
    assert mtu_for(underlay, ipv6) == expected


@pytest.mark.parametrize("underlay, ipv6, needed", [(1300, True, 1360), (600, False, 656)])
def test_mtu_too_small_is_config_error(underlay: int, ipv6: bool, needed: int) -> None:
    with pytest.raises(ConfigError, match=f"underlay MTU {underlay} .* at least {needed}"):
        mtu_for(underlay, ipv6)


def test_plan_uses_underlay_mtu() -> None:
    assert plan(THREE[0], THREE, OWN, Settings(underlay_mtu=9000)).mtu == 8920


def test_find_local_unknown_node_names_known_ones() -> None:
    with pytest.raises(ConfigError, match="'node-9' is not in the node description.*node-1, node-2, node-3"):
        find_local("node-9", THREE)


# -- diff ----------------------------------------------------------------------

P2 = Peer(key(2), (ip("172.18.0.3"), 51871), (net("10.244.2.0/24"),), "node-2")
P3 = Peer(key(3), (ip("172.18.0.4"), 51871), (net("10.244.3.0/24"),), "node-3")


def state(peer: Peer, **over: Any) -> PeerState:
    fields: dict[str, Any] = dict(public_key=peer.public_key, endpoint=peer.endpoint,
                                  allowed_ips=frozenset(peer.allowed_ips),
                                  last_handshake=1234.5, rx_bytes=99, tx_bytes=77)
    fields.update(over)
    return PeerState(**fields)


DIFFS: dict[str, tuple[list[Peer], dict[str, PeerState], list[PeerChange]]] = {
    "empty device: add all": (
        [P2, P3], {},
        [PeerChange("add", P2.public_key, P2.endpoint, P2.allowed_ips),
         PeerChange("add", P3.public_key, P3.endpoint, P3.allowed_ips)],
    ),
    "already right: nothing (counters and handshakes ignored)": (
        [P2, P3], {P2.public_key: state(P2), P3.public_key: state(P3, rx_bytes=0, last_handshake=0.0)}, [],
    ),
    "one endpoint changed: update only that, allowed IPs untouched": (
        [P2, P3], {P2.public_key: state(P2), P3.public_key: state(P3, endpoint=(ip("172.18.0.99"), 51871))},
        [PeerChange("update", P3.public_key, P3.endpoint, None)],
    ),
    "roamed endpoint unknown (never seen): set it": (
        [P2], {P2.public_key: state(P2, endpoint=None)}, [PeerChange("update", P2.public_key, P2.endpoint, None)],
    ),
    "allowed IPs changed: one atomic replace": (
        [P2], {P2.public_key: state(P2, allowed_ips=frozenset({net("10.244.2.0/24"), net("10.9.0.0/16")}))},
        [PeerChange("update", P2.public_key, None, P2.allowed_ips)],
    ),
    "unknown peer on the device: removed": (
        [P2], {P2.public_key: state(P2), P3.public_key: state(P3)}, [PeerChange("remove", P3.public_key)],
    ),
    "key changed (rotation): old removed, new added": (
        [Peer(key(7), P2.endpoint, P2.allowed_ips)], {P2.public_key: state(P2)},
        [PeerChange("add", key(7), P2.endpoint, P2.allowed_ips), PeerChange("remove", P2.public_key)],
    ),
}


@pytest.mark.parametrize("name", list(DIFFS))
def test_diff_peers(name: str) -> None:
    desired, actual, expected = DIFFS[name]
    assert diff_peers(desired, actual) == expected


# -- routes: the diff and the rtnetlink codec (agent.kernel.wgroutes) ----------
#
# The kernel's side is played by a fake socket; pyroute2's message classes
# are the oracle for the wire format: they encode the dump answers the codec
# parses and decode the requests it writes.

import os  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402

from pyroute2.netlink.rtnl.fibmsg import fibmsg  # noqa: E402
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # noqa: E402

from agent.kernel.wgroutes import (  # noqa: E402
    BATCH, FIB_RULE_INVERT, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    RTM_DELROUTE, RTM_DELRULE, RTM_GETROUTE, RTM_GETRULE, RTM_NEWROUTE, RTM_NEWRULE, Routing, diff_routes, route_key,
)
from agent.wireguard.plan import RTPROT_SEALNET  # noqa: E402

NLMSG_ERROR, NLMSG_DONE, NLM_F_MULTI, NLM_F_CAPPED, NLM_F_ACK_TLVS = 2, 3, 2, 0x100, 0x200


def unreachable(dst: str) -> Route:
    return Route(net(dst), ROUTE_TABLE, "unreachable", None, FALLBACK_METRIC)


ROUTE_DIFFS: dict[str, tuple[set[Route], set[Route], set[Route], set[Route]]] = {
    # name: (wanted, in the table, expected adds, expected deletes)
    "already right: nothing": (
        {route("10.244.2.0/24"), unreachable("10.244.2.0/24")}, {route("10.244.2.0/24"), unreachable("10.244.2.0/24")},
        set(), set(),
    ),
    "empty table: add all": (
        {route("10.244.2.0/24"), unreachable("10.244.2.0/24")}, set(),
        {route("10.244.2.0/24"), unreachable("10.244.2.0/24")}, set(),
    ),
    "source changed: replaced in place by the add, never deleted": (
        {route("10.244.2.0/24", "172.18.0.2")}, {route("10.244.2.0/24")}, {route("10.244.2.0/24", "172.18.0.2")}, set(),
    ),
    "type changed at the same metric: replaced in place": (
        {Route(net("10.244.2.0/24"), ROUTE_TABLE, "unreachable", None, ROUTE_METRIC)}, {route("10.244.2.0/24")},
        {Route(net("10.244.2.0/24"), ROUTE_TABLE, "unreachable", None, ROUTE_METRIC)}, set(),
    ),
    "peer gone: both its routes deleted": (
        {route("10.244.2.0/24")}, {route("10.244.2.0/24"), route("10.244.3.0/24"), unreachable("10.244.3.0/24")},
        set(), {route("10.244.3.0/24"), unreachable("10.244.3.0/24")},
    ),
    "IPv6 with a source": (
        {route("fd00:2::/64", "fd00::1")}, {route("fd00:3::/64")}, {route("fd00:2::/64", "fd00::1")}, {route("fd00:3::/64")},
    ),
}


@pytest.mark.parametrize("name", list(ROUTE_DIFFS))
def test_diff_routes(name: str) -> None:
    want, have, adds, deletes = ROUTE_DIFFS[name]
    add, delete = diff_routes(want, {route_key(r) for r in have}, ROUTE_TABLE)
    assert (set(add), set(delete)) == (adds, deletes)
    assert len(add) == len(adds) and len(delete) == len(deletes)


class FakeKernel:
    """A netlink socket: answers dumps with ``dump`` and writes with acks, or ``refuse`` errnos."""

    def __init__(self, dump: Optional[list[bytes]] = None, refuse: Optional[dict[int, tuple[int, str]]] = None) -> None:
        self.dump = dump or []
        self.refuse = refuse or {}  # index of a write request (in order sent) -> (errno, extack text)
        self.sent: list[bytes] = []
        self.requests: list[tuple[int, int, int, bytes]] = []  # (type, flags, seq, whole message)
        self.queue: list[bytes] = []
        self.read_fd, self.write_fd = os.pipe()
        os.write(self.write_fd, b"x")  # always readable for poll()

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        pos, out = 0, b""
        while pos < len(data):
            length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", data, pos)
            msg = data[pos:pos + length]
            index = len([r for r in self.requests if not r[1] & NLM_F_DUMP == NLM_F_DUMP])
            self.requests.append((mtype, flags, seq, msg))
            if flags & NLM_F_DUMP == NLM_F_DUMP:
                for answer in self.dump:
                    out += answer[:8] + struct.pack("=I", seq) + answer[12:]
                out += struct.pack("=IHHIIi", 20, NLMSG_DONE, NLM_F_MULTI, seq, 0, 0)
            elif index in self.refuse:
                code, text = self.refuse[index]
                attr = text.encode() + b"\0"
                attr = struct.pack("=HH", 4 + len(attr), 1) + attr + b"\0" * (-len(attr) % 4)
                out += struct.pack("=IHHIIi", 36 + len(attr), NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, seq, 0,
                                   -code) + msg[:16] + attr
            elif flags & NLM_F_ACK:
                out += struct.pack("=IHHIIi", 36, NLMSG_ERROR, NLM_F_CAPPED, seq, 0, 0) + msg[:16]
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


def route_answer(family: int, dst: Optional[str], dst_len: int, rtype: int, table: int = ROUTE_TABLE,
                 proto: int = RTPROT_SEALNET, oif: Optional[int] = 7, metric: int = ROUTE_METRIC,
                 src: Optional[str] = None) -> bytes:
    m = rtmsg()
    m["family"], m["dst_len"], m["table"], m["proto"], m["type"] = family, dst_len, min(table, 252), proto, rtype
    m["scope"] = 253 if rtype == 1 else 0
    attrs: list[list[Any]] = [["RTA_TABLE", table], ["RTA_PRIORITY", metric]]
    if dst is not None:
        attrs.append(["RTA_DST", dst])
    if oif is not None:
        attrs.append(["RTA_OIF", oif])
    if src is not None:
        attrs.append(["RTA_PREFSRC", src])
    m["attrs"] = attrs
    m["header"]["type"], m["header"]["flags"] = RTM_NEWROUTE, NLM_F_MULTI
    m.encode()
    return bytes(m.data)


def rule_answer(family: int, priority: int = RULE_PRIORITY, table: int = ROUTE_TABLE, proto: int = RTPROT_SEALNET,
                src: Optional[str] = None, src_len: int = 0, fwmark: Optional[int] = None) -> bytes:
    m = fibmsg()
    m["family"], m["src_len"], m["table"], m["action"] = family, src_len, 252, 1
    m["flags"] = FIB_RULE_INVERT if fwmark is not None else 0
    attrs: list[list[Any]] = [["FRA_TABLE", table], ["FRA_PRIORITY", priority], ["FRA_PROTOCOL", proto]]
    if src is not None:
        attrs.append(["FRA_SRC", src])
    if fwmark is not None:
        attrs.append(["FRA_FWMARK", fwmark])
    m["attrs"] = attrs
    m["header"]["type"], m["header"]["flags"] = RTM_NEWRULE, NLM_F_MULTI
    m.encode()
    return bytes(m.data)


def test_routes_dump_asks_the_kernel_for_our_table_and_keeps_only_ours() -> None:
    v4, v6 = socket.AF_INET, socket.AF_INET6
    kernel = FakeKernel(dump=[
        route_answer(v4, "10.244.2.0", 24, 1),                                    # ours, through the device
        route_answer(v4, "10.244.2.0", 24, 7, oif=None, metric=FALLBACK_METRIC),  # ours, fail closed
        route_answer(v4, "10.244.3.0", 24, 1, oif=8),                             # ours, another device: absent
        route_answer(v4, "10.244.4.0", 24, 1, table=254),                         # main table (unfiltered dump)
        route_answer(v4, "10.244.5.0", 24, 1, proto=4),                           # someone else's (static)
        route_answer(v4, None, 0, 1),                                             # default route: never ours
        route_answer(v6, "fd00:2::", 64, 1, src="fd00::1"),                       # IPv6 with a source
        route_answer(v4, "10.244.6.0", 24, 2),                                    # local: not a type we write
    ])
    with Routing(sock=kernel) as routing:
        have = routing.routes(ROUTE_TABLE, 7)
        assert have == {route_key(r) for r in (route("10.244.2.0/24"), unreachable("10.244.2.0/24"),
                                                route("fd00:2::/64", "fd00::1"))}
        assert routing.read(ROUTE_TABLE, 7, RULE_PRIORITY)[0] == {route("10.244.2.0/24"), unreachable("10.244.2.0/24"),
                                                                  route("fd00:2::/64", "fd00::1")}
    mtype, flags, _, msg = kernel.requests[0]
    assert (mtype, flags) == (RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP)
    request = rtmsg(msg)
    request.decode()
    # The kernel's filter (strict checking): all families, our protocol, our table.
    assert (request["family"], request["proto"], request["table"]) == (socket.AF_UNSPEC, RTPROT_SEALNET, 0)
    assert request.get_attr("RTA_TABLE") == ROUTE_TABLE and len(request["attrs"]) == 1


def test_rules_dump_keeps_ours_of_both_families() -> None:
    kernel = FakeKernel(dump=[
        rule_answer(socket.AF_INET, src="10.244.1.0", src_len=24),
        rule_answer(socket.AF_INET6, fwmark=FWMARK),
        rule_answer(socket.AF_INET, priority=RULE_PRIORITY + 1, src="10.244.1.0", src_len=24),
        rule_answer(socket.AF_INET, proto=4, src="10.244.9.0", src_len=24),
        rule_answer(socket.AF_INET, table=254, fwmark=FWMARK),
    ])
    with Routing(sock=kernel) as routing:
        assert routing.rules(ROUTE_TABLE, RULE_PRIORITY) == {
            Rule(4, RULE_PRIORITY, ROUTE_TABLE, src=net("10.244.1.0/24")),
            Rule(6, RULE_PRIORITY, ROUTE_TABLE, not_fwmark=FWMARK),
        }
    assert kernel.requests[0][:2] == (RTM_GETRULE, NLM_F_REQUEST | NLM_F_DUMP)


def test_apply_batches_writes_and_names_only_real_failures() -> None:
    adds = [route(f"10.{i >> 8}.{i & 255}.0/24", "172.18.0.2") for i in range(BATCH)] + [unreachable("10.200.0.0/24")]
    dels = [route("10.201.0.0/24"), unreachable("10.201.0.0/24")]
    rule_in = Rule(4, RULE_PRIORITY, ROUTE_TABLE, src=net("10.244.1.0/24"))
    rule_out = Rule(6, RULE_PRIORITY, ROUTE_TABLE, not_fwmark=FWMARK)
    n = len(adds)
    kernel = FakeKernel(refuse={
        5: (22, "boom"),            # a route add: reported with the kernel's text
        n: (17, ""),                # the rule exists already: fine
        n + 1: (2, ""),             # the rule is gone already: fine
        n + 2: (3, ""),             # the route is gone already: fine
    })
    with Routing(sock=kernel) as routing:
        failures = routing.apply(7, adds, dels, [rule_in], [rule_out])
    assert failures == ["route add unicast 10.0.5.0/24 table 51871 src 172.18.0.2 metric 100: "
                        "Invalid argument (EINVAL): boom"]
    # Two datagrams (BATCH requests, then the rest), an ack asked of each one's last request only.
    assert len(kernel.sent) == 2
    assert [t for t, _, _, _ in kernel.requests] == ([RTM_NEWROUTE] * n + [RTM_NEWRULE, RTM_DELRULE]
                                                     + [RTM_DELROUTE] * 2)
    acked = [i for i, (_, flags, _, _) in enumerate(kernel.requests) if flags & NLM_F_ACK]
    assert acked == [BATCH - 1, len(kernel.requests) - 1]
    assert len({seq for _, _, seq, _ in kernel.requests}) == len(kernel.requests)

    def decoded(i: int, cls: Any = rtmsg) -> Any:
        m = cls(kernel.requests[i][3])
        m.decode()
        return m

    first = decoded(0)
    assert kernel.requests[0][1] & ~NLM_F_ACK == NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE
    assert (first["family"], first["dst_len"], first["table"], first["proto"], first["scope"], first["type"]) == \
        (socket.AF_INET, 24, 252, RTPROT_SEALNET, 253, 1)
    assert (first.get_attr("RTA_DST"), first.get_attr("RTA_TABLE"), first.get_attr("RTA_OIF"),
            first.get_attr("RTA_PRIORITY"), first.get_attr("RTA_PREFSRC")) == ("10.0.0.0", ROUTE_TABLE, 7, 100, "172.18.0.2")
    fallback = decoded(n - 1)
    assert (fallback["type"], fallback["scope"], fallback.get_attr("RTA_OIF"), fallback.get_attr("RTA_PRIORITY")) == \
        (7, 0, None, FALLBACK_METRIC)
    rule = decoded(n, fibmsg)
    assert kernel.requests[n][1] == NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
    assert (rule["family"], rule["src_len"], rule["action"], rule.get_attr("FRA_SRC"), rule.get_attr("FRA_TABLE"),
            rule.get_attr("FRA_PRIORITY"), rule.get_attr("FRA_PROTOCOL")) == \
        (socket.AF_INET, 24, 1, "10.244.1.0", ROUTE_TABLE, RULE_PRIORITY, RTPROT_SEALNET)
    gone = decoded(n + 1, fibmsg)
    assert (gone["family"], gone["flags"], gone.get_attr("FRA_FWMARK")) == (socket.AF_INET6, FIB_RULE_INVERT, FWMARK)
    delete = decoded(n + 2)
    assert kernel.requests[n + 2][1] == NLM_F_REQUEST
    assert (delete.get_attr("RTA_DST"), delete.get_attr("RTA_OIF"), delete.get_attr("RTA_PRIORITY")) == \
        ("10.201.0.0", None, ROUTE_METRIC)


def test_apply_nothing_sends_nothing() -> None:
    kernel = FakeKernel()
    with Routing(sock=kernel) as routing:
        assert routing.apply(7, [], [], [], []) == []
    assert kernel.sent == []
