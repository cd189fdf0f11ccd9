"""The one reconcile loop: coalesced triggers, periodic resync, retry with backoff.

    trigger = Trigger()
    loop = Loop("node-1", datapath, store, keys, publisher, metrics, trigger, resync=60, grace=60)
    loop.run(stop)        # until stop is set; loop.ready / loop.alive() feed /readyz and /healthz

Every change (a Node event, a new keys file, a deleted Node's grace period
ending) only *asks* for a pass: ``trigger.set(reason)``. The loop wakes,
lets a burst settle (up to ``SETTLE`` s while triggers keep coming), and
runs one pass over the latest snapshot, so a burst of 1000 Node updates costs
one or a few passes, not 1000. Each pass is the whole job (plan everything,
dump the kernel, apply the difference), which is also why a periodic resync
repairs drift: an SA deleted by hand is simply missing from the dump and is
added back.

A failed pass (a kernel refusal, the API unreachable for the annotation
patch) is retried after an exponential backoff; the kernel keeps whatever
the last good pass made. The loop never runs a pass before the first Node
list has arrived (the agent would otherwise remove every peer it found in
the kernel on a restart), nor without valid keys in IPsec mode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Callable, Mapping, Optional, Protocol

from agent.cluster import annotations as ann
from agent.cluster.datapaths import Datapath, Outcome
from agent.cluster.keyswatch import KeysFile
from agent.cluster.kube import Backoff
from agent.cluster.metrics import Metrics
from agent.cluster.nodes import NodeStore, PeerView
from agent.errors import ConfigError, KernelError

log = logging.getLogger(__name__)

#: After a wake-up, wait this long for more triggers (a burst) ...
QUIET = 0.02
#: ... but never more than this before the pass starts.
SETTLE = 0.25
#: The loop beats at least this often, so /healthz can tell it is alive.
HEARTBEAT = 5.0


class Trigger:
    """A level-triggered wake-up that remembers why it was set."""

    def __init__(self, metrics: Optional[Metrics] = None) -> None:
        self._cond = threading.Condition()
        self._reasons: Counter[str] = Counter()
        self._metrics = metrics

    def set(self, reason: str) -> None:
        with self._cond:
            self._reasons[reason] += 1
            self._cond.notify_all()
        if self._metrics is not None:
            self._metrics.events_coalesced.labels(reason).inc()

    def wait(self, timeout: float) -> Counter[str]:
        """Block until set or ``timeout``; return and clear the reasons (empty on timeout)."""
        with self._cond:
            if not self._reasons:
                self._cond.wait(timeout)
            reasons, self._reasons = self._reasons, Counter()
            return reasons

    def settle(self, quiet: float = QUIET, limit: float = SETTLE) -> Counter[str]:
        """Collect triggers until none came for ``quiet`` s, or ``limit`` s passed."""
        deadline = time.monotonic() + limit
        collected: Counter[str] = Counter()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return collected
            more = self.wait(min(quiet, left))
            if not more:
                return collected
            collected.update(more)


class Publisher(Protocol):
    def patch_annotations(self, node: str, annotations: Mapping[str, Optional[str]]) -> None: ...

    def event(self, node: str, uid: str, reason: str, message: str, kind: str = "Warning") -> None: ...


class Loop:
    def __init__(self, node_name: str, datapath: Datapath, store: NodeStore, keys: Optional[KeysFile],
                 publisher: Publisher, metrics: Metrics, trigger: Trigger, resync: float = 60.0,
                 grace: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.node_name = node_name
        self.datapath, self.store, self.keys = datapath, store, keys
        self.publisher, self.metrics, self.trigger = publisher, metrics, trigger
        self.resync, self.grace = resync, grace
        self.clock = clock
        self.backoff = Backoff(base=0.5, cap=30.0)
        self.ready = False
        self.not_ready_reason = "no reconcile yet"
        self.passes = 0
        self.last_outcome: Optional[Outcome] = None
        self._beat = clock()
        self._retry_at: Optional[float] = None
        #: when the datapath asked for another pass (a rotation's old keys can go)
        self._datapath_wake: Optional[float] = None
        self._next_resync = clock()
        self._reported: dict[str, tuple[str, ...]] = {}

    # -- liveness -------------------------------------------------------------

    def alive(self, limit: float = 60.0) -> bool:
        """True while the loop beats (a pass stuck for ``limit`` s is not alive)."""
        return self.clock() - self._beat < limit

    # -- the loop -------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set() and not self.store.synced.wait(1.0):
            self._beat = self.clock()
        while not stop.is_set():
            self._beat = self.clock()
            timeout = max(0.0, min(self._next_wake() - self.clock(), HEARTBEAT))
            reasons = self.trigger.wait(timeout)
            if stop.is_set():
                return
            now = self.clock()
            due = now >= self._next_resync or any(t is not None and now >= t
                                                  for t in (self._retry_at, self._datapath_wake))
            if not reasons and not due and not self._expiry_due(now):
                continue
            reasons.update(self.trigger.settle())
            if due and not reasons:
                reasons["resync"] += 1
            self.pass_once(reasons)

    def _next_wake(self) -> float:
        wake = self._next_resync
        if self._retry_at is not None:
            wake = min(wake, self._retry_at)
        if self._datapath_wake is not None:
            wake = min(wake, self._datapath_wake)
        expiry = self.store.next_expiry(self.grace)
        if expiry is not None:
            wake = min(wake, expiry)
        return wake

    def _expiry_due(self, now: float) -> bool:
        expiry = self.store.next_expiry(self.grace)
        return expiry is not None and now >= expiry

    def pass_once(self, reasons: Optional[Counter[str]] = None) -> bool:
        """One reconcile over the latest snapshot; True if it succeeded."""
        start = self.clock()
        self.passes += 1
        self._next_resync = start + self.resync
        snap = self.store.snapshot(self.grace)
        own = next((v for v in snap.views if v.name == self.node_name and not v.deleted), None)
        self._report_problems(snap.views)
        try:
            if own is None or own.node is None:
                why = "is not in the Node list" if own is None else "; ".join(own.problems)
                raise ConfigError(f"own node {self.node_name!r} {why}: the datapath is left as it is")
            keys = self.keys.current if self.keys is not None else None
            outcome = self.datapath.reconcile(own.node, snap.views, keys)
            self._publish(own, outcome)
        except (ConfigError, KernelError, OSError) as e:
            return self._failed(e, start, reasons)
        except Exception as e:  # noqa: BLE001 - the loop must survive anything; the next pass retries
            log.exception("reconcile pass failed unexpectedly")
            return self._failed(e, start, reasons)
        elapsed = self.clock() - start
        self.metrics.reconcile_seconds.observe(elapsed)
        self.last_outcome = outcome
        self._datapath_wake = outcome.wake_at
        self._record(outcome, snap.views)
        if outcome.failures:
            self.metrics.failures.labels("kernel").inc(len(outcome.failures))
            return self._failed(KernelError(f"{len(outcome.failures)} kernel change(s) refused: "
                                            + "; ".join(outcome.failures[:3])), start, reasons, counted=True)
        self.metrics.reconciles.labels("ok").inc()
        self.metrics.last_success.set_to_current_time()
        self.backoff.reset()
        self._retry_at = None
        if not self.ready:
            log.info("ready: first reconcile done node=%s peers_served=%d blocked=%d", self.node_name,
                     len(outcome.served), len(outcome.blocked))
        self.ready, self.not_ready_reason = True, ""
        self.metrics.ready.set(1)
        level = logging.INFO if outcome.changes else logging.DEBUG
        log.log(level, "reconciled reasons=%s duration_ms=%.1f %s", _reasons(reasons), elapsed * 1000,
                outcome.summary)
        return True

    def _publish(self, own: PeerView, outcome: Outcome) -> None:
        patch = ann.changes(own.annotations, outcome.publish)
        if not patch:
            return
        try:
            self.publisher.patch_annotations(self.node_name, patch)
        except Exception as e:  # noqa: BLE001 - the datapath is done; the next pass publishes again
            raise KernelError(f"publishing annotations on node {self.node_name} failed: {e}") from e
        log.info("published on node=%s %s", self.node_name,
                 " ".join(f"{k}={v if v is not None else '(removed)'}" for k, v in sorted(patch.items())))

    def _failed(self, e: BaseException, start: float, reasons: Optional[Counter[str]],
                counted: bool = False) -> bool:
        stage = "config" if isinstance(e, ConfigError) else "kernel" if isinstance(e, KernelError) else "internal"
        if not counted:
            self.metrics.failures.labels(stage).inc()
        self.metrics.reconciles.labels("error").inc()
        self.metrics.reconcile_seconds.observe(self.clock() - start)
        delay = self.backoff.next()
        self._retry_at = self.clock() + delay
        if not self.ready:
            self.not_ready_reason = str(e)
        log.error("reconcile failed stage=%s reasons=%s: %s; retrying in %.1f s", stage, _reasons(reasons), e, delay)
        return False

    def _record(self, outcome: Outcome, views: tuple[PeerView, ...]) -> None:
        m = self.metrics
        deleting = sum(1 for v in views if v.deleted)
        rejected = sum(1 for v in views if v.node is None)
        m.peers.labels("served").set(len(outcome.served))
        m.peers.labels("blocked").set(len(outcome.blocked))
        m.peers.labels("rejected").set(rejected)
        m.peers.labels("deleting").set(deleting)
        m.node_problems.set(sum(1 for v in views if v.problems))
        if self.keys is not None:
            current = self.keys.current
            if current is not None:
                m.current_key.set(current.current.spi)
            now = time.monotonic()
            m.set_key_ids(m.keys_installed, {k: 1 for k in outcome.keys_installed})
            m.set_key_ids(m.key_age, {k: now - t for k, t in self.keys.first_seen.items()})
            m.keys_file_valid.set(0 if self.keys.error else 1)
            m.set_egress(outcome.egress)
            m.peers_behind.set(len(outcome.behind))

    def _report_problems(self, views: tuple[PeerView, ...]) -> None:
        seen = {}
        for v in views:
            if v.problems:
                seen[v.name] = v.problems
                if self._reported.get(v.name) != v.problems:
                    log.warning("node problems node=%s: %s", v.name, "; ".join(v.problems))
        self._reported = seen


def _reasons(reasons: Optional[Counter[str]]) -> str:
    if not reasons:
        return "-"
    return ",".join(f"{k}x{n}" if n > 1 else k for k, n in sorted(reasons.items()))
