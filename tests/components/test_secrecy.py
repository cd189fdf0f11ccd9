"""Key material never leaves a secret: inputs, outputs, exports, logs.

The mock RandomBytes' fake key bytes are known to the test, so it can look
for them, in every form they could take (hex either case, base64 of the
bytes, the keys text, the base64 of the keys text, and 16-character pieces
of the hex), in everything a `pulumi preview` would show or store in plain
text: every resource's inputs outside secret wrappers, every registered
output (components and the stack), and every engine log line.

Properties asserted:
- the Secret's data reaches the engine as a secret value;
- the Keyring's keys text and the Secret's data output are secret Outputs;
- the exports (keyId, rotation, secretName, ...) are plain and key-free;
- no key material appears anywhere else, and the check itself finds a
  deliberately planted key (so it cannot pass by looking nowhere).
"""

from __future__ import annotations

import base64
import logging
from typing import Any, Iterable

import pytest

from tests.components.harness import ProgramRun, fake_key_hex, plain_strings, resolve, unwrap
from pulumi.runtime import rpc

RANDOM = "random:index/randomBytes:RandomBytes"
SECRET = "kubernetes:core/v1:Secret"


def key_forms(run: ProgramRun) -> list[str]:
    forms: list[str] = []
    for slot in run.of_type(RANDOM):
        hex_key = fake_key_hex(slot.name, int(slot.inputs["length"]), slot.inputs["keepers"])
        raw = bytes.fromhex(hex_key)
        forms += [hex_key, hex_key.upper(), base64.b64encode(raw).decode(), hex_key[:16], hex_key[-16:]]
    keys_b64 = unwrap(run.one(SECRET).inputs["data"])["keys"]
    forms += [keys_b64, base64.b64decode(keys_b64).decode().strip()]
    return forms


def leaks(strings: Iterable[str], forms: list[str]) -> list[str]:
    return [s[:24] + "..." for s in strings for form in forms if form in s]


@pytest.fixture(params=[
    {"rotation": 1},
    {"rotation": 6, "keyBits": 256},
    {"mode": "cilium", "installCilium": True, "rotation": 1},
    {"mode": "cilium", "rotation": 1},  # Cilium installed by someone else: the Secret alone
])
def keyed_run(request: pytest.FixtureRequest, run: Any, caplog: pytest.LogCaptureFixture) -> ProgramRun:
    with caplog.at_level(logging.DEBUG):
        result: ProgramRun = run(request.param)
    result.logs.extend(record.getMessage() for record in caplog.records)
    return result


def key_lines(run: ProgramRun) -> int:
    """Previous and current line at rotation 1 and on; Cilium's Secret holds the current one alone."""
    return 1 if run.namespace["settings"].mode == "cilium" else 2


def test_secret_data_is_a_secret_input(keyed_run: ProgramRun) -> None:
    data = keyed_run.one(SECRET).inputs["data"]
    assert rpc.is_rpc_secret(data)
    assert len(base64.b64decode(unwrap(data)["keys"]).decode().splitlines()) == key_lines(keyed_run)


def test_key_outputs_are_secret(keyed_run: ProgramRun) -> None:
    keyring = keyed_run.namespace["encryption"].keyring
    text, secret = resolve(keyring.keys)
    assert secret and text.count("rfc4106(gcm(aes))") == key_lines(keyed_run)
    _, data_secret = resolve(keyring.secret.data)
    assert data_secret
    for output in (keyring.key_id, keyring.rotation, keyring.secret_name):
        assert resolve(output)[1] is False, "identifiers stay readable"


def test_exports_are_plain_and_key_free(keyed_run: ProgramRun) -> None:
    exports = keyed_run.stack_outputs
    assert {"mode", "rotation", "keyId", "secretName"} <= set(exports)
    assert not any(rpc.is_rpc_secret(v) for v in exports.values())
    assert leaks(plain_strings(exports), key_forms(keyed_run)) == []


def test_no_key_material_in_any_plain_input_or_output(keyed_run: ProgramRun) -> None:
    forms = key_forms(keyed_run)
    for reg in keyed_run.registrations:
        assert leaks(plain_strings(reg.inputs), forms) == [], f"key material in the inputs of {reg.name}"
    for urn, outputs in keyed_run.outputs.items():
        assert leaks(plain_strings(outputs), forms) == [], f"key material in the outputs of {urn}"


def test_no_key_material_in_logs(keyed_run: ProgramRun) -> None:
    assert any("key ID" in line for line in keyed_run.logs), "the keyring's log line was not captured"
    assert leaks(keyed_run.logs, key_forms(keyed_run)) == []


def test_the_leak_check_finds_a_planted_key(run: Any) -> None:
    r = run({"rotation": 1})
    forms = key_forms(r)
    planted = {"metadata": {"annotations": {"debug": f"key={forms[0]}"}}}
    assert leaks(plain_strings(planted), forms)
    assert not leaks(plain_strings({"data": rpc.wrap_rpc_secret(forms[0])}), forms)
