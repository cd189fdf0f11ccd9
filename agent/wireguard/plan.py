"""Desired WireGuard datapath of one node: a pure function, no pyroute2.

    config = plan(local, nodes, own_public_key, Settings(node_encryption=True))
    changes = diff_peers(config.peers, backend.read(ifname).peers)

``plan`` turns the local node and the node list into the interface's
configuration: one peer per other node whose public key is usable
(endpoint = its first IP and the cluster port; allowed IPs = its pod CIDRs,
plus its node IPs with nodeEncryption), the routes and policy rules that send
traffic into the interface, and the MTU. ``diff_peers`` compares that with
what the device has and returns the minimal change: peers that are already
right are not touched, so their sessions survive.

Routing: everything lives in its own table (``ROUTE_TABLE``), reached
through policy rules, so the CNI's main table (kindnet or flannel host-gw
routes ``<podCIDR> via <node IP>``) is left as it is and nobody fights over
it. Routes and rules carry protocol ``RTPROT_SEALNET``, which is how the
reconciler recognises its own.

- Without nodeEncryption: ``from <local podCIDR> lookup T``. Pod traffic to
  a peer's pods is encrypted; node-originated traffic keeps the CNI's path,
  as node traffic is only covered with nodeEncryption.
- With nodeEncryption (as wg-quick does for a default route): the device
  sets fwmark ``FWMARK`` on its own UDP socket and one rule
  ``not fwmark FWMARK lookup T`` sends everything else to T, which also
  routes each peer's node IPs into the tunnel. WireGuard's encrypted UDP to
  the same node IPs carries the mark, skips T and leaves through the
  underlay: no loop.

Peers with a missing, malformed or duplicate public key (or with pod CIDRs
that clash) are rejected: a log line names the nodes and the reason, they get
no peer entry, and their pod CIDRs get an ``unreachable`` route in T, so pod
traffic to them is refused, never sent in clear (strict mode, as for IPsec).
Configured peers' pod CIDRs have the same unreachable route below the tunnel
route, so traffic fails closed if the device goes away (wireguard-go killed
with the agent's container). Node IPs are never blocked: that could lock a
node out of its API server.

MTU: the underlay MTU minus 80, WireGuard's worst case: an IPv6 outer header
(40) + UDP (8) + WireGuard data header (type, receiver index, counter: 16)
+ Poly1305 tag (16). IPv4 needs only 60, but the endpoint family can change
and one MTU for both keeps the arithmetic simple (wg-quick does the same).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional, Sequence

from agent.errors import ConfigError
from agent.model import IPAddress, IPNetwork, Node
from agent.wireguard.keys import check_public_key

log = logging.getLogger(__name__)

DEFAULT_INTERFACE = "sealnet_wg0"
DEFAULT_PORT = 51871
#: IPv6 (40) + UDP (8) + WireGuard data header (16) + Poly1305 tag (16).
OVERHEAD = 80
#: Mark on WireGuard's own UDP socket with nodeEncryption. Low byte only: clear
#: of kube-proxy's 0x4000/0x8000, Cilium's 0x0f00 and Calico's 0xffff0000.
FWMARK = 0x5E
#: Routing table holding every route the agent adds (port number, like wg-quick).
ROUTE_TABLE = 51871
#: Rule priority: before main (32766) and before most CNIs' per-pod rules.
RULE_PRIORITY = 871
#: rtm_protocol / FRA_PROTOCOL of our routes and rules (not a reserved number).
RTPROT_SEALNET = 0x5E
#: Route metrics in our table: the tunnel route, and below it (higher metric)
#: an ``unreachable`` route for the same pod CIDR that takes over when the
#: tunnel route disappears with its device (wireguard-go exited, link deleted).
ROUTE_METRIC = 100
FALLBACK_METRIC = 200

Endpoint = tuple[IPAddress, int]


@dataclass(frozen=True)
class Settings:
    interface: str = DEFAULT_INTERFACE
    port: int = DEFAULT_PORT
    node_encryption: bool = False
    underlay_mtu: int = 1500
    fwmark: int = FWMARK
    table: int = ROUTE_TABLE
    rule_priority: int = RULE_PRIORITY
    #: Route.dev of the tunnel routes ("": the one interface reconciled)
    route_dev: str = ""


@dataclass(frozen=True)
class Peer:
    """One desired peer. Identity is the public key; ``node`` is for logs only."""

    public_key: str
    endpoint: Endpoint
    allowed_ips: tuple[IPNetwork, ...]
    node: str = field(default="", compare=False)
    #: persistent keepalive (s, 0 = off): set while a rotation waits for the
    #: first handshake on the new interface, which it starts (agent.wireguard.epochs)
    keepalive: int = 0


@dataclass(frozen=True)
class PeerState:
    """A peer as the device reports it (the counters are not compared)."""

    public_key: str
    endpoint: Optional[Endpoint]
    allowed_ips: frozenset[IPNetwork]
    last_handshake: float = field(default=0.0, compare=False)
    rx_bytes: int = field(default=0, compare=False)
    tx_bytes: int = field(default=0, compare=False)
    keepalive: int = 0


@dataclass(frozen=True)
class Route:
    """A route in our table: ``dst dev <wg>`` (unicast) or ``unreachable dst``.

    The kernel tells routes of one table apart by (dst, metric).
    """

    dst: IPNetwork
    table: int
    type: Literal["unicast", "unreachable"] = "unicast"
    src: Optional[IPAddress] = None
    metric: int = ROUTE_METRIC
    #: the device of a unicast route; "" = the interface being reconciled
    #: (a rotation names one of its two interfaces)
    dev: str = ""

    @property
    def key(self) -> tuple[IPNetwork, int]:
        return (self.dst, self.metric)


@dataclass(frozen=True)
class Rule:
    """A policy rule ``[not fwmark M] [from SRC] lookup TABLE`` at ``priority``."""

    family: int  # 4 or 6
    priority: int
    table: int
    src: Optional[IPNetwork] = None
    not_fwmark: Optional[int] = None


@dataclass(frozen=True)
class Rejected:
    node: str
    reason: str


@dataclass(frozen=True)
class InterfaceConfig:
    """Everything the reconciler makes true for one node."""

    interface: str
    public_key: str
    listen_port: int
    fwmark: int
    mtu: int
    peers: tuple[Peer, ...]
    routes: frozenset[Route]
    rules: frozenset[Rule]
    table: int = ROUTE_TABLE
    rule_priority: int = RULE_PRIORITY
    rejected: tuple[Rejected, ...] = ()


@dataclass(frozen=True)
class PeerChange:
    """One peer operation; None fields are left as the device has them."""

    op: Literal["add", "update", "remove"]
    public_key: str
    endpoint: Optional[Endpoint] = None
    allowed_ips: Optional[tuple[IPNetwork, ...]] = None  # set with replace_allowed_ips
    node: str = field(default="", compare=False)
    keepalive: Optional[int] = None


@dataclass(frozen=True)
class DeviceState:
    """A WireGuard device as a backend reads it (never its private key)."""

    backend: str
    interface: str
    public_key: Optional[str]  # None until a private key is set
    listen_port: int
    fwmark: int
    peers: dict[str, PeerState]


@dataclass(frozen=True)
class PeerFailure:
    change: PeerChange
    reason: str

    def describe(self) -> str:
        return f"peer {self.change.op} node={self.change.node or '?'} public_key={self.change.public_key}: {self.reason}"


def mtu_for(underlay_mtu: int, ipv6: bool = False) -> int:
    """The WireGuard interface MTU for an underlay MTU (see module docstring)."""
    mtu = underlay_mtu - OVERHEAD
    minimum = 1280 if ipv6 else 576
    if mtu < minimum:
        raise ConfigError(
            f"underlay MTU {underlay_mtu} leaves {mtu} for WireGuard (overhead {OVERHEAD}); "
            f"at least {minimum + OVERHEAD} is needed{' for IPv6' if ipv6 else ''}"
        )
    return mtu


def plan(local: Node, nodes: Sequence[Node], own_public_key: str, settings: Settings = Settings()) -> InterfaceConfig:
    """The desired interface configuration for ``local`` among ``nodes``."""
    peers_nodes = [n for n in nodes if n.name != local.name]
    local_nets = list(local.pod_cidrs) + [ipaddress.ip_network(ip) for ip in local.ips]
    rejected: dict[str, str] = {}

    def reject(node: str, reason: str) -> None:
        rejected.setdefault(node, reason)

    by_key: dict[str, list[str]] = {}
    for node in peers_nodes:
        problem = check_public_key(node.wireguard_public_key)
        if problem is not None:
            reject(node.name, f"wireguardPublicKey {problem}")
        elif node.wireguard_public_key == own_public_key:
            reject(node.name, f"wireguardPublicKey {own_public_key} is the local node {local.name}'s own key")
        else:
            assert node.wireguard_public_key is not None
            by_key.setdefault(node.wireguard_public_key, []).append(node.name)
    for key, names in by_key.items():
        if len(names) > 1:
            for name in names:
                others = ", ".join(n for n in names if n != name)
                reject(name, f"wireguardPublicKey {key} is also the key of {others}")

    enc = settings.node_encryption
    allowed_of: dict[str, tuple[IPNetwork, ...]] = {}
    owner: dict[IPNetwork, list[str]] = {}
    clashing_local: set[str] = set()
    local_spans = [(n, n.version, *_span(n)) for n in local_nets]
    for node in peers_nodes:
        nets = list(node.pod_cidrs) + ([ipaddress.ip_network(ip) for ip in node.ips] if enc else [])
        allowed_of[node.name] = _sorted(nets)
        for net in allowed_of[node.name]:
            owner.setdefault(net, []).append(node.name)
            clash = _overlap(net, local_spans)
            if clash is not None:
                clashing_local.add(node.name)
                reject(node.name, f"allowed IP {net} overlaps the local node {local.name}'s {clash}")
    for net, names in owner.items():
        if len(names) > 1:
            for name in names:
                others = ", ".join(n for n in names if n != name)
                reject(name, f"allowed IP {net} is also claimed by {others}")

    local_src = {4: _first(local.ips, 4), 6: _first(local.ips, 6)}
    peers: list[Peer] = []
    routes: set[Route] = set()
    for node in sorted(peers_nodes, key=lambda n: n.name):
        if node.name in rejected:
            continue
        assert node.wireguard_public_key is not None
        port = node.wireguard_port or settings.port
        peers.append(Peer(node.wireguard_public_key, (node.ip, port), allowed_of[node.name], node.name))
        for net in allowed_of[node.name]:
            # With nodeEncryption, node-originated packets leave with the node
            # IP as source (which the peer allows); without it only pods,
            # forwarded with their own source, use these routes.
            routes.add(Route(net, settings.table, "unicast", local_src[net.version] if enc else None,
                             dev=settings.route_dev))
    # Fail closed: every peer's pod CIDR also gets an unreachable route below
    # the tunnel route. For a rejected peer it is the only one (strict mode:
    # its pods are refused, never reached in clear); for a configured peer it
    # takes over if the tunnel route vanishes with its device. Not for CIDRs
    # that clash with ours (that would cut our own pods), nor for node IPs
    # (that could lock a node out of its API server).
    routes |= {Route(c, settings.table, "unreachable", None, FALLBACK_METRIC)
               for n in peers_nodes if n.name not in clashing_local for c in n.pod_cidrs}

    families = {r.dst.version for r in routes}
    rules: set[Rule] = set()
    if enc:
        rules = {Rule(f, settings.rule_priority, settings.table, not_fwmark=settings.fwmark) for f in families}
    else:
        rules = {Rule(c.version, settings.rule_priority, settings.table, src=c)
                 for c in local.pod_cidrs if c.version in families}

    for name in sorted(rejected):
        effect = "its pod CIDRs are left alone" if name in clashing_local else "pod traffic to it is blocked"
        log.error("wireguard peer rejected node=%s reason=%s: not configured, %s", name, rejected[name], effect)
    ipv6 = any(n.version == 6 for n in local_nets) or 6 in families
    return InterfaceConfig(
        interface=settings.interface,
        public_key=own_public_key,
        listen_port=settings.port,
        fwmark=settings.fwmark if enc else 0,
        mtu=mtu_for(settings.underlay_mtu, ipv6),
        peers=tuple(peers),
        routes=frozenset(routes),
        rules=frozenset(rules),
        table=settings.table,
        rule_priority=settings.rule_priority,
        rejected=tuple(Rejected(n, rejected[n]) for n in sorted(rejected)),
    )


def diff_peers(desired: Sequence[Peer], actual: Mapping[str, PeerState]) -> list[PeerChange]:
    """The minimal peer operations that turn ``actual`` into ``desired``.

    A peer that is already right gets no operation (its session is kept); a
    changed one gets only the fields that differ, allowed IPs as one atomic
    replace; peers the plan does not know are removed.
    """
    changes: list[PeerChange] = []
    wanted = {p.public_key: p for p in desired}
    for peer in desired:
        have = actual.get(peer.public_key)
        if have is None:
            changes.append(PeerChange("add", peer.public_key, peer.endpoint, peer.allowed_ips, peer.node,
                                      peer.keepalive or None))
            continue
        endpoint = peer.endpoint if have.endpoint != peer.endpoint else None
        allowed = peer.allowed_ips if have.allowed_ips != frozenset(peer.allowed_ips) else None
        keepalive = peer.keepalive if have.keepalive != peer.keepalive else None
        if endpoint is not None or allowed is not None or keepalive is not None:
            changes.append(PeerChange("update", peer.public_key, endpoint, allowed, peer.node, keepalive))
    for key in sorted(actual):
        if key not in wanted:
            changes.append(PeerChange("remove", key))
    return changes


def find_local(name: str, nodes: Sequence[Node]) -> Node:
    for node in nodes:
        if node.name == name:
            return node
    known = ", ".join(n.name for n in nodes) or "none"
    raise ConfigError(f"--node: {name!r} is not in the node description (nodes: {known})")


def _first(ips: Sequence[IPAddress], version: int) -> Optional[IPAddress]:
    return next((ip for ip in ips if ip.version == version), None)


def _span(net: IPNetwork) -> tuple[int, int]:
    """First and last address of ``net`` as integers (ipaddress's overlaps() costs ten times more)."""
    first = int(net.network_address)
    return first, first | ((1 << (net.max_prefixlen - net.prefixlen)) - 1)


def _overlap(net: IPNetwork, spans: Sequence[tuple[IPNetwork, int, int, int]]) -> Optional[IPNetwork]:
    """The first of ``spans`` (network, version, first, last) that overlaps ``net``, or None."""
    first, last = _span(net)
    for other, version, lo, hi in spans:
        if version == net.version and lo <= last and first <= hi:
            return other
    return None


def _sorted(nets: Sequence[IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(sorted(set(nets), key=lambda n: (n.version, int(n.network_address), n.prefixlen)))
