"""The two datapaths behind one interface, as the reconcile loop drives them.

    dp = IpsecDatapath(PlanConfig(...))          # or WireguardDatapath(cfg)
    outcome = dp.reconcile(local, views, keys)    # one pass; never raises for one bad peer
    outcome.publish                               # annotations for the own Node
    families = dp.scrape()                        # kernel-fresh metric families

Both call exactly what ``python -m agent apply`` calls (agent.ipsec.datapath
``reconcile``, agent.wireguard.datapath ``apply``): the daemon adds nothing
to the kernel layer.

IPsec rotation (agent.ipsec.rotation): the keys installed are the file's
plus older ones still needed; a peer is sent the current key once it
advertises that key as installed inbound (``sealnet.io/ipsec-keys``), until
then the newest key of ours it does advertise; older keys go
``rotationGracePeriod`` s after every peer advertises the current key. The
older keys are kept in the state dir (mode 0600), so an agent restarted
after the Secret lost the previous line (a one-line ``kubectl patch``) still
has them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol, Sequence

from agent import secretfile
from agent.cluster import annotations as ann
from agent.cluster.config import AgentConfig
from agent.cluster.metrics import gauge_family, xfrm_stat
from agent.cluster.nodes import PeerView
from agent.errors import ConfigError
from agent.ipsec import keys as keyfile
from agent.ipsec import rotation
from agent.ipsec.keys import IpsecKey, KeySet
from agent.ipsec.rotation import RotationState
from agent.model import Node

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one pass did: served/blocked peers, refused changes, what to publish."""

    served: tuple[str, ...] = ()
    blocked: tuple[tuple[str, str], ...] = ()
    failures: tuple[str, ...] = ()
    changes: int = 0
    publish: dict[str, Optional[str]] = field(default_factory=dict)
    egress: dict[str, int] = field(default_factory=dict)
    keys_installed: tuple[int, ...] = ()
    #: peers that do not yet advertise the current key
    behind: tuple[str, ...] = ()
    #: monotonic time at which the datapath wants another pass (a rotation's end)
    wake_at: Optional[float] = None
    summary: str = ""


class Datapath(Protocol):
    mode: str

    def reconcile(self, local: Node, views: Sequence[PeerView], keys: Optional[KeySet]) -> Outcome: ...

    def scrape(self) -> Iterable[Any]: ...

    def close(self) -> None: ...


class IpsecDatapath:
    mode = "ipsec"

    def __init__(self, config: AgentConfig, netns: Optional[str] = None) -> None:
        from agent.ipsec.datapath import open_xfrm
        from agent.ipsec.plan import PlanConfig

        self.plan_config = PlanConfig(spi_prefix=config.spi_prefix, node_encryption=config.node_encryption)
        self.netns = netns
        self.grace = config.rotation_grace_period
        self.retained_path = Path(config.state_dir) / RETAINED_FILE
        self.rotation = RotationState(retained=_load_retained(self.retained_path))
        self.xfrm = open_xfrm(netns)

    def reconcile(self, local: Node, views: Sequence[PeerView], keys: Optional[KeySet]) -> Outcome:
        from agent.ipsec.datapath import reconcile

        if keys is None:
            raise ConfigError("no valid keys file yet: the datapath is left as it is")
        peers = [v for v in views if v.node is not None and v.name != local.name]
        advertised = {v.name: v.ipsec_keys for v in peers}
        live = {v.name: v.ipsec_keys for v in peers if not v.deleted}
        state, active = rotation.step(self.rotation, keys, live, time.monotonic(), self.grace)
        egress = rotation.choose_egress(active, advertised)
        result = reconcile(self.xfrm, local, [v.node for v in views if v.node is not None], active,
                           self.plan_config, egress)
        failures = tuple(str(f.error) for f in result.failures)
        publish: dict[str, Optional[str]] = {}
        installed: tuple[int, ...] = ()
        if not failures:
            # Every SA of every active key is in: peers may now send with any of them.
            installed = active.spis
            publish[ann.IPSEC_KEYS] = ann.format_key_ids(frozenset(installed))
            if state.retained != self.rotation.retained:
                _save_retained(self.retained_path, state.retained)
            if active.spis != self._last_spis:
                log.info("ipsec keys installed=%s current=%d peers_behind=%s", ",".join(map(str, active.spis)),
                         active.current.spi, ",".join(rotation.laggards(active, live)) or "-")
            self.rotation, self._last_spis = state, active.spis
        return Outcome(served=result.desired.served, blocked=result.desired.blocked, failures=failures,
                       changes=len(result.changes.steps()), publish=publish, egress=dict(result.desired.egress),
                       keys_installed=installed, behind=rotation.laggards(active, live),
                       wake_at=state.drop_at(self.grace), summary=result.summary())

    _last_spis: tuple[int, ...] = ()

    def scrape(self) -> Iterable[Any]:
        from agent.ipsec.diff import owns_sa
        from agent.kernel.xfrm import Xfrm

        with Xfrm.open(netns=self.netns) as xfrm:
            counters = xfrm.dump_sa_counters()
            owned = [sa for sa in xfrm.dump_sas() if owns_sa(sa, self.plan_config)]
        seqs = []
        for sa in owned:
            c = counters.get((sa.dst, sa.spi))
            if c is None:
                continue
            seqs.append(([f"{sa.spi:#010x}", str(sa.src), str(sa.dst), "out" if c.oseq64 else "in"],
                         float(max(c.oseq64, c.seq64))))
        yield gauge_family("ipsec_sa_sequence", "Highest ESP sequence number sent (out) or received (in) per SA",
                           ["spi", "src", "dst", "direction"], seqs)
        if self.netns is None:
            yield gauge_family("xfrm_stat", "Counters of /proc/net/xfrm_stat (errors of the XFRM layer)",
                               ["counter"], (([k], float(v)) for k, v in xfrm_stat().items()))

    def close(self) -> None:
        self.xfrm.close()


class WireguardDatapath:
    """Both interfaces of a key epoch rotation (agent.wireguard.epochs) behind the loop.

    The previous interface goes once every live peer's routes are on the
    current one and have stayed there ``rotationGracePeriod`` s; while peers
    wait for their first handshake on the new interface the loop is woken
    every POLL s to move them as soon as it succeeds."""

    mode = "wireguard"
    #: s between passes while a peer's handshake on the new interface is awaited
    POLL = 0.25

    def __init__(self, config: AgentConfig, clock: Any = time.monotonic) -> None:
        from agent.wireguard.plan import Settings

        self.config = config
        self.settings = Settings(interface=config.wireguard.interface, port=config.wireguard.port,
                                 node_encryption=config.node_encryption)
        self.clock = clock
        self._names: dict[str, str] = {}
        self._interfaces: tuple[str, ...] = (config.wireguard.interface,)
        self._moved_at: Optional[float] = None  # when the last peer moved to the current interface
        self._rotation: dict[str, Any] = {}

    def reconcile(self, local: Node, views: Sequence[PeerView], keys: Optional[KeySet]) -> Outcome:
        from agent.wireguard.datapath import apply_ring

        live = [v for v in views if v.node is not None]
        self._names = {k.public_key: v.name for v in live for k in v.wireguard_keys}
        now = self.clock()
        retire = self._moved_at is not None and now - self._moved_at >= self.config.rotation_grace_period
        result = apply_ring(local.name, [(v.node, v.wireguard_keys) for v in live if v.node is not None],
                            self.settings, self.config.state_dir, self.config.wireguard.backend,
                            epoch=self.config.wireguard.key_epoch,
                            allow_regeneration=self.config.allow_key_regeneration, retire=retire)
        plan, current, previous = result.plan, result.current, result.previous
        if result.retired:
            previous = None
        # Deleted Nodes (within nodeGracePeriod) do not hold a rotation open.
        deleted = {v.name for v in views if v.deleted}
        behind = tuple(n for n in plan.behind if n not in deleted)
        wake_at: Optional[float] = None
        if previous is None:
            self._moved_at = None
        elif behind:
            self._moved_at = None
            if any(n not in deleted for n in plan.pending):
                wake_at = now + self.POLL
        else:
            if self._moved_at is None:
                self._moved_at = now
                log.info("wireguard rotation: every peer on %s (epoch %d); %s goes in %g s", current.interface,
                         current.epoch, previous.interface, self.config.rotation_grace_period)
            wake_at = self._moved_at + self.config.rotation_grace_period
        if result.ring.waiting is not None:
            log.warning("wireguard key epoch %d waits: the rotation %d -> %d has not finished (peers on %s: %s)",
                        result.ring.waiting, previous.epoch if previous else -1, current.epoch,
                        previous.interface if previous else "-", ",".join(behind) or "-")
        self._interfaces = (current.interface,) + ((previous.interface,) if previous else ())
        epoch_of = {current.interface: current.epoch, **({previous.interface: previous.epoch} if previous else {})}
        self._rotation = {"behind": behind, "waiting": result.ring.waiting, "current": current,
                          "previous": previous,
                          "egress": {n: epoch_of.get(dev, current.epoch) for n, dev in plan.egress.items()}}
        rejected = tuple((r.node, r.reason) for r in plan.rejected)
        served = tuple(sorted(plan.egress))
        changes = sum(r.peers_added + r.peers_updated + r.peers_removed + r.routes_added + r.routes_removed
                      + r.rules_added + r.rules_removed + len(r.device_changed) for r in result.reports)
        publish: dict[str, Optional[str]] = {
            ann.WIREGUARD_PUBLIC_KEY: current.public_key,
            ann.WIREGUARD_KEY_EPOCH: str(current.epoch),
            ann.WIREGUARD_PORT: str(current.port),
            ann.WIREGUARD_PREVIOUS: (ann.format_previous(previous.epoch, previous.port, previous.public_key)
                                     if previous is not None else None),
        }
        return Outcome(served=served, blocked=rejected, failures=tuple(result.failures), changes=changes,
                       summary=result.summary(), publish=publish, behind=behind, wake_at=wake_at)

    def scrape(self) -> Iterable[Any]:
        from agent.wireguard.datapath import status

        ages, counts = [], []
        for interface in self._interfaces:
            st = status(interface)
            counts.append(([interface], float(st.get("peers", 0))))
            for peer in st.get("peerList", []):
                age = peer.get("latestHandshakeSecondsAgo")
                name = self._names.get(peer["publicKey"], peer["publicKey"])
                ages.append(([interface, name], float(age) if age is not None else float("nan")))
        yield gauge_family("wireguard_handshake_age_seconds",
                           "Seconds since the latest handshake with each peer (NaN: none yet)",
                           ["interface", "peer"], ages)
        yield gauge_family("wireguard_peers", "Peers configured on each interface", ["interface"], counts)
        rot = self._rotation
        if rot:
            epochs = [([rot["current"].interface, "current"], float(rot["current"].epoch))]
            if rot["previous"] is not None:
                epochs.append(([rot["previous"].interface, "previous"], float(rot["previous"].epoch)))
            yield gauge_family("wireguard_key_epoch", "Key epoch of each interface's key pair",
                               ["interface", "role"], epochs)
            yield gauge_family("wireguard_peer_egress_epoch",
                               "Key epoch of the interface each peer's routes use", ["peer"],
                               (([n], float(e)) for n, e in sorted(rot["egress"].items())))
            yield gauge_family("wireguard_rotation_peers_behind",
                               "Peers still reached through the previous key's interface", [],
                               [([], float(len(rot["behind"])))])

    def close(self) -> None:
        pass


#: Older IPsec keys still installed (Cilium's line format), in the state dir.
RETAINED_FILE = "ipsec-retained-keys"


def _load_retained(path: Path) -> tuple[IpsecKey, ...]:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return ()
    except (OSError, UnicodeDecodeError) as e:
        log.warning("ignoring %s: %s", path, e)
        return ()
    if not text.strip():
        return ()
    try:
        return keyfile.parse(text).keys
    except ConfigError as e:
        log.warning("ignoring %s: %s", path, e)
        return ()


def _save_retained(path: Path, retained: tuple[IpsecKey, ...]) -> None:
    data = "".join(keyfile.format_line(k) + "\n" for k in retained).encode("ascii")
    path.parent.mkdir(parents=True, exist_ok=True)
    secretfile.write(path, data, "retained IPsec keys")


def open_datapath(config: AgentConfig) -> Datapath:
    if config.mode == "ipsec":
        return IpsecDatapath(config)
    return WireguardDatapath(config)

