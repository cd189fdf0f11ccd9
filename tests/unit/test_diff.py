"""agent.ipsec.diff: minimal, ordered, idempotent changes that never touch foreign state.

Properties asserted:
- only owned objects (our reqid + SPI prefix; our priority band + reqid)
  are updated or deleted; a desired object whose identity a foreign object
  holds is reported, not installed;
- a restarted agent whose kernel already holds the plan changes nothing;
- a changed key is a delete + add of that SA (UPDSA cannot change keys),
  a changed template an in-place update of that policy;
- applying the steps to a kernel model with the kernel's identity rules
  (EEXIST on add, ENOENT on delete/update) works, and a second diff is empty;
- during the steps no selector covered before and after is ever uncovered,
  and a policy is never installed before the SA it pins.
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from dataclasses import fields, replace
from typing import Iterable, Optional, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ipsec import diff, keys, plan
from agent.model import SA, Action, AeadAlgorithm, Direction, KeyMaterial, Node, Policy, Template

ip = ipaddress.ip_address
net = ipaddress.ip_network
CFG = plan.PlanConfig(node_encryption=True)
K3 = "3+ rfc4106(gcm(aes)) 0x" + "11" * 20 + " 128"
K4 = "4+ rfc4106(gcm(aes)) 0x" + "22" * 20 + " 128"
K5 = "5+ rfc4106(gcm(aes)) 0x" + "33" * 20 + " 128"


def node(i: int, boot: Optional[str] = None) -> Node:
    return Node(f"node-{i}", (ip(f"172.18.0.{i + 1}"),), (net(f"10.244.{i}.0/24"),), boot or str(uuid.UUID(int=i)))


MESH = [node(1), node(2), node(3)]

# What other software keeps in the same kernel tables.
FOREIGN_SA = SA(ip("172.18.0.2"), ip("172.18.0.9"), 0xC0000001, 1, AeadAlgorithm("rfc4106(gcm(aes))", KeyMaterial(bytes(20)), 128))
FOREIGN_SA_OUR_PREFIX = replace(FOREIGN_SA, spi=0x51200099, reqid=7)
FOREIGN_POLICY = Policy(Direction.OUT, net("10.9.0.0/16"), net("10.8.0.0/16"), 0, Action.ALLOW,
                        (Template(ip("172.18.0.2"), ip("172.18.0.9"), 1, 0),))
FOREIGN_BAND_OTHER_REQID = replace(FOREIGN_POLICY, priority=10020, dst=net("10.7.0.0/16"))
FOREIGNS_SA = [FOREIGN_SA, FOREIGN_SA_OUR_PREFIX]
FOREIGNS_POL = [FOREIGN_POLICY, FOREIGN_BAND_OTHER_REQID]


def desired(text: str = K3 + "\n" + K4, nodes: Sequence[Node] = MESH, **kw: object) -> plan.DesiredState:
    return plan.plan(nodes[0], nodes, keys.parse(text), CFG, **kw)  # type: ignore[arg-type]


class Kernel:
    """The XFRM tables as the kernel keys them: SAs by (dst, SPI), policies by selector."""

    def __init__(self, sas: Iterable[SA] = (), policies: Iterable[Policy] = ()) -> None:
        self.sas = {diff.sa_id(s): s for s in sas}
        self.policies = {p.selector: p for p in policies}

    def apply(self, step: diff.Step) -> None:
        obj = step.obj
        if isinstance(obj, SA):
            key = diff.sa_id(obj)
            if step.op == "add_sa":
                assert key not in self.sas, f"EEXIST {obj.describe()}"
                self.sas[key] = obj
            else:
                assert self.sas.pop(key) == obj, f"deleted the wrong SA {obj.describe()}"
            return
        sel = obj.selector
        if step.op == "add_policy":
            assert sel not in self.policies, f"EEXIST {obj.describe()}"
        elif step.op == "update_policy":
            assert self.policies[sel] == step.old
        else:
            assert self.policies.pop(sel) == obj
            return
        for t in obj.templates:  # a policy is never installed before the SA it pins
            assert not t.spi or (t.dst, t.spi) in self.sas, f"{obj.describe()} pins a missing SA"
        self.policies[sel] = obj


def converge(state: plan.DesiredState, kernel: Kernel) -> diff.ChangeSet:
    changes = diff.diff(state, kernel.sas.values(), kernel.policies.values(), CFG)
    covered_before = set(kernel.policies)
    must_stay = covered_before & {p.selector for p in state.policies}
    for step in changes.steps():
        kernel.apply(step)
        assert must_stay <= set(kernel.policies), f"selector uncovered after {step.describe()}"
    again = diff.diff(state, kernel.sas.values(), kernel.policies.values(), CFG)
    assert again.empty, "not idempotent"
    return changes


def ops(changes: diff.ChangeSet) -> list[str]:
    return [s.op for s in changes.steps()]


@pytest.mark.parametrize(
    "obj, owned",
    [
        (FOREIGN_SA, False),
        (FOREIGN_SA_OUR_PREFIX, False),
        (replace(FOREIGN_SA, reqid=0x5EA1), False),  # our reqid, strongSwan's SPI range
        (replace(FOREIGN_SA, reqid=0x5EA1, spi=0x51200023), True),
        (FOREIGN_POLICY, False),
        (FOREIGN_BAND_OTHER_REQID, False),
        (Policy(Direction.OUT, net("10.9.0.0/16"), net("10.8.0.0/16"), 10000, Action.BLOCK), True),
        (Policy(Direction.OUT, net("10.9.0.0/16"), net("10.8.0.0/16"), 10100, Action.BLOCK), False),
        (replace(FOREIGN_POLICY, priority=10020, templates=(Template(ip("1.1.1.1"), ip("2.2.2.2"), 0x5EA1),)), True),
    ],
    ids=["strongswan-sa", "our-prefix-other-reqid", "our-reqid-other-prefix", "ours", "foreign-policy",
         "band-other-reqid", "our-block", "block-outside-band", "our-policy"],
)
def test_ownership(obj: object, owned: bool) -> None:
    if isinstance(obj, SA):
        assert diff.owns_sa(obj, CFG) is owned
    else:
        assert isinstance(obj, Policy) and diff.owns_policy(obj, CFG) is owned


def test_fresh_install_order() -> None:
    state = desired()
    changes = converge(state, Kernel(FOREIGNS_SA, FOREIGNS_POL))
    steps = changes.steps()
    kinds = ops(changes)
    n_in = sum(1 for s in state.sas if s.dst in state.local_ips)
    assert kinds == ["add_sa"] * len(state.sas) + ["add_policy"] * len(state.policies)
    assert all(s.obj.dst in state.local_ips for s in steps[:n_in])  # type: ignore[union-attr]
    assert all(s.obj.dst not in state.local_ips for s in steps[n_in : len(state.sas)])  # type: ignore[union-attr]


def test_restart_adopts_without_touching_anything() -> None:
    state = desired()
    changes = diff.diff(state, [*state.sas, *FOREIGNS_SA], [*state.policies, *FOREIGNS_POL], CFG)
    assert changes.empty and changes.steps() == () and changes.conflicts == ()


def test_peer_reboot_replaces_its_sas_only() -> None:
    before = desired()
    after = desired(nodes=[MESH[0], node(2, boot=str(uuid.UUID(int=99))), MESH[2]])
    kernel = Kernel([*before.sas, *FOREIGNS_SA], [*before.policies, *FOREIGNS_POL])
    changes = converge(after, kernel)
    assert changes.add_inbound_sas == changes.add_outbound_sas == changes.delete_sas == ()
    assert changes.add_policies == changes.update_policies == changes.delete_policies == ()
    assert {(str(old.dst), old.spi) for old, _ in changes.replace_sas} == {
        ("172.18.0.2", 0x51200033), ("172.18.0.2", 0x51200034), ("172.18.0.3", 0x51200023), ("172.18.0.3", 0x51200024)
    }
    assert ops(changes) == ["delete_sa", "add_sa"] * 4
    # inbound replacements come first, each delete right before its add
    steps = changes.steps()
    assert [str(s.obj.dst) for s in steps] == ["172.18.0.2"] * 4 + ["172.18.0.3"] * 4  # type: ignore[union-attr]
    assert FOREIGN_SA in kernel.sas.values() and FOREIGN_POLICY in kernel.policies.values()


def test_rotation_in_three_moves() -> None:
    kernel = Kernel([*desired(K3).sas, *FOREIGNS_SA], [*desired(K3).policies, *FOREIGNS_POL])
    # 1. new key seen: install its SAs, keep sending with key 3
    both = K3 + "\n" + K4
    step1 = converge(desired(both, egress={"node-2": 3, "node-3": 3}), kernel)
    assert set(ops(step1)) == {"add_sa"} and len(step1.add_inbound_sas) == len(step1.add_outbound_sas) == 2
    # 2. switch egress: one atomic update per out policy (pod and node selectors)
    step2 = converge(desired(both), kernel)
    assert set(ops(step2)) == {"update_policy"} and len(step2.update_policies) == 4
    assert all(new.direction is Direction.OUT and new.templates[0].spi & 0xF == 4 for _, new in step2.update_policies)
    # 3. old key dropped: its SAs go, nothing else
    step3 = converge(desired(K4), kernel)
    assert set(ops(step3)) == {"delete_sa"} and {s.spi & 0xF for s in step3.delete_sas} == {3}


def test_peer_removed_and_blocked() -> None:
    kernel = Kernel([*desired().sas, *FOREIGNS_SA], [*desired().policies, *FOREIGNS_POL])
    removed = converge(desired(nodes=MESH[:2]), kernel)
    assert ops(removed) == ["delete_policy"] * 6 + ["delete_sa"] * 4
    assert not any(ip("172.18.0.4") in (s.src, s.dst) for s in kernel.sas.values())
    blocked = converge(desired(nodes=[MESH[0], node(2, boot="none")]), kernel)
    assert ops(blocked) == ["update_policy"] * 6 + ["delete_sa"] * 4
    assert {p.action for p in kernel.policies.values() if diff.owns_policy(p, CFG)} == {Action.BLOCK}


def test_foreign_objects_holding_our_identity_are_left_alone() -> None:
    state = desired()
    sa = next(s for s in state.sas if s.dst == ip("172.18.0.3"))
    squatter_sa = replace(sa, reqid=42)
    pol = next(p for p in state.policies if p.direction is Direction.OUT and p.priority == plan.PRIORITY_POD)
    squatter_pol = replace(pol, priority=5)
    changes = diff.diff(state, [squatter_sa], [squatter_pol], CFG)
    touched = [s.obj for s in changes.steps()] + [s.old for s in changes.steps() if s.old]
    assert squatter_sa not in touched and squatter_pol not in touched
    assert sa not in touched and pol not in touched
    assert len(changes.conflicts) == 2
    assert "held by a foreign SA (reqid=42)" in changes.conflicts[0] or "held by a foreign SA (reqid=42)" in changes.conflicts[1]


def test_changed_replay_window_is_a_replace() -> None:
    state = desired()
    old = [replace(s, replay_window=32) for s in state.sas]
    changes = diff.diff(state, old, state.policies, CFG)
    assert len(changes.replace_sas) == len(state.sas) and not changes.add_policies


def test_descriptions_hold_no_key_material() -> None:
    changes = diff.diff(desired(), [], [], CFG)
    text = "\n".join(s.describe() for s in changes.steps()) + repr(changes)
    assert "11" * 8 not in text and "22" * 8 not in text
    for sa in desired().sas:
        assert bytes(sa.algorithm.key).hex()[:16] not in text  # type: ignore[union-attr]


@st.composite
def states(draw: st.DrawFn) -> plan.DesiredState:
    chosen = draw(st.lists(st.sampled_from(range(2, 7)), unique=True, max_size=5))
    nodes = [MESH[0]] + [node(i, boot=draw(st.sampled_from([None, "short", str(uuid.UUID(int=i + 100))]))) for i in chosen]
    text = draw(st.sampled_from([K3, K4, K3 + "\n" + K4, K4 + "\n" + K5]))
    spis = [int(line[0]) for line in text.splitlines()]
    egress = {n.name: draw(st.sampled_from(spis)) for n in nodes[1:] if draw(st.booleans())}
    return plan.plan(MESH[0], nodes, keys.parse(text), plan.PlanConfig(node_encryption=draw(st.booleans())), egress)


@settings(max_examples=80, deadline=None)
@given(states(), states())
def test_any_transition_converges_safely(before: plan.DesiredState, after: plan.DesiredState) -> None:
    kernel = Kernel([*before.sas, *FOREIGNS_SA], [*before.policies, *FOREIGNS_POL])
    converge(after, kernel)
    assert FOREIGN_SA in kernel.sas.values() and FOREIGN_SA_OUR_PREFIX in kernel.sas.values()
    assert set(FOREIGNS_POL) <= set(kernel.policies.values())
    owned = {p for p in kernel.policies.values() if diff.owns_policy(p, CFG)}
    assert owned == set(after.policies)
    assert {s for s in kernel.sas.values() if diff.owns_sa(s, CFG)} == set(after.sas)


def test_5000_peers_diff_fast() -> None:
    mesh = [
        Node(f"n{i}", (ipaddress.IPv4Address(0x0A000000 + i),), (ipaddress.IPv4Network((0x64000000 + (i << 8), 24)),),
             str(uuid.UUID(int=i)))
        for i in range(1, 5002)
    ]
    state = plan.plan(mesh[0], mesh, keys.parse(K3 + "\n" + K4), CFG)
    start = time.process_time()
    adopt = diff.diff(state, state.sas, state.policies, CFG)
    fresh = diff.diff(state, [], [], CFG)
    elapsed = time.process_time() - start
    assert adopt.empty and len(fresh.steps()) == 50000
    assert elapsed < 1.5, f"two diffs of 5000 peers took {elapsed:.2f}s of CPU"


@pytest.mark.parametrize("cls", [SA, Policy])
def test_every_non_identity_field_counts_as_a_change(cls: type) -> None:
    state = desired()
    base = next(iter(state.sas)) if cls is SA else next(p for p in state.policies if p.direction is Direction.OUT)
    changed_values = {
        "src": ip("172.18.0.99"), "reqid": 0x5EA1, "algorithm": AeadAlgorithm("rfc4106(gcm(aes))", KeyMaterial(bytes(20)), 128),
        "replay_window": 64, "esn": False, "output_mark": 0x10, "output_mark_mask": 0xFF, "priority": 10001,
        "action": Action.BLOCK, "templates": (),
    }
    identity = {"dst", "spi"} if cls is SA else {"src", "dst", "direction"}
    for field in fields(cls):
        if field.name in identity:
            continue
        assert field.name in changed_values, f"new field {cls.__name__}.{field.name}: teach agent.ipsec.diff about it"
        other = replace(base, **{field.name: changed_values[field.name]})
        if other == base:
            other = replace(base, **{field.name: 0x5EA2})
        actual = ([other], []) if cls is SA else ([], [other])
        changes = diff.diff(state, *actual, CFG)
        changed = changes.replace_sas if cls is SA else changes.update_policies
        owned = diff.owns_sa(other, CFG) if isinstance(other, SA) else diff.owns_policy(other, CFG)
        assert (base in [new for _, new in changed]) or not owned, f"{cls.__name__}.{field.name} change missed"


def test_step_verbs_map_to_the_kernel_layer() -> None:
    from agent.kernel.xfrm import Verb

    changes = diff.diff(desired(), [], [], CFG)
    assert {Verb(s.verb) for s in changes.steps()} == {Verb.ADD}
    assert CFG.ownership.owns_sa(next(iter(desired().sas))) and CFG.ownership.priority_max == 10099
