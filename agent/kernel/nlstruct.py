"""C structs as pyroute2 netlink messages and attributes, packed in one call.

pyroute2 describes a message by ``fields`` (name, ``struct`` format) and an
``nla_map``, and encodes field by field, building an object per attribute.
Kernel uapi structs such as XFRM's nest (a struct inside a struct), mix
host and network byte order and end in flexible arrays; and the agent
writes thousands of them per apply. This module keeps pyroute2's
declarations and decoder, and adds:

- :class:`Layout`: a ``fields`` tuple whose formats may be ``struct``
  codes ('I', '>H' for __be16, '3x' for the compiler's padding), another
  struct class (nested) or :class:`Address16`, flattened into one
  precompiled ``struct.Struct``;
- :class:`CStruct`: the mixin that makes a pyroute2 ``nla``/``nlmsg`` class
  (de)serialize its ``fields`` through its Layout; :class:`StructNla` and
  :class:`StructMsg` are the two bases to declare with.

Usage (see agent.kernel.xfrm_msg for the real declarations)::

    class pair(StructNla):
        fields = (("a", "I"), ("port", ">H"), ("__pad", "2x"))

    class demo_msg(StructMsg):
        fields = (("inner", pair), ("family", "H"), ("__pad", "2x"))
        nla_map = (("DEMO_UNSPEC", "none"), ("DEMO_PAIR", "pair"))
        pair = pair                       # nla_map names resolve on the class

Addresses (:class:`Address16`, a 16-byte union of in_addr/in6_addr) decode
to ``ipaddress`` objects by the ``family`` member of the nearest enclosing
struct that has one, else the enclosing message's, else stay bytes.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any, Optional

from pyroute2.netlink import nla, nlmsg, nlmsg_base

_ADDR, _BE16, _BE32, _CSTR, _PLAIN, _STRUCT = range(6)
_NLMSGHDR = struct.Struct("=IHHII")
_NLAHDR = struct.Struct("=HH")


class Address16:
    """A 16-byte address union: IPv4 in the first 4 bytes, or IPv6."""

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
            raise ValueError(f"address of {len(raw)} bytes: at most 16 fit")
        return raw.ljust(16, b"\0")

    @staticmethod
    def unpack(raw: bytes, family: Optional[int]) -> Any:
        if family == socket.AF_INET:
            return ipaddress.IPv4Address(raw[:4])
        if family == socket.AF_INET6:
            return ipaddress.IPv6Address(raw)
        return raw  # family unknown (0): keep the 16 bytes


class Layout:
    """One C struct, nested structs included, packed by one ``struct.Struct``.

    ``members`` mirrors ``fields`` without the padding: (name, kind, nested
    layout, width); packing walks it once collecting the arguments.
    Unpacking uses a flat plan made once: one dict per struct ("node"),
    linked to its parent, and one (node, name, kind) step per value.
    """

    def __init__(self, fields: tuple, fmt: Optional[list] = None) -> None:
        top = fmt is None
        fmt = ["="] if fmt is None else fmt
        self.members: list[tuple[str, int, Optional[Layout], int]] = []
        self.has_family = any(name == "family" for name, _ in fields)
        for name, spec in fields:
            if isinstance(spec, type) and issubclass(spec, Address16):
                fmt.append("16s")
                self.members.append((name, _ADDR, None, 16))
            elif isinstance(spec, type):
                self.members.append((name, _STRUCT, Layout(getattr(spec, "fields"), fmt), 0))
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
        """Pack a (nested) dict; missing members are 0."""
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
                args.append(Address16.pack(v))
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
        """A nested dict; ``family`` is the enclosing message's, if any."""
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
        # after all values: xfrm_usersa_info.family follows the id.daddr it types
        for at, name, owner in self.addrs:
            fam = (nodes[owner].get("family") if owner is not None else None) or family
            nodes[at][name] = Address16.unpack(nodes[at][name], fam)
        return nodes[0]

    def _compile_unpack(self) -> None:
        self.links: list[tuple[int, str]] = [(-1, "")]
        self.addrs: list[tuple[int, str, Optional[int]]] = []
        self.plan: list[tuple[int, str, int]] = []

        def walk(layout: Layout, at: int, owner: Optional[int]) -> None:
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


class CStruct(nlmsg_base):
    """Mixin in front of a pyroute2 class: ``fields`` are one C struct.

    ``ft_encode``/``ft_decode`` are pyroute2's per-class codec hooks, so a
    struct attribute also works inside messages pyroute2 encodes itself.

    A struct ending in a flexible array member overrides ``payload`` and
    ``unpack_trailer``; ``array`` marks an attribute holding one or more
    structs back to back (its value is a list); ``value_of`` turns the
    decoded dict into the attribute's value (e.g. a bare address).
    """

    fields: tuple = ()
    array = False
    data: Any  # pyroute2's buffer (a slot of nlmsg_base)

    @classmethod
    def layout(cls) -> Layout:
        lay = cls.__dict__.get("_layout")
        if lay is None:
            lay = Layout(cls.fields)
            setattr(cls, "_layout", lay)
        return lay

    @classmethod
    def payload(cls, value: Any) -> bytes:
        """The struct's bytes (no header, no padding) for ``value``."""
        if cls.array:
            return b"".join(cls.layout().pack(item) for item in value)
        return cls.layout().pack(value)

    @classmethod
    def unpack_trailer(cls, value: dict, raw: bytes) -> None:
        """Decode into ``value`` the bytes after the fixed part (the flexible array)."""

    @classmethod
    def value_of(cls, value: dict) -> Any:
        return value

    @classmethod
    def unpack_payload(cls, data: Any, start: int, end: int, family: Optional[int]) -> Any:
        """The attribute value of the payload ``data[start:end]``."""
        lay = cls.layout()
        if cls.array:
            return [lay.unpack(data, at, family) for at in range(start, end - lay.size + 1, lay.size)]
        if end - start < lay.size:
            return bytes(data[start:end])  # short: not this struct, keep the bytes
        value = lay.unpack(data, start, family)
        cls.unpack_trailer(value, bytes(data[start + lay.size:end]))
        return cls.value_of(value)

    def _outer_family(self) -> Optional[int]:
        parent = getattr(self, "parent", None)
        try:
            return parent["family"] if parent is not None and "family" in parent else None
        except ReferenceError:  # pyroute2 holds the parent by weak reference
            return None

    def ft_encode(self, offset: int) -> tuple[int, int]:
        raw = self.payload(self.getvalue())
        diff = -len(raw) % 4
        self.data.extend(raw + bytes(diff))
        return offset + len(raw) + diff, diff

    def ft_decode(self, offset: int) -> None:
        # pyroute2's generic path (a struct attribute inside another class's
        # message); StructMsg.decode below does not come through here
        end = min(self.offset + self.length, len(self.data))
        value = self.unpack_payload(self.data, offset, end, self._outer_family())
        if isinstance(value, dict):
            self.update(value)
        else:
            self.value = value
        del self["attrs"]


class StructNla(CStruct, nla):
    """An attribute whose payload is a C struct."""


class StructMsg(CStruct, nlmsg):
    """A message whose body is a C struct, followed by attributes.

    ``nla_map`` must use pyroute2's enumerated form ((name, class name), ...).
    """

    @classmethod
    def nla_index(cls) -> dict[Any, tuple[Any, Any]]:
        """name -> (type, class) and type -> (name, class), from ``nla_map``."""
        index = cls.__dict__.get("_nla_index")
        if index is None:
            index = {}
            for nla_type, (name, clsname) in enumerate(cls.nla_map):
                index[name] = (nla_type, getattr(cls, clsname))
                index[nla_type] = (name, getattr(cls, clsname))
            setattr(cls, "_nla_index", index)
        return index

    def decode(self) -> None:
        """Decode in one pass, as ``encode``; ``attrs`` become (name, value)
        pairs, the form pyroute2 accepts for encoding and reads with
        ``get_attr``. Attributes that are not structs decode through pyroute2."""
        index = self.nla_index()
        data: Any = self.data
        start: int = self.offset
        self.length, mtype, flags, seq, pid = _NLMSGHDR.unpack_from(data, start)
        self["header"] = {"length": self.length, "type": mtype, "flags": flags,
                          "sequence_number": seq, "pid": pid}
        end = min(start + self.length, len(data))
        lay = self.layout()
        offset = start + 16
        attrs: list = []
        self["attrs"] = attrs
        self.decoded = True
        if end - offset < lay.size:  # an error's capped echo: a bare header
            return
        self.update(lay.unpack(data, offset, None))
        family = dict.get(self, "family")
        offset += (lay.size + 3) & ~3
        while offset + 4 <= end:
            alen, atype = _NLAHDR.unpack_from(data, offset)
            if alen < 4:
                break
            name, cls = index.get(atype & 0x3FFF, ("UNKNOWN", None))
            stop = min(offset + alen, end)
            if cls is not None and issubclass(cls, CStruct):
                value = cls.unpack_payload(data, offset + 4, stop, family)
            elif cls is not None:
                atom = cls(data, offset=offset, length=stop - offset, parent=self)
                atom.decode()
                value = atom.getvalue()
            else:
                value = bytes(data[offset + 4:stop])
            attrs.append((name, value))
            offset += (alen + 3) & ~3

    def encode(self) -> None:
        """Encode in one pass; the bytes equal pyroute2's generic encoder's.

        pyroute2's encoder builds an object per attribute and packs field by
        field (~30 us per XFRM policy here); struct attributes pack straight
        from their layout, and only other atoms go through pyroute2.
        """
        index = self.nla_index()
        parts = [self.layout().pack(self)]
        for cell in self["attrs"]:
            nla_type, cls = index[cell[0]]
            if issubclass(cls, CStruct):
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
