"""Sockets in another network namespace, from this process.

A network namespace is a property of a socket, fixed when it is made, and
setns(2) switches only the calling thread. So a short-lived thread can enter
a namespace, make a socket and end, and the socket goes on working in that
namespace from any thread of ours. That is how the tests put the fake
Kubernetes API server on a lab cluster's underlay (where the agents in the
node namespaces reach it, as kubelets reach a real one) and how they call
an agent's HTTP port inside its node namespace::

    sock = listening_socket("t1-ul", "172.18.0.1", 0)          # serve on the underlay
    body = http_get("t1-n1", "127.0.0.1", 9879, "/readyz")       # (status, text) from inside node 1

Python 3.11 has no os.setns, so libc's is called through ctypes. Needs root.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from typing import Callable, TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


def run_in(ns: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a new thread that has entered network namespace ``ns``; its result."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            error.append(e)

    thread = threading.Thread(target=body, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def listening_socket(ns: str, host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` in namespace ``ns``, listening."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        return sock

    return run_in(ns, make)


def connected_socket(ns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    return run_in(ns, lambda: socket.create_connection((host, port), timeout=timeout))


def http_get(ns: str, host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """``GET path`` on ``host:port`` as seen from namespace ``ns``: (status, body)."""
    sock = connected_socket(ns, host, port, timeout)
    try:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode(errors="replace")
