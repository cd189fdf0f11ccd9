"""agent.ipsec.keys: the keys-file grammar Cilium accepts, and its error messages.

Properties asserted:
- every form Cilium's LoadIPSecKeys accepts (its own test fixtures included)
  parses to the same key ID, flag, algorithm and bytes;
- what Cilium rejects is rejected, with the line, the field and the rule;
- no error message carries key material, not even a fragment of a bad key;
- format -> parse round-trips, and single mutations of a valid line fail.
"""

from __future__ import annotations

import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ipsec import keys
from agent.errors import ConfigError
from agent.model import AeadAlgorithm, CipherAuthAlgorithm, KeyMaterial

# Distinctive key hex: any 8-character window of it in a message is a leak.
K20 = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
K36 = K20 + "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
K32 = "c0ffee00" * 8


def redacted_id(value: object) -> str:
    """Test IDs without key material: hex runs and bytes are shown by length."""
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        return re.sub(r"(0x)?[0-9a-fA-F]{8,}", lambda m: f"<hex{len(m.group(0))}>", value)
    return "-"


def assert_no_key_material(message: str, *hexkeys: str) -> None:
    low = message.lower()
    for hexkey in hexkeys:
        for i in range(len(hexkey) - 7):
            assert hexkey[i : i + 8].lower() not in low, "error message leaks key material"


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        keys.parse(text)
    return str(info.value)


# --- accepted forms -------------------------------------------------------------


@pytest.mark.parametrize(
    "line, spi, per_node, key_hex, icv",
    [
        (f"3 rfc4106(gcm(aes)) {K20} 128", 3, False, K20, 128),
        (f"3+ rfc4106(gcm(aes)) 0x{K20} 128", 3, True, K20, 128),
        (f"15+ rfc4106(gcm(aes)) {K36.upper()} 96", 15, True, K36, 96),
        (f"1 rfc4106(gcm(aes)) {K36} 128", 1, False, K36, 128),
        (f"07 rfc4106(gcm(aes)) {K20} 128", 7, False, K20, 128),  # Go's Atoi takes leading zeros
        (f"4 rfc7539esp(chacha20,poly1305) {K36} 128", 4, False, K36, 128),
        (f"5 rfcfuture(foo) {K20} 256", 5, False, K20, 256),  # unknown AEAD: left to the kernel
    ],
    ids=redacted_id,
)
def test_aead_line(line: str, spi: int, per_node: bool, key_hex: str, icv: int) -> None:
    ks = keys.parse(line + "\n")
    key = ks.current
    assert (key.spi, key.per_node) == (spi, per_node)
    assert isinstance(key.algorithm, AeadAlgorithm)
    assert key.algorithm.key == KeyMaterial(bytes.fromhex(key_hex))
    assert key.algorithm.icv_bits == icv


def test_auth_enc_line() -> None:
    ks = keys.parse(f"2+ hmac(sha256) 0x{K32} cbc(aes) {K32[:32]}")
    alg = ks.current.algorithm
    assert isinstance(alg, CipherAuthAlgorithm)
    assert (alg.auth_name, alg.enc_name) == ("hmac(sha256)", "cbc(aes)")
    assert bytes(alg.auth_key) == bytes.fromhex(K32) and bytes(alg.enc_key) == bytes.fromhex(K32[:32])


@pytest.mark.parametrize(
    "text",
    [
        # Cilium's own fixtures (ipsec_linux_test.go): keysAeadDat, keysAeadDat256, keysDat.
        "4 rfc4106(gcm(aes)) 44434241343332312423222114131211f4f3f2f1 128\n",
        "5 rfc4106(gcm(aes)) 44434241343332312423222114131211f4f3f2f144434241343332312423222114131211 128\n",
        "1 hmac(sha256) 0123456789abcdef0123456789abcdef cbc(aes) 0123456789abcdef0123456789abcdef\n"
        "2 hmac(sha256) 0123456789abcdef0123456789abcdef cbc(aes) 0123456789abcdef0123456789abcdef\n",
    ],
    ids=redacted_id,
)
def test_cilium_fixtures_accepted(text: str) -> None:
    ks = keys.parse(text)
    assert ks.current.spi == int(text.strip().splitlines()[-1].split(" ")[0])


def test_previous_first_current_last_and_lookup() -> None:
    ks = keys.parse(f"3+ rfc4106(gcm(aes)) {K20} 128\r\n\n4+ rfc4106(gcm(aes)) {K36} 128\r\n\n")
    assert ks.spis == (3, 4)
    assert ks.current.spi == 4
    assert ks[3].algorithm != ks[4].algorithm
    assert ks.get(5) is None and 5 not in ks and 3 in ks
    with pytest.raises(KeyError):
        ks[5]


def test_repr_hides_keys() -> None:
    ks = keys.parse(f"3+ rfc4106(gcm(aes)) {K20} 128")
    assert_no_key_material(repr(ks) + str(ks.current), K20)


def test_load(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"3+ rfc4106(gcm(aes)) {K20} 128\n")
    assert keys.load(path).current.spi == 3
    with pytest.raises(ConfigError, match="cannot read .*missing"):
        keys.load(tmp_path / "missing")


# --- rejected forms ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        # Cilium's parseSPI table and invalid fixtures
        (f"254 rfc4106(gcm(aes)) {K20} 128", ["line 1", "field spi", "1..15", "254"]),
        (f"16+ rfc4106(gcm(aes)) {K20} 128", ["line 1", "field spi", "1..15", "16"]),
        (f"0 rfc4106(gcm(aes)) {K20} 128", ["line 1", "field spi", "1..15", "got 0"]),
        (f"abc rfc4106(gcm(aes)) {K20} 128", ["field spi", "'abc'"]),
        (f"+ rfc4106(gcm(aes)) {K20} 128", ["field spi"]),
        (f"+3 rfc4106(gcm(aes)) {K20} 128", ["field spi"]),
        (f"3++ rfc4106(gcm(aes)) {K20} 128", ["field spi"]),
        (f" rfc4106(gcm(aes)) {K20} 128", ["line 1", "empty field at position 1"]),
        ("6 test abcdefghijklmnopqrstuvwzyzABCDEF test abcdefghijklmnopqrstuvwzyzABCDEF", ["field auth-key", "hex"]),
        (" \n", ["no key line"]),
        ("", ["no key line"]),
        # same SPI twice (Cilium: "changing IPSec keys requires incrementing the key id")
        (f"7 rfc4106(gcm(aes)) {K20} 128\n7 rfc4106(gcm(aes)) {K36} 128", ["line 2", "field spi", "line 1", "new key ID"]),
        (f"7 rfc4106(gcm(aes)) {K20} 128\n8 rfc4106(gcm(aes)) {K36} 128\n7 rfc4106(gcm(aes)) {K20} 128", ["line 3"]),
        # ICV
        (f"3 rfc4106(gcm(aes)) {K20} 64", ["field icv-bits", "96, 128 or 256", "64"]),
        (f"3 rfc4106(gcm(aes)) {K20} 0x80", ["field icv-bits", "96, 128 or 256"]),
        (f"3 rfc4106(gcm(aes)) {K20} +128", ["field icv-bits"]),
        (f"3 rfc4106(gcm(aes)) {K20} 256", ["field icv-bits", "rfc4106(gcm(aes)) takes 96 or 128"]),
        # hex
        (f"3 rfc4106(gcm(aes)) {K20[:-1]} 128", ["field aead-key", "odd number of hex digits (39)"]),
        (f"3 rfc4106(gcm(aes)) {K20[:-1]}g 128", ["field aead-key", "not a hex string", "40-character"]),
        (f"3 rfc4106(gcm(aes)) 0X{K20} 128", ["field aead-key", "lowercase 0x"]),
        ("3 rfc4106(gcm(aes)) 0x 128", ["field aead-key", "empty"]),
        ('3 rfc4106(gcm(aes)) "" 128', ["field aead-key", "empty key"]),
        (f"3 rfc4106(gcm(aes)) {K32} 128", ["field aead-key", "20, 28 or 36 bytes", "got 32 bytes"]),
        # algorithms
        (f"3 gcm(aes) {K20} 128", ["field aead-algo", "'rfc'", "'gcm(aes)'"]),
        (f"3 {K20} rfc4106(gcm(aes)) 128", ["field aead-algo", "40-character value"]),
        (f"3 rfc4106(gcm(aes)) {K20} cbc(aes) {K32[:32]}", ["field auth-algo", "AEAD"]),
        ('3 digest_null "" cipher_null ""', ["field auth-algo", "digest_null", "no protection"]),
        (f"3 hmac(sha256) {K32} cipher_null {K32[:32]}", ["field enc-algo", "cipher_null"]),
        (f"3 hmac(sha256) {K32} cbc(aes) {K20}", ["field enc-key", "cbc(aes) needs 16, 24 or 32 bytes", "got 20"]),
        # field count and separators
        (f"3 rfc4106(gcm(aes)) {K20}", ["line 1", "too few fields (3)"]),
        (f"3 hmac(sha256) {K32} cbc(aes) {K32[:32]} 10.0.0.1", ["too many fields (6)"]),
        (f"3  rfc4106(gcm(aes)) {K20} 128", ["empty field at position 2", "exactly one space"]),
        (f"3 rfc4106(gcm(aes)) {K20}  128", ["empty field at position 4"]),
        (f"3 rfc4106(gcm(aes)) {K20} 128 ", ["empty field at position 5"]),
        (f"3 rfc4106(gcm(aes))\t{K20} 128", ["too few fields (3)"]),
        (f"3 hmac(sha256)\t{K32} cbc(aes) {K32[:32]} x", ["field auth-algo", "whitespace"]),
        # rotation must keep the overhead (Cilium: "key length must not change")
        (f"3 rfc4106(gcm(aes)) {K20} 128\n4 rfc4106(gcm(aes)) {K20} 96", ["line 2", "overhead", "128", "96"]),
        (f"3 rfc4106(gcm(aes)) {K20} 128\n4 hmac(sha256) {K32} cbc(aes) {K32[:32]}", ["line 2", "overhead"]),
        # a '+' key is cut from a SHA-512 digest
        (f"3+ hmac(sha512) {K32 * 3} cbc(aes) {K32[:32]}", ["field auth-key", "at most 64 bytes", "96 bytes"]),
    ],
    ids=redacted_id,
)
def test_rejected(text: str, expected: list[str]) -> None:
    message = error_of(text)
    for part in expected:
        assert part in message
    assert_no_key_material(message, K20, K36, K32)


def test_line_numbers_count_blank_lines() -> None:
    message = error_of(f"\n3 rfc4106(gcm(aes)) {K20} 128\n\n4 rfc4106(gcm(aes)) {K20[:-2]} 128\n")
    assert message.startswith("keys line 4, field aead-key")


def test_check_rotation() -> None:
    old = keys.parse(f"3+ rfc4106(gcm(aes)) {K20} 128")
    keys.check_rotation(old, keys.parse(f"3+ rfc4106(gcm(aes)) {K20} 128\n4+ rfc4106(gcm(aes)) {K36} 128"))
    keys.check_rotation(old, keys.parse(f"4+ rfc4106(gcm(aes)) {K36} 128"))
    for changed in (f"3+ rfc4106(gcm(aes)) {K36} 128", f"3 rfc4106(gcm(aes)) {K20} 128"):
        with pytest.raises(ConfigError, match="key ID 3 now has a different key") as info:
            keys.check_rotation(old, keys.parse(changed))
        assert_no_key_material(str(info.value), K20, K36)


# --- properties -------------------------------------------------------------------

AEAD_SHAPES = [("rfc4106(gcm(aes))", (20, 28, 36), (96, 128)), ("rfc7539esp(chacha20,poly1305)", (36,), (128,))]


@st.composite
def key_lines(draw: st.DrawFn, spi: int) -> keys.IpsecKey:
    per_node = draw(st.booleans())
    if draw(st.booleans()):
        name, lengths, _ = draw(st.sampled_from(AEAD_SHAPES))
        key = draw(st.sampled_from(lengths).flatmap(lambda n: st.binary(min_size=n, max_size=n)))
        return keys.IpsecKey(spi, per_node, AeadAlgorithm(name, KeyMaterial(key), 128))
    auth = draw(st.binary(min_size=32, max_size=32))
    enc = draw(st.sampled_from((16, 24, 32)).flatmap(lambda n: st.binary(min_size=n, max_size=n)))
    return keys.IpsecKey(spi, per_node, CipherAuthAlgorithm("hmac(sha256)", KeyMaterial(auth), "cbc(aes)", KeyMaterial(enc)))


@st.composite
def key_sets(draw: st.DrawFn) -> keys.KeySet:
    spis = draw(st.lists(st.integers(1, 15), min_size=1, max_size=3, unique=True))
    aead = draw(st.booleans())
    lines = [draw(key_lines(spi)) for spi in spis]
    # keep one overhead across the file, as the parser demands
    lines = [k for k in lines if isinstance(k.algorithm, AeadAlgorithm) == aead] or lines[:1]
    return keys.KeySet(tuple(lines))


@settings(max_examples=150, deadline=None)
@given(key_sets())
def test_format_parse_round_trip(ks: keys.KeySet) -> None:
    assert keys.parse(keys.format_keys(ks)) == ks


MUTATIONS = {
    "spi zero": lambda f: ["0" + ("+" if f[0].endswith("+") else ""), *f[1:]],
    "spi too big": lambda f: ["16", *f[1:]],
    "odd hex": lambda f: [f[0], f[1], f[2][:-1], *f[3:]],
    "non-hex char": lambda f: [f[0], f[1], f[2][:-1] + "z", *f[3:]],
    "extra field": lambda f: [*f, "extra"] if len(f) == 5 else [*f, "x", "y"],
    "missing field": lambda f: f[:-2] if len(f) == 5 else f[:-1],
    "double space": lambda f: [f[0], "", *f[1:]],
    "bad icv": lambda f: [*f[:3], "100"] if len(f) == 4 else [f[0], "rfc4106(gcm(aes))", *f[2:]],
}


@settings(max_examples=150, deadline=None)
@given(key_sets(), st.sampled_from(sorted(MUTATIONS)))
def test_mutations_rejected_without_leaking(ks: keys.KeySet, mutation: str) -> None:
    line = keys.format_line(ks.current)
    mutated = " ".join(MUTATIONS[mutation](line.split(" ")))
    with pytest.raises(ConfigError) as info:
        keys.parse(mutated)
    secret_hex = [f.removeprefix("0x") for f in line.split(" ") if f.startswith("0x")]
    assert_no_key_material(str(info.value), *secret_hex)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.printable + "+\u00b2\u0663", max_size=200))
def test_any_text_parses_or_raises_config_error(text: str) -> None:
    try:
        ks = keys.parse(text)
    except ConfigError:
        return
    assert all(1 <= k.spi <= 15 for k in ks)


def test_fuzz_target_short_run(tmp_path: Path) -> None:
    """A short, seeded run of fuzz/fuzz_keys.py (atheris): no crash, no leak."""
    script = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_keys.py"
    result = subprocess.run(
        [sys.executable, str(script), "-runs=5000", "-seed=1", "-print_final_stats=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Done 5000 runs" in result.stderr
    assert not list(tmp_path.glob("crash-*"))
