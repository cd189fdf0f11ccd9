"""An in-process fake Kubernetes API server for Node tests, reached over real HTTP.

No Kubernetes API server can be installed where the tests run, so the node
agent's daemon is tested against this fixture: a ThreadingHTTPServer that
speaks the part of the API the agent uses, the way the real server does --
list (with paging), watch (chunked JSON lines, replay from a resourceVersion,
bookmarks, 410 Gone after compaction, timeoutSeconds), get, merge and
strategic-merge PATCH of Nodes, and POST of Events. The store is driven from
the test (add_node, update_node, delete_node) and every request is recorded.
Failures are injected on purpose: compact(), bookmark(), break_watches(),
set_unavailable(). As on the real server, a PATCH that changes nothing gets
no new resourceVersion and no MODIFIED event; update_node() always writes.

Usage, with the real lightkube client::

    from lightkube import Client, KubeConfig
    from lightkube.resources.core_v1 import Node
    from lightkube.types import PatchType, on_error_raise

    with FakeApiServer() as api:
        api.add_node(node_object("node-1", "10.0.0.1", "10.244.1.0/24", boot_id="b-1"))
        client = Client(config=KubeConfig.from_file(api.kubeconfig(tmp_path / "kubeconfig")))
        listing = client.list(Node)
        nodes = list(listing)                 # resourceVersion is known once iterated
        rv = listing.resourceVersion
        # Client.watch() cannot ask for bookmarks; its own request builder can
        # (the call watch() makes, plus allowWatchBookmarks):
        inner = client._client
        request = inner.prepare_request("list", res=Node, watch=True, params={
            "resourceVersion": rv, "allowWatchBookmarks": "true"})
        for kind, node in inner.watch(request, on_error=on_error_raise):
            ...                               # "ADDED", "MODIFIED", "DELETED", "BOOKMARK"
        client.patch(Node, "node-1", {"metadata": {"annotations": {"k": None}}},
                     patch_type=PatchType.MERGE)

What lightkube 1.0.1 raises (its sync watch loop hands every httpx2.HTTPError
to on_error): a 410 arrives as an ERROR event and is raised as
lightkube.ApiError (status.code 410, no response); break_watches() ends the
stream without its final chunk, so httpx2.RemoteProtocolError; a 503 on a
list is lightkube.ApiError, on a watch a plain httpx2.HTTPStatusError (the
watch loop does not turn error responses into ApiError, and leaves that
response open and unread: read or close ``e.response`` to free the
connection).

Simplifications: one resource kind is stored (Nodes; Events are kept only as
a log), strategic merge treats lists like a merge patch does (replaced
whole), labelSelector/fieldSelector are refused with 400 rather than
ignored, there is no admission or validation beyond a few checks noted in
the code, and the server owns a socket passed in (stop() closes it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import queue
import random
import select
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional, Union, cast
from urllib.parse import parse_qs, urlsplit

Obj = dict[str, Any]

#: The first resourceVersion. Real ones are etcd revisions, large and opaque;
#: an RV below this one counts as compacted, as after a fresh etcd.
START_RV = 1000
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
#: How often an idle watch checks whether its client hung up (the real
#: server notices at once; we only need watch_count() to settle).
WATCH_POLL = 0.1
#: How long stop() lets open watches end cleanly before cutting connections.
STOP_GRACE = 0.5


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str, name: Optional[str] = None) -> Obj:
    """A failure Status, as the API server sends with any error response."""
    status: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": message, "reason": reason, "code": code}
    if name is not None:
        status["details"] = {"name": name, "kind": "nodes"}
    return status


def _not_found(name: str) -> tuple[int, Obj]:
    return 404, _status(404, "NotFound", f'nodes "{name}" not found', name)


def _gen_suffix() -> str:
    # The alphabet apimachinery's name generator uses (no vowels, no 0/1/3).
    return "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: null deletes a key, objects merge recursively, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def node_object(name: str, ip: str, pod_cidr: Union[str, list[str], None], boot_id: Optional[str] = None,
                annotations: Optional[dict[str, str]] = None, labels: Optional[dict[str, str]] = None) -> Obj:
    """A v1 Node as the API returns it for a kubelet-registered node.

    Without ``boot_id`` the field is the empty string: the API server
    serialises unreported nodeInfo fields that way (they are not omitempty),
    and lightkube's model requires the key.
    """
    spec: Obj = {}
    if pod_cidr is not None:
        cidrs = [pod_cidr] if isinstance(pod_cidr, str) else list(pod_cidr)
        spec = {"podCIDR": cidrs[0], "podCIDRs": cidrs}
    machine = hashlib.sha256(name.encode()).hexdigest()[:32]
    now = _now()
    ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
             "lastHeartbeatTime": now, "lastTransitionTime": now}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name,
                       "kubernetes.io/os": "linux", **(labels or {})},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                            "volumes.kubernetes.io/controller-managed-attach-detach": "true", **(annotations or {})},
        },
        "spec": spec,
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
            "capacity": {"cpu": "4", "memory": "8124088Ki", "pods": "110"},
            "allocatable": {"cpu": "4", "memory": "8021688Ki", "pods": "110"},
            "conditions": [ready],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"architecture": "amd64", "bootID": boot_id or "", "machineID": machine,
                         "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
                         "containerRuntimeVersion": "containerd://2.1.4", "kernelVersion": "6.8.0-85-generic",
                         "kubeProxyVersion": "", "kubeletVersion": "v1.34.1", "operatingSystem": "linux",
                         "osImage": "Ubuntu 24.04.3 LTS"},
        },
    }


class _Watch:
    """One open watch stream: the queue its handler thread drains.

    Items are ("event", {"type": ..., "object": ...}), ("break", None) to cut
    the connection, ("end", None) to finish the response cleanly.
    """

    def __init__(self, since: int, bookmarks: bool) -> None:
        self.since = since
        self.bookmarks = bookmarks
        self.queue: queue.Queue[tuple[str, Optional[Obj]]] = queue.Queue()

    def event(self, kind: str, obj: Obj) -> None:
        self.queue.put(("event", {"type": kind, "object": obj}))


class FakeApiServer:
    """The fake API server: a thread-safe Node store behind an HTTP server (see the module doc)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, sock: Optional[socket.socket] = None) -> None:
        # Stored objects are never changed in place (every write stores a new
        # copy), so history entries and watch payloads can be shared.
        self._lock = threading.Condition()
        self._rv = START_RV
        self._compacted = START_RV
        self._nodes: dict[str, Obj] = {}
        self._history: list[tuple[int, str, Obj]] = []
        self._watches: list[_Watch] = []
        self._pages: dict[str, tuple[int, list[Obj]]] = {}
        self._down = False
        self._closing = False
        self._conns: dict[socket.socket, threading.Thread] = {}
        self.events: list[Obj] = []
        self.patches: list[tuple[str, str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self._httpd = _Httpd(self, sock if sock is not None else _listen(host, port))
        bound_host, bound_port = self._httpd.socket.getsockname()[:2]
        self.url = f"http://[{bound_host}]:{bound_port}" if ":" in bound_host else f"http://{bound_host}:{bound_port}"
        self._thread: Optional[threading.Thread] = None

    # --- lifecycle ---

    def start(self) -> "FakeApiServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fakeapi", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: watches end (cleanly if they can within STOP_GRACE), connections close, threads are joined."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self._thread is not None:
            self._httpd.shutdown()  # no accept after this returns
            self._thread.join()
        with self._lock:
            for watch in self._watches:
                watch.queue.put(("end", None))
            self._lock.wait_for(lambda: not self._watches, STOP_GRACE)
            conns = list(self._conns.items())
        for conn, _ in conns:
            _cut(conn)  # idle keep-alive connections block their thread in a read (closed ones raise, ignored)
        self._httpd.server_close()
        for _, thread in conns:
            thread.join(timeout=1)

    def __enter__(self) -> "FakeApiServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, path: Union[str, Path], server: Optional[str] = None) -> Path:
        """Write a kubeconfig (JSON, which is YAML) for this server, plain http, token auth."""
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": server or self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}],
            "current-context": "fake",
        }
        path = Path(path)
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path

    # --- the store ---

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def _commit(self, kind: str, obj: Obj) -> Obj:
        """Record one change at a new RV and hand it to every open watch (lock held)."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._history.append((self._rv, kind, obj))
        for watch in self._watches:
            if self._rv > watch.since:  # a watch from a future RV waits for it
                watch.event(kind, obj)
        return obj

    def add_node(self, obj: Obj) -> Obj:
        node = copy.deepcopy(obj)
        node.setdefault("apiVersion", "v1")
        node.setdefault("kind", "Node")
        meta = node["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        with self._lock:
            if meta["name"] in self._nodes:
                raise ValueError(f"node {meta['name']} exists")
            self._nodes[meta["name"]] = self._commit("ADDED", node)
            return copy.deepcopy(node)

    def update_node(self, name: str, fn: Callable[[Obj], None]) -> Obj:
        """Apply ``fn`` to a copy of the node and store it: always a MODIFIED, even if fn changed nothing."""
        with self._lock:
            node = copy.deepcopy(self._nodes[name])
            fn(node)
            if node["metadata"]["name"] != name:
                raise ValueError("update_node cannot rename a node")
            self._nodes[name] = self._commit("MODIFIED", node)
            return copy.deepcopy(node)

    def delete_node(self, name: str) -> None:
        with self._lock:
            # The DELETED object is the last state, stamped with the deletion's RV.
            self._commit("DELETED", copy.deepcopy(self._nodes.pop(name)))

    def get_node(self, name: str) -> Obj:
        with self._lock:
            return copy.deepcopy(self._nodes[name])

    def nodes(self) -> list[Obj]:
        with self._lock:
            return [copy.deepcopy(self._nodes[n]) for n in sorted(self._nodes)]

    def created_events(self) -> list[Obj]:
        with self._lock:
            return copy.deepcopy(self.events)

    # --- failure injection ---

    def compact(self) -> None:
        """Forget history up to now, as etcd compaction does: older RVs (and list continue tokens) expire."""
        with self._lock:
            self._compacted = self._rv
            self._history.clear()
            self._pages.clear()

    def bookmark(self) -> None:
        with self._lock:
            obj = {"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._rv)}}
            for watch in self._watches:
                if watch.bookmarks:
                    watch.event("BOOKMARK", obj)

    def break_watches(self) -> None:
        """Cut every open watch's connection mid-stream; returns once their handlers are done."""
        with self._lock:
            broken = list(self._watches)
            for watch in broken:
                watch.queue.put(("break", None))
            if not self._lock.wait_for(lambda: not any(w in self._watches for w in broken), 5):
                raise AssertionError("watch handlers did not end within 5 s")

    def set_unavailable(self, down: bool) -> None:
        """While down every request answers 503 (a Status), and open watches are cut now."""
        with self._lock:
            self._down = down
        if down:
            self.break_watches()

    def watch_count(self) -> int:
        with self._lock:
            return len(self._watches)

    def wait_for_watches(self, n: int, timeout: float = 10) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._watches) >= n, timeout):
                raise AssertionError(f"{len(self._watches)} watches open after {timeout} s, wanted {n}")

    # --- what the HTTP handler calls ---

    def _unavailable(self) -> Optional[tuple[int, Obj]]:
        with self._lock:
            if self._down or self._closing:
                return 503, _status(503, "ServiceUnavailable", "the server is currently unable to handle the request")
        return None

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _track(self, conn: socket.socket, thread: threading.Thread) -> None:
        # Kept until the thread is seen dead (not dropped as it finishes), so
        # stop() joins even a thread that is just closing its socket.
        with self._lock:
            for old in [c for c, t in self._conns.items() if not t.is_alive()]:
                del self._conns[old]
            self._conns[conn] = thread

    def _list(self, query: dict[str, str]) -> tuple[int, Obj]:
        """One page of the NodeList; later pages come from a snapshot, so paging is consistent like etcd's."""
        try:
            limit = int(query.get("limit") or 0)
        except ValueError:
            return 400, _status(400, "BadRequest", f"invalid limit {query['limit']!r}")
        with self._lock:
            token = query.get("continue")
            if token:
                if token not in self._pages:
                    return 410, _status(410, "Expired", "The provided continue parameter is too old "
                                        "to display a consistent list result.")
                rv, items = self._pages.pop(token)
            else:
                rv, items = self._rv, [self._nodes[n] for n in sorted(self._nodes)]
            page, rest = (items[:limit], items[limit:]) if limit > 0 else (items, [])
            meta: Obj = {"resourceVersion": str(rv)}
            if rest:
                meta["continue"] = token = uuid.uuid4().hex
                meta["remainingItemCount"] = len(rest)
                self._pages[token] = (rv, rest)
        # The real server leaves apiVersion and kind out of list items.
        items_out = [{k: v for k, v in item.items() if k not in ("apiVersion", "kind")} for item in page]
        return 200, {"kind": "NodeList", "apiVersion": "v1", "metadata": meta, "items": items_out}

    def _get(self, name: str) -> tuple[int, Obj]:
        with self._lock:
            node = self._nodes.get(name)
        return (200, node) if node is not None else _not_found(name)

    def _patch(self, name: str, content_type: str, body: bytes) -> tuple[int, Obj]:
        try:
            patch = json.loads(body)
        except ValueError as e:
            patch = None
            error: Optional[str] = str(e)
        else:
            error = None
        with self._lock:
            self.patches.append((name, content_type, patch))
        if content_type.split(";")[0].strip().lower() not in (MERGE_PATCH, STRATEGIC_PATCH):
            return 415, _status(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                                f"accepted media types include: {MERGE_PATCH}, {STRATEGIC_PATCH}")
        if error is not None or not isinstance(patch, dict):
            return 400, _status(400, "BadRequest", f"the patch is not a JSON object: {error or type(patch).__name__}")
        return self._apply_patch(name, patch)

    def _apply_patch(self, name: str, patch: Obj) -> tuple[int, Obj]:
        with self._lock:
            node = self._nodes.get(name)
            if node is None:
                return _not_found(name)
            meta = node["metadata"]
            wanted_rv = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted_rv is not None and wanted_rv != meta["resourceVersion"]:
                # A resourceVersion in the patch is a precondition (optimistic concurrency).
                return 409, _status(409, "Conflict", f'Operation cannot be fulfilled on nodes "{name}": the object '
                                    "has been modified; please apply your changes to the latest version and try again",
                                    name)
            new = merge_patch(copy.deepcopy(node), patch)
            if not isinstance(new.get("metadata"), dict):
                return 422, _status(422, "Invalid", f'Node "{name}" is invalid: metadata: Required value', name)
            for key in ("name", "uid", "creationTimestamp", "resourceVersion"):
                new["metadata"][key] = meta[key]
            if new == node:
                # A write that changes nothing is skipped by the storage layer:
                # no new RV, no MODIFIED (so a patch loop cannot feed itself).
                return 200, node
            self._nodes[name] = self._commit("MODIFIED", new)
            return 200, new

    def _create_event(self, namespace: str, body: bytes) -> tuple[int, Obj]:
        try:
            event = json.loads(body)
        except ValueError as e:
            return 400, _status(400, "BadRequest", str(e))
        if not isinstance(event, dict):
            return 400, _status(400, "BadRequest", "the body is not a JSON object")
        meta = event.setdefault("metadata", {})
        if meta.get("namespace") not in (None, namespace):
            return 400, _status(400, "BadRequest", "the namespace of the provided object does not match "
                                "the namespace sent on the request")
        name = meta.get("name") or (meta["generateName"] + _gen_suffix() if meta.get("generateName") else None)
        if not name:
            return 422, _status(422, "Invalid", 'Event "" is invalid: metadata.name: Required value: '
                                "name or generateName is required")
        with self._lock:
            if any(e["metadata"]["name"] == name and e["metadata"]["namespace"] == namespace for e in self.events):
                return 409, _status(409, "AlreadyExists", f'events "{name}" already exists')
            self._rv += 1  # one RV sequence across all resources, as in etcd
            meta.update(name=name, namespace=namespace, uid=str(uuid.uuid4()), resourceVersion=str(self._rv),
                        creationTimestamp=_now())
            event.setdefault("apiVersion", "v1")
            event.setdefault("kind", "Event")
            self.events.append(event)
            return 201, copy.deepcopy(event)

    def _open_watch(self, since: Optional[int], bookmarks: bool) -> Union[_Watch, tuple[int, Obj]]:
        """Register a watch with its backlog queued, atomically with respect to writes."""
        with self._lock:
            if self._down or self._closing:
                return 503, _status(503, "ServiceUnavailable", "the server is currently unable to handle the request")
            watch = _Watch(since if since is not None else self._rv, bookmarks)
            if since is None:
                # No RV (or "0"): the current state as synthetic ADDEDs, then live.
                for name in sorted(self._nodes):
                    watch.event("ADDED", self._nodes[name])
            elif since < self._compacted:
                # The real server has already said 200 by the time its watch
                # cache finds the RV gone, so 410 arrives as an ERROR event on
                # the stream, which then ends. Clients must handle it there.
                watch.event("ERROR", _status(410, "Expired", f"too old resource version: {since} ({self._compacted})"))
                watch.queue.put(("end", None))
                return watch  # not registered: nothing more will come
            else:
                for rv, kind, obj in self._history:
                    if rv > since:
                        watch.event(kind, obj)
            self._watches.append(watch)
            self._lock.notify_all()
            return watch

    def _close_watch(self, watch: _Watch) -> None:
        with self._lock:
            if watch in self._watches:
                self._watches.remove(watch)
                self._lock.notify_all()


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _cut(conn: socket.socket) -> None:
    """End a connection abruptly (a FIN now, whatever the response state)."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Httpd(ThreadingHTTPServer):
    """ThreadingHTTPServer on a given listening socket, remembering each connection and its thread.

    The threads are daemons, so a server a test forgot to stop never holds up
    interpreter exit; stop() joins them itself.
    """

    daemon_threads = True

    def __init__(self, api: FakeApiServer, sock: socket.socket) -> None:
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.api = api

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name="fakeapi-conn", daemon=True)
        self.api._track(request, thread)  # in the accept loop, so stop() sees every thread
        thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-response is routine here; the handler reports real failures


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked watch responses

    @property
    def api(self) -> FakeApiServer:
        return cast(_Httpd, self.server).api

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_PATCH = do_POST = do_PUT = do_DELETE = do_GET

    def _dispatch(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.api._record(self.command, self.path)
        down = self.api._unavailable()
        if down is not None:
            return self._send(*down)
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = url.path.strip("/").split("/")
        method = self.command
        if parts == ["api", "v1", "nodes"] and method == "GET":
            unsupported = [k for k in ("labelSelector", "fieldSelector") if k in query]
            if unsupported:  # refused rather than ignored: a test must not pass on a filter never applied
                return self._send(400, _status(400, "BadRequest", f"fakeapi does not implement {unsupported[0]}"))
            if query.get("watch") in ("true", "1"):
                return self._watch(query)
            return self._send(*self.api._list(query))
        if len(parts) == 4 and parts[:3] == ["api", "v1", "nodes"] and method in ("GET", "PATCH"):
            if method == "GET":
                return self._send(*self.api._get(parts[3]))
            return self._send(*self.api._patch(parts[3], self.headers.get("Content-Type", ""), body))
        if len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "events" and method == "POST":
            return self._send(*self.api._create_event(parts[3], body))
        self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))

    def _send(self, code: int, obj: Obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")  # exactly this: lightkube checks for it
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(self, query: dict[str, str]) -> None:
        try:
            rv = query.get("resourceVersion")
            since = int(rv) if rv not in (None, "", "0") else None
            timeout = int(query["timeoutSeconds"]) if "timeoutSeconds" in query else None
        except ValueError as e:
            return self._send(400, _status(400, "BadRequest", str(e)))
        watch = self.api._open_watch(since, query.get("allowWatchBookmarks") in ("true", "1"))
        if isinstance(watch, tuple):
            return self._send(*watch)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            deadline = None if timeout is None else time.monotonic() + timeout
            if self._stream(watch, deadline) == "end":
                self._chunk(b"")  # the zero-length last chunk: a clean end
            else:
                _cut(self.connection)
                self.close_connection = True
        except OSError:
            self.close_connection = True  # the client went away mid-write
        finally:
            self.api._close_watch(watch)

    def _stream(self, watch: _Watch, deadline: Optional[float]) -> str:
        """Send the watch's events as JSON lines until an "end", a "break", the deadline or a gone client."""
        while True:
            wait = WATCH_POLL if deadline is None else min(WATCH_POLL, deadline - time.monotonic())
            if wait <= 0:
                return "end"
            try:
                item, payload = watch.queue.get(timeout=wait)
            except queue.Empty:
                if self._client_gone():
                    return "break"
                continue
            if item != "event":
                return item
            self._chunk(json.dumps(payload).encode() + b"\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _client_gone(self) -> bool:
        """Has the peer closed its side? (Readable with nothing to read means EOF.)"""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            peeked: bytes = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True
        return not peeked
