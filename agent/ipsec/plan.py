"""The planner: (local node, all nodes, keys, config) -> desired XFRM state.

A pure function; it never touches the kernel (and never imports pyroute2).
Its output is frozen and hashable, so the reconciler's work is set
arithmetic (agent.ipsec.diff). Usage::

    from agent.ipsec import keys, plan
    desired = plan.plan(local, nodes, keys.load(path), plan.PlanConfig(node_encryption=True))
    desired.sas, desired.policies        # what the kernel should hold
    desired.blocked, desired.collisions  # peers that cannot be served, and why

Layout (shared/DESIGN.md), per remote node and address family, tunnel
endpoints being the first node IP of that family on each side:

- ``out`` policy local podCIDR -> peer podCIDR, template ESP tunnel local IP
  -> peer IP pinning the local node's SPI for the egress key, so switching
  egress to another key is one atomic policy update;
- ``in`` and ``fwd`` policies peer podCIDR -> local podCIDR, template peer IP
  -> local IP with no SPI pin, so the SAs of every key in the file decrypt;
- per key in the file one ``out`` SA (local -> peer, the local node's SPI)
  and one ``in`` SA (peer -> local, the peer's SPI); per-node-pair keys when
  the key line has ``+``; ESN with a replay window on every SA;
- several podCIDRs on a node: the cross product of same-family pairs;
  pairs of different families are skipped, as are families in which either
  node has no IP.

SPI = prefix (4 bits) | low 24 bits of the *sender's* IP | key ID (4 bits).
The kernel finds the SA of an inbound packet by (dst, SPI, proto, mark),
never by source, so each sender needs its own SPI. Nodes whose IPs share
the low 24 bits cannot be told apart; like podCIDRs that overlap (the
kernel picks XFRM policies by priority, not by longest prefix), they are
reported in ``collisions``, naming every node involved.

Strict mode: a peer that cannot be served (no usable boot ID while the key
has ``+``, its egress key not in the file, an SPI or podCIDR collision) gets
``block`` policies in place of ``allow``, so its traffic is dropped, never
sent in clear. When the local node itself collides, every peer blocks it
(each computes the same collisions from the same node list), so the local
node blocks every peer too and its status says why.

nodeEncryption adds the same objects for node IP/32 <-> node IP/32 (all
protocols). No loop: an ESP packet the kernel builds from one of our SAs
matches that selector (local IP -> peer IP) but is never looked up again;
xfrm_lookup ran once on the inner flow and returned a bundle whose
xfrm_output hands the outer packet to the plain route behind it
(skb_dst_pop), and netfilter's re-route after NAT skips packets flagged
IPSKB_XFRM_TRANSFORMED. Inbound, the ESP packet itself meets no policy check
(xfrm4_rcv decrypts, the check runs on the inner packet at delivery or
forwarding, against the template). No lock-out of the node: selectors name
cluster node IPs only, so SSH or API traffic from outside the node list,
DNS, registries and the cloud metadata service are never matched. The
limit is between nodes: traffic to a node that is blocked (or whose agent
has not yet installed our SAs) is dropped, so a control-plane node whose
agent is down cuts the others off its API server; see the README.
"""

from __future__ import annotations

import gc
import ipaddress
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from agent.ipsec import derive
from agent.errors import ConfigError
from agent.ipsec.keys import KeySet
from agent.model import SA, Action, Direction, IPAddress, IPNetwork, Node, Ownership, Policy, Template

#: The priority band of our policies (lower value = preferred by the
#: kernel). Any policy in it without templates, or whose templates all carry
#: our reqid, is ours (agent.ipsec.diff).
OWNED_PRIORITIES = range(10000, 10100)
#: Block policies win over every allow policy of ours, so any overlap fails closed.
PRIORITY_BLOCK = 10000
#: Node IP/32 pairs before podCIDR pairs, should a node IP fall in a podCIDR.
PRIORITY_NODE = 10010
PRIORITY_POD = 10020


@dataclass(frozen=True)
class PlanConfig:
    """Knobs of the planner; the defaults are the daemon's."""

    spi_prefix: int = 0x5
    reqid: int = 0x5EA1
    node_encryption: bool = False
    #: replay window (packets) of the ESN replay state on every SA
    replay_window: int = 1024

    def __post_init__(self) -> None:
        if not 0x1 <= self.spi_prefix <= 0xF:
            raise ConfigError(f"spi_prefix: must be 0x1..0xf, got {self.spi_prefix:#x}")
        if not 1 <= self.reqid <= 0xFFFFFFFF:
            raise ConfigError(f"reqid: must be 1..0xffffffff, got {self.reqid}")
        # XFRMA_REPLAY_ESN_MAX in net/xfrm/xfrm_user.c: 128 * 32 bits.
        if not 1 <= self.replay_window <= 4096:
            raise ConfigError(f"replay_window: must be 1..4096, got {self.replay_window}")

    @property
    def ownership(self) -> Ownership:
        """How kernel dumps are filtered to our objects (agent.ipsec.diff, agent.kernel.xfrm)."""
        return Ownership(self.reqid, self.spi_prefix, OWNED_PRIORITIES.start, OWNED_PRIORITIES.stop - 1)


@dataclass(frozen=True)
class Collision:
    """Nodes that cannot be told apart: ``kind`` is "spi" or "podCIDR"."""

    kind: str
    nodes: tuple[str, ...]
    detail: str


@dataclass(frozen=True)
class DesiredState:
    """Everything the kernel should hold for the local node, plus status."""

    sas: frozenset[SA]
    policies: frozenset[Policy]
    #: (peer name, reason) for each peer with any blocked or unserved traffic
    blocked: tuple[tuple[str, str], ...] = ()
    collisions: tuple[Collision, ...] = ()
    #: the local node's tunnel endpoints: an SA whose dst is one is inbound
    local_ips: frozenset[IPAddress] = frozenset()
    #: (peer name, key ID) pinned on the out policies of each served peer
    egress: tuple[tuple[str, int], ...] = ()

    @property
    def served(self) -> tuple[str, ...]:
        """Names of the peers with at least one allow policy."""
        return tuple(name for name, _ in self.egress)


def low24(ip: IPAddress) -> int:
    """The low 24 bits of an address, the sender's part of our SPIs."""
    return int(ip) & 0xFFFFFF


def spi_for(prefix: int, sender_ip: IPAddress, key_id: int) -> int:
    """The SPI ``sender_ip`` sends with under key ``key_id``.

    >>> hex(spi_for(0x5, ipaddress.ip_address("172.18.0.3"), 3))
    '0x51200033'
    """
    if not 1 <= prefix <= 0xF or not 1 <= key_id <= 0xF:
        raise ValueError(f"spi_for: prefix and key ID must be 1..15, got {prefix}, {key_id}")
    return (prefix << 28) | (low24(sender_ip) << 4) | key_id


def plan(
    local: Node,
    nodes: Sequence[Node],
    keys: KeySet,
    config: PlanConfig,
    egress: Optional[Mapping[str, int]] = None,
) -> DesiredState:
    """The complete desired state of the local node.

    ``nodes`` is the whole node list; the entry named like ``local`` is
    skipped. ``egress`` maps a peer name to the key ID to send it with
    (the rotation's state); peers not in it use the current key.
    """
    if not local.ips:
        raise ConfigError(f"local node {local.name!r} has no IP address")
    peers = [n for n in nodes if n.name != local.name]
    everyone = [local, *peers]
    planner = _Planner(local, keys, config, egress or {})
    # Tens of thousands of small acyclic objects: the cyclic collector would
    # rescan them over and over (a third of the time at 5000 peers).
    paused = gc.isenabled()
    gc.disable()
    try:
        planner.find_spi_collisions(everyone)
        planner.find_cidr_overlaps(everyone)
        for peer in peers:
            planner.add_peer(peer)
        return planner.result()
    finally:
        if paused:
            gc.enable()


def endpoint(node: Node, version: int) -> Optional[IPAddress]:
    """The node's tunnel endpoint of one address family: its first IP of it."""
    for ip in node.ips:
        if ip.version == version:
            return ip
    return None


def host_network(ip: IPAddress) -> IPNetwork:
    """``ip`` as a /32 (IPv4) or /128 (IPv6) selector."""
    # From the integer: ip_network((ip, 32)) re-parses the address as text.
    if ip.version == 4:
        return ipaddress.IPv4Network(int(ip))
    return ipaddress.IPv6Network(int(ip))


class _Planner:
    """Accumulates the desired objects; one instance per plan() call."""

    def __init__(self, local: Node, keys: KeySet, config: PlanConfig, egress: Mapping[str, int]) -> None:
        self.local, self.keys, self.config, self.egress_map = local, keys, config, egress
        self.sas: list[SA] = []
        self.policies: list[Policy] = []
        self.blocked: list[tuple[str, str]] = []
        self.collisions: list[Collision] = []
        self.egress: list[tuple[str, int]] = []
        # (version) -> node name -> reason; filled by find_*.
        self.spi_reason: dict[int, dict[str, str]] = {4: {}, 6: {}}
        self.cidr_reason: dict[str, str] = {}
        self.local_boot_ok = derive.usable_boot_id(local.boot_id)
        self.has_per_node = any(k.per_node for k in keys)

    # -- collisions ---------------------------------------------------------

    def find_spi_collisions(self, everyone: Sequence[Node]) -> None:
        for version in (4, 6):
            groups: dict[int, list[str]] = defaultdict(list)
            for node in everyone:
                ip = endpoint(node, version)
                if ip is not None:
                    groups[low24(ip)].append(node.name)
            reasons = self.spi_reason[version]
            for bits, names in sorted(groups.items()):
                if len(names) < 2:
                    continue
                detail = (
                    f"nodes {', '.join(names)} share the low 24 bits {bits:#08x} of their IPv{version} "
                    "address, so their SPIs collide"
                )
                self.collisions.append(Collision("spi", tuple(names), detail))
                for name in names:
                    reasons[name] = f"SPI collision: {detail}"

    def find_cidr_overlaps(self, everyone: Sequence[Node]) -> None:
        # Prefixes overlap only by nesting: sorted by (address, length), a
        # prefix overlaps an earlier one iff an open "enclosing" one holds it.
        for version in (4, 6):
            cidrs = sorted(
                ((c, n.name) for n in everyone for c in n.pod_cidrs if c.version == version),
                key=lambda item: (item[0].network_address, item[0].prefixlen),
            )
            stack: list[tuple[IPNetwork, str]] = []
            for cidr, name in cidrs:
                while stack and not _contains(stack[-1][0], cidr):
                    stack.pop()
                for outer, outer_name in stack:
                    if outer_name != name:
                        self._overlap(outer, outer_name, cidr, name)
                stack.append((cidr, name))

    def _overlap(self, a: IPNetwork, a_name: str, b: IPNetwork, b_name: str) -> None:
        detail = f"podCIDR {a} of {a_name} overlaps podCIDR {b} of {b_name}"
        self.collisions.append(Collision("podCIDR", (a_name, b_name), detail))
        for name in (a_name, b_name):
            self.cidr_reason.setdefault(name, f"podCIDR overlap: {detail}")

    # -- one peer -----------------------------------------------------------

    def add_peer(self, peer: Node) -> None:
        reasons: list[str] = []
        egress_id = self.egress_map.get(peer.name, self.keys.current.spi)
        common = self._common_reason(peer, egress_id)
        served = False
        families = 0
        for version in (4, 6):
            l_ip, p_ip = endpoint(self.local, version), endpoint(peer, version)
            if l_ip is None or p_ip is None:
                continue  # mixed-family pair: no tunnel in this family
            families += 1
            served |= self._add_family(peer, l_ip, p_ip, common, egress_id, reasons)
        if families == 0:
            reasons.append("no address family in common with the local node (no tunnel endpoint)")
        if not peer.pod_cidrs and families:
            reasons.append("no podCIDR: its pod traffic cannot be selected")
        if served:
            self.egress.append((peer.name, egress_id))
        if reasons:
            self.blocked.append((peer.name, "; ".join(dict.fromkeys(reasons))))

    def _add_family(
        self, peer: Node, l_ip: IPAddress, p_ip: IPAddress, common: Optional[str], egress_id: int, reasons: list[str]
    ) -> bool:
        """Policies and SAs of one address family; True if anything is allowed."""
        cfg, version = self.config, l_ip.version
        fam_reason = common or self._spi_reason(peer, version)
        pod_pairs = [
            (lc, pc)
            for lc in self.local.pod_cidrs
            if lc.version == version
            for pc in peer.pod_cidrs
            if pc.version == version
        ]
        pod_reason = fam_reason or self._cidr_reason(peer)
        allow: list[tuple[IPNetwork, IPNetwork, int]] = []
        block: list[tuple[IPNetwork, IPNetwork]] = []
        if pod_reason:
            block.extend(pod_pairs)
            if pod_pairs:
                reasons.append(pod_reason)
        else:
            allow.extend((lc, pc, PRIORITY_POD) for lc, pc in pod_pairs)
        if cfg.node_encryption:
            pair = (host_network(l_ip), host_network(p_ip))
            if fam_reason:
                block.append(pair)
                reasons.append(fam_reason)
            else:
                allow.append((*pair, PRIORITY_NODE))
        for local_side, peer_side in block:
            self._block(local_side, peer_side)
        if not allow:
            return False
        out_tmpl = Template(l_ip, p_ip, cfg.reqid, spi_for(cfg.spi_prefix, l_ip, egress_id))
        in_tmpl = Template(p_ip, l_ip, cfg.reqid, 0)
        for local_side, peer_side, prio in allow:
            self.policies.append(Policy(Direction.OUT, local_side, peer_side, prio, Action.ALLOW, (out_tmpl,)))
            self.policies.append(Policy(Direction.IN, peer_side, local_side, prio, Action.ALLOW, (in_tmpl,)))
            self.policies.append(Policy(Direction.FWD, peer_side, local_side, prio, Action.ALLOW, (in_tmpl,)))
        self._add_sas(peer, l_ip, p_ip)
        return True

    def _common_reason(self, peer: Node, egress_id: int) -> Optional[str]:
        """Why nothing can be sent to ``peer`` in any family, if so."""
        key = self.keys.get(egress_id)
        if key is None:
            return f"egress key {egress_id} is not in the keys file (has {list(self.keys.spis)})"
        if key.per_node and not self.local_boot_ok:
            return f"local node {self.local.name} has no usable boot ID (per-node-pair key {key.spi}+)"
        if key.per_node and not derive.usable_boot_id(peer.boot_id):
            what = "no boot ID" if peer.boot_id is None else "a boot ID shorter than 36 characters"
            return f"{what} (per-node-pair key {key.spi}+ needs it)"
        return None

    def _spi_reason(self, peer: Node, version: int) -> Optional[str]:
        reasons = self.spi_reason[version]
        if self.local.name in reasons:
            return f"local node is in an {reasons[self.local.name]}; every node blocks it"
        return reasons.get(peer.name)

    def _cidr_reason(self, peer: Node) -> Optional[str]:
        if self.local.name in self.cidr_reason:
            return f"local node has a {self.cidr_reason[self.local.name]}; every node blocks its pods"
        return self.cidr_reason.get(peer.name)

    def _block(self, local_side: IPNetwork, peer_side: IPNetwork) -> None:
        self.policies.append(Policy(Direction.OUT, local_side, peer_side, PRIORITY_BLOCK, Action.BLOCK))
        self.policies.append(Policy(Direction.IN, peer_side, local_side, PRIORITY_BLOCK, Action.BLOCK))
        self.policies.append(Policy(Direction.FWD, peer_side, local_side, PRIORITY_BLOCK, Action.BLOCK))

    def _add_sas(self, peer: Node, l_ip: IPAddress, p_ip: IPAddress) -> None:
        cfg = self.config
        peer_spi_base = (cfg.spi_prefix << 28) | (low24(p_ip) << 4)
        local_spi_base = (cfg.spi_prefix << 28) | (low24(l_ip) << 4)
        out_mat = in_mat = b""
        if self.has_per_node and self.local_boot_ok and derive.usable_boot_id(peer.boot_id):
            assert self.local.boot_id is not None and peer.boot_id is not None
            l_b, p_b = derive.ip_bytes(l_ip), derive.ip_bytes(p_ip)
            l_boot, p_boot = derive.boot_id_bytes(self.local.boot_id), derive.boot_id_bytes(peer.boot_id)
            out_mat = derive.material(l_b, p_b, l_boot, p_boot)  # f(local, remote)
            in_mat = derive.material(p_b, l_b, p_boot, l_boot)  # f(remote, local)
        for key in self.keys:
            if key.per_node and not out_mat:
                continue  # not the egress key (checked before): this key cannot serve the peer
            out_alg = derive.derive_with(key.algorithm, out_mat) if key.per_node else key.algorithm
            in_alg = derive.derive_with(key.algorithm, in_mat) if key.per_node else key.algorithm
            self.sas.append(SA(l_ip, p_ip, local_spi_base | key.spi, cfg.reqid, out_alg, cfg.replay_window, True))
            self.sas.append(SA(p_ip, l_ip, peer_spi_base | key.spi, cfg.reqid, in_alg, cfg.replay_window, True))

    def result(self) -> DesiredState:
        local_ips = frozenset(ip for ip in (endpoint(self.local, 4), endpoint(self.local, 6)) if ip is not None)
        return DesiredState(
            sas=frozenset(self.sas),
            policies=frozenset(self.policies),
            blocked=tuple(sorted(self.blocked)),
            collisions=tuple(self.collisions),
            local_ips=local_ips,
            egress=tuple(sorted(self.egress)),
        )


def _contains(outer: IPNetwork, inner: IPNetwork) -> bool:
    return int(outer.network_address) <= int(inner.network_address) and int(inner.broadcast_address) <= int(
        outer.broadcast_address
    )
