"""XFRM netlink messages (IPsec SAs and policies) on pyroute2's nlmsg framework.

pyroute2 ships no XFRM SA/policy messages, so this module declares them from
the uapi header ``linux/xfrm.h``, which is the spec: constants keep the
kernel's spelling and enum order, and there is one lower-case class per
kernel struct. Nothing here talks to a socket or knows about sealnet's
model; :mod:`agent.kernel.xfrm` does that.

Usage::

    msg = xfrm_userpolicy_info()
    msg["sel"] = {"saddr": ip_address("10.0.1.0"), "prefixlen_s": 24,
                  "daddr": ip_address("10.0.2.0"), "prefixlen_d": 24,
                  "family": AF_INET}
    msg["lft"] = LIFETIME_INFINITE
    msg["dir"] = XFRM_POLICY_OUT
    msg["attrs"] = [("XFRMA_TMPL", [{"id": {...}, "family": AF_INET, ...}])]
    msg["header"]["type"] = XFRM_MSG_NEWPOLICY
    msg.encode()                      # msg.data is the wire form
    back = xfrm_userpolicy_info(msg.data); back.decode()

How structs are encoded: the kernel structs nest (``xfrm_usersa_info``
holds a selector, an id, lifetimes and stats) and mix host and network
byte order. Each class lists its members in ``fields`` as pyroute2 does;
a member's format is either a ``struct`` code ('I', '>H' for __be16,
'3x' for the compiler's padding) or another struct class. On first use a
class flattens its fields into one precompiled ``struct.Struct`` (the
layout is checked against ``sizeof`` in the unit tests), so a message
packs in one call; this is what makes thousands of policies per second
possible in Python. ``xfrm_address_t`` (a 16-byte union) decodes to an
``ipaddress`` object using the nearest enclosing ``family`` member (or the
message's), and encodes from an ``ipaddress`` object, a string or bytes.

Key material: the flexible ``alg_key`` member decodes to
:class:`agent.model.KeyMaterial`, so a decoded SA that reaches a log line
(pyroute2 logs decoded messages at DEBUG) shows no key.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any, Optional

from pyroute2.netlink import nla, nlmsg, nlmsg_base

from agent.model import KeyMaterial

# enum in linux/xfrm.h: netlink message types
XFRM_MSG_BASE = 0x10
XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_ALLOCSPI = 0x16
XFRM_MSG_ACQUIRE = 0x17
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_POLEXPIRE = 0x1B
XFRM_MSG_FLUSHSA = 0x1C
XFRM_MSG_FLUSHPOLICY = 0x1D
XFRM_MSG_NEWAE = 0x1E
XFRM_MSG_GETAE = 0x1F
XFRM_MSG_REPORT = 0x20
XFRM_MSG_MIGRATE = 0x21
XFRM_MSG_NEWSADINFO = 0x22
XFRM_MSG_GETSADINFO = 0x23
XFRM_MSG_NEWSPDINFO = 0x24
XFRM_MSG_GETSPDINFO = 0x25
XFRM_MSG_MAPPING = 0x26
XFRM_MSG_SETDEFAULT = 0x27
XFRM_MSG_GETDEFAULT = 0x28

# enum xfrm_attr_type_t, in kernel order (the nla_map below relies on it)
XFRMA_NAMES = (
    "XFRMA_UNSPEC", "XFRMA_ALG_AUTH", "XFRMA_ALG_CRYPT", "XFRMA_ALG_COMP",
    "XFRMA_ENCAP", "XFRMA_TMPL", "XFRMA_SA", "XFRMA_POLICY", "XFRMA_SEC_CTX",
    "XFRMA_LTIME_VAL", "XFRMA_REPLAY_VAL", "XFRMA_REPLAY_THRESH",
    "XFRMA_ETIMER_THRESH", "XFRMA_SRCADDR", "XFRMA_COADDR", "XFRMA_LASTUSED",
    "XFRMA_POLICY_TYPE", "XFRMA_MIGRATE", "XFRMA_ALG_AEAD", "XFRMA_KMADDRESS",
    "XFRMA_ALG_AUTH_TRUNC", "XFRMA_MARK", "XFRMA_TFCPAD",
    "XFRMA_REPLAY_ESN_VAL", "XFRMA_SA_EXTRA_FLAGS", "XFRMA_PROTO",
    "XFRMA_ADDRESS_FILTER", "XFRMA_PAD", "XFRMA_OFFLOAD_DEV", "XFRMA_SET_MARK",
    "XFRMA_SET_MARK_MASK", "XFRMA_IF_ID", "XFRMA_MTIMER_THRESH",
)
(XFRMA_UNSPEC, XFRMA_ALG_AUTH, XFRMA_ALG_CRYPT, XFRMA_ALG_COMP, XFRMA_ENCAP,
 XFRMA_TMPL, XFRMA_SA, XFRMA_POLICY, XFRMA_SEC_CTX, XFRMA_LTIME_VAL,
 XFRMA_REPLAY_VAL, XFRMA_REPLAY_THRESH, XFRMA_ETIMER_THRESH, XFRMA_SRCADDR,
 XFRMA_COADDR, XFRMA_LASTUSED, XFRMA_POLICY_TYPE, XFRMA_MIGRATE,
 XFRMA_ALG_AEAD, XFRMA_KMADDRESS, XFRMA_ALG_AUTH_TRUNC, XFRMA_MARK,
 XFRMA_TFCPAD, XFRMA_REPLAY_ESN_VAL, XFRMA_SA_EXTRA_FLAGS, XFRMA_PROTO,
 XFRMA_ADDRESS_FILTER, XFRMA_PAD, XFRMA_OFFLOAD_DEV, XFRMA_SET_MARK,
 XFRMA_SET_MARK_MASK, XFRMA_IF_ID, XFRMA_MTIMER_THRESH) = range(len(XFRMA_NAMES))
XFRMA_OUTPUT_MARK = XFRMA_SET_MARK

XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_POLICY_FWD = 0, 1, 2
XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK = 0, 1
XFRM_POLICY_LOCALOK, XFRM_POLICY_ICMP = 1, 2
XFRM_POLICY_TYPE_MAIN, XFRM_POLICY_TYPE_SUB = 0, 1
XFRM_SHARE_ANY, XFRM_SHARE_SESSION, XFRM_SHARE_USER, XFRM_SHARE_UNIQUE = 0, 1, 2, 3
XFRM_MODE_TRANSPORT, XFRM_MODE_TUNNEL, XFRM_MODE_ROUTEOPTIMIZATION = 0, 1, 2
XFRM_MODE_IN_TRIGGER, XFRM_MODE_BEET = 3, 4
XFRM_STATE_NOECN, XFRM_STATE_DECAP_DSCP, XFRM_STATE_NOPMTUDISC = 1, 2, 4
XFRM_STATE_WILDRECV, XFRM_STATE_ICMP, XFRM_STATE_AF_UNSPEC = 8, 16, 32
XFRM_STATE_ALIGN4, XFRM_STATE_ESN = 64, 128
XFRM_SA_XFLAG_DONT_ENCAP_DSCP, XFRM_SA_XFLAG_OSEQ_MAY_WRAP = 1, 2
XFRM_INF = 0xFFFFFFFFFFFFFFFF
XFRMA_REPLAY_ESN_MAX = 4096
IPPROTO_ESP = socket.IPPROTO_ESP
# iproute2's lifetime for "no limit": byte/packet limits infinite, no timers.
LIFETIME_INFINITE = {
    "soft_byte_limit": XFRM_INF, "hard_byte_limit": XFRM_INF,
    "soft_packet_limit": XFRM_INF, "hard_packet_limit": XFRM_INF,
}

_ADDR, _BE16, _BE32, _CSTR, _PLAIN, _STRUCT = range(6)


class xfrm_address_t:
    """``typedef union { __be32 a4; __be32 a6[4]; struct in6_addr in6; }``."""

    @staticmethod
    def pack(value: Any) -> bytes:
        raw = getattr(value, "packed", None)  # an ipaddress object
        if raw is None:
            if not value:
                return bytes(16)
            if isinstance(value, (bytes, bytearray)):
                raw = bytes(value)
            else:
                raw = ipaddress.ip_address(value).packed
        if len(raw) > 16:
            raise ValueError(f"xfrm_address_t: {len(raw)} bytes, at most 16 fit")
        return raw.ljust(16, b"\0")

    @staticmethod
    def unpack(raw: bytes, family: Optional[int]) -> Any:
        if family == socket.AF_INET:
            return ipaddress.IPv4Address(raw[:4])
        if family == socket.AF_INET6:
            return ipaddress.IPv6Address(raw)
        return raw  # family unknown (0): keep the 16 bytes


class _Layout:
    """One C struct, nested structs included, packed by one ``struct.Struct``.

    ``members`` mirrors ``fields`` without the padding: (name, kind, nested
    layout, width). Packing walks it once collecting the arguments, so a
    policy message costs one ``Struct.pack`` call.
    """

    def __init__(self, fields: tuple, fmt: Optional[list] = None) -> None:
        top = fmt is None
        fmt = ["="] if fmt is None else fmt
        self.members: list[tuple[str, int, Optional[_Layout], int]] = []
        self.has_family = any(name == "family" for name, _ in fields)
        for name, spec in fields:
            if spec is xfrm_address_t:
                fmt.append("16s")
                self.members.append((name, _ADDR, None, 16))
            elif isinstance(spec, type):
                self.members.append((name, _STRUCT, _Layout(getattr(spec, "fields"), fmt), 0))
            elif spec.endswith("x"):
                fmt.append(spec)
            elif spec in (">H", ">I"):
                fmt.append(spec[1])  # swapped by hand: one byte order per Struct
                self.members.append((name, _BE16 if spec == ">H" else _BE32, None, 0))
            elif spec.endswith("s"):
                fmt.append(spec)
                self.members.append((name, _CSTR, None, int(spec[:-1])))
            else:
                fmt.append(spec)
                self.members.append((name, _PLAIN, None, 0))
        if top:
            self.struct = struct.Struct("".join(fmt))
            self.size = self.struct.size
            self._compile_unpack()

    def pack(self, value: Any) -> bytes:
        args: list = []
        self._args(value, args)
        return self.struct.pack(*args)

    def _args(self, value: Any, args: list) -> None:
        get = dict.get  # not nlmsg.get(), which would search the NLAs too
        if not isinstance(value, dict):
            value = {}
        for name, kind, sub, width in self.members:
            v = get(value, name)
            if kind == _PLAIN:
                args.append(v or 0)
            elif kind == _STRUCT:
                sub._args(v, args)  # type: ignore[union-attr]
            elif kind == _ADDR:
                args.append(xfrm_address_t.pack(v))
            elif kind == _BE32:
                args.append(socket.htonl(v or 0))
            elif kind == _BE16:
                args.append(socket.htons(v or 0))
            else:
                raw = v.encode("ascii") if isinstance(v, str) else bytes(v or b"")
                if len(raw) >= width:  # the kernel needs the terminating NUL
                    raise ValueError(f"{name}: {raw!r} is longer than {width - 1}")
                args.append(raw)

    def unpack(self, data: Any, offset: int, family: Optional[int] = None) -> dict:
        nodes: list[dict] = [{} for _ in self.links]
        for (parent, name), node in zip(self.links[1:], nodes[1:]):
            nodes[parent][name] = node
        for (at, name, kind), v in zip(self.plan, self.struct.unpack_from(data, offset)):
            if kind == _BE32:
                v = socket.ntohl(v)
            elif kind == _BE16:
                v = socket.ntohs(v)
            elif kind == _CSTR:
                v = v.split(b"\0", 1)[0].decode("ascii", "replace")
            nodes[at][name] = v
        # addresses decode by the family of the nearest struct that has one
        # (the SA's id.daddr by xfrm_usersa_info.family), else the message's
        for at, name, owner in self.addrs:
            fam = (nodes[owner].get("family") if owner is not None else None) or family
            nodes[at][name] = xfrm_address_t.unpack(nodes[at][name], fam)
        return nodes[0]

    def _compile_unpack(self) -> None:
        """Flatten the member tree: one dict per struct ("node"), linked to its
        parent, and one (node, name, kind) step per unpacked value."""
        self.links: list[tuple[int, str]] = [(-1, "")]
        self.addrs: list[tuple[int, str, Optional[int]]] = []
        self.plan: list[tuple[int, str, int]] = []

        def walk(layout: _Layout, at: int, owner: Optional[int]) -> None:
            if layout.has_family:
                owner = at
            for name, kind, sub, _ in layout.members:
                if kind == _STRUCT:
                    self.links.append((at, name))
                    walk(sub, len(self.links) - 1, owner)  # type: ignore[arg-type]
                    continue
                self.plan.append((at, name, kind))
                if kind == _ADDR:
                    self.addrs.append((at, name, owner))

        walk(self, 0, None)


class xfrm_struct(nlmsg_base):
    """Mixin: (de)serialize ``fields`` as one C struct; see the module doc.

    A struct ending in a flexible array member (``alg_key``, ``bmp``)
    overrides ``payload`` and ``unpack_trailer``; ``array`` marks an
    attribute holding one or more structs back to back (XFRMA_TMPL).
    """

    fields: tuple = ()
    array = False

    @classmethod
    def layout(cls) -> _Layout:
        lay = cls.__dict__.get("_layout")
        if lay is None:
            lay = _Layout(cls.fields)
            setattr(cls, "_layout", lay)
        return lay

    def _outer_family(self) -> Optional[int]:
        parent = getattr(self, "parent", None)
        try:
            return parent["family"] if parent is not None and "family" in parent else None
        except ReferenceError:  # pyroute2 holds the parent by weak reference
            return None

    @classmethod
    def payload(cls, value: Any) -> bytes:
        """The attribute's payload (no header, no padding) for ``value``."""
        if cls.array:
            return b"".join(cls.layout().pack(item) for item in value)
        return cls.layout().pack(value)

    def unpack_trailer(self, raw: bytes) -> None:
        """Decode the bytes after the fixed part (the flexible array)."""

    def ft_encode(self, offset: int) -> tuple[int, int]:
        raw = self.payload(self.getvalue())
        diff = -len(raw) % 4
        self.data.extend(raw + bytes(diff))
        return offset + len(raw) + diff, diff

    def ft_decode(self, offset: int) -> None:
        lay = self.layout()
        end = min(self.offset + self.length, len(self.data))
        family = self._outer_family()
        if self.array:
            count = (end - offset) // lay.size
            self.value = [
                lay.unpack(self.data, offset + i * lay.size, family) for i in range(count)
            ]
        elif end - offset < lay.size:  # an error's capped echo: a bare header
            return
        else:
            self.update(lay.unpack(self.data, offset, family))
            self.unpack_trailer(bytes(self.data[offset + lay.size:end]))
            offset += (lay.size + 3) & ~3
        if self.nla_map:
            self.decode_nlas(offset)
        else:
            del self["attrs"]


class xfrm_nla(xfrm_struct, nla):
    """An attribute whose payload is a kernel struct."""


class xfrm_id(xfrm_nla):
    fields = (("daddr", xfrm_address_t), ("spi", ">I"), ("proto", "B"), ("__pad", "3x"))


class xfrm_selector(xfrm_nla):
    fields = (
        ("daddr", xfrm_address_t), ("saddr", xfrm_address_t),
        ("dport", ">H"), ("dport_mask", ">H"), ("sport", ">H"), ("sport_mask", ">H"),
        ("family", "H"), ("prefixlen_d", "B"), ("prefixlen_s", "B"), ("proto", "B"),
        ("__pad", "3x"), ("ifindex", "i"), ("user", "I"),
    )


class xfrm_lifetime_cfg(xfrm_nla):
    fields = tuple((n, "Q") for n in (
        "soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit",
        "soft_add_expires_seconds", "hard_add_expires_seconds",
        "soft_use_expires_seconds", "hard_use_expires_seconds"))


class xfrm_lifetime_cur(xfrm_nla):
    fields = (("bytes", "Q"), ("packets", "Q"), ("add_time", "Q"), ("use_time", "Q"))


class xfrm_replay_state(xfrm_nla):
    fields = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))


class xfrm_replay_state_esn(xfrm_nla):
    """Header only unless ``bmp`` is given: the kernel accepts either
    (verify_replay() in net/xfrm/xfrm_user.c), and iproute2 sends the header."""

    fields = (("bmp_len", "I"), ("oseq", "I"), ("seq", "I"), ("oseq_hi", "I"),
              ("seq_hi", "I"), ("replay_window", "I"))

    @classmethod
    def payload(cls, value: Any) -> bytes:
        bmp = dict.get(value, "bmp") or ()
        return cls.layout().pack(value) + struct.pack(f"={len(bmp)}I", *bmp)

    def unpack_trailer(self, raw: bytes) -> None:
        words = min(self["bmp_len"], len(raw) // 4)
        self["bmp"] = struct.unpack_from(f"={words}I", raw)


class _algo(xfrm_nla):
    """The xfrm_algo family: the key follows, ``alg_key_len`` in bits."""

    @classmethod
    def payload(cls, value: Any) -> bytes:
        key = bytes(dict.get(value, "alg_key") or b"")
        if not dict.get(value, "alg_key_len"):
            value = {**value, "alg_key_len": len(key) * 8}
        return cls.layout().pack(value) + key

    def unpack_trailer(self, raw: bytes) -> None:
        self["alg_key"] = KeyMaterial(raw[: (self["alg_key_len"] + 7) // 8])


class xfrm_algo(_algo):
    fields = (("alg_name", "64s"), ("alg_key_len", "I"))


class xfrm_algo_auth(_algo):
    fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_trunc_len", "I"))


class xfrm_algo_aead(_algo):
    fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"))


class xfrm_stats(xfrm_nla):
    fields = (("replay_window", "I"), ("replay", "I"), ("integrity_failed", "I"))


class xfrm_user_tmpl(xfrm_nla):
    """XFRMA_TMPL carries one or more of these back to back: value is a list."""

    array = True
    fields = (
        ("id", xfrm_id), ("family", "H"), ("__pad", "2x"), ("saddr", xfrm_address_t),
        ("reqid", "I"), ("mode", "B"), ("share", "B"), ("optional", "B"),
        ("__pad2", "x"), ("aalgos", "I"), ("ealgos", "I"), ("calgos", "I"),
    )


class xfrm_mark(xfrm_nla):
    fields = (("v", "I"), ("m", "I"))


class xfrm_userpolicy_type(xfrm_nla):
    fields = (("type", "B"), ("__pad", "x"), ("reserved1", "H"), ("reserved2", "B"),
              ("__pad2", "x"))


class xfrm_encap_tmpl(xfrm_nla):
    fields = (("encap_type", "H"), ("encap_sport", ">H"), ("encap_dport", ">H"),
              ("__pad", "2x"), ("encap_oa", xfrm_address_t))


class xfrm_address_filter(xfrm_nla):
    fields = (("saddr", xfrm_address_t), ("daddr", xfrm_address_t), ("family", "H"),
              ("splen", "B"), ("dplen", "B"))


class xfrm_user_offload(xfrm_nla):
    fields = (("ifindex", "i"), ("flags", "B"), ("__pad", "3x"))


class xfrm_address(xfrm_nla):
    """XFRMA_SRCADDR / XFRMA_COADDR: a bare xfrm_address_t; the family is the
    message's."""

    fields = (("addr", xfrm_address_t),)

    @classmethod
    def payload(cls, value: Any) -> bytes:
        return xfrm_address_t.pack(value)

    def decode(self) -> None:
        super().decode()
        self.value = self["addr"]


_USERSA_INFO = (
    ("sel", xfrm_selector), ("id", xfrm_id), ("saddr", xfrm_address_t),
    ("lft", xfrm_lifetime_cfg), ("curlft", xfrm_lifetime_cur), ("stats", xfrm_stats),
    ("seq", "I"), ("reqid", "I"), ("family", "H"), ("mode", "B"),
    ("replay_window", "B"), ("flags", "B"), ("__pad", "7x"),
)
_USERPOLICY_INFO = (
    ("sel", xfrm_selector), ("lft", xfrm_lifetime_cfg), ("curlft", xfrm_lifetime_cur),
    ("priority", "I"), ("index", "I"), ("dir", "B"), ("action", "B"), ("flags", "B"),
    ("share", "B"), ("__pad", "4x"),
)


class xfrma_sa(xfrm_nla):
    """XFRMA_SA: a struct xfrm_usersa_info inside an attribute."""

    fields = _USERSA_INFO


class xfrma_policy(xfrm_nla):
    """XFRMA_POLICY: a struct xfrm_userpolicy_info inside an attribute."""

    fields = _USERPOLICY_INFO


class xfrm_msg(xfrm_struct, nlmsg):
    """Base of the XFRM messages: every one shares enum xfrm_attr_type_t."""

    prefix = "XFRMA_"
    nla_map = tuple(zip(XFRMA_NAMES, (
        "none", "xfrm_algo", "xfrm_algo", "xfrm_algo", "xfrm_encap_tmpl",
        "xfrm_user_tmpl", "xfrma_sa", "xfrma_policy", "hex", "xfrm_lifetime_cur",
        "xfrm_replay_state", "uint32", "uint32", "xfrm_address", "xfrm_address",
        "uint64", "xfrm_userpolicy_type", "hex", "xfrm_algo_aead", "hex",
        "xfrm_algo_auth", "xfrm_mark", "uint32", "xfrm_replay_state_esn", "uint32",
        "uint8", "xfrm_address_filter", "none", "xfrm_user_offload", "uint32",
        "uint32", "uint32", "uint32",
    )))
    # nla_map resolves class names as attributes of the message class
    xfrm_algo, xfrm_algo_auth, xfrm_algo_aead = xfrm_algo, xfrm_algo_auth, xfrm_algo_aead
    xfrm_encap_tmpl, xfrm_user_tmpl, xfrm_mark = xfrm_encap_tmpl, xfrm_user_tmpl, xfrm_mark
    xfrma_sa, xfrma_policy, xfrm_address = xfrma_sa, xfrma_policy, xfrm_address
    xfrm_lifetime_cur, xfrm_replay_state = xfrm_lifetime_cur, xfrm_replay_state
    xfrm_replay_state_esn, xfrm_userpolicy_type = xfrm_replay_state_esn, xfrm_userpolicy_type
    xfrm_address_filter, xfrm_user_offload = xfrm_address_filter, xfrm_user_offload

    def encode(self) -> None:
        """Encode in one pass; the bytes equal pyroute2's generic encoder's.

        pyroute2's encoder builds an object per attribute and packs field by
        field (~30 us per policy here); the agent writes thousands of
        objects per apply, so struct attributes pack straight from their
        layout and only other atoms go through pyroute2's classes.
        """
        parts = [self.layout().pack(self)]
        for cell in self["attrs"]:
            nla_type, cls = _NLA_BY_NAME[cell[0]]
            if issubclass(cls, xfrm_struct):
                payload = cls.payload(cell[1])
            else:
                atom = cls()
                atom.setvalue(cell[1])
                atom.encode()
                payload = bytes(atom.data[4:atom.length])
            parts.append(struct.pack("=HH", 4 + len(payload), nla_type))
            parts.append(payload + bytes(-len(payload) % 4))
        body = b"".join(parts)
        header = self["header"]
        header["length"] = self.length = 16 + len(body)
        self.data = bytearray(struct.pack(
            "=IHHII", self.length, header.get("type") or 0, header.get("flags") or 0,
            header.get("sequence_number") or 0, header.get("pid") or 0)) + body


class xfrm_usersa_info(xfrm_msg):
    """XFRM_MSG_NEWSA / UPDSA request and the dump reply (struct xfrm_usersa_info)."""

    fields = _USERSA_INFO


class xfrm_usersa_id(xfrm_msg):
    """XFRM_MSG_DELSA / GETSA request: (daddr, spi, proto) names an SA."""

    fields = (("daddr", xfrm_address_t), ("spi", ">I"), ("family", "H"),
              ("proto", "B"), ("__pad", "x"))


class xfrm_userpolicy_info(xfrm_msg):
    """XFRM_MSG_NEWPOLICY / UPDPOLICY request and the dump reply."""

    fields = _USERPOLICY_INFO


class xfrm_userpolicy_id(xfrm_msg):
    """XFRM_MSG_DELPOLICY / GETPOLICY request: (selector, dir) or index."""

    fields = (("sel", xfrm_selector), ("index", "I"), ("dir", "B"), ("__pad", "3x"))


class xfrm_dump_request(xfrm_msg):
    """A dump request (GETSA/GETPOLICY with NLM_F_DUMP): header and attributes
    only; the kernel parses attributes right after nlmsghdr (xfrm_dump_sa)."""

    fields = ()


_NLA_BY_NAME = {
    name: (nla_type, getattr(xfrm_msg, cls)) for nla_type, (name, cls) in enumerate(xfrm_msg.nla_map)
}

#: message type -> class, for pyroute2's Marshal
MSG_MAP = {
    XFRM_MSG_NEWSA: xfrm_usersa_info,
    XFRM_MSG_UPDSA: xfrm_usersa_info,
    XFRM_MSG_DELSA: xfrm_usersa_id,
    XFRM_MSG_GETSA: xfrm_usersa_id,
    XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info,
    XFRM_MSG_UPDPOLICY: xfrm_userpolicy_info,
    XFRM_MSG_DELPOLICY: xfrm_userpolicy_id,
    XFRM_MSG_GETPOLICY: xfrm_userpolicy_id,
}
