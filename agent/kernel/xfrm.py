"""The kernel's XFRM tables (IPsec SAs and policies) as sealnet model objects.

:class:`Xfrm` writes and reads :class:`~agent.model.SA` and
:class:`~agent.model.Policy` objects over one NETLINK_XFRM socket, using the
messages declared in :mod:`agent.kernel.xfrm_msg`. It receives its socket
(tests and the reconciler pass one in) or opens one, optionally inside a
network namespace::

    with Xfrm.open(netns="node-1") as xfrm:
        xfrm.add_policy(policy)                      # raises KernelError
        failures = xfrm.apply([Change(Verb.ADD, sa), Change(Verb.DELETE, old)])
        sas, policies = xfrm.dump_sas(), xfrm.dump_policies()
        counters = xfrm.dump_sa_counters()           # {(dst, spi): SACounters}

Dumps return every object in the kernel, foreign ones included; ownership
(:class:`agent.model.Ownership`: reqid, SPI prefix, priority band) is the
reconciler's filter. What the model has no field for is not read back:
selector ports/protocol, marks and if_id, lifetimes, template mode (always
written as tunnel, ESP, level required); per-socket policies (dir >= 3) and
sub policies are skipped. An ``auth_trunc_bits`` equal to the kernel's default for the hash
reads back as 0, the model's "default".

Writing: every SA gets infinite lifetimes (iproute2's "no limit"), ESN with
XFRMA_REPLAY_ESN_VAL when ``esn`` is set or the window exceeds the 32 bits of
the legacy state. The kernel cannot change an SA's keys or replay state in
place (xfrm_state_update() copies only encap, addresses, selector, lifetime
and marks): ``update_sa`` is for those; a new key is a new SA.

Batching: :meth:`Xfrm.apply` puts up to ``batch_size`` requests into one
sendmsg() (:mod:`agent.kernel.nlbatch`; XFRM handles them in order under
xfrm_cfg_mutex). Each failure names its object and the errno; the others
still apply. Single-object methods raise the KernelError instead.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from pyroute2.netlink import NETLINK_XFRM, NLM_F_DUMP, NLM_F_REQUEST, SOL_NETLINK
from pyroute2.netlink.marshal import Marshal
from pyroute2.netlink.nlsocket import AsyncNetlinkSocket, NetlinkSocket

from agent.errors import ConfigError, KernelError
from agent.kernel import xfrm_msg as xm
from agent.kernel.nlbatch import NETLINK_CAP_ACK, Batcher, Request, Transport
from agent.model import (
    SA, Action, AeadAlgorithm, CipherAuthAlgorithm, Direction, IPAddress, IPNetwork, KeyMaterial,
    Policy, SACounters, Template,
)

ALL_ALGOS = 0xFFFFFFFF  # template aalgos/ealgos/calgos: any, as iproute2 writes
# net/xfrm/xfrm_algo.c icv_truncbits: what the kernel applies when the
# requested truncation is 0. Note hmac(sha256): Linux keeps the pre-RFC 4868
# 96 bits; a peer that expects RFC 4868's 128 needs auth_trunc_bits=128.
AUTH_TRUNC_DEFAULT_BITS = {
    "hmac(md5)": 96, "hmac(sha1)": 96, "hmac(sha256)": 96, "hmac(sha384)": 192,
    "hmac(sha512)": 256, "hmac(rmd160)": 96, "xcbc(aes)": 96, "cmac(aes)": 96,
}
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_NO_KEY = KeyMaterial(b"")  # an AH or crypt-only foreign SA lacks one of the keys

SAKey = tuple[IPAddress, int]
XfrmObject = Union[SA, Policy]


class MarshalXfrm(Marshal):
    msg_map = dict(xm.MSG_MAP)


class AsyncXfrmSocket(AsyncNetlinkSocket):
    marshal_class = MarshalXfrm


class XfrmSocket(NetlinkSocket):
    """A pyroute2 NetlinkSocket on NETLINK_XFRM, optionally in a netns.

    pyroute2 creates a namespaced socket in a short-lived child that joins
    the netns and hands the descriptor back, so the calling thread never
    changes namespace. ``flags=0``: a missing netns is an error, not created.
    """

    async_class = AsyncXfrmSocket

    def __init__(self, netns: Optional[str] = None) -> None:
        super().__init__(family=NETLINK_XFRM, netns=netns, flags=0, ext_ack=True)
        # errors echo only the failed request's header, never its keys
        self.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)


class Verb(enum.Enum):
    ADD = "add"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True)
class Change:
    """One write for :meth:`Xfrm.apply`."""

    verb: Verb
    obj: XfrmObject


@dataclass(frozen=True)
class Failure:
    """A change the kernel refused; ``error`` names the object and errno."""

    change: Change
    error: KernelError


class Xfrm:
    """SAs and policies in one network namespace; see the module doc."""

    def __init__(self, sock: Transport, batch_size: int = 128) -> None:
        self._sock = sock
        self._batcher = Batcher(sock, xm.MSG_MAP, batch_size)

    @classmethod
    def open(cls, netns: Optional[str] = None, batch_size: int = 128) -> "Xfrm":
        return cls(XfrmSocket(netns), batch_size)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Xfrm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes --------------------------------------------------------------
    def add_sa(self, sa: SA) -> None:
        self._raise_first([Change(Verb.ADD, sa)])

    def update_sa(self, sa: SA) -> None:
        self._raise_first([Change(Verb.UPDATE, sa)])

    def delete_sa(self, sa: SA) -> None:
        self._raise_first([Change(Verb.DELETE, sa)])

    def add_policy(self, policy: Policy) -> None:
        self._raise_first([Change(Verb.ADD, policy)])

    def update_policy(self, policy: Policy) -> None:
        """Create or atomically replace the policy with this selector and dir."""
        self._raise_first([Change(Verb.UPDATE, policy)])

    def delete_policy(self, policy: Policy) -> None:
        self._raise_first([Change(Verb.DELETE, policy)])

    def apply(self, changes: Iterable[Change]) -> list[Failure]:
        """Send all changes batched; return the ones the kernel refused."""
        changes = list(changes)
        requests = [Request(_change_msg(c), f"{c.verb.value} {c.obj.describe()}")
                    for c in changes]
        self._batcher.exchange(requests, expect_reply=False)
        return [Failure(c, r.error()) for c, r in zip(changes, requests) if r.code]

    def _raise_first(self, changes: list[Change]) -> None:
        failures = self.apply(changes)
        if failures:
            raise failures[0].error

    # -- reads ---------------------------------------------------------------
    def get_sa(self, dst: IPAddress, spi: int) -> Optional[SA]:
        """The SA (dst, spi, esp), or None when the kernel has none."""
        msg = sa_id_msg(xm.XFRM_MSG_GETSA, dst, spi, None)
        replies = self._get(msg, f"get sa dst={dst} spi={spi:#010x}", errno.ESRCH)
        return sa_from_msg(replies[0]) if replies else None

    def get_policy(self, direction: Direction, src: IPNetwork, dst: IPNetwork) -> Optional[Policy]:
        """The policy with exactly this selector and direction, or None."""
        msg = policy_id_msg(xm.XFRM_MSG_GETPOLICY, direction, src, dst)
        what = f"get policy {direction.name.lower()} {src} -> {dst}"
        replies = self._get(msg, what, errno.ENOENT)
        return policy_from_msg(replies[0]) if replies else None

    def dump_sas(self) -> list[SA]:
        """Every SA in the namespace, ours and foreign."""
        return [sa_from_msg(m) for m in self._dump(xm.XFRM_MSG_GETSA, "dump sas")]

    def dump_sa_counters(self) -> dict[SAKey, SACounters]:
        """Replay state, lifetime use and error counts of every SA."""
        counters = (counters_from_msg(m) for m in self._dump(xm.XFRM_MSG_GETSA, "dump sas"))
        return {c.key: c for c in counters}

    def dump_policies(self) -> list[Policy]:
        """Every global policy in the namespace, ours and foreign."""
        msgs = self._dump(xm.XFRM_MSG_GETPOLICY, "dump policies")
        return [policy_from_msg(m) for m in msgs if _is_global_main(m)]

    def _get(self, msg: xm.xfrm_msg, what: str, missing: int) -> list[xm.xfrm_msg]:
        request = Request(msg, what)
        self._batcher.exchange([request], expect_reply=True)
        if request.code == missing:
            return []
        if request.code:
            raise request.error()
        return request.replies

    def _dump(self, msg_type: int, what: str) -> list[xm.xfrm_msg]:
        for _ in range(3):  # a table changed mid-dump is dumped again
            msg = xm.xfrm_dump_request()
            msg["header"].update(type=msg_type, flags=NLM_F_REQUEST | NLM_F_DUMP)
            request = Request(msg, what)
            self._batcher.exchange([request], expect_reply=True)
            if request.code:
                raise request.error()
            if not request.intr:
                break
        return request.replies


# -- model -> messages ---------------------------------------------------------
# Flags are NLM_F_REQUEST alone, as iproute2 sends them: XFRM takes create vs
# replace from the message type (xfrm_add_policy(): excl = NEWPOLICY), not
# from NLM_F_CREATE/EXCL/REPLACE.


def _change_msg(change: Change) -> xm.xfrm_msg:
    obj, verb = change.obj, change.verb
    if isinstance(obj, SA):
        if verb is Verb.DELETE:
            return sa_id_msg(xm.XFRM_MSG_DELSA, obj.dst, obj.spi, obj.src)
        msg_type = xm.XFRM_MSG_NEWSA if verb is Verb.ADD else xm.XFRM_MSG_UPDSA
        return sa_msg(obj, msg_type)
    if verb is Verb.DELETE:
        return policy_id_msg(xm.XFRM_MSG_DELPOLICY, obj.direction, obj.src, obj.dst)
    msg_type = xm.XFRM_MSG_NEWPOLICY if verb is Verb.ADD else xm.XFRM_MSG_UPDPOLICY
    return policy_msg(obj, msg_type)


def _selector(src: IPNetwork, dst: IPNetwork, what: str) -> dict:
    if src.version != dst.version:
        raise ConfigError(f"{what}: selector mixes IPv{src.version} src {src} "
                          f"and IPv{dst.version} dst {dst}; one family is allowed")
    return {"saddr": src.network_address, "prefixlen_s": src.prefixlen,
            "daddr": dst.network_address, "prefixlen_d": dst.prefixlen,
            "family": _FAMILY[src.version]}


def policy_msg(policy: Policy, msg_type: int = xm.XFRM_MSG_NEWPOLICY) -> xm.xfrm_userpolicy_info:
    """The XFRM_MSG_NEWPOLICY (or UPDPOLICY) request for ``policy``."""
    msg = xm.xfrm_userpolicy_info()
    msg["sel"] = _selector(policy.src, policy.dst, policy.describe())
    msg["lft"] = xm.LIFETIME_INFINITE
    msg["priority"] = policy.priority
    msg["dir"] = int(policy.direction)
    msg["action"] = int(policy.action)
    for t in policy.templates:
        if t.src.version != t.dst.version:
            raise ConfigError(f"{policy.describe()}: template {t.src} -> {t.dst} mixes families")
    if policy.templates:
        msg["attrs"] = [("XFRMA_TMPL", [
            {"id": {"daddr": t.dst, "spi": t.spi, "proto": xm.IPPROTO_ESP},
             "family": _FAMILY[t.dst.version], "saddr": t.src, "reqid": t.reqid,
             "mode": xm.XFRM_MODE_TUNNEL, "aalgos": ALL_ALGOS, "ealgos": ALL_ALGOS,
             "calgos": ALL_ALGOS}
            for t in policy.templates])]
    msg["header"].update(type=msg_type, flags=NLM_F_REQUEST)
    return msg


def policy_id_msg(msg_type: int, direction: Direction, src: IPNetwork,
                   dst: IPNetwork) -> xm.xfrm_userpolicy_id:
    msg = xm.xfrm_userpolicy_id()
    msg["sel"] = _selector(src, dst, f"policy {direction.name.lower()} {src} -> {dst}")
    msg["dir"] = int(direction)
    msg["header"].update(type=msg_type, flags=NLM_F_REQUEST)
    return msg


def sa_msg(sa: SA, msg_type: int = xm.XFRM_MSG_NEWSA) -> xm.xfrm_usersa_info:
    """The XFRM_MSG_NEWSA (or UPDSA) request for ``sa``; checks its fields."""
    _check_sa(sa)
    msg = xm.xfrm_usersa_info()
    msg["id"] = {"daddr": sa.dst, "spi": sa.spi, "proto": xm.IPPROTO_ESP}
    msg["saddr"] = sa.src
    msg["family"] = _FAMILY[sa.dst.version]
    msg["mode"] = xm.XFRM_MODE_TUNNEL
    msg["reqid"] = sa.reqid
    msg["lft"] = xm.LIFETIME_INFINITE
    alg = sa.algorithm
    if isinstance(alg, AeadAlgorithm):
        attrs: list = [("XFRMA_ALG_AEAD", {"alg_name": alg.name, "alg_key": alg.key,
                                           "alg_icv_len": alg.icv_bits})]
    else:
        attrs = [("XFRMA_ALG_AUTH_TRUNC", {"alg_name": alg.auth_name, "alg_key": alg.auth_key,
                                           "alg_trunc_len": alg.auth_trunc_bits}),
                 ("XFRMA_ALG_CRYPT", {"alg_name": alg.enc_name, "alg_key": alg.enc_key})]
    if sa.esn or sa.replay_window > 32:
        # the kernel wants usersa_info.replay_window 0 then (verify_replay())
        attrs.append(("XFRMA_REPLAY_ESN_VAL", {"bmp_len": (sa.replay_window + 31) // 32,
                                               "replay_window": sa.replay_window}))
        msg["flags"] = xm.XFRM_STATE_ESN if sa.esn else 0
    else:
        msg["replay_window"] = sa.replay_window
    if sa.output_mark is not None:
        attrs.append(("XFRMA_SET_MARK", sa.output_mark))
        attrs.append(("XFRMA_SET_MARK_MASK", sa.output_mark_mask))
    msg["attrs"] = attrs
    msg["header"].update(type=msg_type, flags=NLM_F_REQUEST)
    return msg


def _check_sa(sa: SA) -> None:
    what = sa.describe()
    if sa.src.version != sa.dst.version:
        raise ConfigError(f"{what}: src and dst must be one family")
    if not 0 <= sa.replay_window <= xm.XFRMA_REPLAY_ESN_MAX:
        raise ConfigError(f"{what}: replay_window {sa.replay_window} is outside "
                          f"0..{xm.XFRMA_REPLAY_ESN_MAX}")
    if sa.esn and sa.replay_window == 0:
        raise ConfigError(f"{what}: esn needs a replay_window of 1..{xm.XFRMA_REPLAY_ESN_MAX}")
    if sa.output_mark is not None and not sa.output_mark_mask:
        raise ConfigError(f"{what}: output_mark_mask 0 marks nothing; use 0x1..0xffffffff")
    if not isinstance(sa.algorithm, (AeadAlgorithm, CipherAuthAlgorithm)):
        raise ConfigError(f"{what}: algorithm must be AeadAlgorithm or CipherAuthAlgorithm")


def sa_id_msg(msg_type: int, dst: IPAddress, spi: int,
               src: Optional[IPAddress]) -> xm.xfrm_usersa_id:
    msg = xm.xfrm_usersa_id()
    msg["daddr"], msg["spi"] = dst, spi
    msg["family"], msg["proto"] = _FAMILY[dst.version], xm.IPPROTO_ESP
    if src is not None:  # ignored for ESP lookups, sent as iproute2 does
        msg["attrs"] = [("XFRMA_SRCADDR", src)]
    msg["header"].update(type=msg_type, flags=NLM_F_REQUEST)
    return msg


# -- messages -> model ---------------------------------------------------------
def _is_global_main(msg: xm.xfrm_msg) -> bool:
    """Per-socket policies (dir >= XFRM_POLICY_MAX) and sub policies have no
    place in the model; they are skipped."""
    ptype = msg.get_attr("XFRMA_POLICY_TYPE")
    return msg["dir"] <= xm.XFRM_POLICY_FWD and (ptype is None or ptype["type"] == 0)


def _network(address: IPAddress, prefixlen: int) -> IPNetwork:
    # from int: ip_network() would format and reparse the address (slow);
    # strict=False: foreign policies may carry host bits, ours never do
    cls = ipaddress.IPv4Network if address.version == 4 else ipaddress.IPv6Network
    return cls((int(address), prefixlen), strict=False)


def policy_from_msg(msg: xm.xfrm_msg) -> Policy:
    """A Policy from an XFRM_MSG_NEWPOLICY reply."""
    sel = msg["sel"]
    templates = tuple(
        Template(src=t["saddr"], dst=t["id"]["daddr"], reqid=t["reqid"], spi=t["id"]["spi"])
        for t in msg.get_attr("XFRMA_TMPL") or ())
    return Policy(direction=Direction(msg["dir"]), src=_network(sel["saddr"], sel["prefixlen_s"]),
                  dst=_network(sel["daddr"], sel["prefixlen_d"]), priority=msg["priority"],
                  action=Action(msg["action"]), templates=templates)


def sa_from_msg(msg: xm.xfrm_msg) -> SA:
    """An SA from an XFRM_MSG_NEWSA reply (keys stay KeyMaterial)."""
    aead = msg.get_attr("XFRMA_ALG_AEAD")
    if aead is not None:
        algorithm: Any = AeadAlgorithm(aead["alg_name"], aead["alg_key"], aead["alg_icv_len"])
    else:
        auth = msg.get_attr("XFRMA_ALG_AUTH_TRUNC") or msg.get_attr("XFRMA_ALG_AUTH") or {}
        crypt = msg.get_attr("XFRMA_ALG_CRYPT") or {}
        name = auth.get("alg_name", "")
        trunc = auth.get("alg_trunc_len", 0)
        algorithm = CipherAuthAlgorithm(
            auth_name=name, auth_key=auth.get("alg_key", _NO_KEY),
            enc_name=crypt.get("alg_name", ""), enc_key=crypt.get("alg_key", _NO_KEY),
            auth_trunc_bits=0 if trunc == AUTH_TRUNC_DEFAULT_BITS.get(name) else trunc)
    esn = msg.get_attr("XFRMA_REPLAY_ESN_VAL")
    mark = msg.get_attr("XFRMA_SET_MARK")
    return SA(
        src=msg["saddr"], dst=msg["id"]["daddr"], spi=msg["id"]["spi"], reqid=msg["reqid"],
        algorithm=algorithm,
        replay_window=esn["replay_window"] if esn is not None else msg["replay_window"],
        esn=bool(msg["flags"] & xm.XFRM_STATE_ESN),
        output_mark=mark,
        output_mark_mask=0xFFFFFFFF if mark is None else msg.get_attr("XFRMA_SET_MARK_MASK"),
    )


def counters_from_msg(msg: xm.xfrm_msg) -> SACounters:
    """The counters of one SA from an XFRM_MSG_NEWSA reply."""
    replay = msg.get_attr("XFRMA_REPLAY_ESN_VAL") or msg.get_attr("XFRMA_REPLAY_VAL") or {}
    cur, stats = msg["curlft"], msg["stats"]
    return SACounters(
        dst=msg["id"]["daddr"], spi=msg["id"]["spi"],
        oseq=replay.get("oseq", 0), seq=replay.get("seq", 0),
        oseq_hi=replay.get("oseq_hi", 0), seq_hi=replay.get("seq_hi", 0),
        bytes=cur["bytes"], packets=cur["packets"], replay_window=stats["replay_window"],
        replay=stats["replay"], integrity_failed=stats["integrity_failed"])

