"""WireGuard mode: key pair + plan + backend + routing = one node's datapath.

    python -m agent pubkey --state-dir /var/lib/sealnet [--key-epoch N]
    python -m agent apply  --mode wireguard --node node-1 --nodes nodes.json \\
                           --state-dir /var/lib/sealnet [--interface sealnet_wg0] [--port 51871] \\
                           [--backend auto|kernel|userspace] [--node-encryption] [--key-epoch N]
    python -m agent status --mode wireguard [--interface sealnet_wg0] [--json]

``apply`` is idempotent and minimal: run it again with the same input and
nothing changes (no peer, route or rule is rewritten, sessions go on); change
one node and only that peer and its routes change; drop a node and its peer
and routes go. An existing interface is adopted as it is, whichever backend
made it. The daemon calls :func:`apply` (or :func:`reconcile` with a plan)
the same way.

Status prints one line like ``cilium status``::

    Encryption: WireGuard [sealnet_wg0 (Pubkey: <key>, Port: 51871, Peers: 3, backend kernel)]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

from agent import nodesfile
from agent.wireguard import keys as wgkeys
from agent.errors import ConfigError, KernelError
from agent.model import KeyMaterial, Node
from agent.wireguard.epochs import PeerKey, RingPlan, Slot, plan_ring, slot_names
from agent.wireguard.plan import InterfaceConfig, PeerFailure, Route, Rule, Settings, diff_peers, find_local, plan

if TYPE_CHECKING:
    from agent.kernel.wireguard import Backend

# The kernel edge (pyroute2, a large package) is imported where it is used:
# `pubkey` needs none of it, and in the lab VM every import is slow.

log = logging.getLogger(__name__)

_IFNAME = re.compile(r"\A[A-Za-z0-9_.-]{1,15}\Z")


@dataclass
class Report:
    """What one apply did (counts) and what it could not do."""

    interface: str
    backend: str
    created: bool
    public_key: str
    peers: int = 0
    peers_added: int = 0
    peers_updated: int = 0
    peers_removed: int = 0
    routes_added: int = 0
    routes_removed: int = 0
    rules_added: int = 0
    rules_removed: int = 0
    device_changed: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        made = " (created)" if self.created else ""
        device = f", device {'+'.join(self.device_changed)}" if self.device_changed else ""
        return (f"wireguard {self.interface}: backend {self.backend}{made}, peers {self.peers} "
                f"(+{self.peers_added} ~{self.peers_updated} -{self.peers_removed}), "
                f"routes +{self.routes_added} -{self.routes_removed}, rules +{self.rules_added} -{self.rules_removed}"
                f"{device}, rejected {len(self.rejected)}, failed {len(self.failures)}")


def apply(local_name: str, nodes: Sequence[Node], settings: Settings, state_dir: str | Path,
          backend: str = "auto", epoch: Optional[int] = None, allow_regeneration: bool = False,
          wireguard_go: str = "wireguard-go") -> Report:
    """Program the local node's WireGuard datapath; KernelError if anything failed."""
    local = find_local(local_name, nodes)
    pair = wgkeys.load_or_create(state_dir, epoch, allow_regeneration, advertised=local.wireguard_public_key)
    if local.wireguard_public_key is not None and local.wireguard_public_key != pair.public_key:
        log.warning("wireguard node=%s advertises public_key=%s but its key is %s: peers reach it only "
                    "once they have the new key", local.name, local.wireguard_public_key, pair.public_key)
    from pyroute2 import IPRoute

    from agent.kernel.wireguard import open_backend

    with IPRoute() as ipr:
        settings = replace(settings, underlay_mtu=underlay_mtu(ipr, local))
        config = plan(local, nodes, pair.public_key, settings)
        dev, created = open_backend(settings.interface, backend, ipr, wireguard_go)
        try:
            report = reconcile(config, pair.private, dev, ipr, created)
        finally:
            dev.close()
        if settings.node_encryption:
            _check_rp_filter(ipr, local)
    if report.failures:
        raise KernelError(f"wireguard {settings.interface}: {len(report.failures)} change(s) failed: "
                          + "; ".join(report.failures[:5]))
    return report


def reconcile(config: InterfaceConfig, private: KeyMaterial, dev: "Backend", ipr: Any,
              created: bool = False) -> Report:
    """Make the device, its link, routes and rules match ``config``; minimal changes only."""
    report, ifindex = _reconcile_device(config, private, dev, ipr, created)
    _reconcile_routing(ipr, config.routes, config.rules, config.table, config.rule_priority, ifindex, report)
    return report


def _reconcile_device(config: InterfaceConfig, private: KeyMaterial, dev: "Backend", ipr: Any,
                      created: bool) -> tuple[Report, int]:
    """The device, its link and its peers (not routes); (report, ifindex)."""
    report = Report(config.interface, dev.name, created, config.public_key, peers=len(config.peers),
                    rejected=[f"{r.node}: {r.reason}" for r in config.rejected])
    index = ipr.link_lookup(ifname=config.interface)
    if not index:
        raise KernelError(f"wireguard {config.interface}: interface vanished during apply")
    ifindex = index[0]

    state = dev.read()
    key = private if state.public_key != config.public_key else None
    port = config.listen_port if state.listen_port != config.listen_port else None
    fwmark = config.fwmark if state.fwmark != config.fwmark else None
    if key is not None or port is not None or fwmark is not None:
        # The mark must be on the socket before a rule relies on it (below).
        dev.set_device(key, port, fwmark)
        report.device_changed = [n for n, v in (("key", key), ("port", port), ("fwmark", fwmark)) if v is not None]
        log.info("wireguard device set interface=%s changed=%s public_key=%s", config.interface,
                 ",".join(report.device_changed), config.public_key)

    link = ipr.get_links(ifindex)[0]
    if link.get("mtu") != config.mtu or link.get("state") != "up":
        ipr.link("set", index=ifindex, mtu=config.mtu, state="up")

    # Peers before routes: a route into the tunnel before its peer exists
    # would refuse packets that a moment later would have been encrypted.
    changes = diff_peers(config.peers, state.peers)
    failures: list[PeerFailure] = dev.apply_peers(changes) if changes else []
    failed = {f.change.public_key for f in failures}
    verbose = log.isEnabledFor(logging.INFO)
    for c in changes:
        if c.public_key in failed:
            continue
        if c.op == "add":
            report.peers_added += 1
        elif c.op == "update":
            report.peers_updated += 1
        else:
            report.peers_removed += 1
        if verbose:
            log.info("wireguard peer %s interface=%s node=%s public_key=%s allowed_ips=%s%s", c.op,
                     config.interface, c.node or "-", c.public_key,
                     ",".join(map(str, c.allowed_ips)) if c.allowed_ips is not None else "unchanged",
                     f" keepalive={c.keepalive}" if c.keepalive is not None else "")
    report.failures += [f.describe() for f in failures]
    return report, ifindex


def _reconcile_routing(ipr: Any, routes: frozenset[Route], rules: frozenset[Rule], table: int, priority: int,
                       devices: Union[int, Mapping[str, int]], report: Report) -> None:
    from agent.kernel.wgroutes import Routing, describe_rule, diff_routes

    by_index = {devices: ""} if isinstance(devices, int) else {i: n for n, i in devices.items()}
    with Routing(ipr) as routing:
        add_routes, del_routes = diff_routes(routes, routing.routes(table, by_index), table)
        have_rules = routing.rules(table, priority)
        add_rules, del_rules = rules - have_rules, have_rules - rules
        if add_routes or del_routes or add_rules or del_rules:
            report.failures += routing.apply(devices, add_routes, del_routes, add_rules, del_rules)
    report.routes_added, report.routes_removed = len(add_routes), len(del_routes)
    report.rules_added, report.rules_removed = len(add_rules), len(del_rules)
    for route in add_routes:
        if route.dev and route.type == "unicast":
            log.debug("wireguard route %s dev %s", route.dst, route.dev)
    for rule in add_rules:
        log.info("wireguard rule added %s", describe_rule(rule))
    for rule in del_rules:
        log.info("wireguard rule removed %s", describe_rule(rule))
    for failure in report.failures:
        log.error("wireguard apply failed: %s", failure)


# -- key epoch rotation (the daemon) -------------------------------------------


@dataclass
class RingReport:
    """One pass over both interfaces of a key epoch rotation."""

    plan: RingPlan
    ring: wgkeys.Ring
    current: Slot
    previous: Optional[Slot]
    reports: list[Report]
    retired: Optional[str] = None

    @property
    def failures(self) -> list[str]:
        return [f for r in self.reports for f in r.failures]

    def summary(self) -> str:
        text = "; ".join(r.summary() for r in self.reports)
        if self.previous is not None:
            text += (f"; rotation epoch {self.previous.epoch} -> {self.current.epoch}: "
                     f"{len(self.plan.behind)} peer(s) on {self.previous.interface}")
        if self.retired:
            text += f"; {self.retired} retired"
        return text


def apply_ring(local_name: str, peers: Sequence[tuple[Node, Sequence[PeerKey]]], settings: Settings,
               state_dir: str | Path, backend: str = "auto", epoch: Optional[int] = None,
               allow_regeneration: bool = False, retire: bool = False,
               wireguard_go: str = "wireguard-go") -> RingReport:
    """One pass of the daemon's WireGuard datapath: both interfaces of a rotation (agent.wireguard.epochs).

    ``peers`` includes the local node; ``retire`` removes the previous
    interface and key, if no peer still uses it. Per-peer failures are in
    the report, not raised."""
    from pyroute2 import IPRoute

    from agent.kernel.wireguard import open_backend

    local = find_local(local_name, [n for n, _ in peers])
    ring = wgkeys.load_ring(state_dir, epoch, allow_regeneration, advertised=local.wireguard_public_key)
    names = slot_names(settings.interface, settings.port)

    def slot(pair: wgkeys.KeyPair) -> Slot:
        name, port = names[pair.slot]
        return Slot(name, port, pair.epoch, pair.public_key)

    current = slot(ring.current)
    previous = slot(ring.previous) if ring.previous is not None else None
    held = [(current, ring.current)] + ([(previous, ring.previous)] if previous and ring.previous else [])
    with IPRoute() as ipr:
        settings = replace(settings, underlay_mtu=underlay_mtu(ipr, local))
        devs: list[tuple[Slot, wgkeys.KeyPair, "Backend", bool]] = []
        try:
            for s, pair in held:
                dev, created = open_backend(s.interface, backend, ipr, wireguard_go)
                devs.append((s, pair, dev, created))
            handshakes = {(s.interface, p.public_key): p.last_handshake
                          for s, _, dev, _ in devs for p in dev.read().peers.values()}
            ring_plan = plan_ring(local, peers, current, previous, handshakes, settings)
            configs = {c.interface: c for c in ring_plan.interfaces}
            reports, indexes = [], {}
            for s, pair, dev, created in devs:
                report, indexes[s.interface] = _reconcile_device(configs[s.interface], pair.private, dev, ipr, created)
                reports.append(report)
        finally:
            for _, _, dev, _ in devs:
                dev.close()
        head = reports[0]
        _reconcile_routing(ipr, ring_plan.routes, ring_plan.interfaces[0].rules, settings.table,
                           settings.rule_priority, indexes, head)
        result = RingReport(ring_plan, ring, current, previous, reports)
        other = names[1 - ring.current.slot][0]
        stale = previous is None and ipr.link_lookup(ifname=other)
        if (retire and previous is not None and not ring_plan.behind and not result.failures) or stale:
            # Every peer's routes are on the current interface: the other one carries nothing of ours.
            _delete_link(ipr, other)
            wgkeys.retire_previous(state_dir)
            result.retired = other
            log.info("wireguard rotation finished: %s removed, epoch %d only", other, current.epoch)
        if settings.node_encryption:
            _check_rp_filter(ipr, local)
    return result


def _delete_link(ipr: Any, name: str) -> None:
    from pyroute2 import NetlinkError

    index = ipr.link_lookup(ifname=name)
    if not index:
        return
    try:
        ipr.link("del", index=index[0])
    except NetlinkError as e:
        raise KernelError(f"wireguard: cannot remove {name}: {os.strerror(e.code)}", e.code) from e


def underlay_mtu(ipr: Any, local: Node) -> int:
    """MTU of the link that holds the local node's IP (where WireGuard's UDP leaves)."""
    for msg in ipr.get_addr():
        if msg.get("address") == str(local.ip):
            return int(ipr.get_links(msg["index"])[0].get("mtu"))
    raise ConfigError(f"--node: {local.name}'s IP {local.ip} is not assigned to any interface in this network "
                      f"namespace; is --node right, and does the agent run in the node's namespace?")


def _check_rp_filter(ipr: Any, local: Node) -> None:
    # Strict reverse-path filtering checks the source of WireGuard's incoming
    # UDP with mark 0; the not-fwmark rule then points the peer's node IP at
    # the tunnel, not at the underlay, and the packet is dropped.
    dev = next((ipr.get_links(m["index"])[0].get("ifname") for m in ipr.get_addr()
                if m.get("address") == str(local.ip)), None)
    values = []
    for name in ("all", dev):
        try:
            values.append(int(Path(f"/proc/sys/net/ipv4/conf/{name}/rp_filter").read_text()))
        except (OSError, ValueError, TypeError):
            pass
    if values and max(values) == 1:
        log.warning("wireguard nodeEncryption: rp_filter is strict (1) on %s; WireGuard packets from peers will be "
                    "dropped. Set net.ipv4.conf.all.rp_filter and net.ipv4.conf.%s.rp_filter to 2 (loose) or 0",
                    dev, dev)


# -- status --------------------------------------------------------------------


def status(interface: str) -> dict[str, Any]:
    """The interface's state as data (no private key); ``present`` False when it does not exist."""
    from pyroute2 import IPRoute

    from agent.kernel.wguapi import UserspaceBackend
    from agent.kernel.wireguard import KernelBackend, detect

    with IPRoute() as ipr:
        kind = detect(ipr, interface)
        if kind is None:
            return {"encryption": "WireGuard", "interface": interface, "present": False}
        dev: "Backend" = KernelBackend(interface) if kind == "kernel" else UserspaceBackend(interface)
        try:
            state = dev.read()
        finally:
            dev.close()
        link = ipr.get_links(ipr.link_lookup(ifname=interface)[0])[0]
    now = time.time()
    return {
        "encryption": "WireGuard", "interface": interface, "present": True, "backend": state.backend,
        "publicKey": state.public_key, "port": state.listen_port, "fwmark": state.fwmark,
        "mtu": link.get("mtu"), "up": link.get("state") == "up", "peers": len(state.peers),
        "peerList": [
            {"publicKey": p.public_key,
             "endpoint": f"{p.endpoint[0]}:{p.endpoint[1]}" if p.endpoint else None,
             "allowedIPs": sorted(map(str, p.allowed_ips)),
             "latestHandshakeSecondsAgo": round(now - p.last_handshake, 1) if p.last_handshake else None,
             "rxBytes": p.rx_bytes, "txBytes": p.tx_bytes}
            for p in sorted(state.peers.values(), key=lambda p: p.public_key)
        ],
    }


def status_line(st: dict[str, Any]) -> str:
    if not st["present"]:
        return f"Encryption: WireGuard [{st['interface']} (not present)]"
    return (f"Encryption: WireGuard [{st['interface']} (Pubkey: {st['publicKey']}, Port: {st['port']}, "
            f"Peers: {st['peers']}, backend {st['backend']})]")


# -- commands ------------------------------------------------------------------


def _interface(value: str) -> str:
    if not _IFNAME.match(value) or value in (".", ".."):
        raise ConfigError(f"--interface: {value!r} is not a Linux interface name "
                          f"(1..15 characters of A-Z a-z 0-9 _ . -)")
    return value


def cmd_apply(args: argparse.Namespace) -> int:
    if not args.state_dir:
        raise ConfigError("--state-dir: required in wireguard mode (where the node's private key is kept)")
    settings = Settings(interface=_interface(args.interface), port=args.port,
                        node_encryption=bool(args.node_encryption))
    nodes = nodesfile.load(args.nodes)
    report = apply(args.node, nodes, settings, args.state_dir, args.backend,
                   epoch=getattr(args, "key_epoch", None),
                   allow_regeneration=bool(getattr(args, "allow_key_regeneration", False)))
    print(report.summary())
    return 0


def rotation_status(interface: str) -> dict[str, Any]:
    """``status`` of the configured interface and of its rotation partner
    (``slot_names``): when both exist, a key epoch rotation is in progress and
    the partner's status is under ``"rotation"``; when only the partner does
    (the epoch after a finished rotation), it is the one shown."""
    st = status(interface)
    try:
        (_, _), (partner, _) = slot_names(interface, 1)
    except ConfigError:
        return st  # a name with no rotation partner
    other = status(partner)
    if not other["present"]:
        return st
    if not st["present"]:
        return other
    return {**st, "rotation": other}


def rotation_status_line(st: dict[str, Any]) -> str:
    line = status_line(st)
    other = st.get("rotation")
    if other is None:
        return line
    return (f"{line[:-1]}, {other['interface']} (Pubkey: {other['publicKey']}, Port: {other['port']}, "
            f"Peers: {other['peers']}, backend {other['backend']}); key epoch rotation in progress]")


def cmd_status(args: argparse.Namespace) -> int:
    st = rotation_status(_interface(args.interface))
    print(json.dumps(st, indent=2) if args.json else rotation_status_line(st))
    return 0 if st["present"] else 1


def cmd_pubkey(args: argparse.Namespace) -> int:
    pair = wgkeys.load_or_create(args.state_dir, getattr(args, "key_epoch", None),
                                 bool(getattr(args, "allow_key_regeneration", False)))
    print(pair.public_key)
    return 0
