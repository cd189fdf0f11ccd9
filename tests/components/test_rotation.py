"""components/rotation.py: the key schedule, without the engine.

Properties asserted:
- key ID = rotation % 15 + 1: always 1..15, +1 per rotation, 15 wraps to 1;
- rotation N -> N+1 changes the keepers of exactly one slot, the one N+1 uses,
  and the other slot (holding key N) keeps its keepers;
- the keys entry has the previous line first and the current one last, in
  Cilium's format, with `+` exactly when per-node keys are on;
- malformed key material is refused without echoing it.
"""

from __future__ import annotations

import re

import pytest

from components.rotation import (
    KEY_BYTES,
    RotationConfig,
    key_id,
    key_line,
    keys_entry,
    slot_keepers,
    slot_rotation,
)

# Cilium's keys line: <spi>[+] <aead> <hex> <icv bits> (parseSPI: 1..15).
CILIUM_LINE = re.compile(r"\A(?P<spi>[0-9]+)(?P<plus>\+?) rfc4106\(gcm\(aes\)\) (?P<hex>[0-9a-f]+) 128\Z")


@pytest.mark.parametrize(
    ("rotation", "expected"),
    [(0, 1), (1, 2), (2, 3), (13, 14), (14, 15), (15, 1), (16, 2), (29, 15), (30, 1), (1000, 1000 % 15 + 1)],
)
def test_key_id_table(rotation: int, expected: int) -> None:
    assert key_id(rotation) == expected


def test_key_id_steps_by_one_and_wraps_15_to_1() -> None:
    for rotation in range(100):
        current, following = key_id(rotation), key_id(rotation + 1)
        assert 1 <= current <= 15
        assert following == (1 if current == 15 else current + 1)


def test_each_rotation_changes_exactly_the_slot_it_writes() -> None:
    for rotation in range(40):
        before = [slot_keepers(rotation, s) for s in (0, 1)]
        after = [slot_keepers(rotation + 1, s) for s in (0, 1)]
        changed = [s for s in (0, 1) if before[s] != after[s]]
        assert changed == [(rotation + 1) % 2], f"rotation {rotation} -> {rotation + 1}"
        assert after[(rotation + 1) % 2] == {"rotation": str(rotation + 1)}


def test_slot_rotation_is_newest_of_its_parity() -> None:
    assert slot_rotation(0, 0) == 0
    assert slot_rotation(0, 1) is None  # slot 1 is unused until rotation 1
    assert slot_keepers(0, 1) == {"rotation": "unused"}
    assert slot_rotation(7, 1) == 7 and slot_rotation(7, 0) == 6


def test_rotation_zero_has_only_the_current_line() -> None:
    rc = RotationConfig(0, 128, True)
    entry = keys_entry(rc, {0: "aa" * 20, 1: "bb" * 20})
    assert entry == f"1+ rfc4106(gcm(aes)) {'aa' * 20} 128\n"


@pytest.mark.parametrize("per_node", [True, False])
@pytest.mark.parametrize("bits", [128, 256])
def test_previous_line_first_then_current(per_node: bool, bits: int) -> None:
    n = KEY_BYTES[bits]
    slots = {0: "0a" * n, 1: "1b" * n}
    rc = RotationConfig(5, bits, per_node)  # current slot 1 (key ID 6), previous slot 0 (key ID 5)
    lines = keys_entry(rc, slots).splitlines()
    parsed = [CILIUM_LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(int(m["spi"]), m["hex"]) for m in parsed] == [(5, slots[0]), (6, slots[1])]  # type: ignore[index]
    assert {m["plus"] for m in parsed} == {"+" if per_node else ""}  # type: ignore[index]
    assert len(bytes.fromhex(parsed[1]["hex"])) == {128: 20, 256: 36}[bits]  # type: ignore[index]


def test_without_the_previous_line_only_the_current_key() -> None:
    entry = keys_entry(RotationConfig(15, 128, True), {0: "00" * 20, 1: "11" * 20}, include_previous=False)
    assert entry == f"1+ rfc4106(gcm(aes)) {'11' * 20} 128\n"


def test_wrap_keeps_distinct_key_ids() -> None:
    lines = keys_entry(RotationConfig(15, 128, True), {0: "00" * 20, 1: "11" * 20}).splitlines()
    assert [line.split()[0] for line in lines] == ["15+", "1+"]


@pytest.mark.parametrize(
    ("hex_key", "why"),
    [("ab" * 19, "too short"), ("ab" * 36, "256-bit length for a 128-bit key"), ("zz" * 20, "not hex"),
     ("AB" * 20, "upper case")],
)
def test_key_line_rejects_bad_material_without_echoing_it(hex_key: str, why: str) -> None:
    with pytest.raises(ValueError) as err:
        key_line(3, hex_key, True, 128)
    assert hex_key not in str(err.value), why
    assert "40 lowercase hex digits" in str(err.value)


@pytest.mark.parametrize("bad", [0, 16, -1])
def test_key_line_rejects_key_ids_outside_cilium_range(bad: int) -> None:
    with pytest.raises(ValueError, match=r"key ID must be in 1\.\.15"):
        key_line(bad, "ab" * 20, False, 128)


@pytest.mark.parametrize(("rotation", "bits"), [(-1, 128), (1, 192)])
def test_rotation_config_validates(rotation: int, bits: int) -> None:
    with pytest.raises(ValueError):
        RotationConfig(rotation, bits, True)
