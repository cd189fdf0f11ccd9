"""Continuous sequence-numbered UDP between two pods, with exact loss accounting.

For the zero-loss claims (rotation, reconcile under traffic): every datagram
carries a 64-bit sequence number; the receiver keeps a bitmap, so at the end
we know exactly which datagrams were lost, duplicated or reordered, and the
longest run of consecutive losses (the traffic gap, in datagrams and ms).

    with Flow(cluster, src_pod, dst_pod, rate=500) as flow:
        ...  # rotate keys, restart the agent, ...
    result = flow.result
    assert result.lost == 0, result

The two ends also run standalone (``python -m lab.udpflow send|recv``) and
print one JSON line when stopped with SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

HEADER = struct.Struct("!QQ")  # sequence number, send time (ns)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Stop:
    def __init__(self) -> None:
        self.stopped = False
        signal.signal(signal.SIGINT, self._set)
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, *_: object) -> None:
        self.stopped = True


def send(dst: str, port: int, rate: float, size: int) -> dict[str, Any]:
    stop = _Stop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    interval = 1.0 / rate
    pad = b"\0" * max(0, size - HEADER.size)
    print("ready", flush=True)
    seq, errors, start = 0, 0, time.monotonic()
    while not stop.stopped:
        try:
            sock.sendto(HEADER.pack(seq, time.monotonic_ns()) + pad, (dst, port))
        except OSError:
            errors += 1  # e.g. EPERM from a block policy: counted as sent and lost
        seq += 1
        delay = start + seq * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return {"sent": seq, "send_errors": errors, "interval_ms": interval * 1000}


def recv(port: int) -> dict[str, Any]:
    stop = _Stop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("0.0.0.0", port))
    sock.settimeout(0.1)
    seen = bytearray()
    received = duplicates = reordered = 0
    highest = -1
    print("ready", flush=True)
    while not stop.stopped:
        try:
            data = sock.recv(65535)
        except socket.timeout:
            continue
        except InterruptedError:
            continue
        seq, _ = HEADER.unpack_from(data)
        if seq >= len(seen):
            seen.extend(b"\0" * (seq + 1 - len(seen) + 4096))
        if seen[seq]:
            duplicates += 1
            continue
        seen[seq] = 1
        received += 1
        if seq < highest:
            reordered += 1
        highest = max(highest, seq)
    return {"received": received, "duplicates": duplicates, "reordered": reordered,
            "bitmap": seen[: highest + 1].hex()}


@dataclass(frozen=True)
class FlowResult:
    sent: int
    received: int
    lost: int
    duplicates: int
    reordered: int
    longest_gap: int  # consecutive lost datagrams
    gap_ms: float
    send_errors: int

    def __str__(self) -> str:
        return (f"sent={self.sent} received={self.received} lost={self.lost} dup={self.duplicates} "
                f"reordered={self.reordered} longest_gap={self.longest_gap} ({self.gap_ms:.0f} ms)")


class Flow:
    """A sender in ``src.ns`` and a receiver in ``dst.ns`` for a ``with`` block."""

    def __init__(self, src_ns: str, dst_ns: str, dst_ip: str, port: int = 5001, rate: float = 200,
                 size: int = 64) -> None:
        self.src_ns, self.dst_ns, self.dst_ip = src_ns, dst_ns, dst_ip
        self.port, self.rate, self.size = port, rate, size
        self.result: Optional[FlowResult] = None
        self._recv: Optional[subprocess.Popen[str]] = None
        self._send: Optional[subprocess.Popen[str]] = None

    def _spawn(self, ns: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "lab.udpflow", *args],
                                cwd=ROOT, stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> "Flow":
        self._recv = self._spawn(self.dst_ns, "recv", "--port", str(self.port))
        assert self._recv.stdout is not None
        if self._recv.stdout.readline().strip() != "ready":
            raise RuntimeError("udpflow receiver did not start")
        self._send = self._spawn(self.src_ns, "send", "--dst", self.dst_ip, "--port", str(self.port),
                                 "--rate", str(self.rate), "--size", str(self.size))
        # Wait for the sender too: in the lab VM its start alone can take
        # seconds, and a stop() before it runs would find nothing sent.
        assert self._send.stdout is not None
        if self._send.stdout.readline().strip() != "ready":
            raise RuntimeError("udpflow sender did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.result = self.stop()

    def stop(self) -> FlowResult:
        assert self._send is not None and self._recv is not None
        self._send.send_signal(signal.SIGINT)
        sent = json.loads(self._send.communicate(timeout=30)[0])
        time.sleep(0.5)  # datagrams in flight
        self._recv.send_signal(signal.SIGINT)
        got = json.loads(self._recv.communicate(timeout=30)[0])
        bitmap = bytes.fromhex(got["bitmap"]).ljust(sent["sent"], b"\0")[: sent["sent"]]
        longest = run = 0
        for bit in bitmap:
            run = 0 if bit else run + 1
            longest = max(longest, run)
        return FlowResult(
            sent=sent["sent"], received=got["received"], lost=sent["sent"] - got["received"],
            duplicates=got["duplicates"], reordered=got["reordered"], longest_gap=longest,
            gap_ms=longest * sent["interval_ms"], send_errors=sent["send_errors"],
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.udpflow")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("--dst", required=True)
    s.add_argument("--port", type=int, default=5001)
    s.add_argument("--rate", type=float, default=200)
    s.add_argument("--size", type=int, default=64)
    r = sub.add_parser("recv")
    r.add_argument("--port", type=int, default=5001)
    args = parser.parse_args()
    out = send(args.dst, args.port, args.rate, args.size) if args.cmd == "send" else recv(args.port)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
