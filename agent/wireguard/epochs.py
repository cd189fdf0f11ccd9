"""WireGuard key epoch rotation without loss: two interfaces, one per key.

A new key epoch (``sealnet:rotation`` in wireguard mode) gives every node a
new key pair. Swapping the key on the one interface cannot be lossless:
WireGuard accepts a peer's packets only under the one key configured for
it, so both ends would have to switch at the same instant. Instead the new
key comes up beside the old one, on the second interface and port::

    slot 0  sealnet_wg0  :51871  key of epoch 5   <- peers' epoch-5 keys
    slot 1  sealnet_wg1  :51872  key of epoch 6   <- peers' epoch-6 keys

and the node advertises both (``sealnet.io/wireguard-public-key`` + epoch +
port for the new one, ``sealnet.io/wireguard-previous-key`` for the old).
Each interface is paired with the peers' key *of its own epoch*, so the two
sessions never mix. Per peer the route (its pod CIDRs in our table) stays
on the old interface until a handshake on the new interface has succeeded,
which is proof that both ends hold each other's new key; then one route
replace moves it. The handshake is started by a persistent keepalive set
only while it is pending (WireGuard sends one at once when keepalive is
turned on, and retries); whichever side adds the other second completes it.
The old interface goes ``rotationGracePeriod`` after every peer has moved
(late packets of a peer still in flight get there), and with it the old
key. A peer that never moves keeps the old pair: nothing dropped, nothing
in clear, and status names it.

Peers that advertise no epoch in common with ours (an agent before epochs,
static mode) are paired as before: our current interface with their
current key.

    p = plan_ring(local, peers, current, previous, handshakes, settings)
    p.interfaces    # InterfaceConfig per interface, current first
    p.egress        # node -> interface its routes use
    p.behind        # nodes still on the previous interface

Pure: no pyroute2, no clock; the caller reads handshakes from the devices.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence

from agent.errors import ConfigError
from agent.model import Node
from agent.wireguard.plan import InterfaceConfig, Peer, Rejected, Route, Settings, plan

#: Persistent keepalive (s) while waiting for the first handshake on the new
#: interface: turning it on sends a keepalive at once (kernel and
#: wireguard-go), which starts the handshake; then one every KEEPALIVE s
#: besides WireGuard's own retries every 5 s.
KEEPALIVE = 5


@dataclass(frozen=True)
class PeerKey:
    """A public key a peer advertises, with its epoch and port (None: not said)."""

    public_key: str
    epoch: Optional[int] = None
    port: Optional[int] = None


@dataclass(frozen=True)
class Slot:
    """One of our interfaces and the key pair it holds (public half only)."""

    interface: str
    port: int
    epoch: int
    public_key: str


@dataclass(frozen=True)
class RingPlan:
    interfaces: tuple[InterfaceConfig, ...]  # current first, then previous (if any)
    routes: frozenset[Route]
    egress: Mapping[str, str]  # node -> interface
    behind: tuple[str, ...]  # nodes whose egress is still the previous interface
    pending: tuple[str, ...]  # of those, the ones whose new key we have configured (handshake awaited)
    rejected: tuple[Rejected, ...]


def slot_names(interface: str, port: int) -> tuple[tuple[str, int], tuple[str, int]]:
    """The two interfaces and ports: ``sealnet_wg0``:51871 and ``sealnet_wg1``:51872.

    The second name is the first with its last digit 0 turned into 1, or with
    ``1`` appended when it does not end in 0."""
    second = interface[:-1] + "1" if interface.endswith("0") else interface + "1"
    if len(second) > 15:
        raise ConfigError(f"config.wireguard.interface: {interface!r} leaves no room for the rotation interface "
                          f"{second!r} (15 characters at most); use at most 14 or end the name in 0")
    if port >= 65535:
        raise ConfigError(f"config.wireguard.port: {port} leaves no port for the rotation interface (port + 1)")
    return (interface, port), (second, port + 1)


def plan_ring(local: Node, peers: Sequence[tuple[Node, Sequence[PeerKey]]], current: Slot, previous: Optional[Slot],
              handshakes: Mapping[tuple[str, str], float], settings: Settings = Settings()) -> RingPlan:
    """Both interfaces' configuration and each peer's egress (see the module docstring).

    ``peers``: every other node with the keys it advertises (current first);
    ``handshakes``: (interface, peer public key) -> latest handshake time
    (0 or absent: none yet)."""
    ours = {current.epoch} | ({previous.epoch} if previous else set())
    on_current: list[Node] = []
    on_previous: list[Node] = []
    for node, keys in peers:
        if node.name == local.name:
            continue
        by_epoch = {k.epoch: k for k in keys if k.epoch is not None}
        key_c = by_epoch.get(current.epoch)
        key_p = by_epoch.get(previous.epoch) if previous else None
        if key_c is None and key_p is None and keys and not ours & by_epoch.keys():
            key_c = keys[0]  # no epoch in common: as before epochs
        # A key advertised without a port is reached on the cluster's port
        # (settings.port), not on the port of the slot it is paired with.
        if key_c is not None:
            on_current.append(replace(node, wireguard_public_key=key_c.public_key,
                                      wireguard_port=key_c.port or settings.port))
        if key_p is not None and previous is not None:
            on_previous.append(replace(node, wireguard_public_key=key_p.public_key,
                                       wireguard_port=key_p.port or settings.port))
        if key_c is None and key_p is None:
            # No usable key: planned (and refused, fail closed) on the current interface.
            on_current.append(replace(node, wireguard_public_key=keys[0].public_key if keys else None))

    def slot_plan(slot: Slot, nodes: list[Node]) -> InterfaceConfig:
        return plan(local, [local, *nodes], slot.public_key,
                    replace(settings, interface=slot.interface, port=slot.port, route_dev=slot.interface))

    cur = slot_plan(current, on_current)
    prev = slot_plan(previous, on_previous) if previous is not None else None
    cur_peers = {p.node: p for p in cur.peers}
    prev_peers = {p.node: p for p in prev.peers} if prev is not None else {}

    egress: dict[str, str] = {}
    pending: list[str] = []
    for name in sorted(cur_peers.keys() | prev_peers.keys()):
        c, p = cur_peers.get(name), prev_peers.get(name)
        assert previous is not None or p is None
        if c is not None and (p is None or handshakes.get((current.interface, c.public_key), 0) > 0):
            egress[name] = current.interface
        else:
            assert previous is not None
            egress[name] = previous.interface
            if c is not None:
                pending.append(name)
    waiting = set(pending)
    cur = replace(cur, peers=tuple(replace(p, keepalive=KEEPALIVE) if p.node in waiting else p for p in cur.peers))

    by_dev = {current.interface: cur, **({previous.interface: prev} if previous and prev else {})}
    peer_of = {current.interface: cur_peers, **({previous.interface: prev_peers} if previous else {})}
    routes: set[Route] = set()
    for config in by_dev.values():
        routes |= {r for r in config.routes if r.type == "unreachable"}
    for name, dev in egress.items():
        nets = set(peer_of[dev][name].allowed_ips)
        routes |= {r for r in by_dev[dev].routes if r.type == "unicast" and r.dst in nets}
    served = set(egress)
    rejected = {r.node: r for config in by_dev.values() for r in config.rejected if r.node not in served}
    behind = tuple(sorted(n for n, dev in egress.items() if dev != current.interface))
    rules = cur.rules | (prev.rules if prev is not None else frozenset())
    interfaces = tuple(replace(c, routes=frozenset(), rules=rules) for c in by_dev.values())
    return RingPlan(interfaces=interfaces, routes=frozenset(routes), egress=egress, behind=behind,
                    pending=tuple(pending), rejected=tuple(rejected[n] for n in sorted(rejected)))
