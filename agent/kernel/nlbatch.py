"""Batched netlink requests: many messages per sendmsg(), one answer each.

Writing thousands of XFRM objects one request and one wait at a time costs
a round trip each. A :class:`Batcher` encodes up to ``batch_size``
requests into one datagram. The kernel handles every message of it, in
order, inside that sendmsg() (netlink_rcv_skb() in the sender's context),
and answers failures always but successes only when asked (NLM_F_ACK). So
writes go without NLM_F_ACK except the last of each batch, whose answer
marks the end: by then every failure before it has been queued. Requests
that expect data (get, dump) are answered anyway. Batches stay small
enough that their answers fit the socket's receive buffer.

Usage::

    batcher = Batcher(sock, msg_map={XFRM_MSG_NEWSA: xfrm_usersa_info})
    requests = [Request(msg, "add sa ...") for msg in msgs]
    batcher.exchange(requests, expect_reply=False)
    errors = [r.error() for r in requests if r.code]

Errors come back as errno plus the kernel's extended-ack text; with
NETLINK_CAP_ACK set on the socket the kernel echoes only the failed
request's header, so a request carrying keys never travels back.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import struct
from typing import Any, Mapping, Protocol, Sequence

from pyroute2.netlink import (
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP_INTR, NLM_F_MULTI, NLMSG_DONE, NLMSG_ERROR,
)

from agent.errors import KernelError

NETLINK_CAP_ACK = 10  # linux/netlink.h socket option
NLMSGERR_ATTR_MSG = 1
REPLY_TIMEOUT = 10.0  # seconds without an answer before the kernel counts as stuck


class Transport(Protocol):
    """What a Batcher needs of its socket: pyroute2's NetlinkSocket, or a
    plain ``socket.socket(AF_NETLINK, SOCK_RAW, family)``."""

    def send(self, data: bytes) -> int: ...
    def recv(self, bufsize: int) -> bytes: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


class Request:
    """One message and what became of it; ``what`` names the object for errors."""

    __slots__ = ("msg", "what", "replies", "code", "extack", "done", "intr")

    def __init__(self, msg: Any, what: str) -> None:
        self.msg, self.what = msg, what
        self.replies: list[Any] = []
        self.code, self.extack, self.done, self.intr = 0, "", False, False

    def error(self) -> KernelError:
        """The failure as a KernelError: object, strerror, errno name, kernel text."""
        name = errno.errorcode.get(self.code, "?")
        why = f"{os.strerror(self.code)} ({name})" + (f": {self.extack}" if self.extack else "")
        return KernelError(f"{self.what}: {why}", self.code)


class Batcher:
    """Runs :class:`Request` lists over one socket; see the module doc."""

    def __init__(self, sock: Transport, msg_map: Mapping[int, type], batch_size: int = 128) -> None:
        self.sock, self.msg_map, self.batch_size = sock, msg_map, batch_size
        self._seq = itertools.count(1)

    def exchange(self, requests: Sequence[Request], expect_reply: bool) -> None:
        """Send requests in batches; fill in each one's code and replies."""
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            by_seq = {}
            for i, request in enumerate(batch):
                header = request.msg["header"]
                seq = header["sequence_number"] = next(self._seq) & 0xFFFFFFFF or 1
                if i == len(batch) - 1 and not expect_reply:
                    header["flags"] |= NLM_F_ACK  # the batch's end marker
                request.msg.encode()
                by_seq[seq] = request
            try:
                self.sock.send(b"".join(bytes(r.msg.data) for r in batch))
            except OSError as e:
                raise KernelError(f"{batch[0].what}: netlink send failed: {e}", e.errno) from e
            self._receive(by_seq, batch[-1])

    def _receive(self, by_seq: dict[int, Request], last: Request) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        while not last.done:
            if not poller.poll(REPLY_TIMEOUT * 1000):
                raise KernelError(f"{last.what}: no answer from the kernel in {REPLY_TIMEOUT:.0f} s")
            try:
                data = self.sock.recv(65536)  # a dump datagram is at most 32 KiB
            except BlockingIOError:
                continue
            except OSError as e:  # ENOBUFS: answers were dropped
                raise KernelError(f"{last.what}: netlink receive failed: {e}", e.errno) from e
            self._dispatch(data, by_seq)

    def _dispatch(self, data: bytes, by_seq: dict[int, Request]) -> None:
        offset = 0
        while offset + 16 <= len(data):
            length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", data, offset)
            request = by_seq.get(seq)  # anything else is not ours (stale, multicast)
            if request is not None:
                if mtype in (NLMSG_ERROR, NLMSG_DONE):
                    request.code = -struct.unpack_from("=i", data, offset + 16)[0]
                    if mtype == NLMSG_ERROR:
                        request.extack = extack(data, offset, length, flags)
                    request.done = True
                elif mtype in self.msg_map:
                    msg = self.msg_map[mtype](data, offset=offset)
                    msg.decode()
                    request.replies.append(msg)
                    request.intr |= bool(flags & NLM_F_DUMP_INTR)
                    request.done = not flags & NLM_F_MULTI
            offset += (length + 3) & ~3 if length else len(data)


def extack(data: bytes, offset: int, length: int, flags: int) -> str:
    """NLMSGERR_ATTR_MSG of the error message at ``offset``, or "".

    The attributes follow the echoed request (its header only when capped).
    pyroute2 0.9.7's nlmsgerr looks for them right after the errno, where
    the echo sits, so it is not used here."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    echoed = struct.unpack_from("=I", data, offset + 20)[0]
    pos = offset + 20 + (16 if flags & NLM_F_CAPPED else (echoed + 3) & ~3)
    end = offset + length
    while pos + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, pos)
        if alen < 4:
            break
        if atype == NLMSGERR_ATTR_MSG:
            return bytes(data[pos + 4:pos + alen]).split(b"\0", 1)[0].decode("ascii", "replace")
        pos += (alen + 3) & ~3
    return ""
