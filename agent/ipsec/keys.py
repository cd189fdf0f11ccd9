"""Parse the IPsec keys file, in the grammar Cilium's agent accepts.

The keys Secret has one entry, ``keys``, mounted as a file. Each non-blank
line is one key; the previous key comes first and the current one last::

    <spi>[+] <aead-algo> <hex-key> <icv-bits>
    <spi>[+] <auth-algo> <hex-key> <enc-algo> <hex-key>

for example ``3+ rfc4106(gcm(aes)) 0x41049390e1e2b5d6543901daab6435f4042155fe 128``.
``<spi>`` is the key ID, 1..15; a trailing ``+`` asks for per-node-pair keys
derived from this one (see agent.ipsec.derive). Usage::

    from agent.ipsec import keys
    ks = keys.load("/etc/sealnet/keys/keys")   # or keys.parse(text)
    ks.current.spi, ks.current.per_node        # the key to send with
    ks.get(3)                                  # a key by its ID, or None
    keys.check_rotation(old_ks, ks)            # refuse a re-used key ID

Rules, checked against cilium/cilium pkg/datapath/linux/ipsec/ipsec_linux.go
(LoadIPSecKeys, parseSPI, decodeIPSecKey):

- fields are separated by exactly one space (Cilium splits on " "); a line
  ending in CR is accepted (Go's bufio.ScanLines strips it);
- 4 fields: AEAD, the algorithm name starts with ``rfc``, ICV 96, 128 or 256;
- 5 fields: auth + encryption; more than 5 is "too many fields";
- hex keys may carry a lowercase ``0x`` prefix; odd length or non-hex fails;
- a key ID that repeats is refused ("changing IPSec keys requires
  incrementing the key id"), and so is a rotation that changes the ESP
  overhead (Cilium: "key length must not change": the ICV for AEAD keys, the
  auth key length otherwise).

Where sealnet is stricter than Cilium, on purpose (each is a file Cilium would
take but that cannot be what the operator meant, or that sends traffic
without protection):

- blank lines are skipped (Cilium refuses them; the Secret sealnet renders
  never has one, so a Cilium agent reading it is unaffected);
- ``+3``, ``-3`` as a key ID (Go's Atoi takes a sign), empty fields (two
  spaces, a trailing space) and fewer than 4 fields (a panic in Cilium) fail;
- a key ID repeated on any earlier line fails, not only on the line before;
- ``cipher_null`` / ``digest_null`` (Cilium's test keys: no encryption or no
  integrity) and empty keys fail; the key lengths of well-known algorithms
  are checked here rather than by the kernel when the SA is added.

Error messages name the line, the field and the rule. They never contain key
material, not even part of a malformed key: a field that may be a key is
described by its length only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from agent.errors import ConfigError
from agent.model import AeadAlgorithm, Algorithm, CipherAuthAlgorithm, KeyMaterial

#: Cilium's key ID range (4 mark bits; linux_defaults.IPsecMaxKeyVersion).
MIN_SPI, MAX_SPI = 1, 15
#: ICV lengths Cilium accepts for the AEAD form.
ICV_BITS = (96, 128, 256)
#: Longest key a '+' line may carry: derived keys are cut from a SHA-512 digest.
MAX_PER_NODE_KEY_BYTES = 64

# Key lengths (bytes, salt included) and ICVs the kernel takes for well-known
# transforms (crypto/gcm.c crypto_rfc4106_setkey: AES key + 4-byte salt;
# rfc4309: + 3-byte salt; chacha20poly1305.c: 32 + 4). Unknown names are left
# to the kernel, as Cilium does.
_AEAD_RULES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "rfc4106(gcm(aes))": ((20, 28, 36), (96, 128)),
    "rfc4543(gcm(aes))": ((20, 28, 36), (128,)),
    "rfc4309(ccm(aes))": ((19, 27, 35), (96, 128)),
    "rfc7539esp(chacha20,poly1305)": ((36,), (128,)),
}
_ENC_KEY_BYTES: dict[str, tuple[int, ...]] = {"cbc(aes)": (16, 24, 32), "rfc3686(ctr(aes))": (20, 28, 36)}
_NULL_ALGORITHMS = frozenset({"cipher_null", "ecb(cipher_null)", "digest_null"})

_SPI_RE = re.compile(r"([0-9]+)(\+?)")
_HEX_RE = re.compile(r"[0-9a-fA-F]*")
_DECIMAL_RE = re.compile(r"[0-9]+")
# An algorithm name is echoed in errors only if it cannot be key material:
# key hex never contains "(" or "_".
_SAFE_NAME_RE = re.compile(r"[A-Za-z0-9_,-]*[(_][A-Za-z0-9_(),-]*")

_AEAD_FIELDS = ("spi", "aead-algo", "aead-key", "icv-bits")
_PAIR_FIELDS = ("spi", "auth-algo", "auth-key", "enc-algo", "enc-key")


@dataclass(frozen=True)
class IpsecKey:
    """One line of the keys file: key ID, ``+`` flag and transform."""

    spi: int
    per_node: bool
    algorithm: Algorithm

    def overhead(self) -> tuple[str, int]:
        """What Cilium refuses to change during a rotation (ESP overhead)."""
        if isinstance(self.algorithm, AeadAlgorithm):
            return ("aead icv-bits", self.algorithm.icv_bits)
        return ("auth-key bytes", len(self.algorithm.auth_key))


@dataclass(frozen=True)
class KeySet:
    """The parsed file: keys in file order, the current (last) one last."""

    keys: tuple[IpsecKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigError("keys: no key; at least one line is required")
        spis = [k.spi for k in self.keys]
        if len(set(spis)) != len(spis):
            raise ConfigError(f"keys: key IDs must be unique, got {spis}")

    @property
    def current(self) -> IpsecKey:
        """The key new traffic is sent with: the file's last line."""
        return self.keys[-1]

    @property
    def spis(self) -> tuple[int, ...]:
        return tuple(k.spi for k in self.keys)

    def get(self, spi: int) -> Optional[IpsecKey]:
        for key in self.keys:
            if key.spi == spi:
                return key
        return None

    def __getitem__(self, spi: int) -> IpsecKey:
        key = self.get(spi)
        if key is None:
            raise KeyError(spi)
        return key

    def __contains__(self, spi: object) -> bool:
        return any(k.spi == spi for k in self.keys)

    def __iter__(self) -> Iterator[IpsecKey]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def load(path: str | Path) -> KeySet:
    """Read and parse the keys file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--keys: {path} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"--keys: cannot read {path}: {e.strerror}") from None
    return parse(text)


def parse(text: str) -> KeySet:
    """Parse the keys file's text; raise ConfigError on the first bad line."""
    keys: list[IpsecKey] = []
    first_line: dict[int, int] = {}
    previous: Optional[tuple[int, IpsecKey]] = None
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip():
            continue
        key = _parse_line(number, line)
        if key.spi in first_line:
            raise ConfigError(
                f"keys line {number}, field spi: key ID {key.spi} is already used on line "
                f"{first_line[key.spi]}; changing a key requires a new key ID"
            )
        if previous is not None and previous[1].overhead() != key.overhead():
            (what, before), (what_now, now) = previous[1].overhead(), key.overhead()
            raise ConfigError(
                f"keys line {number}: a rotation must not change the ESP overhead "
                f"(line {previous[0]}: {what} {before}, line {number}: {what_now} {now}); "
                "Cilium refuses it (key length must not change)"
            )
        first_line[key.spi] = number
        previous = (number, key)
        keys.append(key)
    if not keys:
        raise ConfigError("keys: the file has no key line; expected '<spi>[+] <aead-algo> <hex-key> <icv-bits>'")
    return KeySet(tuple(keys))


def check_rotation(old: KeySet, new: KeySet) -> None:
    """Refuse a new keys file that gives a key ID seen before another key.

    Cilium refuses a changed key under the same ID: both ends would hold
    different keys for one SPI during the switch. Call this before replacing
    the KeySet in use.
    """
    for key in new:
        before = old.get(key.spi)
        if before is not None and before != key:
            raise ConfigError(
                f"keys: key ID {key.spi} now has a different key; changing a key requires a new key ID"
            )


def format_line(key: IpsecKey) -> str:
    """The keys-file line for ``key``. SECRET: the result holds key material."""
    spi = f"{key.spi}{'+' if key.per_node else ''}"
    alg = key.algorithm
    if isinstance(alg, AeadAlgorithm):
        return f"{spi} {alg.name} 0x{alg.key.value.hex()} {alg.icv_bits}"
    return f"{spi} {alg.auth_name} 0x{alg.auth_key.value.hex()} {alg.enc_name} 0x{alg.enc_key.value.hex()}"


def format_keys(keys: KeySet) -> str:
    """The whole file for ``keys``. SECRET: the result holds key material."""
    return "".join(format_line(k) + "\n" for k in keys)


# --- one line -----------------------------------------------------------------


def _parse_line(number: int, line: str) -> IpsecKey:
    fields = line.split(" ")
    n = len(fields)
    if "" in fields:
        raise ConfigError(
            f"keys line {number}: empty field at position {fields.index('') + 1}; fields are separated "
            "by exactly one space (no leading, trailing or double spaces)"
        )
    if n < 4 or n > 5:
        count = "too few" if n < 4 else "too many"
        raise ConfigError(
            f"keys line {number}: {count} fields ({n}); expected 4 "
            "'<spi>[+] <aead-algo> <hex-key> <icv-bits>' or 5 "
            "'<spi>[+] <auth-algo> <hex-key> <enc-algo> <hex-key>', separated by single spaces"
        )
    names = _AEAD_FIELDS if n == 4 else _PAIR_FIELDS
    for name, value in zip(names, fields):
        if any(c.isspace() for c in value):
            raise ConfigError(
                f"keys line {number}, field {name}: contains a tab or other whitespace; "
                "fields are separated by single spaces"
            )
    spi, per_node = _spi(number, fields[0])
    if n == 4:
        key = IpsecKey(spi, per_node, _aead(number, fields[1], fields[2], fields[3]))
    else:
        key = IpsecKey(spi, per_node, _pair(number, fields[1:]))
    if per_node:
        # Derived keys are a truncated SHA-512 digest at most (agent.ipsec.derive).
        for field, length in _key_lengths(key.algorithm):
            if length > MAX_PER_NODE_KEY_BYTES:
                raise ConfigError(
                    f"keys line {number}, field {field}: a per-node-pair ('+') key is derived from a "
                    f"SHA-512 digest, so at most {MAX_PER_NODE_KEY_BYTES} bytes; got {length} bytes"
                )
    return key


def _key_lengths(alg: Algorithm) -> tuple[tuple[str, int], ...]:
    if isinstance(alg, AeadAlgorithm):
        return (("aead-key", len(alg.key)),)
    return (("auth-key", len(alg.auth_key)), ("enc-key", len(alg.enc_key)))


def _spi(number: int, value: str) -> tuple[int, bool]:
    m = _SPI_RE.fullmatch(value)
    if m is None:
        shown = f"{value!r}" if len(value) <= 4 else f"a {len(value)}-character value"
        raise ConfigError(
            f"keys line {number}, field spi: must be a key ID {MIN_SPI}..{MAX_SPI} with an optional "
            f"'+' (per-node-pair keys), got {shown}"
        )
    spi = int(m.group(1))
    if not MIN_SPI <= spi <= MAX_SPI:
        shown = m.group(1) if len(m.group(1)) <= 4 else f"a {len(m.group(1))}-digit number"
        raise ConfigError(
            f"keys line {number}, field spi: key ID must be {MIN_SPI}..{MAX_SPI} "
            f"(Cilium's 4-bit key space), got {shown}"
        )
    return spi, m.group(2) == "+"


def _aead(number: int, name: str, key_field: str, icv_field: str) -> AeadAlgorithm:
    where = f"keys line {number}"
    if not name.startswith("rfc"):
        raise ConfigError(
            f"{where}, field aead-algo: an AEAD algorithm name starts with 'rfc', "
            f"e.g. rfc4106(gcm(aes)); got {_name(name)}"
        )
    key = _hex(number, "aead-key", key_field)
    digits = _DECIMAL_RE.fullmatch(icv_field) is not None
    if not digits or int(icv_field) not in ICV_BITS:
        shown = icv_field if digits and len(icv_field) <= 4 else f"a {len(icv_field)}-character value"
        raise ConfigError(f"{where}, field icv-bits: must be 96, 128 or 256, got {shown}")
    icv = int(icv_field)
    rule = _AEAD_RULES.get(name)
    if rule is not None:
        lengths, icvs = rule
        if len(key) not in lengths:
            raise ConfigError(
                f"{where}, field aead-key: {name} needs {_alternatives(lengths)} bytes "
                f"(key + salt), got {len(key)} bytes"
            )
        if icv not in icvs:
            raise ConfigError(f"{where}, field icv-bits: {name} takes {_alternatives(icvs)}, got {icv}")
    return AeadAlgorithm(name=name, key=KeyMaterial(key), icv_bits=icv)


def _pair(number: int, fields: list[str]) -> CipherAuthAlgorithm:
    auth_name, auth_field, enc_name, enc_field = fields
    where = f"keys line {number}"
    if auth_name.startswith("rfc"):
        raise ConfigError(
            f"{where}, field auth-algo: {_name(auth_name)} is an AEAD algorithm; "
            "the AEAD form has 4 fields '<spi>[+] <aead-algo> <hex-key> <icv-bits>'"
        )
    for field, name in (("auth-algo", auth_name), ("enc-algo", enc_name)):
        if name in _NULL_ALGORITHMS:
            raise ConfigError(
                f"{where}, field {field}: {name} gives no protection; sealnet refuses null algorithms"
            )
    auth_key = _hex(number, "auth-key", auth_field)
    enc_key = _hex(number, "enc-key", enc_field)
    lengths = _ENC_KEY_BYTES.get(enc_name)
    if lengths is not None and len(enc_key) not in lengths:
        raise ConfigError(
            f"{where}, field enc-key: {enc_name} needs {_alternatives(lengths)} bytes, got {len(enc_key)} bytes"
        )
    return CipherAuthAlgorithm(
        auth_name=auth_name, auth_key=KeyMaterial(auth_key), enc_name=enc_name, enc_key=KeyMaterial(enc_key)
    )


def _hex(number: int, field: str, value: str) -> bytes:
    """Decode a hex key as Cilium's decodeIPSecKey does, without echoing it."""
    where = f"keys line {number}, field {field}"
    if value == '""':
        # Cilium's spelling of an empty key, only meaningful with the null
        # algorithms, which are refused above.
        raise ConfigError(f'{where}: "" (an empty key) is not allowed')
    digits = value[2:] if value.startswith("0x") else value
    if not digits:
        raise ConfigError(f"{where}: the key is empty; expected hex digits after the optional 0x")
    if _HEX_RE.fullmatch(digits) is None:
        hint = " (only a lowercase 0x prefix is recognised)" if digits[:2] == "0X" else ""
        raise ConfigError(
            f"{where}: not a hex string: a {len(digits)}-character value contains a character "
            f"other than 0-9, a-f, A-F{hint}"
        )
    if len(digits) % 2:
        raise ConfigError(f"{where}: odd number of hex digits ({len(digits)}); each byte takes two")
    return bytes.fromhex(digits)


def _name(value: str) -> str:
    """An algorithm field as shown in an error: verbatim only if not key-like."""
    if len(value) <= 64 and _SAFE_NAME_RE.fullmatch(value):
        return repr(value)
    return f"a {len(value)}-character value"


def _alternatives(values: tuple[int, ...]) -> str:
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]
