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
holds a selector, an id, lifetimes and stats) and mix host and network byte
order. Each class lists its members in ``fields`` as pyroute2 does; a
member's format is a ``struct`` code ('I', '>H' for __be16, '3x' for the
compiler's padding) or another struct class. :mod:`agent.kernel.nlstruct`
packs each message with one precompiled ``struct.Struct`` (sizes are checked
against the kernel's ``sizeof`` in the unit tests). ``xfrm_address_t``
decodes to an ``ipaddress`` object by the nearest enclosing ``family``.

Key material: the flexible ``alg_key`` member decodes to
:class:`agent.model.KeyMaterial`, so a decoded SA that reaches a log line
(pyroute2 logs decoded messages at DEBUG) shows no key.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from agent.kernel.nlstruct import Address16, StructMsg, StructNla
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


class xfrm_address_t(Address16):
    """``typedef union { __be32 a4; __be32 a6[4]; struct in6_addr in6; } xfrm_address_t``."""


class xfrm_id(StructNla):
    fields = (("daddr", xfrm_address_t), ("spi", ">I"), ("proto", "B"), ("__pad", "3x"))


class xfrm_selector(StructNla):
    fields = (
        ("daddr", xfrm_address_t), ("saddr", xfrm_address_t),
        ("dport", ">H"), ("dport_mask", ">H"), ("sport", ">H"), ("sport_mask", ">H"),
        ("family", "H"), ("prefixlen_d", "B"), ("prefixlen_s", "B"), ("proto", "B"),
        ("__pad", "3x"), ("ifindex", "i"), ("user", "I"),
    )


class xfrm_lifetime_cfg(StructNla):
    fields = tuple((n, "Q") for n in (
        "soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit",
        "soft_add_expires_seconds", "hard_add_expires_seconds",
        "soft_use_expires_seconds", "hard_use_expires_seconds"))


class xfrm_lifetime_cur(StructNla):
    fields = (("bytes", "Q"), ("packets", "Q"), ("add_time", "Q"), ("use_time", "Q"))


class xfrm_replay_state(StructNla):
    fields = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))


class xfrm_replay_state_esn(StructNla):
    """Header only unless ``bmp`` is given: the kernel accepts either
    (verify_replay() in net/xfrm/xfrm_user.c), and iproute2 sends the header."""

    fields = (("bmp_len", "I"), ("oseq", "I"), ("seq", "I"), ("oseq_hi", "I"),
              ("seq_hi", "I"), ("replay_window", "I"))

    @classmethod
    def payload(cls, value: Any) -> bytes:
        bmp = dict.get(value, "bmp") or ()
        return cls.layout().pack(value) + struct.pack(f"={len(bmp)}I", *bmp)

    @classmethod
    def unpack_trailer(cls, value: dict, raw: bytes) -> None:
        words = min(value["bmp_len"], len(raw) // 4)
        value["bmp"] = struct.unpack_from(f"={words}I", raw)


class _algo(StructNla):
    """The xfrm_algo family: the key follows, ``alg_key_len`` in bits."""

    @classmethod
    def payload(cls, value: Any) -> bytes:
        key = bytes(dict.get(value, "alg_key") or b"")
        if not dict.get(value, "alg_key_len"):
            value = {**value, "alg_key_len": len(key) * 8}
        return cls.layout().pack(value) + key

    @classmethod
    def unpack_trailer(cls, value: dict, raw: bytes) -> None:
        value["alg_key"] = KeyMaterial(raw[: (value["alg_key_len"] + 7) // 8])


class xfrm_algo(_algo):
    fields = (("alg_name", "64s"), ("alg_key_len", "I"))


class xfrm_algo_auth(_algo):
    fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_trunc_len", "I"))


class xfrm_algo_aead(_algo):
    fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"))


class xfrm_stats(StructNla):
    fields = (("replay_window", "I"), ("replay", "I"), ("integrity_failed", "I"))


class xfrm_user_tmpl(StructNla):
    """XFRMA_TMPL carries one or more of these back to back: value is a list."""

    array = True
    fields = (
        ("id", xfrm_id), ("family", "H"), ("__pad", "2x"), ("saddr", xfrm_address_t),
        ("reqid", "I"), ("mode", "B"), ("share", "B"), ("optional", "B"),
        ("__pad2", "x"), ("aalgos", "I"), ("ealgos", "I"), ("calgos", "I"),
    )


class xfrm_mark(StructNla):
    fields = (("v", "I"), ("m", "I"))


class xfrm_userpolicy_type(StructNla):
    fields = (("type", "B"), ("__pad", "x"), ("reserved1", "H"), ("reserved2", "B"),
              ("__pad2", "x"))


class xfrm_encap_tmpl(StructNla):
    fields = (("encap_type", "H"), ("encap_sport", ">H"), ("encap_dport", ">H"),
              ("__pad", "2x"), ("encap_oa", xfrm_address_t))


class xfrm_address_filter(StructNla):
    fields = (("saddr", xfrm_address_t), ("daddr", xfrm_address_t), ("family", "H"),
              ("splen", "B"), ("dplen", "B"))


class xfrm_user_offload(StructNla):
    fields = (("ifindex", "i"), ("flags", "B"), ("__pad", "3x"))


class xfrm_address(StructNla):
    """XFRMA_SRCADDR / XFRMA_COADDR: a bare xfrm_address_t; the family is the
    message's."""

    fields = (("addr", xfrm_address_t),)

    @classmethod
    def payload(cls, value: Any) -> bytes:
        return xfrm_address_t.pack(value)  # the value is the address itself

    @classmethod
    def value_of(cls, value: dict) -> Any:
        return value["addr"]


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


class xfrma_sa(StructNla):
    """XFRMA_SA: a struct xfrm_usersa_info inside an attribute."""

    fields = _USERSA_INFO


class xfrma_policy(StructNla):
    """XFRMA_POLICY: a struct xfrm_userpolicy_info inside an attribute."""

    fields = _USERPOLICY_INFO


class xfrm_msg(StructMsg):
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
