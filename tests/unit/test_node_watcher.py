"""agent.cluster.kube.NodeWatcher and the loop, against the fake API server over HTTP.

Properties asserted (the real lightkube client, tests.fakeapi on loopback):
- list then watch: the store holds every Node; later ADDED/MODIFIED/DELETED
  arrive; bookmarks advance the resourceVersion without touching the store;
- 410 Gone (history compacted) -> a fresh list, which also notices a Node
  deleted while the watch was away; a broken stream or a 503 -> reconnect
  after backoff, the store kept as it was, restarts counted by reason;
- a burst of 1000 Node updates costs a few reconcile passes, not 1000;
- the loop publishes the datapath's annotations on its own Node by merge
  patch, and only when they change.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import pytest

from agent.cluster.datapaths import Outcome
from agent.cluster.kube import Backoff, KubeApi, NodeWatcher
from agent.cluster.loop import Loop, Trigger
from agent.cluster.metrics import Metrics
from agent.cluster.nodes import NodeStore, PeerView
from agent.model import Node
from tests.fakeapi import FakeApiServer, node_object


def wait(what: str, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def node(i: int, **kw: Any) -> dict[str, Any]:
    return node_object(f"node-{i}", f"172.18.{i // 250}.{i % 250 + 2}", f"10.{i // 250}.{i % 250}.0/24",
                       boot_id=f"boot-{i}", **kw)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FakeApiServer, KubeApi]]:
    with FakeApiServer() as server:
        yield server, KubeApi.connect(str(server.kubeconfig(tmp_path / "kubeconfig")))


@pytest.fixture
def watching(api: tuple[FakeApiServer, KubeApi]) -> Iterator[tuple[FakeApiServer, NodeStore, NodeWatcher, Metrics]]:
    server, kube = api
    for i in range(3):
        server.add_node(node(i))
    metrics = Metrics()
    store = NodeStore()
    watcher = NodeWatcher(kube, store, metrics, backoff=Backoff(base=0.05, cap=0.2))
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    yield server, store, watcher, metrics
    stop.set()
    server.break_watches()
    thread.join(timeout=5)


def restarts(metrics: Metrics, reason: str) -> float:
    return metrics.watch_restarts.labels(reason)._value.get()


def names(store: NodeStore) -> set[str]:
    return {v.name for v in store.snapshot(grace=0).views}


def test_list_then_watch_events_and_bookmarks(watching) -> None:
    server, store, watcher, _ = watching
    assert store.synced.wait(5) and names(store) == {"node-0", "node-1", "node-2"}
    server.wait_for_watches(1)
    server.add_node(node(3))
    server.update_node("node-1", lambda n: n["metadata"].setdefault("annotations", {}).update(
        {"sealnet.io/ipsec-keys": "3,4"}))
    server.delete_node("node-2")
    wait("events applied", lambda: names(store) == {"node-0", "node-1", "node-3"})
    view = store.get("node-1")
    assert view is not None and view.ipsec_keys == frozenset({3, 4})
    # Other objects move the resourceVersion (here an Event, recorded the way the agent
    # records one); only a bookmark tells a Node watcher.
    rv = watcher.resource_version
    watcher.api.event("node-1", "uid-1", "KeysFileRefused", "keys line 1: aead-key has 39 hex digits")
    event = server.created_events()[-1]
    assert event["involvedObject"]["kind"] == "Node" and event["involvedObject"]["name"] == "node-1"
    assert event["reason"] == "KeysFileRefused" and event["type"] == "Warning"
    assert watcher.resource_version == rv
    server.bookmark()
    wait("bookmark advances the resourceVersion", lambda: watcher.resource_version != rv)
    assert int(watcher.resource_version) == server.resource_version


def test_expired_watch_relists_and_sees_missed_deletion(watching) -> None:
    server, store, watcher, metrics = watching
    assert store.synced.wait(5)
    server.wait_for_watches(1)
    # The watch goes away; meanwhile a Node is deleted and history is compacted.
    server.set_unavailable(True)
    server.delete_node("node-0")
    server.compact()
    assert names(store) == {"node-0", "node-1", "node-2"}, "an outage must not clear the store"
    wait("restart counted", lambda: restarts(metrics, "connection") + restarts(metrics, "api-error") > 0)
    server.set_unavailable(False)
    wait("relisted after 410", lambda: restarts(metrics, "expired") >= 1)
    wait("the deletion is noticed by the list", lambda: names(store) == {"node-1", "node-2"})


def test_broken_stream_reconnects_from_resource_version(watching) -> None:
    server, store, watcher, metrics = watching
    assert store.synced.wait(5)
    server.wait_for_watches(1)
    lists = sum(1 for m, p in server.requests if m == "GET" and "watch" not in p and p.startswith("/api/v1/nodes"))
    server.break_watches()
    server.add_node(node(7))
    wait("event after reconnect", lambda: "node-7" in names(store))
    assert restarts(metrics, "connection") >= 1
    relists = sum(1 for m, p in server.requests if m == "GET" and "watch" not in p and p.startswith("/api/v1/nodes"))
    assert relists == lists, "a broken stream resumes from its resourceVersion, it does not re-list"


class Recording:
    """A datapath that records each pass (the loop's logic is under test, not the kernel's)."""

    mode = "test"

    def __init__(self, delay: float = 0.0) -> None:
        self.passes: list[int] = []
        self.delay = delay

    def reconcile(self, local: Node, views: Sequence[PeerView], keys: Optional[Any]) -> Outcome:
        self.passes.append(len(views))
        time.sleep(self.delay)
        return Outcome(served=tuple(v.name for v in views if v.name != local.name),
                       publish={"sealnet.io/ipsec-keys": "3"})

    def scrape(self) -> list[Any]:
        return []

    def close(self) -> None:
        pass


def test_burst_of_1000_updates_coalesces_and_publishes_once(api) -> None:
    server, kube = api
    for i in range(1001):
        server.add_node(node(i))
    metrics = Metrics()
    trigger = Trigger(metrics)
    store = NodeStore(on_change=trigger.set)
    dp = Recording(delay=0.05)
    loop = Loop("node-0", dp, store, None, kube, metrics, trigger, resync=3600, grace=0)
    stop = threading.Event()
    watcher = NodeWatcher(kube, store, metrics)
    threads = [threading.Thread(target=t, args=(stop,), daemon=True) for t in (watcher.run, loop.run)]
    for t in threads:
        t.start()
    try:
        wait("first pass", lambda: loop.ready)
        wait("published", lambda: server.get_node("node-0")["metadata"].get("annotations", {})
             .get("sealnet.io/ipsec-keys") == "3")
        server.wait_for_watches(1)
        # Our own patch comes back as a MODIFIED event: one more pass, then quiet.
        wait("own annotation seen", lambda: store.get("node-0").ipsec_keys == frozenset({3}))
        time.sleep(0.5)
        first = len(dp.passes)
        for i in range(1, 1001):
            server.update_node(f"node-{i}", lambda n: n["metadata"]["labels"].update(touched="yes"))
        # labels are not ours: the views do not change, nothing to do
        time.sleep(0.5)
        assert len(dp.passes) == first
        for i in range(1, 1001):
            server.update_node(f"node-{i}", lambda n: n["status"]["nodeInfo"].update(bootID="rebooted"))
        wait("the burst reconciled", lambda: store.get("node-1000").node.boot_id == "rebooted"
             and len(dp.passes) > first and not trigger._reasons, timeout=30)
        time.sleep(0.3)
        burst = len(dp.passes) - first
        print(f"\n1000 Node updates -> {burst} reconcile pass(es)")
        assert 1 <= burst <= 10
        patches = [p for p in server.patches if p[0] == "node-0"]
        assert len(patches) == 1 and patches[0][1] == "application/merge-patch+json"
        assert patches[0][2] == {"metadata": {"annotations": {"sealnet.io/ipsec-keys": "3"}}}
    finally:
        stop.set()
        trigger.set("stop")
        server.break_watches()
        for t in threads:
            t.join(timeout=5)
