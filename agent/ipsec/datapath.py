"""The IPsec datapath, end to end: parse -> derive -> plan -> diff -> apply.

This module is the only one that joins the pure core (agent.ipsec.keys,
agent.ipsec.plan, agent.ipsec.diff) to the kernel (agent.kernel.xfrm). The one-shot
static mode (``python -m agent apply``) and the daemon run the same
:func:`reconcile`; the CLI's ``cmd_*`` functions are thin wrappers.

    keys = agent.ipsec.keys.load("/etc/sealnet/keys/keys")
    with Xfrm.open() as xfrm:
        result = reconcile(xfrm, local, nodes, keys, PlanConfig())
    result.failures        # kernel refusals, each naming its object
    result.desired.blocked # peers held behind block policies, with reasons

Exit codes of ``apply``: 0 every peer encrypted; 1 the kernel refused a
change; 2 bad input (nothing touched); 3 applied, but some peers are blocked
(named on stderr) - their traffic is dropped, never sent in clear.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from agent.ipsec import keys as keyfile
from agent import nodesfile
from agent.ipsec.diff import ChangeSet, Step, diff, owns_policy, owns_sa
from agent.errors import ConfigError, KernelError
from agent.kernel.xfrm import Change, Failure, Verb, Xfrm
from agent.ipsec.keys import KeySet
from agent.model import Action, Direction, Node
from agent.ipsec.plan import DesiredState, PlanConfig, plan

log = logging.getLogger("sealnet.ipsec")

_VERBS = {
    "add_sa": Verb.ADD,
    "delete_sa": Verb.DELETE,
    "add_policy": Verb.ADD,
    "update_policy": Verb.UPDATE,
    "delete_policy": Verb.DELETE,
}


@dataclass(frozen=True)
class ApplyResult:
    desired: DesiredState
    changes: ChangeSet
    failures: tuple[Failure, ...]

    def summary(self) -> str:
        counts = Counter(step.op for step in self.changes.steps())
        done = ", ".join(f"{op} {n}" for op, n in sorted(counts.items())) or "no change"
        return (f"peers served {len(self.desired.served)}, blocked {len(self.desired.blocked)}; "
                f"{done}; failures {len(self.failures)}")


def reconcile(xfrm: Xfrm, local: Node, nodes: Sequence[Node], keys: KeySet, config: PlanConfig,
              egress: Optional[Mapping[str, int]] = None) -> ApplyResult:
    """Bring the kernel's owned XFRM state to the plan; never touch foreign state.

    One dump of each table, one batched write. A refused change does not stop
    the others (one bad peer must not hold back the rest); it is returned.
    ``egress`` maps peers to the key ID to send them with (plan.plan's).
    """
    desired = plan(local, nodes, keys, config, egress)
    for collision in desired.collisions:
        log.error("cannot tell nodes apart kind=%s nodes=%s: %s", collision.kind,
                  ",".join(collision.nodes), collision.detail)
    for peer, reason in desired.blocked:
        log.warning("peer blocked peer=%s reason=%s", peer, reason)
    changes = diff(desired, xfrm.dump_sas(), xfrm.dump_policies(), config)
    for conflict in changes.conflicts:
        log.error("left alone, held by a foreign object: %s", conflict)
    steps = changes.steps()
    for step in steps:
        log.info("%s", step.describe())
    failures = tuple(xfrm.apply(_change(step) for step in steps))
    for failure in failures:
        log.error("kernel refused: %s", failure.error)
    return ApplyResult(desired, changes, failures)


def _change(step: Step) -> Change:
    return Change(_VERBS[step.op], step.obj)


def open_xfrm(netns: Optional[str]) -> Xfrm:
    """The XFRM socket of the current namespace, or of the named one."""
    try:
        return Xfrm.open(netns=netns)
    except FileNotFoundError:
        raise ConfigError(f"--netns: no network namespace named {netns!r} (see `ip netns list`)") from None
    except OSError as e:
        where = f"namespace {netns!r}" if netns else "this namespace"
        raise KernelError(f"cannot open an XFRM netlink socket in {where}: {e.strerror}", e.errno) from e


def local_node(nodes: Sequence[Node], name: str) -> Node:
    for node in nodes:
        if node.name == name:
            return node
    known = ", ".join(n.name for n in nodes) or "none"
    raise ConfigError(f"--node: {name!r} is not in the node description (nodes: {known})")


# -- status --------------------------------------------------------------------


def status(xfrm: Xfrm, config: PlanConfig, keys: Optional[KeySet] = None) -> dict[str, Any]:
    """The encryption status of this node, read from the kernel alone.

    Peers are the tunnel endpoints of our out policies; each one's egress key
    is the low nibble of the SPI its out policy pins. Errors add up the
    per-SA failure counters (replay window, replay, authentication).
    """
    policies = [p for p in xfrm.dump_policies() if owns_policy(p, config)]
    counters = xfrm.dump_sa_counters()
    owned_sas = [sa for sa in xfrm.dump_sas() if owns_sa(sa, config)]
    owned = {(sa.dst, sa.spi) for sa in owned_sas}
    egress: dict[str, int] = {}
    egress_sas: set[tuple[Any, int]] = set()
    blocked = 0
    for p in policies:
        if p.direction is not Direction.OUT:
            continue
        if p.action is Action.BLOCK:
            blocked += 1
            continue
        for t in p.templates:
            if t.spi:
                egress[str(t.dst)] = t.spi & 0xF
                egress_sas.add((t.dst, t.spi))
    installed = sorted({sa.spi & 0xF for sa in owned_sas})
    # ESP's 32-bit sequence number wraps (the SA must be replaced) at 2^32;
    # without ESN, warn from 2^31 on. Our own SAs always have ESN.
    no_esn_high = sorted(f"{sa.spi:#010x}" for sa in owned_sas if not sa.esn
                         and counters.get((sa.dst, sa.spi)) and counters[(sa.dst, sa.spi)].oseq >= 2**31)
    current = keys.current.spi if keys else (Counter(egress.values()).most_common(1)[0][0] if egress else None)
    per_node = bool(keys and keys.current.per_node)
    on_current = sum(1 for k in egress.values() if k == current)
    max_seq = max((counters[k].oseq64 for k in egress_sas if k in counters), default=0)
    errors = sum(c.replay_window + c.replay + c.integrity_failed for k, c in counters.items() if k in owned)
    return {
        "mode": "ipsec",
        "key": current,
        "perNodeKeys": per_node,
        "peers": len(egress),
        "peersOnCurrentKey": on_current,
        "egressKeys": dict(sorted(egress.items())),
        "blockedPolicies": blocked,
        "sas": len(owned),
        "maxSeq": max_seq,
        "errors": errors,
        "keysInstalled": installed,
        "peersByEgressKey": {str(k): n for k, n in sorted(Counter(egress.values()).items())},
        "seqWarnings": no_esn_high,
    }


def status_line(s: dict[str, Any]) -> str:
    """``Encryption: IPsec [key 4+, peers 3/3 on key 4, max seq 0x1e3, errors 0]``."""
    if s["key"] is None:
        return f"Encryption: IPsec [no key in use, peers 0, blocked {s['blockedPolicies']}, errors {s['errors']}]"
    plus = "+" if s["perNodeKeys"] else ""
    blocked = f", blocked {s['blockedPolicies']}" if s["blockedPolicies"] else ""
    # During a rotation: every key whose SAs are in, and the peers per egress key.
    rotating = ""
    if len(s.get("keysInstalled", ())) > 1:
        by_key = " ".join(f"{k}:{n}" for k, n in s["peersByEgressKey"].items())
        rotating = f", rotating: keys {','.join(map(str, s['keysInstalled']))} installed, egress {by_key}"
    line = (f"Encryption: IPsec [key {s['key']}{plus}, peers {s['peersOnCurrentKey']}/{s['peers']} on key "
            f"{s['key']}{blocked}{rotating}, max seq {s['maxSeq']:#x}, errors {s['errors']}]")
    if s.get("seqWarnings"):
        line += (f"\nWARNING: SAs without ESN past 2^31 packets (replace them before 2^32): "
                 f"{', '.join(s['seqWarnings'])}")
    return line


# -- CLI commands (agent.cli dispatches here) -------------------------------------


def cmd_apply(args: argparse.Namespace) -> int:
    if not args.keys:
        raise ConfigError("--keys: required in ipsec mode (the keys file, Cilium's format)")
    # Everything is read and checked before the kernel is touched.
    keys = keyfile.load(args.keys)
    nodes = nodesfile.load(args.nodes)
    local = local_node(nodes, args.node)
    config = PlanConfig(spi_prefix=args.spi_prefix, node_encryption=args.node_encryption)
    with open_xfrm(args.netns) as xfrm:
        result = reconcile(xfrm, local, nodes, keys, config)
    print(f"sealnet-agent apply: node {local.name}: {result.summary()}")
    if result.failures:
        return 1
    if result.desired.blocked:
        for peer, reason in result.desired.blocked:
            print(f"sealnet-agent apply: peer {peer} blocked (traffic dropped, never in clear): {reason}",
                  file=sys.stderr)
        return 3
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    keys = keyfile.load(args.keys) if args.keys else None
    config = PlanConfig(spi_prefix=args.spi_prefix)
    with open_xfrm(args.netns) as xfrm:
        s = status(xfrm, config, keys)
    print(json.dumps(s, sort_keys=True) if args.json else status_line(s))
    return 0
