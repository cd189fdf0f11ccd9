"""HTTP endpoints of the daemon: ``/healthz``, ``/readyz`` and ``/metrics``.

    servers = serve(loop, metrics, health_port=9879, metrics_port=9878)
    ...
    for s in servers: s.shutdown()

- ``/healthz``: 200 while the reconcile loop beats (the kubelet restarts a
  stuck agent; the datapath stays in the kernel meanwhile);
- ``/readyz``: 200 once the first reconcile succeeded with every known peer
  served or explicitly blocked, 503 with the reason before;
- ``/metrics``: the Prometheus text format from the agent's registry.

Both ports serve all three paths (the DaemonSet probes the health port and
Prometheus scrapes the metrics port; one handler keeps them consistent). The
agent runs with the host network, so the ports are the node's. One thread
per server; requests are tiny.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.cluster.metrics import Metrics

log = logging.getLogger(__name__)


class Health:
    """What the endpoints ask: is the loop alive, is it ready, and if not why."""

    def __init__(self, alive: Callable[[], bool], ready: Callable[[], bool], reason: Callable[[], str]) -> None:
        self.alive, self.ready, self.reason = alive, ready, reason


def _handler(health: Health, metrics: Metrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "sealnet-agent"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ok = health.alive()
                self._send(200 if ok else 503, b"ok\n" if ok else b"reconcile loop stuck\n")
            elif path == "/readyz":
                if health.ready():
                    self._send(200, b"ok\n")
                else:
                    self._send(503, f"not ready: {health.reason()}\n".encode())
            elif path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b"not found: /healthz /readyz /metrics\n")

        def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - probes every few s: debug only
            log.debug("http %s", format % args)

    return Handler


def serve(health: Health, metrics: Metrics, ports: list[int], address: str = "") -> list[ThreadingHTTPServer]:
    """Start one server per distinct port, each in a daemon thread."""
    servers = []
    for port in dict.fromkeys(ports):
        server = ThreadingHTTPServer((address, port), _handler(health, metrics))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name=f"http-{port}", daemon=True).start()
        servers.append(server)
        log.info("serving /healthz /readyz /metrics address=%s port=%d", address or "*", port)
    return servers
