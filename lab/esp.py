"""Decrypt captured ESP with scapy's independent ESP implementation.

This is the proof that the datapath uses the key we think it does: the
kernel encrypted the packet, scapy (which shares no code with the kernel or
the agent) decrypts it with the expected key material and the test checks
that the inner packet is the pod traffic that was sent. A wrong key fails the
ICV check and raises.

Usage::

    inner = decrypt(esp_pkt, key=bytes.fromhex(...), icv_bits=128, esn=True)
    assert inner[IP].src == "10.244.1.10"
"""

from __future__ import annotations

from scapy.layers.inet import IP  # type: ignore[import-untyped]
from scapy.layers.ipsec import ESP, SecurityAssociation  # type: ignore[import-untyped]
from scapy.packet import Packet  # type: ignore[import-untyped]

# Kernel transform names -> scapy's names.
_AEAD = {"rfc4106(gcm(aes))": "AES-GCM"}
_CRYPT = {"cbc(aes)": "AES-CBC"}
_AUTH = {"hmac(sha256)": "SHA2-256-128", "hmac(sha1)": "HMAC-SHA1-96", "hmac(sha512)": "SHA2-512-256"}


class DecryptError(Exception):
    """The packet did not decrypt (wrong key, SPI or algorithm). No key material in the message."""


def decrypt(
    pkt: Packet,
    key: bytes,
    algo: str = "rfc4106(gcm(aes))",
    icv_bits: int = 128,
    esn: bool = False,
    esn_hi: int = 0,
) -> Packet:
    """Decrypt one captured tunnel-mode ESP packet with an AEAD key (key || salt)."""
    ip = pkt[IP]
    if algo not in _AEAD:
        raise ValueError(f"algo must be one of {sorted(_AEAD)}, got {algo!r}")
    sa = SecurityAssociation(
        ESP,
        spi=ip[ESP].spi,
        crypt_algo=_AEAD[algo],
        crypt_key=key,
        crypt_icv_size=icv_bits // 8,
        tunnel_header=IP(src=ip.src, dst=ip.dst),
        esn_en=esn,
        esn=esn_hi,
    )
    return _run(sa, ip)


def decrypt_cbc(pkt: Packet, enc_key: bytes, auth_key: bytes, auth: str = "hmac(sha256)") -> Packet:
    """Decrypt one tunnel-mode ESP packet of the non-AEAD form (cbc(aes) + hmac)."""
    ip = pkt[IP]
    sa = SecurityAssociation(
        ESP,
        spi=ip[ESP].spi,
        crypt_algo=_CRYPT["cbc(aes)"],
        crypt_key=enc_key,
        auth_algo=_AUTH[auth],
        auth_key=auth_key,
        tunnel_header=IP(src=ip.src, dst=ip.dst),
    )
    return _run(sa, ip)


def _run(sa: SecurityAssociation, ip: Packet) -> Packet:
    try:
        inner = sa.decrypt(IP(bytes(ip)))
    except Exception as e:  # scapy raises several types for a bad ICV or padding
        raise DecryptError(f"ESP spi={ip[ESP].spi:#010x} seq={ip[ESP].seq} did not decrypt: {type(e).__name__}") from None
    return inner
