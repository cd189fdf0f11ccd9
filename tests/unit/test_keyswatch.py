"""agent.cluster.keyswatch: the keys Secret as the kubelet updates it.

Properties asserted:
- a Secret update (atomic ..data symlink swap, never an in-place write) is
  noticed within 1 s through the directory watch, and the new keys are used;
- a bad new file (unparsable, or changing the ESP overhead, which Cilium
  refuses too) keeps the last good keys, reports one line once, and never
  shows key material in the report or the logs;
- a good file after a bad one is taken again;
- content that did not change triggers nothing.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Iterator

import pytest

from agent.cluster.keyswatch import KeysFile
from tests.kubelet import SecretVolume

K3 = "5c7dc606a6e901eb92accc3063c5259ddca19049"
K4 = "0f1e2d3c4b5a69788796a5b4c3d2e1f012345678"
K4_256 = K4 + "a1b2c3d4e5f60718293a4b5c6d7e8f90"
SECRETS = (K3, K4, K4_256)


def line(key_id: int, key: str, icv: int = 128) -> str:
    return f"{key_id}+ rfc4106(gcm(aes)) {key} {icv}"


@pytest.fixture
def volume(tmp_path: Path) -> SecretVolume:
    vol = SecretVolume(tmp_path / "keys")
    vol.write({"keys": line(3, K3) + "\n"})
    return vol


@pytest.fixture
def watched(volume: SecretVolume) -> Iterator[tuple[KeysFile, "queue.Queue[str]", list[str]]]:
    changes: "queue.Queue[str]" = queue.Queue()
    errors: list[str] = []
    keys = KeysFile(volume.path("keys"), on_change=changes.put, on_error=errors.append)
    assert keys.load() is not None
    assert changes.get_nowait() == "keys"
    stop = threading.Event()
    thread = threading.Thread(target=keys.watch, args=(stop,), daemon=True)
    thread.start()
    yield keys, changes, errors
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_rotation_by_symlink_swap_is_seen_within_a_second(volume: SecretVolume, watched) -> None:
    keys, changes, errors = watched
    volume.write({"keys": line(3, K3) + "\n" + line(4, K4) + "\n"})
    assert changes.get(timeout=1.0) == "keys"
    assert keys.current is not None and keys.current.spis == (3, 4) and keys.current.current.spi == 4
    assert errors == [] and keys.error is None
    assert set(keys.first_seen) == {3, 4}


def test_bad_file_keeps_last_good_keys(volume: SecretVolume, watched, caplog: pytest.LogCaptureFixture) -> None:
    keys, changes, errors = watched
    caplog.set_level(logging.DEBUG)
    volume.write({"keys": line(4, K4[:-1]) + "\n"})  # odd number of hex digits
    deadline = threading.Event()
    for _ in range(50):
        if errors:
            break
        deadline.wait(0.02)
    assert len(errors) == 1 and "line 1" in errors[0] and "aead-key" in errors[0]
    assert keys.current is not None and keys.current.spis == (3,)
    assert changes.empty()
    # A 256-bit key with a different ICV changes the ESP overhead: refused.
    volume.write({"keys": line(3, K3) + "\n" + line(4, K4_256, icv=96) + "\n"})
    for _ in range(50):
        if len(errors) == 2:
            break
        deadline.wait(0.02)
    assert len(errors) == 2 and "icv" in errors[1].lower()
    assert keys.current.spis == (3,)
    # Then a good file is taken.
    volume.write({"keys": line(3, K3) + "\n" + line(4, K4) + "\n"})
    assert changes.get(timeout=1.0) == "keys"
    assert keys.current.spis == (3, 4) and keys.error is None
    text = "\n".join(errors) + caplog.text
    leaks = sum(1 for s in SECRETS for i in range(0, len(s) - 8) if s[i:i + 8] in text)
    assert leaks == 0, "key material in an error or log line"


def test_same_content_triggers_nothing(volume: SecretVolume, watched) -> None:
    keys, changes, errors = watched
    volume.write({"keys": line(3, K3) + "\n"})
    with pytest.raises(queue.Empty):
        changes.get(timeout=0.5)
    assert errors == []
