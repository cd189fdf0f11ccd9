"""Routes and policy rules of the WireGuard datapath, on one raw rtnetlink socket.

Reads and writes :class:`agent.wireguard.plan.Route` and :class:`agent.wireguard.plan.Rule`.
Ours are told apart by table and protocol (``RTPROT_SEALNET`` on routes,
FRA_PROTOCOL on rules): nothing else in the table or the rule list is read
as ours, changed or removed::

    with Routing() as routing:
        have = routing.routes(table=51871, ifindex=idx)     # route keys, see route_key()
        rules = routing.rules(table=51871, priority=871)
        failures = routing.apply(idx, add_routes, del_routes, add_rules, del_rules)

One device (an ifindex) or several: during a WireGuard key rotation the
peers' routes are spread over two interfaces, ``{ifindex: name}`` for
reading and ``{name: ifindex}`` for writing, and a route names its device
in ``Route.dev`` ("" = the one device given). Moving a route to the other
device is one replace, never a delete and an add.

Reading: one dump of our table alone. With NETLINK_GET_STRICT_CHK the
kernel filters the dump by RTA_TABLE and rtm_protocol (Linux >= 4.20), so a
node with a large main table or many CNI tables costs nothing here; the
answers are parsed with ``struct`` for the five attributes we compare, and
filtered again in userspace (older kernels ignore the filter). A route comes
back as a key of plain bytes and ints (:func:`route_key`), so a pass where
nothing changed compares two sets of tuples and builds no object.

Writing: RTM_NEWROUTE / RTM_NEWRULE / RTM_DELRULE / RTM_DELROUTE requests,
encoded straight to bytes, go many per sendmsg() with an ack asked of the
last of each batch only, as :mod:`agent.kernel.nlbatch` batches XFRM
objects (same kernel contract, without a Python object per request). The
kernel answers every failure anyway, so each one is named (errno and the
kernel's extended-ack text) while the rest of the batch still applies.

The socket is opened in the calling process's network namespace, the one
where the agent's IPRoute and backend live.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from agent.errors import KernelError
from agent.kernel.nlbatch import NETLINK_CAP_ACK, REPLY_TIMEOUT, extack
from agent.wireguard.plan import RTPROT_SEALNET, Route, Rule

RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_DUMP_INTR = 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12
RTA_DST, RTA_OIF, RTA_PRIORITY, RTA_PREFSRC, RTA_TABLE = 1, 4, 6, 7, 15
FRA_SRC, FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_PROTOCOL = 2, 6, 10, 15, 21
FR_ACT_TO_TBL = 1

RTN_UNICAST = 1
RTN_UNREACHABLE = 7
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_TABLE_COMPAT = 252  # rtm_table when the id needs RTA_TABLE (> 255)
FIB_RULE_INVERT = 0x2
BATCH = 256  # requests per sendmsg(); their error answers stay far below the receive buffer
DUMP_RETRIES = 3  # a dump interrupted by a concurrent change (NLM_F_DUMP_INTR) is read again
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}
_TYPE = {"unicast": RTN_UNICAST, "unreachable": RTN_UNREACHABLE}
_TYPE_NAME = {RTN_UNICAST: "unicast", RTN_UNREACHABLE: "unreachable"}
_RTMSG = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table protocol scope type flags
_NLHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_SEQ = struct.Struct("=I")  # nlmsg_seq, at offset 8 of the header
_FLAGS = struct.Struct("=H")  # nlmsg_flags, at offset 6

#: (IP version, destination address bytes, prefix length, metric, rtm_type, preferred source bytes or None,
#: device name: "" for unreachable routes and in single-device use)
RouteKey = tuple[int, bytes, int, int, int, Optional[bytes], str]
#: ifindex -> device name (reading), device name -> ifindex (writing); a bare ifindex is {ifindex: ""}
Devices = Union[int, Mapping[int, str]]
DeviceIndexes = Union[int, Mapping[str, int]]


def route_key(route: Route) -> RouteKey:
    """A route as the kernel's dump describes it: what :meth:`Routing.routes` returns."""
    unicast = route.type == "unicast"
    return (route.dst.version, route.dst.network_address.packed, route.dst.prefixlen, route.metric,
            _TYPE[route.type], route.src.packed if route.src is not None else None, route.dev if unicast else "")


def route_of_key(key: RouteKey, table: int) -> Route:
    version, dst, dst_len, metric, rtype, src, dev = key
    return Route(ipaddress.ip_network((ipaddress.ip_address(dst), dst_len)), table, _TYPE_NAME[rtype],  # type: ignore[arg-type]
                 ipaddress.ip_address(src) if src is not None else None, metric, dev)


def _attrs(data: bytes, pos: int, end: int) -> dict[int, bytes]:
    out = {}
    while pos + 4 <= end:
        alen, atype = _NLA.unpack_from(data, pos)
        if alen < 4:
            break
        out[atype & 0x3FFF] = data[pos + 4:pos + alen]
        pos += (alen + 3) & ~3
    return out


def _nla(atype: int, payload: bytes) -> bytes:
    return _NLA.pack(4 + len(payload), atype) + payload + b"\0" * (-len(payload) % 4)


def _u32(atype: int, value: int) -> bytes:
    return _NLA.pack(8, atype) + _U32.pack(value)


def open_route_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
        # Errors echo only the failed request's header, with the kernel's text.
        for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK):
            try:
                sock.setsockopt(SOL_NETLINK, option, 1)
            except OSError:
                pass  # older kernel: unfiltered dumps (filtered here too), plain errors
    except OSError:
        sock.close()
        raise
    return sock


class Routing:
    def __init__(self, ipr: Any = None, protocol: int = RTPROT_SEALNET, sock: Any = None) -> None:
        # ``ipr`` is accepted for callers that pass their IPRoute; this class
        # speaks rtnetlink on its own socket in the same namespace.
        self.protocol = protocol
        self._sock = sock if sock is not None else open_route_socket()
        self._own = sock is None
        self._seq = 0
        self._interrupted = False  # the last dump answered with NLM_F_DUMP_INTR

    def close(self) -> None:
        if self._own:
            self._sock.close()

    def __enter__(self) -> "Routing":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- read ------------------------------------------------------------------

    def routes(self, table: int, ifindex: Devices) -> set[RouteKey]:
        """Our routes in ``table`` as :func:`route_key` tuples.

        A unicast route of ours through a device not in ``ifindex`` does not
        count as present: the diff adds the right one, which replaces it."""
        devices = {ifindex: ""} if isinstance(ifindex, int) else ifindex
        # rtm_table 0 with RTA_TABLE: the table filter; rtm_protocol: the protocol filter.
        body = _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, self.protocol, 0, 0, 0) + _u32(RTA_TABLE, table)
        found: set[RouteKey] = set()
        protocol = self.protocol
        unpack_rtmsg, unpack_nla, unpack_u32 = _RTMSG.unpack_from, _NLA.unpack_from, _U32.unpack_from
        for data, offset, end in self._dump(RTM_GETROUTE, body, f"route dump table {table}"):
            family, dst_len, _, _, rtm_table, proto, _, rtype, _ = unpack_rtmsg(data, offset + 16)
            if proto != protocol or (rtype != RTN_UNICAST and rtype != RTN_UNREACHABLE) or family not in _VERSION:
                continue
            # Only the five attributes compared are decoded.
            dst = src = None
            metric = oif = 0
            pos = offset + 28
            while pos + 4 <= end:
                alen, atype = unpack_nla(data, pos)
                if alen < 4:
                    break
                if atype == RTA_DST:
                    dst = data[pos + 4:pos + alen]
                elif atype == RTA_TABLE:
                    rtm_table = unpack_u32(data, pos + 4)[0]
                elif atype == RTA_PRIORITY:
                    metric = unpack_u32(data, pos + 4)[0]
                elif atype == RTA_OIF:
                    oif = unpack_u32(data, pos + 4)[0]
                elif atype == RTA_PREFSRC:
                    src = data[pos + 4:pos + alen]
                pos += (alen + 3) & ~3
            if rtm_table != table or dst is None:  # another table (unfiltered dump), or a default route: never ours
                continue
            dev = ""
            if rtype == RTN_UNICAST:
                name = devices.get(oif)
                if name is None:
                    continue
                dev = name
            else:
                src = None
            found.add((_VERSION[family], dst, dst_len, metric, rtype, src, dev))
        return found

    def rules(self, table: int, priority: int) -> set[Rule]:
        """Our rules at ``priority`` that look up ``table``, both families (one dump)."""
        body = _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)  # fib_rule_hdr has rtmsg's layout
        found: set[Rule] = set()
        for data, offset, end in self._dump(RTM_GETRULE, body, "rule dump"):
            family, _, src_len, _, hdr_table, _, _, _, flags = _RTMSG.unpack_from(data, offset + 16)
            if family not in _VERSION:
                continue
            attrs = _attrs(data, offset + 28, end)
            got = attrs.get(FRA_TABLE)
            prio = attrs.get(FRA_PRIORITY)
            proto = attrs.get(FRA_PROTOCOL)
            if ((_U32.unpack(got)[0] if got is not None else hdr_table) != table
                    or (_U32.unpack(prio)[0] if prio is not None else 0) != priority
                    or (proto[0] if proto else 0) != self.protocol):
                continue
            src = attrs.get(FRA_SRC)
            mark = attrs.get(FRA_FWMARK)
            found.add(Rule(
                _VERSION[family], priority, table,
                src=ipaddress.ip_network((ipaddress.ip_address(src), src_len)) if src else None,
                not_fwmark=_U32.unpack(mark)[0] if mark is not None and flags & FIB_RULE_INVERT else None,
            ))
        return found

    def read(self, table: int, ifindex: Devices, priority: int) -> tuple[set[Route], set[Rule]]:
        """Routes as Route objects and rules: for tools and tests; reconcile compares keys."""
        return {route_of_key(k, table) for k in self.routes(table, ifindex)}, self.rules(table, priority)

    def _dump(self, mtype: int, body: bytes, what: str) -> list[tuple[bytes, int, int]]:
        """(datagram, offset, end) of each answer to a dump request.

        AF_UNSPEC: every family in one dump (as `ip route show table T`
        asks); a table missing in one family is an empty answer, not ENOENT.
        A dump interrupted by a concurrent change is read again."""
        for _ in range(DUMP_RETRIES):
            seq = self._next_seq(1)
            self._send(_NLHDR.pack(16 + len(body), mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body, what)
            found: list[tuple[bytes, int, int]] = []
            refused = self._receive(seq, seq, what, found, mtype - 2)  # RTM_NEWROUTE / RTM_NEWRULE answer a GET
            if seq in refused:
                code, text = refused[seq]
                raise KernelError(_error(what, code, text), code)
            if not self._interrupted:
                return found
        raise KernelError(f"{what}: interrupted by concurrent changes {DUMP_RETRIES} times", errno.EINTR)

    def _write(self, msgs: list[bytes], what: str) -> dict[int, tuple[int, str]]:
        """Send pre-encoded requests (sequence 0, no NLM_F_ACK) in batches of BATCH.

        As agent.kernel.nlbatch does for XFRM: one sendmsg() per batch, an
        ack asked of its last request only; the kernel answers each failure
        on its own. Returns {index in msgs: (errno, extended-ack text)} of
        the refused ones."""
        refused: dict[int, tuple[int, str]] = {}
        for start in range(0, len(msgs), BATCH):
            chunk = msgs[start:start + BATCH]
            first = self._next_seq(len(chunk))
            buf = bytearray().join(chunk)
            pos = 0
            for i, msg in enumerate(chunk):
                _SEQ.pack_into(buf, pos + 8, first + i)
                pos += len(msg)
            last = pos - len(chunk[-1])
            _FLAGS.pack_into(buf, last + 6, _FLAGS.unpack_from(buf, last + 6)[0] | NLM_F_ACK)  # the batch's end
            self._send(bytes(buf), what)
            for seq, answer in self._receive(first, first + len(chunk) - 1, what, None, 0).items():
                refused[start + seq - first] = answer
        return refused

    def _next_seq(self, count: int) -> int:
        if self._seq + count >= 0xFFFFFFFF:
            self._seq = 0
        first = self._seq + 1
        self._seq += count
        return first

    def _send(self, data: bytes, what: str) -> None:
        try:
            self._sock.send(data)
        except OSError as e:
            raise KernelError(f"{what}: netlink send failed: {e}", e.errno) from e

    def _receive(self, first: int, last: int, what: str, answers: Optional[list[tuple[bytes, int, int]]],
                 answer_type: int) -> dict[int, tuple[int, str]]:
        """Read until ``last`` is answered (its ack, error or NLMSG_DONE).

        Collects into ``answers`` the messages of ``answer_type`` (a dump's)
        and returns {sequence: (errno, text)} of every refused request in
        [first, last]; anything else on the socket (stale answers) is skipped."""
        refused: dict[int, tuple[int, str]] = {}
        self._interrupted = False
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        while True:
            if not poller.poll(REPLY_TIMEOUT * 1000):
                raise KernelError(f"{what}: no answer from the kernel in {REPLY_TIMEOUT:.0f} s")
            try:
                data = self._sock.recv(1 << 16)  # a dump datagram is at most 32 KiB
            except BlockingIOError:
                continue
            except OSError as e:  # ENOBUFS: answers were dropped
                raise KernelError(f"{what}: netlink receive failed: {e}", e.errno) from e
            offset, size, done = 0, len(data), False
            while offset + 16 <= size:
                length, mtype, flags, seq, _ = _NLHDR.unpack_from(data, offset)
                if length < 16:
                    break
                if first <= seq <= last:
                    if mtype == NLMSG_ERROR or mtype == NLMSG_DONE:
                        code = -_I32.unpack_from(data, offset + 16)[0] if length >= 20 else 0
                        if code:
                            refused[seq] = (code, extack(data, offset, length, flags) if mtype == NLMSG_ERROR else "")
                        done |= seq == last
                    elif mtype == answer_type and answers is not None and length >= 28:
                        answers.append((data, offset, offset + length))
                        self._interrupted |= bool(flags & NLM_F_DUMP_INTR)
                offset += (length + 3) & ~3
            if done:
                return refused

    # -- write -----------------------------------------------------------------

    def apply(self, ifindex: DeviceIndexes, add_routes: Iterable[Route], del_routes: Iterable[Route],
              add_rules: Iterable[Rule], del_rules: Iterable[Rule]) -> list[str]:
        """Add (replace) and delete, in this order: route adds, rule adds,
        rule deletes, route deletes. One line per failure, [] when all applied."""
        adds, dels = sorted(add_routes, key=_order), sorted(del_routes, key=_order)
        rules_in, rules_out = sorted(add_rules, key=_rule_order), sorted(del_rules, key=_rule_order)
        new_route = self._new_route(ifindex)
        msgs = [new_route(r) for r in adds]
        msgs += [self._rule_msg(RTM_NEWRULE, r) for r in rules_in]
        msgs += [self._rule_msg(RTM_DELRULE, r) for r in rules_out]
        msgs += [self._del_route(r) for r in dels]
        if not msgs:
            return []
        failures = []
        objs: list[Any] = [*adds, *rules_in, *rules_out, *dels]
        bounds = (len(adds), len(adds) + len(rules_in), len(adds) + len(rules_in) + len(rules_out))
        for index, (code, text) in sorted(self._write(msgs, "routes and rules").items()):
            obj = objs[index]
            if index < bounds[0]:
                verb, what, already = "route add", _describe(obj), None
            elif index < bounds[1]:
                verb, what, already = "rule add", describe_rule(obj), errno.EEXIST
            elif index < bounds[2]:
                verb, what, already = "rule del", describe_rule(obj), errno.ENOENT
            else:
                verb, what, already = "route delete", _describe(obj), errno.ESRCH  # already gone
            if code != already:
                failures.append(_error(f"{verb} {what}", code, text))
        return failures

    def _new_route(self, ifindex: DeviceIndexes) -> Callable[[Route], bytes]:
        """The RTM_NEWROUTE encoder for routes through ``ifindex`` (by ``Route.dev``)."""
        heads: dict[tuple[int, int, bool, int], bytes] = {}
        oifs = {name: _u32(RTA_OIF, index)
                for name, index in ({"": ifindex} if isinstance(ifindex, int) else ifindex).items()}

        def encode(route: Route) -> bytes:
            dst = route.dst
            unicast = route.type == "unicast"
            shape = (dst.version, dst.prefixlen, unicast, route.table)
            head = heads.get(shape)
            if head is None:
                # Replace, not exclusive create: a route that differs only in type or
                # source is switched in place, never removed first (no gap).
                head = heads[shape] = self._route_head(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, route)
            tail = _nla(RTA_DST, dst.network_address.packed) + _u32(RTA_PRIORITY, route.metric)
            if unicast:
                oif = oifs.get(route.dev)
                if oif is None:
                    raise KernelError(f"route {_describe(route)}: device {route.dev or '(default)'} is not one of "
                                      f"{', '.join(n or '(default)' for n in oifs)}")
                tail += oif
                if route.src is not None:
                    tail += _nla(RTA_PREFSRC, route.src.packed)
            return _with_length(head + tail)

        return encode

    def _del_route(self, route: Route) -> bytes:
        return _with_length(self._route_head(RTM_DELROUTE, 0, route)
                            + _nla(RTA_DST, route.dst.network_address.packed) + _u32(RTA_PRIORITY, route.metric))

    def _route_head(self, command: int, flags: int, route: Route) -> bytes:
        """Netlink header (length 0, to be set), rtmsg and RTA_TABLE."""
        unicast = route.type == "unicast"
        return (_NLHDR.pack(0, command, NLM_F_REQUEST | flags, 0, 0)
                + _RTMSG.pack(_AF[route.dst.version], route.dst.prefixlen, 0, 0,
                              route.table if route.table <= 255 else RT_TABLE_COMPAT, self.protocol,
                              RT_SCOPE_LINK if unicast else RT_SCOPE_UNIVERSE,
                              RTN_UNICAST if unicast else RTN_UNREACHABLE, 0)
                + _u32(RTA_TABLE, route.table))

    def _rule_msg(self, command: int, rule: Rule) -> bytes:
        src_len = rule.src.prefixlen if rule.src is not None else 0
        flags = FIB_RULE_INVERT if rule.not_fwmark is not None else 0
        # Exclusive create: without NLM_F_EXCL the kernel adds a duplicate rule.
        nl_flags = NLM_F_REQUEST | (NLM_F_CREATE | NLM_F_EXCL if command == RTM_NEWRULE else 0)
        parts = [_NLHDR.pack(0, command, nl_flags, 0, 0),
                 _RTMSG.pack(_AF[rule.family], 0, src_len, 0, rule.table if rule.table <= 255 else RT_TABLE_COMPAT,
                             0, 0, FR_ACT_TO_TBL, flags),
                 _u32(FRA_PRIORITY, rule.priority), _u32(FRA_TABLE, rule.table),
                 _nla(FRA_PROTOCOL, bytes([self.protocol]))]
        if rule.src is not None:
            parts.append(_nla(FRA_SRC, rule.src.network_address.packed))
        if rule.not_fwmark is not None:
            parts.append(_u32(FRA_FWMARK, rule.not_fwmark))
        return _with_length(b"".join(parts))


def _with_length(msg: bytes) -> bytes:
    return _U32.pack(len(msg)) + msg[4:]


def _error(what: str, code: int, text: str) -> str:
    """A refused request as one line: object, strerror, errno name, the kernel's text."""
    return f"{what}: {os.strerror(code)} ({errno.errorcode.get(code, '?')})" + (f": {text}" if text else "")


def describe_rule(rule: Rule) -> str:
    sel = f"not fwmark {rule.not_fwmark:#x}" if rule.not_fwmark is not None else f"from {rule.src or 'all'}"
    return f"{rule.priority}: {sel} lookup {rule.table} (IPv{rule.family})"


def _describe(route: Route) -> str:
    src = f" src {route.src}" if route.src else ""
    dev = f" dev {route.dev}" if route.dev and route.type == "unicast" else ""
    return f"{route.type} {route.dst}{dev} table {route.table}{src} metric {route.metric}"


def _order(route: Route) -> tuple[int, int, int, int]:
    return (route.dst.version, int(route.dst.network_address), route.dst.prefixlen, route.metric)


def _rule_order(rule: Rule) -> tuple[int, str, int]:
    return (rule.family, str(rule.src), rule.not_fwmark or 0)


def diff_routes(want: Iterable[Route], have: set[RouteKey], table: int) -> tuple[list[Route], list[Route]]:
    """(routes to add, routes to delete) between the plan's routes and :meth:`Routing.routes`.

    A route whose (dst, metric) stays but whose type or source changed is
    replaced in place by the add (never a moment without it); only what is
    gone is deleted."""
    wanted = {route_key(r): r for r in want}
    if wanted.keys() == have:
        return [], []
    add = [wanted[k] for k in wanted.keys() - have]
    slots = {k[:4] for k in wanted}
    delete = [route_of_key(k, table) for k in have - wanted.keys() if k[:4] not in slots]
    return add, delete
