"""The two datapaths behind one interface, as the reconcile loop drives them.

    dp = IpsecDatapath(PlanConfig(...))          # or WireguardDatapath(cfg)
    outcome = dp.reconcile(local, views, keys)    # one pass; never raises for one bad peer
    outcome.publish                               # annotations for the own Node
    families = dp.scrape()                        # kernel-fresh metric families

Both call exactly what ``python -m agent apply`` calls (agent.ipsec.datapath
``reconcile``, agent.wireguard.datapath ``apply``): the daemon adds nothing
to the kernel layer.

IPsec egress (the rotation protocol's last step, shared/DESIGN.md): a peer
is sent the current key once it advertises that key as installed inbound
(``sealnet.io/ipsec-keys``); until then, the newest key of ours it does
advertise; a peer that advertises nothing (its agent not yet running, or an
older agent) gets the current key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Protocol, Sequence

from agent.cluster import annotations as ann
from agent.cluster.config import AgentConfig
from agent.cluster.metrics import gauge_family, xfrm_stat
from agent.cluster.nodes import PeerView
from agent.errors import ConfigError
from agent.ipsec.keys import KeySet
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
    summary: str = ""


class Datapath(Protocol):
    mode: str

    def reconcile(self, local: Node, views: Sequence[PeerView], keys: Optional[KeySet]) -> Outcome: ...

    def scrape(self) -> Iterable[Any]: ...

    def close(self) -> None: ...


def choose_egress(keys: KeySet, views: Sequence[PeerView], local: str) -> dict[str, int]:
    """Per peer, the key ID to send with (see the module docstring)."""
    newest_first = [k.spi for k in reversed(keys.keys)]
    egress = {}
    for view in views:
        if view.name == local or view.node is None:
            continue
        advertised = view.ipsec_keys
        if advertised is None:
            egress[view.name] = newest_first[0]
        else:
            egress[view.name] = next((spi for spi in newest_first if spi in advertised), newest_first[0])
    return egress


class IpsecDatapath:
    mode = "ipsec"

    def __init__(self, config: AgentConfig, netns: Optional[str] = None) -> None:
        from agent.ipsec.datapath import open_xfrm
        from agent.ipsec.plan import PlanConfig

        self.plan_config = PlanConfig(spi_prefix=config.spi_prefix, node_encryption=config.node_encryption)
        self.netns = netns
        self.xfrm = open_xfrm(netns)

    def reconcile(self, local: Node, views: Sequence[PeerView], keys: Optional[KeySet]) -> Outcome:
        from agent.ipsec.datapath import reconcile

        if keys is None:
            raise ConfigError("no valid keys file yet: the datapath is left as it is")
        nodes = [v.node for v in views if v.node is not None]
        egress = choose_egress(keys, views, local.name)
        result = reconcile(self.xfrm, local, nodes, keys, self.plan_config, egress)
        failures = tuple(str(f.error) for f in result.failures)
        publish: dict[str, Optional[str]] = {}
        installed: tuple[int, ...] = ()
        if not failures:
            # Every SA of every key is in: peers may now send with any of them.
            installed = keys.spis
            publish[ann.IPSEC_KEYS] = ann.format_key_ids(frozenset(installed))
        return Outcome(served=result.desired.served, blocked=result.desired.blocked, failures=failures,
                       changes=len(result.changes.steps()), publish=publish, egress=dict(result.desired.egress),
                       keys_installed=installed, summary=result.summary())

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
    mode = "wireguard"

    def __init__(self, config: AgentConfig) -> None:
        from agent.wireguard.plan import Settings

        self.config = config
        self.settings = Settings(interface=config.wireguard.interface, port=config.wireguard.port,
                                 node_encryption=config.node_encryption)
        self._names: dict[str, str] = {}

    def reconcile(self, local: Node, views: Sequence[PeerView], keys: Optional[KeySet]) -> Outcome:
        from agent.wireguard.datapath import apply

        nodes = [v.node for v in views if v.node is not None]
        self._names = {n.wireguard_public_key: n.name for n in nodes if n.wireguard_public_key}
        report = apply(local.name, nodes, self.settings, self.config.state_dir, self.config.wireguard.backend,
                       epoch=self.config.wireguard.key_epoch,
                       allow_regeneration=self.config.allow_key_regeneration)
        rejected = tuple((r.split(":", 1)[0], r.split(":", 1)[-1].strip()) for r in report.rejected)
        served = tuple(v.name for v in views if v.node is not None and v.name != local.name
                       and v.name not in {name for name, _ in rejected})
        changes = (report.peers_added + report.peers_updated + report.peers_removed + report.routes_added
                   + report.routes_removed + report.rules_added + report.rules_removed + len(report.device_changed))
        return Outcome(served=served, blocked=rejected, changes=changes, summary=report.summary(), publish={
            ann.WIREGUARD_PUBLIC_KEY: report.public_key,
            ann.WIREGUARD_KEY_EPOCH: str(self.config.wireguard.key_epoch),
        })

    def scrape(self) -> Iterable[Any]:
        from agent.wireguard.datapath import status

        st = status(self.settings.interface)
        ages = []
        for peer in st.get("peerList", []):
            age = peer.get("latestHandshakeSecondsAgo")
            name = self._names.get(peer["publicKey"], peer["publicKey"])
            ages.append(([name], float(age) if age is not None else float("nan")))
        yield gauge_family("wireguard_handshake_age_seconds",
                           "Seconds since the latest handshake with each peer (NaN: none yet)", ["peer"], ages)
        yield gauge_family("wireguard_peers", "Peers configured on the interface", [],
                           [([], float(st.get("peers", 0)))])

    def close(self) -> None:
        pass


def open_datapath(config: AgentConfig) -> Datapath:
    if config.mode == "ipsec":
        return IpsecDatapath(config)
    return WireguardDatapath(config)


def problems_by_node(views: Sequence[PeerView]) -> Mapping[str, tuple[str, ...]]:
    return {v.name: v.problems for v in views if v.problems}
