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
