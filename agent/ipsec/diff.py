"""The reconciler's pure heart: desired vs. kernel state -> ordered changes.

Usage::

    from agent.ipsec import diff, plan
    changes = diff.diff(desired, kernel_sas, kernel_policies, config)
    for step in changes.steps():          # apply in this order
        step.op, step.obj, step.old       # "add_sa", "update_policy", ...
        Change(Verb(step.verb), step.obj) # agent.kernel.xfrm
    changes.empty                         # nothing to do (restart adoption)
    changes.conflicts                     # ours that foreign objects block

Only objects the agent owns are ever changed; the kernel's tables are dumped
whole (foreign objects included) and filtered here:

- an SA is ours if its reqid is ``config.reqid`` and the top 4 bits of its
  SPI are ``config.spi_prefix``;
- a policy is ours if its priority is in ``plan.OWNED_PRIORITIES`` and it
  has no template or only templates with our reqid.

These are ``config.ownership`` (a model.Ownership), the same rules the
kernel layer documents; pass that object wherever dumps are filtered.

Identity follows the kernel: an SA is found by (dst, SPI) (ESP, no mark:
xfrm_state_lookup), a policy by (selector, direction) (no mark, no if_id:
xfrm_policy_insert replaces a policy with the same selector). A desired
object whose identity a foreign object holds is left alone and reported in
``conflicts``: installing it would replace or collide with state we do not
own.

Change kinds:
- SA added; SA *replaced* when one of ours with the same identity differs
  (key, replay window, ...): XFRM_MSG_UPDSA cannot change keys (the kernel's
  xfrm_state_update copies lifetimes, encap and marks only), so it is a
  delete followed at once by an add. Traffic on that SA is dropped for that
  moment, never sent in clear: the policies stay and find no SA;
- policy added; policy *updated* in place (same selector and direction,
  other priority, action or template) with XFRM_MSG_UPDPOLICY, which swaps
  it atomically; policy deleted; SA deleted.

Order (steps()), chosen so that no selector ever loses its policy on the way
and no policy ever points at a missing SA that is about to come:
inbound SAs (a peer may already send with a new key), outbound SAs, policy
adds, policy updates (egress switches here), policy deletes, SA deletes (old
keys go last). Applying the steps to the kernel and diffing again gives an
empty change set.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Iterable, Optional, TypeVar, Union

from agent.model import SA, IPAddress, Policy
from agent.ipsec.plan import DesiredState, PlanConfig

SaId = tuple[IPAddress, int]
XfrmObject = Union[SA, Policy]


def sa_id(sa: SA) -> SaId:
    """The kernel's identity of an SA (ESP, no mark): (dst, SPI)."""
    return (sa.dst, sa.spi)


def owns_sa(sa: SA, config: PlanConfig) -> bool:
    """Our reqid and SPI prefix (model.Ownership with plan's band)."""
    return config.ownership.owns_sa(sa)


def owns_policy(policy: Policy, config: PlanConfig) -> bool:
    """Priority in plan.OWNED_PRIORITIES, no template or only our reqid."""
    return config.ownership.owns_policy(policy)


@dataclass(frozen=True)
class Step:
    """One kernel operation. ``old`` is the object replaced or updated."""

    op: str  # add_sa | delete_sa | add_policy | update_policy | delete_policy
    obj: XfrmObject
    old: Optional[XfrmObject] = None

    @property
    def verb(self) -> str:
        """"add", "update" or "delete": agent.kernel.xfrm.Verb(step.verb)."""
        return self.op.split("_", 1)[0]

    def describe(self) -> str:
        """Log-safe: SA and policy descriptions carry no key material."""
        return f"{self.op} {self.obj.describe()}"


@dataclass(frozen=True)
class ChangeSet:
    """The minimal changes, grouped; steps() gives the order to apply them."""

    add_inbound_sas: tuple[SA, ...] = ()
    add_outbound_sas: tuple[SA, ...] = ()
    #: (old, new) with the same (dst, SPI): delete, then add at once
    replace_sas: tuple[tuple[SA, SA], ...] = ()
    add_policies: tuple[Policy, ...] = ()
    #: (old, new) with the same selector and direction: UPDPOLICY in place
    update_policies: tuple[tuple[Policy, Policy], ...] = ()
    delete_policies: tuple[Policy, ...] = ()
    delete_sas: tuple[SA, ...] = ()
    #: desired objects left out because a foreign object holds their identity
    conflicts: tuple[str, ...] = ()
    local_ips: frozenset[IPAddress] = frozenset()

    @property
    def empty(self) -> bool:
        """True when the kernel already holds the desired state."""
        return not (
            self.add_inbound_sas or self.add_outbound_sas or self.replace_sas or self.add_policies
            or self.update_policies or self.delete_policies or self.delete_sas
        )

    def steps(self) -> tuple[Step, ...]:
        """Every operation, in the order that never opens a plaintext window."""
        inbound = [(old, new) for old, new in self.replace_sas if new.dst in self.local_ips]
        outbound = [(old, new) for old, new in self.replace_sas if new.dst not in self.local_ips]
        out: list[Step] = []
        for replaced, added in ((inbound, self.add_inbound_sas), (outbound, self.add_outbound_sas)):
            for old, new in replaced:
                out += [Step("delete_sa", old), Step("add_sa", new, old)]
            out += [Step("add_sa", sa) for sa in added]
        out += [Step("add_policy", p) for p in self.add_policies]
        out += [Step("update_policy", new, old) for old, new in self.update_policies]
        out += [Step("delete_policy", p) for p in self.delete_policies]
        out += [Step("delete_sa", sa) for sa in self.delete_sas]
        return tuple(out)


def diff(
    desired: DesiredState,
    actual_sas: Iterable[SA],
    actual_policies: Iterable[Policy],
    config: PlanConfig,
) -> ChangeSet:
    """The changes that turn the kernel's owned state into ``desired``."""
    conflicts: list[str] = []
    paused = gc.isenabled()  # as in plan.plan: many small acyclic objects
    gc.disable()
    try:
        add_in, add_out, replace, delete_sas = _diff_sas(desired, actual_sas, config, conflicts)
        add_pol, update_pol, delete_pol = _diff_policies(desired, actual_policies, config, conflicts)
    finally:
        if paused:
            gc.enable()
    return ChangeSet(
        add_inbound_sas=add_in,
        add_outbound_sas=add_out,
        replace_sas=replace,
        add_policies=add_pol,
        update_policies=update_pol,
        delete_policies=delete_pol,
        delete_sas=delete_sas,
        conflicts=tuple(conflicts),
        local_ips=desired.local_ips,
    )


def _diff_sas(
    desired: DesiredState, actual: Iterable[SA], config: PlanConfig, conflicts: list[str]
) -> tuple[tuple[SA, ...], tuple[SA, ...], tuple[tuple[SA, SA], ...], tuple[SA, ...]]:
    ours: dict[_Key, SA] = {}
    foreign: dict[_Key, SA] = {}
    owns = config.ownership.owns_sa
    for sa in actual:
        (ours if owns(sa) else foreign).setdefault(_sa_key(sa), sa)
    add_in: list[tuple[_Key, SA]] = []
    add_out: list[tuple[_Key, SA]] = []
    replace: list[tuple[_Key, tuple[SA, SA]]] = []
    wanted = {_sa_key(sa): sa for sa in desired.sas}
    for key, sa in wanted.items():
        if key in foreign:
            conflicts.append(f"{sa.describe()}: held by a foreign SA (reqid={foreign[key].reqid}); left alone")
            continue
        current = ours.get(key)
        if current is None:
            (add_in if sa.dst in desired.local_ips else add_out).append((key, sa))
        elif _sa_changed(current, sa):
            replace.append((key, (current, sa)))
    delete = [(key, sa) for key, sa in ours.items() if key not in wanted]
    return _sorted(add_in), _sorted(add_out), _sorted(replace), _sorted(delete)


def _diff_policies(
    desired: DesiredState, actual: Iterable[Policy], config: PlanConfig, conflicts: list[str]
) -> tuple[tuple[Policy, ...], tuple[tuple[Policy, Policy], ...], tuple[Policy, ...]]:
    ours: dict[_Key, Policy] = {}
    foreign: dict[_Key, Policy] = {}
    owns = config.ownership.owns_policy
    for p in actual:
        (ours if owns(p) else foreign).setdefault(_policy_key(p), p)
    add: list[tuple[_Key, Policy]] = []
    update: list[tuple[_Key, tuple[Policy, Policy]]] = []
    wanted = {_policy_key(p): p for p in desired.policies}
    for key, p in wanted.items():
        if key in foreign:
            conflicts.append(
                f"{p.describe()}: selector held by a foreign policy (prio={foreign[key].priority}); left alone"
            )
            continue
        current = ours.get(key)
        if current is None:
            add.append((key, p))
        elif _policy_changed(current, p):
            update.append((key, (current, p)))
    delete = [(key, p) for key, p in ours.items() if key not in wanted]
    conflicts.sort()
    return _sorted(add), _sorted(update), _sorted(delete)


# Identity keys of plain ints: hashed and compared in C, and a stable order
# for the steps (ipaddress objects hash in Python, several times per lookup).
_Key = tuple[int, ...]
T = TypeVar("T")


def _sa_key(sa: SA) -> _Key:
    """(dst, SPI), as xfrm_state_lookup finds an ESP SA without mark."""
    return (sa.dst.version, int(sa.dst), sa.spi)


def _policy_key(p: Policy) -> _Key:
    """(selector, direction), as xfrm_policy_insert matches an unmarked policy."""
    src, dst = p.src, p.dst
    return (src.version, int(src.network_address), src.prefixlen, int(dst.network_address), dst.prefixlen, p.direction)


def _sa_changed(old: SA, new: SA) -> bool:
    """``old != new`` for two SAs of one identity, cheapest fields first."""
    # Every field but the identity (dst, spi); tests/unit/test_diff.py checks
    # that a field added to model.SA is not forgotten here.
    return (
        old.reqid != new.reqid or old.replay_window != new.replay_window or old.esn != new.esn
        or old.output_mark != new.output_mark or old.output_mark_mask != new.output_mark_mask
        or old.algorithm != new.algorithm or old.src != new.src
    )


def _policy_changed(old: Policy, new: Policy) -> bool:
    """``old != new`` for two policies of one selector (all other fields)."""
    return old.priority != new.priority or old.action != new.action or old.templates != new.templates


def _sorted(items: list[tuple[_Key, T]]) -> tuple[T, ...]:
    items.sort(key=lambda item: item[0])
    return tuple(obj for _, obj in items)
