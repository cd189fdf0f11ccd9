"""Domain types shared by the agent's pure core and its kernel edge.

Everything here is a frozen, hashable dataclass so that the planner's output
and the reconciler's view of the kernel can be compared with set arithmetic:
``missing = desired - actual``, ``stale = actual - desired``.

Key material is carried as :class:`KeyMaterial`, whose ``repr``/``str`` never
show the bytes, so a dataclass repr, a log line or an exception message that
happens to include an SA cannot leak a key.

Direction words (in/out) are always from the local node's point of view.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import Optional, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class KeyMaterial:
    """Secret bytes that refuse to be printed.

    ``bytes(k)`` or ``k.value`` give the bytes to code that must hand them to
    the kernel; every textual form is redacted.
    """

    value: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"KeyMaterial(<{len(self.value)} bytes redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __bytes__(self) -> bytes:
        return self.value

    def __len__(self) -> int:
        return len(self.value)


@dataclass(frozen=True)
class Node:
    """A cluster node as the agent needs it (Kubernetes Node field names).

    ``ips`` are the node's InternalIPs, first one preferred; ``boot_id`` is
    ``status.nodeInfo.bootID`` (None when the API does not report one).
    """

    name: str
    ips: tuple[IPAddress, ...]
    pod_cidrs: tuple[IPNetwork, ...]
    boot_id: Optional[str] = None
    wireguard_public_key: Optional[str] = None
    #: the UDP port of that key's interface; None = the cluster's port
    wireguard_port: Optional[int] = None

    @property
    def ip(self) -> IPAddress:
        """The node's primary IP (the underlay tunnel endpoint)."""
        return self.ips[0]


class Direction(enum.IntEnum):
    """XFRM policy directions; values are the kernel's XFRM_POLICY_* ."""

    IN = 0
    OUT = 1
    FWD = 2


class Action(enum.IntEnum):
    """XFRM policy actions; values are the kernel's XFRM_POLICY_ALLOW/BLOCK."""

    ALLOW = 0
    BLOCK = 1


@dataclass(frozen=True)
class AeadAlgorithm:
    """An AEAD transform, e.g. ``rfc4106(gcm(aes))`` with a 128-bit ICV."""

    name: str
    key: KeyMaterial
    icv_bits: int


@dataclass(frozen=True)
class CipherAuthAlgorithm:
    """The non-AEAD pair: an authentication and an encryption transform."""

    auth_name: str
    auth_key: KeyMaterial
    enc_name: str
    enc_key: KeyMaterial
    #: truncation length of the auth ICV (bits); Cilium uses the hash's default.
    auth_trunc_bits: int = 0


Algorithm = Union[AeadAlgorithm, CipherAuthAlgorithm]


@dataclass(frozen=True)
class SA:
    """One ESP security association, tunnel mode.

    Identity in the kernel is (dst, spi, proto, mark); ``src`` is the outer
    source address. ``replay_window`` with ``esn`` set means the kernel's
    XFRMA_REPLAY_ESN_VAL state with that window (bits).
    """

    src: IPAddress
    dst: IPAddress
    spi: int
    reqid: int
    algorithm: Algorithm
    replay_window: int = 1024
    esn: bool = True
    #: XFRMA_SET_MARK: mark (and mask) the kernel sets on packets this SA
    #: produces; None leaves packet marks alone.
    output_mark: Optional[int] = None
    output_mark_mask: int = 0xFFFFFFFF

    def describe(self) -> str:
        """A log-safe one-line description (no key material)."""
        return f"sa src={self.src} dst={self.dst} spi={self.spi:#010x} reqid={self.reqid}"


@dataclass(frozen=True)
class Template:
    """A policy template (struct xfrm_user_tmpl): ESP tunnel src -> dst.

    ``spi`` 0 means any SPI (inbound); a non-zero SPI pins the SA used for
    egress, which is how the key in use is switched atomically.
    """

    src: IPAddress
    dst: IPAddress
    reqid: int
    spi: int = 0


@dataclass(frozen=True)
class Policy:
    """One XFRM policy. Kernel identity is (selector, direction, mark)."""

    direction: Direction
    src: IPNetwork
    dst: IPNetwork
    priority: int
    action: Action = Action.ALLOW
    templates: tuple[Template, ...] = ()

    @property
    def selector(self) -> tuple[IPNetwork, IPNetwork, Direction]:
        return (self.src, self.dst, self.direction)

    def describe(self) -> str:
        """A log-safe one-line description."""
        verb = "block" if self.action is Action.BLOCK else "allow"
        spis = ",".join(f"{t.spi:#010x}" for t in self.templates if t.spi)
        pin = f" spi={spis}" if spis else ""
        return (
            f"policy {self.direction.name.lower()} {self.src} -> {self.dst} "
            f"prio={self.priority} {verb}{pin}"
        )


@dataclass(frozen=True)
class SACounters:
    """What the kernel counts for one SA (read from an SA dump, never written).

    Keyed by ``(dst, spi)``, the SA's identity. Sequence numbers are the
    replay state (XFRMA_REPLAY_ESN_VAL, or XFRMA_REPLAY_VAL without ESN):
    ``oseq`` is the last sequence number sent, ``seq`` the highest received;
    with ESN the ``*_hi`` words hold the upper 32 bits. ``replay_window``,
    ``replay`` and ``integrity_failed`` are struct xfrm_stats: packets
    dropped outside the window, replayed, and failing authentication.
    """

    dst: IPAddress
    spi: int
    oseq: int = 0
    seq: int = 0
    oseq_hi: int = 0
    seq_hi: int = 0
    bytes: int = 0
    packets: int = 0
    replay_window: int = 0
    replay: int = 0
    integrity_failed: int = 0

    @property
    def key(self) -> tuple[IPAddress, int]:
        return (self.dst, self.spi)

    @property
    def oseq64(self) -> int:
        """The 64-bit outbound sequence number (ESN)."""
        return self.oseq_hi << 32 | self.oseq

    @property
    def seq64(self) -> int:
        """The 64-bit highest inbound sequence number (ESN)."""
        return self.seq_hi << 32 | self.seq


@dataclass(frozen=True)
class Ownership:
    """How the agent tells its XFRM objects from anyone else's.

    An SA is ours when its reqid is ``reqid`` and the top nibble of its SPI
    is ``spi_prefix`` (DESIGN.md's SPI layout). A policy is ours when its
    priority lies in ``priority_min..priority_max`` (inclusive) and every
    template carries our reqid; block policies have no template, so the band
    alone marks them. XFRM picks the matching policy with the *lowest*
    priority value; the default band 10000..10099 (agent.ipsec.plan's, where the
    priorities inside it are assigned) sits below (so wins over)
    what IKE daemons install (strongSwan and libreswan use six- and
    seven-digit priorities) while leaving 0..9999 to an administrator.
    Kernel dumps return every object; filtering with these rules is the
    reconciler's job, and foreign objects are never touched.
    """

    reqid: int = 0x5EA1
    spi_prefix: int = 0x5
    priority_min: int = 10000
    priority_max: int = 10099

    def owns_sa(self, sa: SA) -> bool:
        return sa.reqid == self.reqid and sa.spi >> 28 == self.spi_prefix

    def owns_policy(self, policy: Policy) -> bool:
        return self.priority_min <= policy.priority <= self.priority_max and all(
            t.reqid == self.reqid for t in policy.templates
        )
