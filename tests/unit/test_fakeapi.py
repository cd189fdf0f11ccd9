"""tests/fakeapi.py against the real lightkube client, over real HTTP.

Watches are drained on a thread (lightkube's watch is a blocking
generator); every wait is on an event or a queue, never a sleep. Each test's
server is stopped and every thread it started is joined at teardown.
"""

from __future__ import annotations

import http.client
import json
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx2
import pytest
from lightkube import ApiError, Client, KubeConfig
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Event, Node
from lightkube.types import OnErrorAction, OnErrorResult, PatchType, on_error_retry

from tests.fakeapi import START_RV, FakeApiServer, node_object


def raise_now(error: Exception, count: int) -> OnErrorResult:
    return OnErrorResult(OnErrorAction.RAISE)


class Consumer:
    """Drains one lightkube watch on a thread: events into a queue, then the exception it ended with."""

    def __init__(self, events: Iterator[tuple[str, Any]]) -> None:
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, args=(events,), name="consumer", daemon=True)
        self.thread.start()

    def _run(self, events: Iterator[tuple[str, Any]]) -> None:
        try:
            for event in events:
                self.events.put(event)
        except Exception as e:
            self.error = e

    def next(self, timeout: float = 5) -> tuple[str, Any]:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no watch event within {timeout} s") from None

    def end(self, timeout: float = 5) -> Optional[BaseException]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "watch consumer still running"
        return self.error


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as api:
        yield api
    leftover = [t for t in threading.enumerate() if t.name.startswith("fakeapi")]
    assert not leftover, leftover


@pytest.fixture
def client(server: FakeApiServer, tmp_path: Path) -> Iterator[Client]:
    c = Client(config=KubeConfig.from_file(server.kubeconfig(tmp_path / "kubeconfig")))
    yield c
    c.close()


@pytest.fixture
def consume(server: FakeApiServer) -> Iterator[Any]:
    """consume(watch_iterator) -> Consumer; all are joined after the server stops (which ends their streams)."""
    consumers: list[Consumer] = []

    def start(events: Iterator[tuple[str, Any]]) -> Consumer:
        consumers.append(Consumer(events))
        return consumers[-1]

    yield start
    server.stop()
    for consumer in consumers:
        consumer.end()


def bookmark_watch(client: Client, rv: str) -> Iterator[tuple[str, Any]]:
    """A bookmark-enabled watch, the way tests/fakeapi.py's docstring shows."""
    inner = client._client
    request = inner.prepare_request("list", res=Node, watch=True, params={
        "resourceVersion": rv, "allowWatchBookmarks": "true"})
    return inner.watch(request, on_error=raise_now)


def listed(client: Client) -> tuple[list[Any], str]:
    listing = client.list(Node)
    return list(listing), listing.resourceVersion


def test_list_returns_nodes_and_resource_version(server: FakeApiServer, client: Client) -> None:
    server.add_node(node_object("node-b", "10.0.0.2", "10.244.2.0/24", boot_id="boot-b"))
    server.add_node(node_object("node-a", "10.0.0.1", ["10.244.1.0/24", "fd00:1::/64"]))
    nodes, rv = listed(client)
    assert [n.metadata.name for n in nodes] == ["node-a", "node-b"]
    assert rv == str(server.resource_version) == str(START_RV + 2)
    a, b = nodes
    assert a.spec.podCIDRs == ["10.244.1.0/24", "fd00:1::/64"] and a.spec.podCIDR == "10.244.1.0/24"
    assert b.status.nodeInfo.bootID == "boot-b" and a.status.nodeInfo.bootID == ""
    assert b.status.addresses[0].type == "InternalIP" and b.status.addresses[0].address == "10.0.0.2"
    assert b.metadata.labels["kubernetes.io/hostname"] == "node-b"
    assert b.metadata.resourceVersion == str(START_RV + 1) and b.metadata.uid


def test_list_pages_are_one_snapshot(server: FakeApiServer, client: Client) -> None:
    for i in range(5):
        server.add_node(node_object(f"node-{i}", f"10.0.0.{i}", None))
    listing = client.list(Node, chunk_size=2)
    names = []
    for node in listing:
        names.append(node.metadata.name)
        if len(names) == 1:
            server.add_node(node_object("node-late", "10.0.0.9", None))  # after the first page: not in this list
    assert names == [f"node-{i}" for i in range(5)]
    assert listing.resourceVersion == str(START_RV + 5)
    pages = [path for method, path in server.requests if method == "GET"]
    assert len(pages) == 3 and "continue=" in pages[1] and "limit=2" in pages[2]


def test_get_node_and_404(server: FakeApiServer, client: Client) -> None:
    server.add_node(node_object("node-1", "10.0.0.1", None))
    assert client.get(Node, "node-1").spec.podCIDR is None
    with pytest.raises(ApiError) as err:
        client.get(Node, "node-9")
    assert err.value.status.code == 404 and err.value.status.reason == "NotFound"


def test_watch_from_list_rv_sees_later_changes_in_order(server: FakeApiServer, client: Client, consume: Any) -> None:
    server.add_node(node_object("node-1", "10.0.0.1", None))
    server.add_node(node_object("node-2", "10.0.0.2", None))
    server.update_node("node-1", lambda n: n["metadata"]["labels"].update(zone="a"))
    _, rv = listed(client)
    watch = consume(client.watch(Node, resource_version=rv, on_error=raise_now))
    server.wait_for_watches(1)
    server.add_node(node_object("node-3", "10.0.0.3", None))
    server.update_node("node-3", lambda n: n["metadata"]["labels"].update(zone="b"))
    server.delete_node("node-2")
    seen = [watch.next() for _ in range(3)]
    assert [(kind, n.metadata.name) for kind, n in seen] == [
        ("ADDED", "node-3"), ("MODIFIED", "node-3"), ("DELETED", "node-2")]
    assert seen[1][1].metadata.labels["zone"] == "b"
    rvs = [int(n.metadata.resourceVersion) for _, n in seen]
    assert int(rv) < rvs[0] < rvs[1] < rvs[2] == server.resource_version


def test_watch_replays_history_after_rv(server: FakeApiServer, client: Client) -> None:
    server.add_node(node_object("node-1", "10.0.0.1", None))
    rv = server.resource_version
    server.update_node("node-1", lambda n: n["metadata"]["annotations"].update(k="v"))
    server.delete_node("node-1")
    server.add_node(node_object("node-2", "10.0.0.2", None))
    events = client.watch(Node, resource_version=str(rv), on_error=raise_now)
    got = [(kind, n.metadata.name) for kind, n in (next(events) for _ in range(3))]
    assert got == [("MODIFIED", "node-1"), ("DELETED", "node-1"), ("ADDED", "node-2")]


def test_watch_without_rv_starts_with_current_state(server: FakeApiServer, client: Client) -> None:
    server.add_node(node_object("node-1", "10.0.0.1", None))
    server.update_node("node-1", lambda n: n["metadata"]["annotations"].update(k="v"))
    kind, node = next(iter(client.watch(Node, on_error=raise_now)))
    assert kind == "ADDED" and node.metadata.annotations["k"] == "v"


def test_watch_from_compacted_rv_raises_410(server: FakeApiServer, client: Client) -> None:
    server.add_node(node_object("node-1", "10.0.0.1", None))
    _, old = listed(client)
    server.update_node("node-1", lambda n: n["metadata"]["annotations"].update(k="v"))
    server.compact()
    with pytest.raises(ApiError) as err:
        next(iter(client.watch(Node, resource_version=old, on_error=raise_now)))
    status = err.value.status
    assert status.code == 410 and status.reason == "Expired"
    assert status.message == f"too old resource version: {old} ({server.resource_version})"
    # The compaction point itself is still watchable; lightkube's retry
    # handler drops the RV after a 410 and gets the current state.
    assert list(client.list(Node))
    kind, node = next(iter(client.watch(Node, resource_version=old, on_error=on_error_retry)))
    assert kind == "ADDED" and node.metadata.annotations["k"] == "v"
    assert server.requests[-1] == ("GET", "/api/v1/nodes?watch=true")


def test_bookmarks_only_when_asked(server: FakeApiServer, client: Client, consume: Any) -> None:
    server.add_node(node_object("node-1", "10.0.0.1", None))
    _, rv = listed(client)
    with_marks = consume(bookmark_watch(client, rv))
    without = consume(client.watch(Node, resource_version=rv, on_error=raise_now))
    server.wait_for_watches(2)
    server.bookmark()
    server.add_node(node_object("node-2", "10.0.0.2", None))
    server.bookmark()
    kind, mark = with_marks.next()
    assert kind == "BOOKMARK" and mark.metadata.resourceVersion == rv and mark.metadata.name is None
    assert with_marks.next()[0] == "ADDED"
    assert with_marks.next()[1].metadata.resourceVersion == str(server.resource_version)
    kind, node = without.next()
    assert (kind, node.metadata.name) == ("ADDED", "node-2")  # no bookmark came first
    assert ("GET", f"/api/v1/nodes?resourceVersion={rv}&allowWatchBookmarks=true&watch=true") in server.requests


def test_merge_patch_annotations(server: FakeApiServer, client: Client, consume: Any) -> None:
    server.add_node(node_object("node-1", "10.0.0.1", None, annotations={"old": "1", "keep": "k"}))
    _, rv = listed(client)
    watch = consume(client.watch(Node, resource_version=rv, on_error=raise_now))
    server.wait_for_watches(1)
    patched = client.patch(Node, "node-1", {"metadata": {"annotations": {"new": "n", "keep": "K", "old": None}}},
                           patch_type=PatchType.MERGE)
    kind, seen = watch.next()
    for node in (patched, seen):
        assert node.metadata.annotations["new"] == "n" and node.metadata.annotations["keep"] == "K"
        assert "old" not in node.metadata.annotations
        assert "node.alpha.kubernetes.io/ttl" in node.metadata.annotations  # merged, not replaced
    assert kind == "MODIFIED" and seen.metadata.resourceVersion == str(server.resource_version) != rv
    assert server.get_node("node-1")["metadata"]["annotations"]["new"] == "n"
    assert server.patches == [("node-1", "application/merge-patch+json",
                               {"metadata": {"annotations": {"new": "n", "keep": "K", "old": None}}})]


def test_noop_patch_does_not_bump_rv(server: FakeApiServer, client: Client) -> None:
    server.add_node(node_object("node-1", "10.0.0.1", None, annotations={"a": "1"}))
    rv = server.resource_version
    node = client.patch(Node, "node-1", {"metadata": {"annotations": {"a": "1", "gone": None}}},
                        patch_type=PatchType.MERGE)
    assert node.metadata.resourceVersion == str(rv) == str(server.resource_version)


def test_strategic_merge_patch_annotations(server: FakeApiServer, client: Client) -> None:
    server.add_node(node_object("node-1", "10.0.0.1", None))
    node = client.patch(Node, "node-1", {"metadata": {"annotations": {
        "sealnet.io/wg-key": "abc", "node.alpha.kubernetes.io/ttl": None}}})
    assert node.metadata.annotations["sealnet.io/wg-key"] == "abc"
    assert "node.alpha.kubernetes.io/ttl" not in node.metadata.annotations
    assert server.patches[-1][1] == "application/strategic-merge-patch+json"


def test_patch_errors(server: FakeApiServer, client: Client) -> None:
    server.add_node(node_object("node-1", "10.0.0.1", None))
    rv = server.resource_version
    with pytest.raises(ApiError) as err:
        client.patch(Node, "node-1", [{"op": "add", "path": "/metadata/annotations/a", "value": "1"}],
                     patch_type=PatchType.JSON)
    assert err.value.status.code == 415 and err.value.response.status_code == 415
    with pytest.raises(ApiError) as err:
        client.patch(Node, "node-9", {"metadata": {"annotations": {"a": "1"}}}, patch_type=PatchType.MERGE)
    assert err.value.status.code == 404
    with pytest.raises(ApiError) as err:  # a resourceVersion in the patch is a precondition
        client.patch(Node, "node-1", {"metadata": {"resourceVersion": "1", "annotations": {"a": "1"}}},
                     patch_type=PatchType.MERGE)
    assert err.value.status.code == 409
    assert server.resource_version == rv and len(server.patches) == 3


def test_create_event(server: FakeApiServer, client: Client) -> None:
    created = client.create(Event(
        metadata=ObjectMeta(generateName="node-1.sealnet-"),
        involvedObject=ObjectReference(apiVersion="v1", kind="Node", name="node-1"),
        reason="KeysRotated", message="generation 3", type="Normal",
        source=EventSource(component="sealnet-agent", host="node-1"),
    ), namespace="default")
    assert created.metadata.name.startswith("node-1.sealnet-") and len(created.metadata.name) == 20
    assert created.metadata.namespace == "default"
    assert created.metadata.resourceVersion == str(server.resource_version)
    [stored] = server.created_events()
    assert stored == server.events[0]
    assert stored["reason"] == "KeysRotated" and stored["involvedObject"]["name"] == "node-1"
    assert stored["metadata"]["name"] == created.metadata.name
    assert server.requests[-1] == ("POST", "/api/v1/namespaces/default/events")


def test_break_watches_is_a_transport_error(server: FakeApiServer, client: Client, consume: Any) -> None:
    _, rv = listed(client)
    watch = consume(client.watch(Node, resource_version=rv, on_error=raise_now))
    server.wait_for_watches(1)
    server.add_node(node_object("node-1", "10.0.0.1", None))
    assert watch.next()[0] == "ADDED"
    server.break_watches()
    assert server.watch_count() == 0
    error = watch.end()
    # Not a clean end (lightkube would just reconnect): the chunked body is cut short.
    assert isinstance(error, httpx2.RemoteProtocolError), repr(error)
    assert isinstance(error, httpx2.TransportError) and "incomplete chunked read" in str(error)


def test_unavailable_is_503(server: FakeApiServer, client: Client, consume: Any) -> None:
    server.add_node(node_object("node-1", "10.0.0.1", None))
    _, rv = listed(client)
    watch = consume(client.watch(Node, resource_version=rv, on_error=raise_now))
    server.wait_for_watches(1)
    server.set_unavailable(True)
    assert isinstance(watch.end(), httpx2.RemoteProtocolError)
    with pytest.raises(ApiError) as err:
        list(client.list(Node))
    assert err.value.status.code == 503 and err.value.status.reason == "ServiceUnavailable"
    # lightkube's watch does not turn an error response into ApiError.
    with pytest.raises(httpx2.HTTPStatusError) as werr:
        next(iter(client.watch(Node, resource_version=rv, on_error=raise_now)))
    assert not isinstance(werr.value, ApiError) and werr.value.response.status_code == 503
    assert json.loads(werr.value.response.read())["code"] == 503  # the streamed body is left unread
    server.set_unavailable(False)
    assert [n.metadata.name for n in client.list(Node)] == ["node-1"]


def test_stop_with_open_watch_is_prompt(server: FakeApiServer, client: Client, consume: Any) -> None:
    watch = consume(client.watch(Node, on_error=raise_now))
    server.wait_for_watches(1)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2
    assert isinstance(watch.end(), httpx2.HTTPError)  # lightkube reconnected after the end, and failed
    assert server.watch_count() == 0


def _read_watch(conn: http.client.HTTPConnection, path: str) -> tuple[http.client.HTTPResponse, list[Any]]:
    conn.request("GET", path, headers={"Authorization": "Bearer fake-token"})
    resp = conn.getresponse()
    return resp, [json.loads(line) for line in resp.read().splitlines()]


def test_wire_format(server: FakeApiServer) -> None:
    server.add_node(node_object("node-1", "10.0.0.1", None))
    old = server.resource_version - 1
    server.compact()
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        resp, lines = _read_watch(conn, f"/api/v1/nodes?watch=1&resourceVersion={old}")
        assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.getheader("Content-Type") == "application/json"
        assert lines == [{"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f"too old resource version: {old} ({old + 1})", "reason": "Expired", "code": 410}}]
        # timeoutSeconds ends the stream cleanly, and the connection is reused.
        resp, lines = _read_watch(conn, "/api/v1/nodes?watch=true&timeoutSeconds=1")
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [("ADDED", "node-1")]
        assert lines[0]["object"]["kind"] == "Node"
        conn.request("GET", "/api/v1/nodes")
        listing = json.loads(conn.getresponse().read())
        assert listing["kind"] == "NodeList" and listing["metadata"] == {"resourceVersion": str(old + 1)}
        assert "kind" not in listing["items"][0]  # as the real server: list items carry no TypeMeta
        conn.request("DELETE", "/apis/apps/v1/deployments")
        resp = conn.getresponse()
        assert resp.status == 404 and json.loads(resp.read())["reason"] == "NotFound"
    finally:
        conn.close()


def test_serves_on_a_given_socket(tmp_path: Path) -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    with FakeApiServer(sock=sock) as api:
        assert api.url == f"http://127.0.0.1:{port}"
        api.add_node(node_object("node-1", "10.0.0.1", "10.244.1.0/24"))
        config = KubeConfig.from_file(api.kubeconfig(tmp_path / "kc", server=api.url))
        with Client(config=config) as c:
            assert [n.metadata.name for n in c.list(Node)] == ["node-1"]
    assert sock.fileno() == -1  # the server owned it
