"""The Kubernetes API, through lightkube: list and watch Nodes, patch our own, record Events.

    api = KubeApi.connect(kubeconfig=None)     # in-cluster service account, or $KUBECONFIG / --kubeconfig
    watcher = NodeWatcher(api, store, metrics)
    threading.Thread(target=watcher.run, args=(stop,), daemon=True).start()
    api.patch_annotations("node-1", {"sealnet.io/ipsec-keys": "3"})
    api.event("node-1", uid, "KeysFileInvalid", "keys line 2: ...")

The watcher is the informer pattern, kept small: list (the store is
replaced, so Nodes deleted while we were away are noticed), then watch from
the list's resourceVersion with bookmarks (so a quiet cluster still advances
our resourceVersion and a reconnect does not replay or expire). A 410 Gone
(our resourceVersion is older than the server's history) means re-list at
once; a broken stream or an unreachable server means reconnect from the last
resourceVersion after an exponential backoff with full jitter. None of this
ever clears the store: while the API server is away the agent keeps serving
the Nodes it last saw, for as long as it lasts.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol

from agent.cluster.nodes import NodeStore, translate
from agent.errors import ConfigError

log = logging.getLogger(__name__)

#: Server-side end of a watch request (it is then reopened from the last
#: resourceVersion): bounds how long a silently dead connection can hang.
WATCH_TIMEOUT = 300
EVENT_NAMESPACE = "default"
COMPONENT = "sealnet-agent"


class Backoff:
    """Exponential backoff with full jitter: ``base * 2**n`` capped, times U(0.5, 1)."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: Callable[[], float] = random.random) -> None:
        self.base, self.cap, self._rng = base, cap, rng
        self.failures = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2 ** self.failures)
        self.failures += 1
        return delay * (0.5 + self._rng() / 2)

    def reset(self) -> None:
        self.failures = 0


class WatchMetrics(Protocol):
    def watch_restart(self, reason: str) -> None: ...


class KubeApi:
    """The few API calls the agent makes, on one lightkube client."""

    def __init__(self, client: Any) -> None:
        self.client = client

    @classmethod
    def connect(cls, kubeconfig: Optional[str] = None) -> "KubeApi":
        from lightkube import Client, KubeConfig
        from lightkube.core.exceptions import ConfigError as LightkubeConfigError

        path = kubeconfig or os.environ.get("KUBECONFIG")
        try:
            config = KubeConfig.from_file(path) if path else KubeConfig.from_service_account()
        except (OSError, LightkubeConfigError, ValueError) as e:
            where = f"kubeconfig {path}" if path else (
                "the in-cluster service account (/var/run/secrets/kubernetes.io/serviceaccount; "
                "outside a cluster set KUBECONFIG or --kubeconfig)")
            raise ConfigError(f"cannot load {where}: {e}") from None
        return cls(Client(config=config, field_manager=COMPONENT))

    def list_nodes(self) -> tuple[list[Any], str]:
        from lightkube.resources.core_v1 import Node

        listed = self.client.list(Node)
        items = list(listed)
        return items, listed.resourceVersion

    def watch_nodes(self, resource_version: str, timeout: int = WATCH_TIMEOUT) -> Iterator[tuple[str, Any]]:
        """(type, Node) events after ``resource_version``, BOOKMARK included; raises on errors."""
        from lightkube.resources.core_v1 import Node
        from lightkube.types import OnErrorAction, OnErrorResult

        def raise_now(e: Exception, count: int) -> OnErrorResult:
            return OnErrorResult(OnErrorAction.RAISE)

        # lightkube's public watch() cannot ask for bookmarks; its request
        # builder can (the same call watch() makes, plus allowWatchBookmarks).
        inner = self.client._client
        request = inner.prepare_request("list", res=Node, watch=True, params={
            "resourceVersion": resource_version, "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout)})
        # One request per call: a clean end of the stream (timeoutSeconds)
        # returns to the caller, which reopens from its resourceVersion.
        for kind, obj in inner.watch(request, on_error=raise_now):
            yield kind, obj

    def patch_annotations(self, node: str, annotations: Mapping[str, Optional[str]]) -> None:
        """Merge patch of the Node's ``metadata.annotations`` (None deletes a key)."""
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        self.client.patch(Node, node, {"metadata": {"annotations": dict(annotations)}},
                          patch_type=PatchType.MERGE)

    def event(self, node: str, uid: str, reason: str, message: str, kind: str = "Warning") -> None:
        """Record an Event on the Node (``kubectl describe node`` shows it)."""
        from lightkube.models.core_v1 import EventSource, ObjectReference
        from lightkube.models.meta_v1 import ObjectMeta
        from lightkube.resources.core_v1 import Event

        now = datetime.now(timezone.utc)
        self.client.create(Event(
            metadata=ObjectMeta(generateName=f"{node}.", namespace=EVENT_NAMESPACE),
            involvedObject=ObjectReference(apiVersion="v1", kind="Node", name=node, uid=uid or None),
            reason=reason, message=message[:1024], type=kind, count=1,
            firstTimestamp=now, lastTimestamp=now,
            source=EventSource(component=COMPONENT, host=node),
            reportingComponent=f"sealnet.io/{COMPONENT}", reportingInstance=node,
        ), namespace=EVENT_NAMESPACE)


def _status_code(e: BaseException) -> Optional[int]:
    status = getattr(e, "status", None)
    code = getattr(status, "code", None)
    return int(code) if isinstance(code, int) else None


class NodeWatcher:
    """List + watch Nodes into a :class:`NodeStore`, forever (until ``stop``)."""

    def __init__(self, api: KubeApi, store: NodeStore, metrics: Optional[WatchMetrics] = None,
                 backoff: Optional[Backoff] = None, sleep: Callable[[float], bool] | None = None) -> None:
        self.api, self.store, self.metrics = api, store, metrics
        self.backoff = backoff or Backoff()
        self._sleep = sleep
        self.resource_version: Optional[str] = None

    def run(self, stop: threading.Event) -> None:
        sleep = self._sleep or stop.wait
        while not stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch(stop)
                self.backoff.reset()
            except Exception as e:  # noqa: BLE001 - every failure is handled the same: log, count, retry
                if stop.is_set():
                    return
                _release(e)
                code = _status_code(e)
                if code == 410:
                    log.info("node watch expired (410 Gone) resource_version=%s: listing again",
                             self.resource_version)
                    self.resource_version = None
                    self._restart("expired")
                    continue
                delay = self.backoff.next()
                reason = "api-error" if code else "connection"
                log.warning("node watch failed reason=%s error=%s: retrying in %.1f s (datapath kept as it is)",
                            reason, _describe(e), delay)
                self._restart(reason)
                sleep(delay)

    def _list(self) -> None:
        items, rv = self.api.list_nodes()
        self.store.replace(translate(obj) for obj in items)
        self.resource_version = rv
        log.info("nodes listed count=%d resource_version=%s", len(items), rv)

    def _watch(self, stop: threading.Event) -> None:
        assert self.resource_version is not None
        for kind, obj in self.api.watch_nodes(self.resource_version):
            if stop.is_set():
                return
            rv = getattr(obj.metadata, "resourceVersion", None)
            if kind == "BOOKMARK":
                pass
            elif kind == "DELETED":
                self.store.delete(str(obj.metadata.name))
            elif kind in ("ADDED", "MODIFIED"):
                self.store.upsert(translate(obj))
            if rv:
                self.resource_version = str(rv)
            self.backoff.reset()

    def _restart(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.watch_restart(reason)


def _release(e: BaseException) -> None:
    # lightkube's watch raises an error response (a 503) without reading or
    # closing it: close it here, or every outage leaks a pooled connection.
    response = getattr(e, "response", None)
    close = getattr(response, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - best effort
            pass


def _describe(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:300]
