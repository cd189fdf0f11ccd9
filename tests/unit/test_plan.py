"""agent.ipsec.plan: the desired XFRM state of one node, as shared/DESIGN.md lays it out.

Properties asserted:
- per peer: out policy pinning the local SPI of the egress key, in and fwd
  policies without a pin, one out and one in SA per key, ESN + window;
- SPI = prefix | low 24 bits of the sender's IP | key ID (DESIGN's example);
- what node A plans to send to B is exactly what B plans to receive from A
  (same SPI, same derived key), for every ordered pair of a mesh;
- strict mode: peers without boot ID, with an unknown egress key, with
  colliding SPIs or overlapping podCIDRs get block policies, never allow;
- nodeEncryption adds node IP/32 pairs; IPv6 works, mixed families are skipped;
- the output never holds two policies for one kernel identity, nor two SAs;
- 5000 peers are planned in well under a second.
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from typing import Optional, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ipsec import derive, keys, plan
from agent.errors import ConfigError
from agent.model import SA, Action, Direction, Node, Policy, Template

ip = ipaddress.ip_address
net = ipaddress.ip_network
KEY3 = "3+ rfc4106(gcm(aes)) 0x" + "11" * 20 + " 128"
KEY4 = "4+ rfc4106(gcm(aes)) 0x" + "22" * 20 + " 128"
KS = keys.parse(KEY3 + "\n" + KEY4)  # previous 3, current 4
CFG = plan.PlanConfig()


def node(i: int, *, boot: Optional[str] = "auto", cidrs: Sequence[str] = (), ips: Sequence[str] = ()) -> Node:
    """node-i as the lab builds it: 172.18.0.<i+1>, 10.244.<i>.0/24."""
    return Node(
        name=f"node-{i}",
        ips=tuple(ip(a) for a in (ips or [f"172.18.0.{i + 1}"])),
        pod_cidrs=tuple(net(c) for c in (cidrs or [f"10.244.{i}.0/24"])),
        boot_id=str(uuid.UUID(int=i)) if boot == "auto" else boot,
    )


MESH = [node(1), node(2), node(3)]


def policies(state: plan.DesiredState, direction: Direction, action: Action = Action.ALLOW) -> set[Policy]:
    return {p for p in state.policies if p.direction is direction and p.action is action}


def test_three_node_layout() -> None:
    state = plan.plan(MESH[0], MESH, KS, CFG)
    local, peer2 = ip("172.18.0.2"), ip("172.18.0.3")
    out = {p for p in policies(state, Direction.OUT) if p.dst == net("10.244.2.0/24")}
    assert out == {
        Policy(Direction.OUT, net("10.244.1.0/24"), net("10.244.2.0/24"), plan.PRIORITY_POD, Action.ALLOW,
               (Template(local, peer2, 0x5EA1, 0x51200024),))
    }
    for direction in (Direction.IN, Direction.FWD):
        assert Policy(direction, net("10.244.2.0/24"), net("10.244.1.0/24"), plan.PRIORITY_POD, Action.ALLOW,
                      (Template(peer2, local, 0x5EA1, 0),)) in state.policies
    assert len(state.policies) == 2 * 3
    # one out and one in SA per key and peer; DESIGN's example: 172.18.0.3 sending with key 3
    assert {(str(s.src), str(s.dst), hex(s.spi)) for s in state.sas if peer2 in (s.src, s.dst)} == {
        ("172.18.0.2", "172.18.0.3", "0x51200023"), ("172.18.0.2", "172.18.0.3", "0x51200024"),
        ("172.18.0.3", "172.18.0.2", "0x51200033"), ("172.18.0.3", "172.18.0.2", "0x51200034"),
    }
    assert all(s.esn and s.replay_window == 1024 and s.reqid == 0x5EA1 for s in state.sas)
    assert state.blocked == () and state.collisions == ()
    assert state.egress == (("node-2", 4), ("node-3", 4)) and state.served == ("node-2", "node-3")
    assert state.local_ips == frozenset({local})


def test_sa_keys_are_the_derived_pair_keys() -> None:
    state = plan.plan(MESH[0], MESH, KS, CFG)
    a, b = MESH[0], MESH[1]
    out_sa = next(s for s in state.sas if s.dst == b.ip and s.spi & 0xF == 4)
    in_sa = next(s for s in state.sas if s.src == b.ip and s.spi & 0xF == 4)
    global_key = bytes.fromhex("22" * 20)
    assert bytes(out_sa.algorithm.key) == derive.pair_key(global_key, a.ip, b.ip, a.boot_id, b.boot_id)
    assert bytes(in_sa.algorithm.key) == derive.pair_key(global_key, b.ip, a.ip, b.boot_id, a.boot_id)


def test_every_sender_matches_its_receiver() -> None:
    mesh = [node(i) for i in range(1, 6)]
    states = {n.name: plan.plan(n, mesh, KS, plan.PlanConfig(node_encryption=True)) for n in mesh}
    for a in mesh:
        for b in mesh:
            if a is b:
                continue
            sent = {s for s in states[a.name].sas if s.src == a.ip and s.dst == b.ip}
            received = {s for s in states[b.name].sas if s.src == a.ip and s.dst == b.ip}
            assert sent == received and len(sent) == 2
            pinned = {t.spi for p in policies(states[a.name], Direction.OUT) for t in p.templates if t.dst == b.ip}
            assert pinned == {plan.spi_for(5, a.ip, 4)} and pinned <= {s.spi for s in received}


def test_egress_map_pins_the_key_per_peer() -> None:
    state = plan.plan(MESH[0], MESH, KS, CFG, egress={"node-2": 3})
    pins = {p.dst: p.templates[0].spi for p in policies(state, Direction.OUT)}
    assert pins == {net("10.244.2.0/24"): 0x51200023, net("10.244.3.0/24"): 0x51200024}
    assert dict(state.egress) == {"node-2": 3, "node-3": 4}


def blocked_selectors(state: plan.DesiredState) -> set[tuple[str, str, Direction]]:
    return {(str(p.src), str(p.dst), p.direction) for p in state.policies if p.action is Action.BLOCK}


def assert_blocked(state: plan.DesiredState, peer: Node, local: Node = MESH[0]) -> None:
    lc, pc = str(local.pod_cidrs[0]), str(peer.pod_cidrs[0])
    assert {(lc, pc, Direction.OUT), (pc, lc, Direction.IN), (pc, lc, Direction.FWD)} <= blocked_selectors(state)
    assert not any(p.action is Action.ALLOW and str(p.dst) in (pc,) for p in state.policies)
    assert not any(peer.ip in (s.src, s.dst) for s in state.sas)
    assert all(p.priority == plan.PRIORITY_BLOCK and not p.templates for p in state.policies if p.action is Action.BLOCK)


def test_peer_without_boot_id_is_blocked_not_leaked() -> None:
    peers = [MESH[0], node(2, boot=None), MESH[2]]
    state = plan.plan(MESH[0], peers, KS, CFG)
    assert_blocked(state, peers[1])
    assert dict(state.blocked) == {"node-2": "no boot ID (per-node-pair key 4+ needs it)"}
    assert state.served == ("node-3",)
    short = plan.plan(MESH[0], [MESH[0], node(2, boot="too-short")], KS, CFG)
    assert "shorter than 36" in dict(short.blocked)["node-2"]


def test_global_key_needs_no_boot_id() -> None:
    ks = keys.parse("4 rfc4106(gcm(aes)) 0x" + "22" * 20 + " 128")
    state = plan.plan(node(1, boot=None), [node(1, boot=None), node(2, boot=None)], ks, CFG)
    assert state.blocked == () and {bytes(s.algorithm.key) for s in state.sas} == {bytes.fromhex("22" * 20)}


def test_previous_key_without_boot_id_is_skipped_current_served() -> None:
    ks = keys.parse("3+ rfc4106(gcm(aes)) 0x" + "11" * 20 + " 128\n4 rfc4106(gcm(aes)) 0x" + "22" * 20 + " 128")
    state = plan.plan(MESH[0], [MESH[0], node(2, boot=None)], ks, CFG)
    assert state.served == ("node-2",) and {s.spi & 0xF for s in state.sas} == {4}


def test_unknown_egress_key_blocks() -> None:
    state = plan.plan(MESH[0], MESH, KS, CFG, egress={"node-3": 9})
    assert_blocked(state, MESH[2])
    assert "egress key 9 is not in the keys file" in dict(state.blocked)["node-3"]


def test_local_without_boot_id_blocks_everyone() -> None:
    local = node(1, boot=None)
    state = plan.plan(local, [local, *MESH[1:]], KS, CFG)
    assert state.served == () and {p.action for p in state.policies} == {Action.BLOCK}
    assert all("local node node-1 has no usable boot ID" in reason for _, reason in state.blocked)


def test_spi_collision_names_both_and_blocks_both() -> None:
    a, b = node(2, ips=["10.0.0.5"]), node(3, ips=["11.0.0.5"])
    state = plan.plan(MESH[0], [MESH[0], a, b, node(4)], KS, CFG)
    assert [(c.kind, c.nodes) for c in state.collisions] == [("spi", ("node-2", "node-3"))]
    assert "0x000005" in state.collisions[0].detail
    for peer in (a, b):
        assert_blocked(state, peer)
        assert "node-2, node-3" in dict(state.blocked)[peer.name]
    assert state.served == ("node-4",)


def test_local_in_spi_collision_blocks_everyone() -> None:
    twin = node(9, ips=["10.18.0.2"])  # same low 24 bits as node-1's 172.18.0.2
    state = plan.plan(MESH[0], [*MESH, twin], KS, CFG)
    assert state.served == () and {p.action for p in state.policies} == {Action.BLOCK}
    assert "every node blocks it" in dict(state.blocked)["node-2"]


def test_overlapping_pod_cidrs_are_blocked() -> None:
    a, b = node(2, cidrs=["10.244.0.0/16"]), node(3, cidrs=["10.244.3.0/24"])
    state = plan.plan(node(1, cidrs=["10.245.1.0/24"]), [a, b, node(4, cidrs=["10.246.4.0/24"])], KS, CFG)
    assert [(c.kind, c.nodes) for c in state.collisions] == [("podCIDR", ("node-2", "node-3"))]
    assert set(dict(state.blocked)) == {"node-2", "node-3"} and state.served == ("node-4",)


def test_peer_without_pod_cidr() -> None:
    bare = Node("node-2", (ip("172.18.0.3"),), (), str(uuid.UUID(int=2)))
    state = plan.plan(MESH[0], [MESH[0], bare], KS, CFG)
    assert state.policies == frozenset() and state.sas == frozenset()
    assert dict(state.blocked) == {"node-2": "no podCIDR: its pod traffic cannot be selected"}
    with_nodes = plan.plan(MESH[0], [MESH[0], bare], KS, plan.PlanConfig(node_encryption=True))
    assert with_nodes.served == ("node-2",) and len(with_nodes.sas) == 4


def test_node_encryption_adds_host_pairs() -> None:
    state = plan.plan(MESH[0], MESH, KS, plan.PlanConfig(node_encryption=True))
    host = {p for p in state.policies if p.priority == plan.PRIORITY_NODE}
    assert {(str(p.src), str(p.dst), p.direction) for p in host if "172.18.0.3/32" in (str(p.src), str(p.dst))} == {
        ("172.18.0.2/32", "172.18.0.3/32", Direction.OUT),
        ("172.18.0.3/32", "172.18.0.2/32", Direction.IN),
        ("172.18.0.3/32", "172.18.0.2/32", Direction.FWD),
    }
    assert state.sas == plan.plan(MESH[0], MESH, KS, CFG).sas  # the same tunnels carry both
    blocked = plan.plan(MESH[0], [MESH[0], node(2, boot=None)], KS, plan.PlanConfig(node_encryption=True))
    assert ("172.18.0.2/32", "172.18.0.3/32", Direction.OUT) in blocked_selectors(blocked)


def test_multiple_pod_cidrs_cross_product_and_families() -> None:
    local = node(1, ips=["172.18.0.2", "fd00::2"], cidrs=["10.244.1.0/24", "10.245.1.0/24", "fd10:1::/64"])
    peer = node(2, ips=["172.18.0.3", "fd00::3"], cidrs=["10.244.2.0/24", "fd10:2::/64"])
    v4only = node(3, ips=["172.18.0.4"], cidrs=["10.244.3.0/24"])
    v6only = node(4, ips=["fd00::4"], cidrs=["fd10:4::/64"])
    state = plan.plan(local, [local, peer, v4only, v6only], KS, CFG)
    outs = {(str(p.src), str(p.dst)) for p in policies(state, Direction.OUT)}
    assert outs == {
        ("10.244.1.0/24", "10.244.2.0/24"), ("10.245.1.0/24", "10.244.2.0/24"), ("fd10:1::/64", "fd10:2::/64"),
        ("10.244.1.0/24", "10.244.3.0/24"), ("10.245.1.0/24", "10.244.3.0/24"), ("fd10:1::/64", "fd10:4::/64"),
    }
    v6_out = next(p for p in policies(state, Direction.OUT) if p.dst == net("fd10:2::/64"))
    assert v6_out.templates == (Template(ip("fd00::2"), ip("fd00::3"), 0x5EA1, plan.spi_for(5, ip("fd00::2"), 4)),)
    assert state.local_ips == frozenset({ip("172.18.0.2"), ip("fd00::2")})
    mixed = plan.plan(v4only, [v4only, v6only], KS, CFG)
    assert mixed.policies == frozenset() and "no address family in common" in dict(mixed.blocked)["node-4"]


def test_only_the_local_entry_is_skipped() -> None:
    state = plan.plan(MESH[0], [*MESH, MESH[0]], KS, CFG)
    assert not any(p.dst == MESH[0].pod_cidrs[0] and p.direction is Direction.OUT for p in state.policies)
    assert len(state.served) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [({"spi_prefix": 0}, "spi_prefix"), ({"spi_prefix": 0x10}, "spi_prefix"), ({"reqid": 0}, "reqid"),
     ({"replay_window": 0}, "replay_window"), ({"replay_window": 8192}, "replay_window")],
)
def test_config_validation(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan.PlanConfig(**kwargs)


@st.composite
def clusters(draw: st.DrawFn) -> list[Node]:
    count = draw(st.integers(2, 12))
    low = st.integers(0, 3)  # few values: collisions and overlaps happen
    out = []
    for i in range(count):
        a, b = draw(low), draw(low)
        cidrs = [f"10.{draw(low)}.{draw(low)}.0/24"] if draw(st.booleans()) else [f"10.{draw(low)}.0.0/16"]
        boot = draw(st.sampled_from([str(uuid.UUID(int=i)), None, "short"]))
        out.append(node(i, ips=[f"{draw(st.sampled_from([172, 10]))}.{a}.{b}.{i % 3}"], cidrs=cidrs, boot=boot))
    return out


@settings(max_examples=120, deadline=None)
@given(clusters(), st.booleans())
def test_invariants(mesh: list[Node], node_encryption: bool) -> None:
    state = plan.plan(mesh[0], mesh, KS, plan.PlanConfig(node_encryption=node_encryption))
    selectors = [p.selector for p in state.policies]
    assert len(selectors) == len(set(selectors)), "two policies for one kernel identity"
    sa_ids = [(s.dst, s.spi) for s in state.sas]
    assert len(sa_ids) == len(set(sa_ids)), "two SAs for one kernel identity"
    out_spis = {(s.dst, s.spi) for s in state.sas if s.src in state.local_ips}
    for p in state.policies:
        if p.action is Action.BLOCK:
            assert p.priority == plan.PRIORITY_BLOCK and not p.templates
        elif p.direction is Direction.OUT:
            assert (p.templates[0].dst, p.templates[0].spi) in out_spis, "out policy pins a missing SA"
    served_blocked = set(state.served) & {n for n, r in state.blocked if "collision" in r or "boot ID" in r}
    assert not served_blocked


def test_5000_peers_well_under_a_second() -> None:
    mesh = [
        Node(f"n{i}", (ipaddress.IPv4Address(0x0A000000 + i),), (ipaddress.IPv4Network((0x64000000 + (i << 8), 24)),),
             str(uuid.UUID(int=i)))
        for i in range(1, 5002)
    ]
    start = time.process_time()
    state = plan.plan(mesh[0], mesh, KS, plan.PlanConfig(node_encryption=True))
    elapsed = time.process_time() - start
    assert len(state.served) == 5000 and len(state.sas) == 20000 and len(state.policies) == 30000
    assert elapsed < 1.0, f"planning 5000 peers took {elapsed:.2f}s of CPU"
