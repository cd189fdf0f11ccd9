"""Key rotation through the whole program: what `pulumi preview` would diff.

The mock RandomBytes derives its fake key from name, length and keepers, as
the real one keeps its bytes until its inputs change; so "the previous key is
byte-identical" is observable.

Properties asserted, for rotation N -> N+1:
- ipsec and cilium: exactly two resources get different inputs, the
  RandomBytes slot (N+1) % 2 and the keys Secret; the other slot's inputs are
  identical, and so are the ConfigMap and the DaemonSet (no pod restart) or
  Cilium's release;
- keyId goes up by one and 15 wraps to 1;
- the Secret's `keys` entry is the previous key (byte-identical to the
  current key before the rotation) then the new key;
- mode cilium: the Secret holds the current key alone, and every rotation's
  Secret, 0 to 31 across two wraps, is one Cilium's agent reloads (its
  LoadIPSecKeys refuses a line whose key ID is the key it holds, so a
  previous line would make it refuse every rotation after the first start);
- wireguard: the rotation is a new key epoch in the agent config, so exactly
  the ConfigMap and the DaemonSet's checksum annotation change (the pods roll
  and make new key pairs), and no key material exists in the stack.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.components.harness import ProgramRun, fake_key_hex, unwrap

RANDOM = "random:index/randomBytes:RandomBytes"
SECRET = "kubernetes:core/v1:Secret"


def changed(before: ProgramRun, after: ProgramRun) -> set[str]:
    assert sorted(before.by_urn) == sorted(after.by_urn), "a rotation must not add or remove resources"
    return {reg.name for urn, reg in before.by_urn.items() if reg.inputs != after.by_urn[urn].inputs}


def keys_lines(run: ProgramRun) -> list[list[str]]:
    data = unwrap(run.one(SECRET).inputs["data"])
    return [line.split(" ") for line in base64.b64decode(data["keys"]).decode().splitlines()]


def slot_hex(run: ProgramRun) -> dict[str, str]:
    return {
        r.name: fake_key_hex(r.name, int(r.inputs["length"]), r.inputs["keepers"]) for r in run.of_type(RANDOM)
    }


@pytest.mark.parametrize("n", [0, 1, 2, 13, 14, 15, 29])
def test_ipsec_rotation_changes_one_slot_and_the_secret(run: Any, n: int) -> None:
    before, after = run({"rotation": n}), run({"rotation": n + 1})
    new_slot = f"sealnet-keys-slot{(n + 1) % 2}"
    assert changed(before, after) == {new_slot, "sealnet-keys-secret"}

    key_before, key_after = before.stack_outputs["keyId"], after.stack_outputs["keyId"]
    assert key_after == (1 if key_before == 15 else key_before + 1)
    assert after.stack_outputs["rotation"] == n + 1

    old_current = keys_lines(before)[-1]
    previous, current = keys_lines(after)
    assert previous == old_current, "the previous key line must stay byte-identical"
    assert int(previous[0].rstrip("+")) == key_before and int(current[0].rstrip("+")) == key_after
    hexes = slot_hex(after)
    assert current[2] == hexes[new_slot] and current[2] not in (line[2] for line in keys_lines(before))
    assert previous[2] == hexes[f"sealnet-keys-slot{n % 2}"]


def test_rotation_zero_has_a_single_line(run: Any) -> None:
    (line,) = keys_lines(run({"rotation": 0}))
    assert line[:2] == ["1+", "rfc4106(gcm(aes))"] and line[3] == "128"
    assert len(bytes.fromhex(line[2])) == 20


def test_key_ids_over_a_full_cycle(run: Any) -> None:
    ids = [run({"rotation": n}).stack_outputs["keyId"] for n in range(0, 31, 3)]
    assert ids == [n % 15 + 1 for n in range(0, 31, 3)]


def test_cilium_rotation_leaves_cilium_alone(run: Any) -> None:
    cfg = {"mode": "cilium", "installCilium": True}
    before, after = run({**cfg, "rotation": 14}), run({**cfg, "rotation": 15})
    assert changed(before, after) == {"sealnet-keys-slot1", "sealnet-keys-secret"}
    assert [line[0] for line in keys_lines(after)] == ["1+"]


def cilium_reload(held: int | None, lines: list[list[str]]) -> int:
    """The key ID Cilium's agent holds after loading ``lines`` while holding ``held``.

    A model of LoadIPSecKeys (pkg/datapath/linux/ipsec): the lines are read
    in order, each becomes the key held, and a line naming the key ID held
    at that point is an error ("changing IPSec keys requires incrementing
    the key id"); so is a key ID outside 1..15.
    """
    for line in lines:
        key_id = int(line[0].rstrip("+"))
        if not 1 <= key_id <= 15:
            raise ValueError(f"key ID {key_id} outside 1..15")
        if key_id == held:
            raise ValueError(f"key ID {key_id} is the key held: Cilium refuses the reload")
        held = key_id
    assert held is not None, "an empty keys entry"
    return held


def test_cilium_reload_model_refuses_the_two_line_form() -> None:
    """The two-line form sealnet's own agent reads is accepted at Cilium's start, refused on reload."""
    assert cilium_reload(None, [["1+"], ["2+"]]) == 2
    with pytest.raises(ValueError, match="refuses the reload"):
        cilium_reload(2, [["2+"], ["3+"]])


@pytest.mark.parametrize("install", [True, False], ids=["installCilium", "cilium-installed-elsewhere"])
def test_cilium_takes_every_rotation_by_hot_reload(run: Any, install: bool) -> None:
    cfg = {"mode": "cilium", "installCilium": install}
    held = None
    for n in range(32):
        r = run({**cfg, "rotation": n})
        lines = keys_lines(r)
        assert len(lines) == 1, (n, [line[0] for line in lines])
        held = cilium_reload(held, lines)
        assert held == r.stack_outputs["keyId"] == n % 15 + 1


def test_per_node_keys_off_drops_the_plus(run: Any) -> None:
    assert [line[0] for line in keys_lines(run({"rotation": 4, "perNodeKeys": False}))] == ["4", "5"]


def test_256_bit_keys(run: Any) -> None:
    lines = keys_lines(run({"rotation": 1, "keyBits": 256}))
    assert [len(bytes.fromhex(line[2])) for line in lines] == [36, 36]


def test_wireguard_rotation_rolls_the_agents_through_the_config(run: Any) -> None:
    before, after = run({"mode": "wireguard", "rotation": 3}), run({"mode": "wireguard", "rotation": 4})
    assert changed(before, after) == {"sealnet-agent-config", "sealnet-agent-ds"}
    ds_before = unwrap(before.one("kubernetes:apps/v1:DaemonSet").inputs)
    ds_after = unwrap(after.one("kubernetes:apps/v1:DaemonSet").inputs)
    annotations = "sealnet.io/config-checksum"
    assert ds_before["spec"]["template"]["metadata"]["annotations"][annotations] != ds_after["spec"]["template"]["metadata"]["annotations"][annotations]
    ds_before["spec"]["template"]["metadata"]["annotations"] = ds_after["spec"]["template"]["metadata"]["annotations"] = {}
    assert ds_before == ds_after, "only the checksum may change"
    assert not after.of_type(RANDOM) and not after.of_type(SECRET)


def test_config_change_rolls_the_agents(run: Any) -> None:
    before, after = run({"logLevel": "info"}), run({"logLevel": "debug"})
    assert changed(before, after) == {"sealnet-agent-config", "sealnet-agent-ds"}
