"""Key rotation as pure functions: rotation counter -> key ID, key slots, keys entry.

The stack config holds a monotonic counter ``sealnet:rotation`` (0, 1, 2, ...).
Everything about the IPsec keys follows from it, with no state of its own:

- **Key ID** (the SPI of Cilium's keys format): ``rotation % 15 + 1``, so it
  is always in 1..15 (Cilium's range, 4 mark bits), one higher per rotation,
  and 15 wraps to 1::

      rotation  0  1  2 ... 13 14 15 16 ... 29 30
      key ID    1  2  3 ... 14 15  1  2 ... 15  1

- **Slots**: two ``random.RandomBytes`` resources hold the key material.
  Rotation N uses slot ``N % 2`` for its key; each slot's ``keepers`` carry
  the newest rotation of that slot's parity, so going from N to N+1 changes
  the keepers (and so replaces) exactly one slot, and the other slot, which
  holds the previous key, keeps byte-identical inputs.
- **Keys entry**: the Secret's ``keys`` value, Cilium's format, one line per
  key, previous first and current last (only the current line at rotation 0)::

      <key ID>[+] rfc4106(gcm(aes)) <hex key + salt> 128

  Mode ``cilium`` writes the current line alone (``include_previous=False``):
  Cilium's agent takes a file's last line as its key and, on every reload
  after the first, refuses a line whose key ID is the key it already holds
  ("changing IPSec keys requires incrementing the key id"), so the previous
  line would make it refuse every rotation. Cilium keeps the previous key's
  states itself for ``ipsec-key-rotation-duration``.

Usage::

    rc = RotationConfig(rotation=3, key_bits=128, per_node_keys=True)
    rc.key_id                      # 4
    slot_keepers(rc.rotation, 1)   # {"rotation": "3"}
    keys_entry(rc, {0: hex0, 1: hex1})
    # "3+ rfc4106(gcm(aes)) <hex0> 128\\n4+ rfc4106(gcm(aes)) <hex1> 128\\n"

The checks mirror Cilium's ``parseSPI`` (SPI 1..15, optional trailing ``+``)
and ``LoadIPSecKeys`` (a key ID never names two different keys at once). A
reload's key ID differing from the one Cilium holds is not checked here (it
needs the node's state): the one-line form, ``include_previous=False``,
guarantees it for every rotation by one.
Error messages never include key material.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

#: Cilium's key ID (SPI) range: 4 bits of the packet mark, 0 meaning "none".
KEY_ID_MIN = 1
KEY_ID_MAX = 15

#: Number of RandomBytes key slots (double buffering: current + previous).
SLOTS = 2

#: The AEAD Cilium and the agent use by default, and its ICV length in bits.
AEAD_ALGORITHM = "rfc4106(gcm(aes))"
ICV_BITS = 128

#: rfc4106 key material = AES key + 4-byte salt (RFC 4106 section 8.1).
SALT_BYTES = 4
KEY_BYTES = {128: 16 + SALT_BYTES, 256: 32 + SALT_BYTES}

#: Keepers value of a slot that no rotation has used yet (slot 1 at rotation 0).
UNUSED_SLOT = "unused"

_HEX = re.compile(r"\A[0-9a-f]+\Z")


@dataclass(frozen=True)
class RotationConfig:
    """The validated inputs of the key schedule.

    ``rotation`` is the stack's counter, ``key_bits`` the AES key size (128 or
    256) and ``per_node_keys`` selects per-node-pair key derivation (``+``).
    """

    rotation: int
    key_bits: int
    per_node_keys: bool

    def __post_init__(self) -> None:
        if isinstance(self.rotation, bool) or not isinstance(self.rotation, int) or self.rotation < 0:
            raise ValueError(f"rotation must be an integer >= 0, got {self.rotation!r}")
        if self.key_bits not in KEY_BYTES:
            raise ValueError(f"key_bits must be 128 or 256, got {self.key_bits!r}")

    @property
    def key_id(self) -> int:
        """Key ID of the current key."""
        return key_id(self.rotation)

    @property
    def previous_key_id(self) -> Optional[int]:
        """Key ID of the previous key, None at rotation 0."""
        return key_id(self.rotation - 1) if self.rotation > 0 else None

    @property
    def current_slot(self) -> int:
        return slot_of(self.rotation)

    @property
    def previous_slot(self) -> Optional[int]:
        return slot_of(self.rotation - 1) if self.rotation > 0 else None

    @property
    def key_length(self) -> int:
        """Bytes of key material per RandomBytes slot (key + salt)."""
        return KEY_BYTES[self.key_bits]


def key_id(rotation: int) -> int:
    """The key ID of ``rotation``: 1..15, one higher per rotation, 15 wraps to 1."""
    if rotation < 0:
        raise ValueError(f"rotation must be >= 0, got {rotation}")
    return rotation % (KEY_ID_MAX - KEY_ID_MIN + 1) + KEY_ID_MIN


def slot_of(rotation: int) -> int:
    """The slot holding the key of ``rotation``."""
    return rotation % SLOTS


def slot_rotation(rotation: int, slot: int) -> Optional[int]:
    """The newest rotation <= ``rotation`` whose key lives in ``slot`` (None if none yet)."""
    if slot not in range(SLOTS):
        raise ValueError(f"slot must be 0 or 1, got {slot}")
    newest = rotation - ((rotation - slot) % SLOTS)
    return newest if newest >= 0 else None


def slot_keepers(rotation: int, slot: int) -> dict[str, str]:
    """The ``keepers`` of a slot's RandomBytes at ``rotation``.

    They change exactly when a rotation lands on the slot, which makes
    pulumi-random replace that slot and nothing else.
    """
    newest = slot_rotation(rotation, slot)
    return {"rotation": UNUSED_SLOT if newest is None else str(newest)}


def key_line(key_id_: int, hex_key: str, per_node_keys: bool, key_bits: int) -> str:
    """One line of Cilium's keys format (no newline)."""
    if not KEY_ID_MIN <= key_id_ <= KEY_ID_MAX:
        raise ValueError(f"key ID must be in {KEY_ID_MIN}..{KEY_ID_MAX}, got {key_id_}")
    if key_bits not in KEY_BYTES:
        raise ValueError(f"key_bits must be 128 or 256, got {key_bits!r}")
    want = KEY_BYTES[key_bits] * 2
    if len(hex_key) != want or not _HEX.match(hex_key):
        # Never echo the value: it is key material.
        raise ValueError(
            f"key for key ID {key_id_} must be {want} lowercase hex digits "
            f"({KEY_BYTES[key_bits]} bytes), got {len(hex_key)} characters"
        )
    plus = "+" if per_node_keys else ""
    return f"{key_id_}{plus} {AEAD_ALGORITHM} {hex_key} {ICV_BITS}"


def keys_entry(config: RotationConfig, slot_hex: Mapping[int, str], include_previous: bool = True) -> str:
    """The Secret's ``keys`` value: previous line (if any), then the current one.

    ``slot_hex`` maps slot number to that slot's key material in hex. With
    ``include_previous=False`` (mode ``cilium``) only the current line.
    """
    lines = []
    if include_previous and config.previous_slot is not None and config.previous_key_id is not None:
        lines.append(
            key_line(config.previous_key_id, slot_hex[config.previous_slot], config.per_node_keys, config.key_bits)
        )
    lines.append(key_line(config.key_id, slot_hex[config.current_slot], config.per_node_keys, config.key_bits))
    if len(lines) == 2 and lines[0].split(" ", 1)[0] == lines[1].split(" ", 1)[0]:
        # Cilium's LoadIPSecKeys rejects one SPI naming two keys; consecutive
        # rotations never collide (15 > 1), so this guards the arithmetic.
        raise ValueError("previous and current key share a key ID")
    return "".join(line + "\n" for line in lines)
