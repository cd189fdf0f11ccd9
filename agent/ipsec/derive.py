"""Per-node-pair IPsec keys, byte for byte as Cilium derives them.

A key line with ``+`` (``3+ rfc4106(gcm(aes)) ... 128``) is not used as is:
each direction between two nodes gets its own key, derived from the global
key, both node IPs and both boot IDs, so no two senders ever encrypt under
one key and a reboot (new boot ID) gives fresh keys, hence fresh sequence
numbers and nonces (CVE-2024-28860). Usage::

    from agent.ipsec import derive
    out_alg = derive.out_algorithm(key, local.ip, peer.ip, local.boot_id, peer.boot_id)
    in_alg = derive.in_algorithm(key, local.ip, peer.ip, local.boot_id, peer.boot_id)
    raw = derive.pair_key(global_key, src_ip, dst_ip, src_boot_id, dst_boot_id)

The layout, checked against cilium/cilium pkg/datapath/linux/ipsec/
ipsec_linux.go (computeNodeIPsecKey, deriveNodeIPsecKey, canonicalIP,
getNodeIPsecKey):

    input  = global_key || src_ip || dst_ip || src_boot_id[:36] || dst_boot_id[:36]
    digest = SHA-256(input) if len(global_key) <= 32 else SHA-512(input)
    key    = digest[:len(global_key)]

- IPs are raw network-order bytes: 4 for IPv4 (and for an IPv4-mapped IPv6
  address, which Go's To4 turns into 4 bytes), 16 for IPv6;
- boot IDs are the ASCII bytes of ``Node.status.nodeInfo.bootID`` (a UUID,
  36 characters), cut to 36 bytes; Cilium slices ``[:36]`` unchecked, so a
  shorter boot ID has no defined key and is refused here;
- the whole key is hashed and replaced, the AEAD salt included: for
  rfc4106(gcm(aes)) with 20 bytes (16 key + 4 salt) all 20 bytes come from
  the digest; for 36 bytes (AES-256 + salt) SHA-512 is used;
- for the non-AEAD form the auth key and the encryption key are each
  derived on their own, with the same inputs.

Direction (local node's view, as in Cilium's getNodeIPsecKey comment):
``out = f(local, remote)``, ``in = f(remote, local)``, so node A's out key
for B is node B's in key for A.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import replace
from typing import Optional

from agent.errors import ConfigError
from agent.ipsec.keys import IpsecKey
from agent.model import AeadAlgorithm, Algorithm, IPAddress, KeyMaterial

#: Bytes of a boot ID that enter the hash (Cilium: bootID[:36]).
BOOT_ID_BYTES = 36


def usable_boot_id(boot_id: Optional[str]) -> bool:
    """True if ``boot_id`` can take part in a derivation (>= 36 bytes)."""
    return boot_id is not None and len(boot_id.encode("utf-8")) >= BOOT_ID_BYTES


def ip_bytes(ip: IPAddress) -> bytes:
    """The address as Cilium hashes it: canonicalIP, 4 bytes for IPv4."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.packed
    return ip.packed


def pair_key(global_key: bytes, src_ip: IPAddress, dst_ip: IPAddress, src_boot_id: str, dst_boot_id: str) -> bytes:
    """Cilium's computeNodeIPsecKey: the key ``src`` sends to ``dst`` with."""
    return _digest(global_key, _material(src_ip, dst_ip, src_boot_id, dst_boot_id))


def pair_algorithm(
    algorithm: Algorithm, src_ip: IPAddress, dst_ip: IPAddress, src_boot_id: str, dst_boot_id: str
) -> Algorithm:
    """Cilium's deriveNodeIPsecKey: the same transform with derived keys."""
    return _derive(algorithm, _material(src_ip, dst_ip, src_boot_id, dst_boot_id))


def out_algorithm(
    key: IpsecKey, local_ip: IPAddress, remote_ip: IPAddress, local_boot_id: Optional[str], remote_boot_id: Optional[str]
) -> Algorithm:
    """Transform of the local node's outbound SA to ``remote`` for ``key``."""
    if not key.per_node:
        return key.algorithm
    return pair_algorithm(key.algorithm, local_ip, remote_ip, _boot(local_boot_id), _boot(remote_boot_id))


def in_algorithm(
    key: IpsecKey, local_ip: IPAddress, remote_ip: IPAddress, local_boot_id: Optional[str], remote_boot_id: Optional[str]
) -> Algorithm:
    """Transform of the local node's inbound SA from ``remote`` for ``key``."""
    if not key.per_node:
        return key.algorithm
    return pair_algorithm(key.algorithm, remote_ip, local_ip, _boot(remote_boot_id), _boot(local_boot_id))


def boot_id_bytes(boot_id: str, which: str = "node") -> bytes:
    """The part of a boot ID that is hashed; ConfigError if too short."""
    raw = boot_id.encode("utf-8")
    if len(raw) < BOOT_ID_BYTES:
        raise ConfigError(
            f"{which} boot ID has {len(raw)} bytes; per-node-pair keys need at least "
            f"{BOOT_ID_BYTES} (a bootID UUID)"
        )
    return raw[:BOOT_ID_BYTES]


def material(src_ip_bytes: bytes, dst_ip_bytes: bytes, src_boot: bytes, dst_boot: bytes) -> bytes:
    """Everything hashed after the global key, from pre-encoded parts.

    For callers deriving many keys (the planner): encode each node once with
    ip_bytes() and boot_id_bytes(), then derive_with(algorithm, material).
    """
    return b"".join((src_ip_bytes, dst_ip_bytes, src_boot, dst_boot))


def derive_with(algorithm: Algorithm, material_bytes: bytes) -> Algorithm:
    """pair_algorithm() from a precomputed material()."""
    return _derive(algorithm, material_bytes)


def _material(src_ip: IPAddress, dst_ip: IPAddress, src_boot_id: str, dst_boot_id: str) -> bytes:
    return material(
        ip_bytes(src_ip), ip_bytes(dst_ip), boot_id_bytes(src_boot_id, "source node"),
        boot_id_bytes(dst_boot_id, "destination node"),
    )


def _digest(global_key: bytes, material_bytes: bytes) -> bytes:
    if not global_key:
        raise ValueError("pair_key: empty global key")
    data = global_key + material_bytes
    digest = hashlib.sha256(data) if len(global_key) <= 32 else hashlib.sha512(data)
    # SHA-512 gives 64 bytes: a longer global key cannot be derived (keys.py
    # refuses '+' keys over 64 bytes; Cilium would panic slicing the digest).
    if len(global_key) > digest.digest_size:
        raise ValueError(f"pair_key: a {len(global_key)}-byte key is longer than the {digest.digest_size}-byte digest")
    return digest.digest()[: len(global_key)]


def _derive(algorithm: Algorithm, material_bytes: bytes) -> Algorithm:
    def d(key: KeyMaterial) -> KeyMaterial:
        return KeyMaterial(_digest(key.value, material_bytes))

    if isinstance(algorithm, AeadAlgorithm):
        return AeadAlgorithm(algorithm.name, d(algorithm.key), algorithm.icv_bits)
    return replace(algorithm, auth_key=d(algorithm.auth_key), enc_key=d(algorithm.enc_key))


def _boot(boot_id: Optional[str]) -> str:
    if boot_id is None:
        raise ConfigError("per-node-pair keys ('+') need the boot ID of both nodes; one has none")
    return boot_id
