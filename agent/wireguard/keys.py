"""The node's WireGuard key pair: made once, kept in the state dir, never shown.

Each node makes its own X25519 key pair (``cryptography``) and keeps the
private key in the agent's state dir (the DaemonSet's hostPath), so a restart
reuses it and peers need not learn a new key. Only the public key leaves the
node: base64, exactly as ``wg pubkey`` prints it, published as the Node
annotation ``sealnet.io/wireguard-public-key`` (static mode: the node
description's ``wireguardPublicKey``)::

    pair = load_or_create("/var/lib/sealnet", epoch=3)
    pair.public_key            # 'xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg='
    bytes(pair.private)        # 32 bytes, for the backend only; repr is redacted

The key file ``wireguard-key.json`` (mode 0600, owner only) holds the private
key, the public key (a consistency check) and the key epoch it was made for.
Writes are atomic: a temporary file in the same directory, fsync, rename,
fsync of the directory, so a crash leaves either the old or the new key,
never half of one.

In the daemon a key epoch change is a rotation without loss
(:func:`load_ring`, agent.wireguard.epochs): the old pair moves to
``wireguard-key-previous.json`` and stays up on its own interface until
every peer has moved to the new one; each pair records its interface slot
(0 or 1), so the two alternate. One rotation at a time: an epoch declared
while the previous pair is still kept waits (``Ring.waiting``).

When is a new pair made?
- no key file and nothing advertised for this node yet: first start, create;
- the declared key epoch differs from the stored one: a static rotation,
  always a new pair;
- the file is unreadable, corrupt, not 0600, not ours, or lost while the node
  still advertises a key: refuse with a ConfigError that says what is wrong
  and how to proceed, unless the operator allowed regeneration
  (``allowKeyRegeneration`` / ``--allow-key-regeneration``); never silently.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent import secretfile
from agent.errors import ConfigError
from agent.model import KeyMaterial

log = logging.getLogger(__name__)

KEY_FILE = "wireguard-key.json"
PREVIOUS_FILE = "wireguard-key-previous.json"
FILE_MODE = 0o600
DIR_MODE = 0o700
KEY_LEN = 32
_FORMAT_VERSION = 1
_REGEN_HINT = "remove the file or pass --allow-key-regeneration (allowKeyRegeneration: true)"


@dataclass(frozen=True)
class KeyPair:
    """A WireGuard key pair; ``private`` never prints (KeyMaterial)."""

    private: KeyMaterial
    public_key: str
    epoch: int
    #: which of the two interfaces holds it (a rotation alternates them)
    slot: int = 0


@dataclass(frozen=True)
class Ring:
    """The node's key pairs: the current one and, during a rotation, the previous one."""

    current: KeyPair
    previous: Optional[KeyPair] = None
    #: a declared epoch that waits until the previous pair has retired
    waiting: Optional[int] = None


def public_key_of(private: bytes) -> str:
    """The base64 public key for a raw 32-byte private key (``wg pubkey``)."""
    raw = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(raw).decode("ascii")


def generate(epoch: int = 0, slot: int = 0) -> KeyPair:
    """A fresh key pair (not stored)."""
    raw = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return KeyPair(KeyMaterial(raw), public_key_of(raw), epoch, slot)


def check_public_key(text: object) -> Optional[str]:
    """None if ``text`` is a WireGuard public key in base64, else why not."""
    if not isinstance(text, str) or not text:
        return "missing"
    if len(text) != 44 or not text.endswith("="):
        return f"{text!r} is not 44 characters of base64 ending in '='"
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return f"{text!r} is not valid base64"
    if len(raw) != KEY_LEN:
        return f"{text!r} decodes to {len(raw)} bytes, not {KEY_LEN}"
    if base64.b64encode(raw).decode("ascii") != text:
        return f"{text!r} is not canonical base64"
    return None


def key_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / KEY_FILE


def load_or_create(
    state_dir: str | Path,
    epoch: Optional[int] = None,
    allow_regeneration: bool = False,
    advertised: Optional[str] = None,
) -> KeyPair:
    """The node's key pair, made or replaced only as the module docstring says.

    ``epoch`` None keeps whatever epoch is stored; ``advertised`` is the
    public key the cluster currently has for this node (None if none), used to
    tell a first start from a lost key.
    """
    return _load(state_dir, epoch, allow_regeneration, advertised, keep_previous=False).current


def load_ring(
    state_dir: str | Path,
    epoch: Optional[int] = None,
    allow_regeneration: bool = False,
    advertised: Optional[str] = None,
) -> Ring:
    """Like :func:`load_or_create`, but an epoch change keeps the old pair as ``previous``.

    The old pair is written to ``wireguard-key-previous.json`` before the new
    one replaces ``wireguard-key.json`` (a crash in between leaves two copies
    of the old pair, read as one). If a previous pair is still kept, the new
    epoch waits: ``Ring.waiting`` says which."""
    return _load(state_dir, epoch, allow_regeneration, advertised, keep_previous=True)


def retire_previous(state_dir: str | Path) -> None:
    """Forget the previous pair (its interface is gone); nothing if there is none."""
    try:
        os.unlink(Path(state_dir) / PREVIOUS_FILE)
    except FileNotFoundError:
        pass


def _previous(directory: Path, current: Optional[KeyPair]) -> Optional[KeyPair]:
    path = directory / PREVIOUS_FILE
    try:
        previous = _read(path)
    except FileNotFoundError:
        return None
    except _BadKeyFile as e:
        # Only peers still on the old epoch need it; they are refused, never sent in clear.
        log.error("wireguard previous key ignored: %s; peers still on its epoch lose this node until they rotate",
                  e)
        return None
    if current is not None and previous.public_key == current.public_key:
        return None  # a crash between the two writes of a rotation
    return previous


def _load(state_dir: str | Path, epoch: Optional[int], allow_regeneration: bool, advertised: Optional[str],
          keep_previous: bool) -> Ring:
    if epoch is not None and epoch < 0:
        raise ConfigError(f"key epoch: must be an integer >= 0, got {epoch}")
    directory = Path(state_dir)
    _ensure_dir(directory)
    path = directory / KEY_FILE
    try:
        stored: Optional[KeyPair] = _read(path)
    except FileNotFoundError:
        stored = None
        if advertised is not None:
            # The cluster knows a key for this node that we no longer have:
            # a lost state dir, not a first start. Peers keep the old key
            # until the new one is published, so this needs a human's yes.
            problem = (f"{path} does not exist, but this node still advertises public key {advertised}: "
                       f"the private key was lost")
            return _regenerate_or_fail(path, problem, epoch or 0, allow_regeneration, keep_previous)
    except _BadKeyFile as e:
        return _regenerate_or_fail(path, str(e), epoch or 0, allow_regeneration, keep_previous)

    if stored is None:
        pair = generate(epoch or 0)
        _write(path, pair)
        log.info("wireguard key pair created path=%s epoch=%d public_key=%s", path, pair.epoch, pair.public_key)
        return Ring(pair)
    previous = _previous(directory, stored) if keep_previous else None
    if epoch is not None and epoch != stored.epoch:
        if previous is not None:
            return Ring(stored, previous, waiting=epoch)
        if keep_previous:
            _write(directory / PREVIOUS_FILE, stored)
        pair = generate(epoch, 1 - stored.slot if keep_previous else stored.slot)
        _write(path, pair)
        log.info(
            "wireguard key epoch changed old=%d new=%d: new key pair public_key=%s (was %s)%s",
            stored.epoch, epoch, pair.public_key, stored.public_key,
            ", kept until every peer has moved" if keep_previous else "",
        )
        return Ring(pair, stored if keep_previous else None)
    return Ring(stored, previous)


class _BadKeyFile(Exception):
    """The key file exists but cannot be used; message names path and problem, never content."""


def _regenerate_or_fail(path: Path, problem: str, epoch: int, allowed: bool, keep_previous: bool) -> Ring:
    """A new current pair in place of a lost or unusable one, when allowed.

    A previous pair still kept (a rotation in progress) stays, and the new
    pair takes the other slot, so the two never share an interface."""
    if not allowed:
        raise ConfigError(f"wireguard key: {problem}; {_REGEN_HINT}")
    previous = _previous(path.parent, None) if keep_previous else None
    pair = generate(epoch, 1 - previous.slot if previous is not None else 0)
    _write(path, pair)
    log.warning(
        "wireguard key: %s; made a new key pair because regeneration is allowed path=%s public_key=%s",
        problem, path, pair.public_key,
    )
    return Ring(pair, previous)


def _ensure_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--state-dir: cannot create {directory}: {e.strerror}") from e
    if not directory.is_dir():
        raise ConfigError(f"--state-dir: {directory} is not a directory")


def _read(path: Path) -> KeyPair:
    # O_NOFOLLOW: a symlink planted in the state dir must not redirect us.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _BadKeyFile(f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _BadKeyFile(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise _BadKeyFile(f"{path} is owned by uid {st.st_uid}, not by the agent (uid {os.geteuid()})")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            # Readable or writable by others: the key may be known or planted.
            raise _BadKeyFile(
                f"{path} has mode {mode:04o}, expected {FILE_MODE:04o} (no access for group or others); "
                f"the private key may have been exposed"
            )
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
    finally:
        os.close(fd)
    return _parse(path, data)


def _parse(path: Path, data: bytes) -> KeyPair:
    # Error messages say what is wrong and never quote the content.
    try:
        doc: Any = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _BadKeyFile(f"{path} is corrupt (not a JSON key file)") from None
    if not isinstance(doc, dict) or doc.get("version") != _FORMAT_VERSION:
        raise _BadKeyFile(f"{path} is corrupt (expected a version {_FORMAT_VERSION} key file)")
    epoch = doc.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise _BadKeyFile(f"{path} is corrupt (epoch is not an integer >= 0)")
    try:
        private = base64.b64decode(doc.get("privateKey", ""), validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise _BadKeyFile(f"{path} is corrupt (privateKey is not base64)") from None
    if len(private) != KEY_LEN:
        raise _BadKeyFile(f"{path} is corrupt (privateKey is {len(private)} bytes, not {KEY_LEN})")
    public = public_key_of(private)
    if doc.get("publicKey") != public:
        raise _BadKeyFile(f"{path} is corrupt (publicKey does not belong to privateKey)")
    slot = doc.get("slot", 0)
    if slot not in (0, 1) or isinstance(slot, bool):
        raise _BadKeyFile(f"{path} is corrupt (slot is not 0 or 1)")
    return KeyPair(KeyMaterial(private), public, epoch, slot)


def _write(path: Path, pair: KeyPair) -> None:
    doc = {
        "version": _FORMAT_VERSION,
        "epoch": pair.epoch,
        "slot": pair.slot,
        "publicKey": pair.public_key,
        "privateKey": base64.b64encode(bytes(pair.private)).decode("ascii"),
    }
    secretfile.write(path, (json.dumps(doc, indent=2) + "\n").encode("ascii"), "wireguard key")
