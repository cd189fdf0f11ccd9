"""Kubernetes Nodes, translated at the edge into the agent's own types.

:func:`translate` turns one Node object (as lightkube decodes it) into a
:class:`PeerView`: the ``model.Node`` the planners take (InternalIPs,
``spec.podCIDRs``, ``status.nodeInfo.bootID``, the WireGuard public key
annotation) plus the other annotations of ours and the problems found. Bad
values are tolerated per node: a podCIDR that does not parse is left out and
reported, a Node without a usable InternalIP has no ``node`` (it cannot be a
peer) and says why; nothing here raises on a Node's content.

:class:`NodeStore` holds the latest view of every Node, thread-safe. The
watcher writes it, the reconcile loop takes snapshots. A deleted Node stays
in the snapshot for the grace period (its SAs, policies or WireGuard peer are
kept that long), then goes::

    store = NodeStore(on_change=trigger.set)
    store.replace([translate(n) for n in listed])   # after a list
    store.upsert(translate(obj)); store.delete(name) # watch events
    snap = store.snapshot(grace=60.0)               # .views, .next_expiry
"""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from agent.cluster import annotations as ann
from agent.model import IPAddress, IPNetwork, Node
from agent.wireguard.epochs import PeerKey


@dataclass(frozen=True)
class PeerView:
    """One Node as the agent sees it."""

    name: str
    #: None when the Node cannot be a peer at all (no usable InternalIP)
    node: Optional[Node]
    uid: str = ""
    #: our annotations (``sealnet.io/...``) as found on the Node
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: key IDs the Node advertises as installed inbound; None if it says nothing
    ipsec_keys: Optional[frozenset[int]] = None
    #: WireGuard keys it advertises, current first (a rotation adds the previous one)
    wireguard_keys: tuple[PeerKey, ...] = ()
    problems: tuple[str, ...] = ()
    deleted: bool = False


def translate(obj: Any) -> PeerView:
    """A lightkube ``Node`` (or anything shaped like it) -> :class:`PeerView`."""
    meta = obj.metadata
    name = str(meta.name)
    problems: list[str] = []
    ours = {k: str(v) for k, v in (meta.annotations or {}).items() if k.startswith(ann.PREFIX)}
    status, spec = obj.status, obj.spec
    ips = _ips(name, getattr(status, "addresses", None) or [], problems)
    cidrs = _cidrs(spec, problems)
    info = getattr(status, "nodeInfo", None)
    boot_id = getattr(info, "bootID", None) or None
    key_ids, problem = ann.parse_key_ids(ours.get(ann.IPSEC_KEYS))
    if problem:
        problems.append(problem)
    wg_keys, wg_problems = ann.parse_wireguard(ours)
    problems += wg_problems
    node = None
    if ips:
        node = Node(name=name, ips=tuple(ips), pod_cidrs=tuple(cidrs), boot_id=boot_id,
                    wireguard_public_key=ours.get(ann.WIREGUARD_PUBLIC_KEY),
                    wireguard_port=wg_keys[0].port if ann.WIREGUARD_PUBLIC_KEY in ours else None)
    else:
        problems.append("no usable InternalIP in status.addresses: cannot be a peer")
    return PeerView(name=name, node=node, uid=str(meta.uid or ""), annotations=ours, ipsec_keys=key_ids,
                    wireguard_keys=wg_keys, problems=tuple(problems))


def _ips(name: str, addresses: Iterable[Any], problems: list[str]) -> list[IPAddress]:
    ips: list[IPAddress] = []
    for address in addresses:
        if getattr(address, "type", None) != "InternalIP":
            continue
        try:
            ip = ipaddress.ip_address(str(address.address))
        except ValueError:
            problems.append(f"status.addresses InternalIP {address.address!r} is not an IP address (ignored)")
            continue
        if ip not in ips:
            ips.append(ip)
    return ips


def _cidrs(spec: Any, problems: list[str]) -> list[IPNetwork]:
    values = list(getattr(spec, "podCIDRs", None) or [])
    single = getattr(spec, "podCIDR", None)
    if not values and single:
        values = [single]
    cidrs: list[IPNetwork] = []
    for value in values:
        try:
            cidr = ipaddress.ip_network(str(value), strict=True)
        except ValueError:
            problems.append(f"spec.podCIDRs {value!r} is not a network in CIDR form (ignored)")
            continue
        if cidr not in cidrs:
            cidrs.append(cidr)
    return cidrs


@dataclass(frozen=True)
class Snapshot:
    #: every Node to serve: live ones and deleted ones within the grace period
    views: tuple[PeerView, ...]
    #: monotonic time at which the next deleted Node leaves (None: none pending)
    next_expiry: Optional[float]
    #: the store's change counter when the snapshot was taken
    version: int


class NodeStore:
    """Latest view of every Node; deletions are remembered for a grace period."""

    def __init__(self, on_change: Callable[[str], None] = lambda reason: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._views: dict[str, PeerView] = {}
        self._deleted: dict[str, tuple[PeerView, float]] = {}
        self._on_change = on_change
        self._clock = clock
        self._version = 0
        #: set once the first list has been stored
        self.synced = threading.Event()

    def replace(self, views: Iterable[PeerView]) -> None:
        """A full list: Nodes missing from it count as deleted now."""
        now = self._clock()
        with self._lock:
            fresh = {v.name: v for v in views}
            for name, old in self._views.items():
                if name not in fresh:
                    self._deleted[name] = (_deleted(old), now)
            for name in fresh:
                self._deleted.pop(name, None)
            self._views = fresh
            self._version += 1
        self.synced.set()
        self._on_change("list")

    def upsert(self, view: PeerView) -> None:
        with self._lock:
            if self._views.get(view.name) == view:
                return
            self._views[view.name] = view
            self._deleted.pop(view.name, None)
            self._version += 1
        self._on_change("node")

    def delete(self, name: str) -> None:
        with self._lock:
            old = self._views.pop(name, None)
            if old is None:
                return
            self._deleted[name] = (_deleted(old), self._clock())
            self._version += 1
        self._on_change("node-deleted")

    def get(self, name: str) -> Optional[PeerView]:
        with self._lock:
            return self._views.get(name)

    def snapshot(self, grace: float) -> Snapshot:
        now = self._clock()
        with self._lock:
            for name, (_, at) in list(self._deleted.items()):
                if now - at >= grace:
                    del self._deleted[name]
            views = tuple(self._views.values()) + tuple(v for v, _ in self._deleted.values())
            expiry = min((at + grace for _, at in self._deleted.values()), default=None)
            return Snapshot(views, expiry, self._version)

    def next_expiry(self, grace: float) -> Optional[float]:
        """When the next deleted Node leaves, without copying the views (the loop asks on every wake)."""
        with self._lock:
            return min((at + grace for _, at in self._deleted.values()), default=None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._views)


def _deleted(view: PeerView) -> PeerView:
    return PeerView(view.name, view.node, view.uid, view.annotations, view.ipsec_keys, view.problems, deleted=True)
