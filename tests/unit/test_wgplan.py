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
- the diff touches only peers that differ, and only the fields that differ.
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
