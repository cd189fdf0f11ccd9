"""agent.ipsec.rotation: which keys stay installed during a rotation, and egress per peer.

Properties asserted (named table cases, then sequences):
- the current key is always installed; older keys stay while any peer does
  not advertise the current key, and go ``grace`` s after every peer does;
- a Secret patched to one line keeps the old key (from memory) until then;
- two rotations within the grace period keep both older keys;
- the 15 -> 1 wrap: "newest" is file order, not the numeric ID;
- egress: the newest of our keys a peer advertises; the current one for a
  peer that advertises none or nothing; laggards are named;
- a peer that never catches up keeps the old key installed for ever.
"""

from __future__ import annotations

import pytest

from agent.ipsec import keys
from agent.ipsec.rotation import RotationState, choose_egress, laggards, step

K = {i: f"{i:02x}" * 20 for i in range(1, 16)}


def ks(*ids: int) -> keys.KeySet:
    return keys.parse("\n".join(f"{i}+ rfc4106(gcm(aes)) {K[i]} 128" for i in ids))


def spis(k: keys.KeySet) -> tuple[int, ...]:
    return k.spis


def test_steady_state_installs_the_file() -> None:
    state, active = step(RotationState(), ks(3), {"b": frozenset({3}), "c": None}, now=0, grace=10)
    assert spis(active) == (3,) and state.retained == () and state.drop_at(10) is None


def test_rotation_as_the_program_writes_it() -> None:
    state, active = step(RotationState(), ks(3), {"b": frozenset({3})}, 0, 10)
    # The Secret now has the previous line and the new one.
    state, active = step(state, ks(3, 4), {"b": frozenset({3})}, 1, 10)
    assert spis(active) == (3, 4)
    assert choose_egress(active, {"b": frozenset({3})}) == {"b": 3}, "b cannot decrypt 4 yet"
    assert laggards(active, {"b": frozenset({3})}) == ("b",)
    state, active = step(state, ks(3, 4), {"b": frozenset({3, 4})}, 2, 10)
    assert spis(active) == (3, 4) and state.caught_up_since == 2 and state.drop_at(10) == 12
    assert choose_egress(active, {"b": frozenset({3, 4})}) == {"b": 4}
    state, active = step(state, ks(3, 4), {"b": frozenset({3, 4})}, 11.9, 10)
    assert spis(active) == (3, 4)
    state, active = step(state, ks(3, 4), {"b": frozenset({3, 4})}, 12, 10)
    assert spis(active) == (4,) and state.retained == () and state.drop_at(10) is None
    # Still (3, 4) in the file: the dropped key does not come back.
    state, active = step(state, ks(3, 4), {"b": frozenset({4})}, 13, 10)
    assert spis(active) == (4,)
    # The next rotation: 4 becomes the older key.
    state, active = step(state, ks(4, 5), {"b": frozenset({4})}, 14, 10)
    assert spis(active) == (4, 5) and choose_egress(active, {"b": frozenset({4})}) == {"b": 4}


def test_one_line_patch_keeps_the_old_key_from_memory() -> None:
    state, _ = step(RotationState(), ks(3), {"b": frozenset({3})}, 0, 5)
    state, active = step(state, ks(4), {"b": frozenset({3})}, 1, 5)
    assert spis(active) == (3, 4), "the old key must stay installed while b sends with it"
    assert active.get(3) == ks(3).current  # the same bytes, from memory
    state, active = step(state, ks(4), {"b": frozenset({3, 4})}, 2, 5)
    state, active = step(state, ks(4), {"b": frozenset({3, 4})}, 7, 5)
    assert spis(active) == (4,)


def test_two_rotations_within_the_grace_period() -> None:
    state, _ = step(RotationState(), ks(3), {}, 0, 30)
    state, active = step(state, ks(3, 4), {"b": frozenset({3, 4})}, 1, 30)
    state, active = step(state, ks(4, 5), {"b": frozenset({3, 4})}, 2, 30)
    assert spis(active) == (3, 4, 5) and state.caught_up_since is None
    assert choose_egress(active, {"b": frozenset({3, 4})}) == {"b": 4}
    state, active = step(state, ks(4, 5), {"b": frozenset({3, 4, 5})}, 3, 30)
    assert state.caught_up_since == 3
    state, active = step(state, ks(4, 5), {"b": frozenset({5})}, 33, 30)
    assert spis(active) == (5,)


def test_wrap_from_15_to_1() -> None:
    state, _ = step(RotationState(), ks(15), {"b": frozenset({15})}, 0, 5)
    state, active = step(state, ks(15, 1), {"b": frozenset({15, 1})}, 1, 5)
    assert active.current.spi == 1
    assert choose_egress(active, {"b": frozenset({15, 1}), "c": frozenset({15})}) == {"b": 1, "c": 15}


def test_peer_that_never_catches_up_keeps_the_old_key() -> None:
    state, _ = step(RotationState(), ks(3), {}, 0, 1)
    for t in range(1, 100):
        state, active = step(state, ks(3, 4), {"b": frozenset({3, 4}), "slow": frozenset({3})}, t, 1)
    assert spis(active) == (3, 4)
    assert choose_egress(active, {"slow": frozenset({3})}) == {"slow": 3}
    assert laggards(active, {"b": frozenset({3, 4}), "slow": frozenset({3})}) == ("slow",)


@pytest.mark.parametrize("advertised, egress", [
    (None, 4), (frozenset(), 4), (frozenset({9}), 4), (frozenset({3}), 3), (frozenset({3, 4}), 4),
], ids=["nothing", "empty", "unknown-key", "old-only", "both"])
def test_egress_choice(advertised, egress) -> None:
    assert choose_egress(ks(3, 4), {"p": advertised}) == {"p": egress}
