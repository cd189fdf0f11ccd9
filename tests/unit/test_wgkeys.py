"""The node's WireGuard key pair in the state dir (agent.wireguard.keys).

Properties asserted:
- the public key is X25519 of the private key, base64 as ``wg pubkey``
  prints it (RFC 7748 vector, and the wg tool itself when installed);
- the key file is 0600 in a 0700 dir whatever the umask, and is reused
  across restarts byte for byte; any group/other permission bit is refused;
- writes are atomic: a failure before the rename leaves the old key intact
  and no temporary file behind;
- a corrupt, wrong-mode, symlinked or lost key file is a ConfigError that
  names the file and the problem, and a new pair comes only when allowed;
- a new key epoch always makes a new pair, persisted with the epoch;
- the private key never appears in a log line or an error message.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from agent.wireguard import keys as wgkeys
from agent.errors import ConfigError, KernelError
from agent.wireguard.keys import KEY_FILE, check_public_key, load_or_create, public_key_of

# RFC 7748 section 6.1, Alice's key pair.
RFC_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def secrets_of(state_dir: Path) -> list[str]:
    """Every textual form of the stored private key (to prove it never leaks)."""
    raw = base64.b64decode(json.loads((state_dir / KEY_FILE).read_text())["privateKey"])
    return [base64.b64encode(raw).decode(), raw.hex(), repr(raw)]


def assert_no_secret(texts: list[str], state_dir: Path) -> None:
    for secret in secrets_of(state_dir):
        for text in texts:
            assert secret not in text, "private key material leaked"


def test_public_key_is_x25519_base64_rfc7748() -> None:
    assert public_key_of(RFC_PRIVATE) == base64.b64encode(RFC_PUBLIC).decode()


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools not installed")
def test_public_key_matches_wg_pubkey(tmp_path: Path) -> None:
    pair = load_or_create(tmp_path)
    out = subprocess.run(["wg", "pubkey"], input=base64.b64encode(bytes(pair.private)).decode() + "\n",
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == pair.public_key


def test_created_file_and_dir_modes_ignore_umask(tmp_path: Path) -> None:
    state = tmp_path / "state" / "nested"
    old = os.umask(0)
    try:
        pair = load_or_create(state)
    finally:
        os.umask(old)
    assert stat.S_IMODE((state / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert check_public_key(pair.public_key) is None
    assert pair.epoch == 0
    assert "redacted" in repr(pair) and "redacted" in f"{pair.private}"


def test_reused_across_restarts(tmp_path: Path) -> None:
    first = load_or_create(tmp_path, epoch=4)
    before = (tmp_path / KEY_FILE).stat()
    again = load_or_create(tmp_path, epoch=4)
    unchanged_epoch = load_or_create(tmp_path)  # no epoch declared: keep what is stored
    assert again == first == unchanged_epoch
    after = (tmp_path / KEY_FILE).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "file rewritten"


def test_epoch_change_makes_new_pair_persisted_with_epoch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    first = load_or_create(tmp_path, epoch=1)
    second = load_or_create(tmp_path, epoch=2)
    assert second.public_key != first.public_key and second.epoch == 2
    assert json.loads((tmp_path / KEY_FILE).read_text())["epoch"] == 2
    assert load_or_create(tmp_path, epoch=2) == second
    assert "epoch changed old=1 new=2" in caplog.text and second.public_key in caplog.text
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert_no_secret([caplog.text], tmp_path)


def test_failed_write_keeps_old_key_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = load_or_create(tmp_path, epoch=1)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wgkeys.os, "fsync", broken_fsync)
    with pytest.raises(KernelError, match="cannot write .*No space left"):
        load_or_create(tmp_path, epoch=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE]
    assert load_or_create(tmp_path, epoch=1) == old


def test_leftover_temp_file_from_crash_is_harmless(tmp_path: Path) -> None:
    (tmp_path / f".{KEY_FILE}.tmp").write_text("half a key")
    pair = load_or_create(tmp_path)
    assert load_or_create(tmp_path) == pair
    assert not (tmp_path / f".{KEY_FILE}.tmp").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_wrong_mode_refused_then_regenerated_when_allowed(
    tmp_path: Path, mode: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    old = load_or_create(tmp_path)
    (tmp_path / KEY_FILE).chmod(mode)
    with pytest.raises(ConfigError) as err:
        load_or_create(tmp_path)
    text = str(err.value)
    assert str(tmp_path / KEY_FILE) in text and f"{mode:04o}" in text and "0600" in text
    assert "--allow-key-regeneration" in text
    assert_no_secret([text], tmp_path)
    new = load_or_create(tmp_path, allow_regeneration=True)
    assert new.public_key != old.public_key
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert "made a new key pair because regeneration is allowed" in caplog.text


CORRUPT = {
    "truncated": lambda d: json.dumps(d)[:40],
    "not json": lambda d: "\x00\x01garbage",
    "bad base64": lambda d: json.dumps({**d, "privateKey": "!!!not base64!!!"}),
    "short key": lambda d: json.dumps({**d, "privateKey": base64.b64encode(b"x" * 31).decode()}),
    "public mismatch": lambda d: json.dumps({**d, "publicKey": base64.b64encode(RFC_PUBLIC).decode()}),
    "negative epoch": lambda d: json.dumps({**d, "epoch": -1}),
    "unknown version": lambda d: json.dumps({**d, "version": 9}),
    "empty": lambda d: "",
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_file_is_clear_error_never_silent(tmp_path: Path, name: str) -> None:
    load_or_create(tmp_path)
    path = tmp_path / KEY_FILE
    doc = json.loads(path.read_text())
    secrets = secrets_of(tmp_path)
    path.write_text(CORRUPT[name](doc))
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="corrupt") as err:
        load_or_create(tmp_path)
    assert str(path) in str(err.value)
    assert all(s not in str(err.value) for s in secrets)
    assert path.read_text() == CORRUPT[name](doc), "a refused file must be left for the operator"
    regenerated = load_or_create(tmp_path, allow_regeneration=True)
    assert load_or_create(tmp_path) == regenerated


def test_symlink_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    load_or_create(elsewhere)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / KEY_FILE).symlink_to(elsewhere / KEY_FILE)
    with pytest.raises(ConfigError, match="cannot open"):
        load_or_create(state)


def test_lost_key_of_advertising_node_needs_permission(tmp_path: Path) -> None:
    advertised = base64.b64encode(RFC_PUBLIC).decode()
    with pytest.raises(ConfigError, match=f"still advertises public key {advertised}.*lost"):
        load_or_create(tmp_path, advertised=advertised)
    assert not (tmp_path / KEY_FILE).exists()
    pair = load_or_create(tmp_path, advertised=advertised, allow_regeneration=True)
    assert pair.public_key != advertised
    # Once the file exists, an advertised (stale) key is no reason to refuse.
    assert load_or_create(tmp_path, advertised=advertised) == pair


def test_negative_epoch_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="epoch.*>= 0, got -1"):
        load_or_create(tmp_path, epoch=-1)


@pytest.mark.parametrize(
    "text, problem",
    [
        (None, "missing"),
        ("", "missing"),
        ("abc", "not 44 characters"),
        ("A" * 43 + "=", None),
        ("!" * 43 + "=", "not valid base64"),
        ("A" * 42 + "==", "decodes to 31 bytes"),
        ("A" * 42 + "B=", "not canonical"),
    ],
)
def test_check_public_key(text: object, problem: str | None) -> None:
    result = check_public_key(text)
    if problem is None:
        assert result is None
    else:
        assert result is not None and problem in result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    load_or_create(tmp_path)
    os.chown(tmp_path / KEY_FILE, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        load_or_create(tmp_path)
