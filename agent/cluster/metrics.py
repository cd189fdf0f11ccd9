"""The daemon's Prometheus metrics (prometheus_client), one registry per agent.

Metric names are ``sealnet_<subsystem>_<name>``. Two kinds:

- written by the loop as it works: reconciles (count, duration, failures by
  stage), watch restarts, peers by state, keys file validity, IPsec keys
  installed, each peer's egress key, key age;
- read from the kernel when scraped (:class:`KernelCollector`, through the
  datapath's ``scrape()``): the highest ESP sequence number per SA,
  ``/proc/net/xfrm_stat``, WireGuard handshake age per peer. Those are the
  numbers an operator needs fresh, not as of the last reconcile.

No label or value ever carries key material: labels are node names, SPIs in
hex, key IDs and counter names.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

NS = "sealnet"
PEER_STATES = ("served", "blocked", "rejected", "deleting")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reconciles = Counter("reconciles", "Reconcile passes, by result", ["result"], namespace=NS,
                                  subsystem="agent", registry=r)
        self.reconcile_seconds = Histogram(
            "reconcile_duration_seconds", "Time of one reconcile pass (plan, kernel dump, writes)",
            namespace=NS, subsystem="agent", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.failures = Counter("reconcile_failures", "Failed reconciles and refused kernel changes, by stage",
                                ["stage"], namespace=NS, subsystem="agent", registry=r)
        self.events_coalesced = Counter("triggers", "Changes that asked for a reconcile (many coalesce into one)",
                                        ["reason"], namespace=NS, subsystem="agent", registry=r)
        self.watch_restarts = Counter("watch_restarts", "Node list/watch restarts, by reason", ["reason"],
                                      namespace=NS, subsystem="agent", registry=r)
        self.ready = Gauge("ready", "1 once the first reconcile succeeded with every known peer served or blocked",
                           namespace=NS, subsystem="agent", registry=r)
        self.last_success = Gauge("last_success_timestamp_seconds", "Unix time of the last successful reconcile",
                                  namespace=NS, subsystem="agent", registry=r)
        self.peers = Gauge("peers", "Peers by state", ["state"], namespace=NS, subsystem="agent", registry=r)
        self.node_problems = Gauge("node_problems", "Nodes whose objects have values the agent cannot use",
                                   namespace=NS, subsystem="agent", registry=r)
        self.keys_file_valid = Gauge("keys_file_valid", "1 when the keys file on disk is the one in use",
                                     namespace=NS, subsystem="ipsec", registry=r)
        self.keys_file_errors = Counter("keys_file_errors", "Keys files refused (the last good keys were kept)",
                                        namespace=NS, subsystem="ipsec", registry=r)
        self.keys_installed = Gauge("keys_installed", "1 for each key ID whose SAs are installed", ["key_id"],
                                    namespace=NS, subsystem="ipsec", registry=r)
        self.current_key = Gauge("current_key_id", "Key ID of the keys file's current (last) line",
                                 namespace=NS, subsystem="ipsec", registry=r)
        self.key_age = Gauge("key_age_seconds", "Seconds since this agent first saw each key ID", ["key_id"],
                             namespace=NS, subsystem="ipsec", registry=r)
        self.peers_behind = Gauge("rotation_peers_behind", "Peers that do not yet advertise the current key",
                                  namespace=NS, subsystem="ipsec", registry=r)
        self.egress_key = Gauge("peer_egress_key_id", "Key ID this node sends each peer with", ["peer"],
                                namespace=NS, subsystem="ipsec", registry=r)
        for state in PEER_STATES:
            self.peers.labels(state).set(0)
        for result in ("ok", "error"):
            self.reconciles.labels(result)

    def watch_restart(self, reason: str) -> None:
        self.watch_restarts.labels(reason).inc()

    def set_key_ids(self, gauge: Gauge, values: Mapping[int, float]) -> None:
        """Replace a key-ID-labelled gauge's children by ``values``."""
        gauge.clear()
        for key_id, value in values.items():
            gauge.labels(str(key_id)).set(value)

    def set_egress(self, egress: Mapping[str, int]) -> None:
        self.egress_key.clear()
        for peer, key_id in egress.items():
            self.egress_key.labels(peer).set(key_id)


Scrape = Callable[[], Iterable[Metric]]


class KernelCollector:
    """Runs the datapath's ``scrape()`` at each scrape; a failure yields nothing (and is logged)."""

    def __init__(self, scrape: Scrape) -> None:
        self._scrape = scrape

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._scrape())
        except Exception as e:  # noqa: BLE001 - a scrape must not take the endpoint down
            log.warning("kernel metrics unavailable: %s", e)
            return []

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: its families depend on the datapath


def gauge_family(name: str, doc: str, labels: list[str], samples: Iterable[tuple[list[str], float]]) -> Any:
    family = GaugeMetricFamily(f"{NS}_{name}", doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def xfrm_stat(path: str = "/proc/self/net/xfrm_stat") -> dict[str, int]:
    """``/proc/net/xfrm_stat`` of the agent's network namespace (empty without XFRM)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return {}
    stats = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            stats[parts[0]] = int(parts[1])
    return stats
