"""KeySpec: `pulumi preview` and `pulumi up` refuse a changed key size, algorithm or ICV length.

The mock engine never calls a provider's ``check``, so the refusal is tested
three ways:

- :func:`components.keyspec.refusal`, table-driven: a first deployment takes
  128 and 256; unchanged values pass (also a float from the wire against an
  int); 128 -> 256 and 256 -> 128 are refused with a message naming
  ``sealnet:keyBits``, both values, what is allowed and what to do instead;
  an algorithm or ICV change is refused; state without the fields (written
  before they existed) is accepted; no message holds a run of 8 or more hex
  digits, so no key material can hide in one; the README quotes the real
  message;
- the real dynamic-provider process, ``python -m pulumi.dynamic`` (what the
  CLI's ``pulumi-resource-pulumi-python`` plugin runs in the project's
  virtualenv) started in the project directory, over its gRPC interface,
  with the ``__provider`` the program itself serialized: Check returns the
  failure for a keyBits change between two program runs (ipsec, cilium) and
  none for a rotation or a first deployment; Create returns the three
  fields; Diff ignores a ``__provider`` pickled with another protocol;
  started elsewhere it cannot load the provider (the pickle is by reference,
  so components/keyspec.py must stay importable from the project directory);
  requirements.txt pins pulumi and dill, which that process imports;
- the wiring in the mock engine: one KeySpec per Keyring, a child of it, in
  modes ipsec and cilium and not in wireguard, with keyBits/algorithm/icvBits
  from config and rotation.py, plain and free of key material, and both key
  slots (so the keys Secret too) depend on it.
"""

from __future__ import annotations

import base64
import importlib.metadata
import os
import re
import select
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import dill
import grpc
import pytest
from google.protobuf import struct_pb2
from pulumi.runtime import rpc
from pulumi.runtime.proto import provider_pb2, provider_pb2_grpc

from components import keyspec
from components.rotation import AEAD_ALGORITHM, ICV_BITS
from tests.components.harness import REPO, ProgramRun, plain_strings, resolve
from tests.components.test_secrecy import key_forms, leaks

KEY_SPEC = "pulumi-python:dynamic/sealnet:KeySpec"
KEY_SPEC_NAME = "sealnet-keys-key-spec"
RANDOM = "random:index/randomBytes:RandomBytes"
FIELDS = {"keyBits", "algorithm", "icvBits"}
GMAC = "rfc4543(gcm(aes))"


def spec(key_bits: Any = 128, algorithm: Any = AEAD_ALGORITHM, icv_bits: Any = ICV_BITS) -> dict[str, Any]:
    return {"keyBits": key_bits, "algorithm": algorithm, "icvBits": icv_bits}


# --- refusal() -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_bits", [128, 256, 128.0, 256.0])
def test_a_first_deployment_takes_any_key_size(key_bits: Any) -> None:
    assert keyspec.refusal({}, spec(key_bits)) is None


@pytest.mark.parametrize(
    ("olds", "news"),
    [
        pytest.param(spec(128), spec(128), id="128"),
        pytest.param(spec(256), spec(256), id="256"),
        pytest.param(spec(128.0, icv_bits=128.0), spec(128), id="float-from-the-wire-vs-int"),
        pytest.param(spec(256), spec(256.0, icv_bits=128.0), id="int-vs-float"),
        pytest.param({"__provider": "x"}, spec(256), id="state-without-the-fields"),
        pytest.param({"keyBits": 128.0}, spec(128), id="state-without-algorithm-and-icv"),
    ],
)
def test_an_unchanged_or_unknown_key_spec_passes(olds: dict[str, Any], news: dict[str, Any]) -> None:
    assert keyspec.refusal(olds, news) is None


@pytest.mark.parametrize(("old", "new"), [(128, 256), (256, 128), (128.0, 256.0), (256.0, 128)])
def test_a_key_size_change_is_refused_with_what_to_do(old: Any, new: Any) -> None:
    found = keyspec.refusal(spec(old), spec(new))
    assert found is not None
    name, message = found
    old_i, new_i = int(old), int(new)
    assert name == "keyBits"
    assert message.startswith("sealnet:keyBits cannot change on a deployed stack")
    assert f"deployed with sealnet:keyBits {old_i}, the new value is {new_i}; allowed: {old_i}." in message
    assert f"keep sealnet:keyBits {old_i} on this stack (`pulumi config set sealnet:keyBits {old_i}`)" in message
    assert f"deploy a new stack with sealnet:keyBits {new_i} from its first `pulumi up`" in message
    assert ".0" not in message, "numbers are shown as written in config, not as the wire's floats"


@pytest.mark.parametrize(
    ("news", "name", "old", "new"),
    [
        pytest.param(spec(algorithm=GMAC), "algorithm", AEAD_ALGORITHM, GMAC, id="algorithm"),
        pytest.param(spec(icv_bits=96), "icvBits", "128", "96", id="icv"),
    ],
)
def test_an_algorithm_or_icv_change_is_refused(news: dict[str, Any], name: str, old: str, new: str) -> None:
    found = keyspec.refusal(spec(), news)
    assert found is not None and found[0] == name
    message = found[1]
    assert f"({name}, set by sealnet, not a setting)" in message
    assert f"deployed with {old}, this version of the program sets {new}; allowed: {old}." in message
    assert "cilium/cilium#37936" in message and "deploy a new stack" in message


def test_the_key_size_is_checked_first_and_one_change_gives_one_failure() -> None:
    found = keyspec.refusal(spec(128), spec(256, icv_bits=96))
    assert found is not None and found[0] == "keyBits"


def test_a_removed_field_is_refused_too() -> None:
    found = keyspec.refusal(spec(), {"keyBits": 128, "algorithm": AEAD_ALGORITHM})
    assert found is not None and found[0] == "icvBits" and "sets None" in found[1]


def test_the_readme_quotes_the_real_message() -> None:
    readme = " ".join((REPO / "README.md").read_text().split())
    quoted = re.search(r"`(sealnet:keyBits cannot change on a deployed stack [^`]*)`", readme)
    assert quoted is not None, "the README's rotation advice quotes the refusal"
    pattern = ".*".join(re.escape(part) for part in quoted.group(1).replace("(...)", "...").split("..."))
    found = keyspec.refusal(spec(128), spec(256))
    assert found is not None and re.fullmatch(pattern, found[1]), (quoted.group(1), found)


def test_messages_hold_no_long_hex_or_digit_runs() -> None:
    for olds, news in [(spec(128), spec(256)), (spec(), spec(icv_bits=96)), (spec(), spec(algorithm=GMAC))]:
        found = keyspec.refusal(olds, news)
        assert found is not None
        assert not re.search(r"[0-9a-fA-F]{8,}", found[1]), found[1]


# --- the real dynamic-provider process --------------------------------------------------------------------------


class ProviderProcess:
    """``python -m pulumi.dynamic`` in a directory, and a gRPC stub to it."""

    def __init__(self, cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "pulumi.dynamic", "unused-engine-address"],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            self.close()
            raise AssertionError(f"the dynamic provider did not start: {line!r}")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{int(line)}")
        self.stub = provider_pb2_grpc.ResourceProviderStub(self.channel)

    def close(self) -> None:
        if getattr(self, "channel", None) is not None:
            self.channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def check(self, olds: Mapping[str, Any], news: Mapping[str, Any]) -> Any:
        request = provider_pb2.CheckRequest(urn=URN, olds=struct(olds), news=struct(news))
        return self.stub.Check(request, timeout=30)

    def diff(self, olds: Mapping[str, Any], news: Mapping[str, Any]) -> Any:
        request = provider_pb2.DiffRequest(urn=URN, id="key-spec", olds=struct(olds), news=struct(news))
        return self.stub.Diff(request, timeout=30)


URN = f"urn:pulumi:dev::sealnet::sealnet:index:Keyring${KEY_SPEC}::{KEY_SPEC_NAME}"


def struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(dict(values))
    return out


def plain(props: struct_pb2.Struct) -> dict[str, Any]:
    return dict(rpc.deserialize_properties(props))


@pytest.fixture(scope="module")
def provider() -> Iterator[ProviderProcess]:
    process = ProviderProcess(REPO)
    yield process
    process.close()


def key_spec_inputs(run: ProgramRun) -> dict[str, Any]:
    """The KeySpec's inputs as the engine stores them (the olds of the next run)."""
    return dict(run.named(KEY_SPEC_NAME).inputs)


@pytest.mark.parametrize(
    "mode", [{}, {"mode": "cilium"}, {"mode": "cilium", "installCilium": True}], ids=["ipsec", "cilium", "cilium+install"]
)
@pytest.mark.parametrize(("old", "new"), [(128, 256), (256, 128)])
def test_the_provider_refuses_a_key_size_change_between_two_runs(
    run: Any, provider: ProviderProcess, mode: dict[str, Any], old: int, new: int
) -> None:
    before, after = run({**mode, "keyBits": old, "rotation": 4}), run({**mode, "keyBits": new, "rotation": 5})
    expected = keyspec.refusal(spec(old), spec(new))
    assert expected is not None
    response = provider.check(key_spec_inputs(before), key_spec_inputs(after))
    assert [(f.property, f.reason) for f in response.failures] == [expected]
    assert f"sealnet:keyBits {old}, the new value is {new}" in response.failures[0].reason


@pytest.mark.parametrize("mode", [{}, {"mode": "cilium"}], ids=["ipsec", "cilium"])
def test_the_provider_passes_a_rotation_and_a_first_deployment(
    run: Any, provider: ProviderProcess, mode: dict[str, Any]
) -> None:
    before = key_spec_inputs(run({**mode, "keyBits": 256, "rotation": 14}))
    after = key_spec_inputs(run({**mode, "keyBits": 256, "rotation": 15}))
    assert before == after, "a rotation does not touch the key spec"
    response = provider.check(before, after)
    assert list(response.failures) == []
    assert plain(response.inputs) == after, "check hands the inputs back unchanged, __provider included"
    first = provider.check({}, after)
    assert list(first.failures) == [] and plain(first.inputs) == after


def test_the_provider_passes_a_stack_whose_state_predates_the_fields(run: Any, provider: ProviderProcess) -> None:
    news = key_spec_inputs(run({"keyBits": 256}))
    assert list(provider.check({"__provider": news["__provider"]}, news).failures) == []


def test_create_stores_the_three_fields(run: Any, provider: ProviderProcess) -> None:
    inputs = key_spec_inputs(run({"keyBits": 256}))
    response = provider.stub.Create(provider_pb2.CreateRequest(urn=URN, properties=struct(inputs)), timeout=30)
    assert response.id == "key-spec"
    assert plain(response.properties) == {**spec(256.0, icv_bits=float(ICV_BITS)), "__provider": inputs["__provider"]}


def test_diff_ignores_a_provider_pickled_another_way(run: Any, provider: ProviderProcess) -> None:
    outputs = key_spec_inputs(run({"keyBits": 128}))
    repickled = base64.b64encode(dill.dumps(keyspec.KeySpecProvider(), protocol=5)).decode()
    assert repickled != outputs["__provider"]
    news = {**outputs, "__provider": repickled}
    diff = provider.diff(outputs, news)
    assert diff.changes == provider_pb2.DiffResponse.DIFF_NONE
    # A field the state does not hold yet is a change (an update stores it).
    older = {k: v for k, v in outputs.items() if k != "icvBits"}
    diff = provider.diff(older, news)
    assert diff.changes == provider_pb2.DiffResponse.DIFF_SOME and list(diff.replaces) == []


def test_the_provider_is_pickled_by_reference_and_needs_the_project_directory(run: Any, tmp_path: Path) -> None:
    provider_b64 = key_spec_inputs(run())["__provider"]
    pickled = base64.b64decode(provider_b64)
    assert b"components.keyspec" in pickled and b"KeySpecProvider" in pickled and len(pickled) < 200
    elsewhere = ProviderProcess(tmp_path)
    try:
        with pytest.raises(grpc.RpcError) as failed:
            elsewhere.check({}, {**spec(), "__provider": provider_b64})
    finally:
        elsewhere.close()
    assert "No module named 'components'" in (failed.value.details() or "")


def test_the_runtime_requirements_install_what_the_provider_process_imports() -> None:
    # `scripts/install-deps --runtime` installs requirements.txt only: pulumi, and
    # dill for the dynamic-provider process, must both be pinned there.
    pins = dict(
        line.split("==", 1) for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line
    )
    assert pins["dill"] == importlib.metadata.version("dill")
    assert pins["pulumi"] == importlib.metadata.version("pulumi")


# --- wiring in the mock engine ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "secret_name"),
    [({"keyBits": 256}, "sealnet-ipsec-keys"), ({"mode": "cilium", "keyBits": 128}, "cilium-ipsec-keys"),
     ({"mode": "cilium", "installCilium": True, "keyBits": 256}, "cilium-ipsec-keys")],
    ids=["ipsec", "cilium", "cilium+install"],
)
def test_one_key_spec_per_keyring_guards_both_slots(run: Any, overrides: dict[str, Any], secret_name: str) -> None:
    r = run({**overrides, "rotation": 3})
    guard = r.one(KEY_SPEC)
    keyring = r.one("sealnet:index:Keyring")
    assert guard.name == KEY_SPEC_NAME and guard.custom and guard.parent == keyring.urn
    assert r.stack_outputs["secretName"] == secret_name
    assert {k: v for k, v in guard.inputs.items() if k != "__provider"} == spec(
        float(overrides["keyBits"]), AEAD_ALGORITHM, float(ICV_BITS)
    )
    slots = r.of_type(RANDOM)
    assert len(slots) == 2
    for slot in slots:
        assert guard.urn in slot.dependencies, f"{slot.name} must wait for the key spec's check"
    # The Secret Cilium or the agents read follows the slots, so it waits too.
    secret = r.one("kubernetes:core/v1:Secret")
    assert {s.urn for s in slots} <= set(secret.dependencies)


def test_wireguard_has_no_key_spec(run: Any) -> None:
    assert run({"mode": "wireguard"}).of_type(KEY_SPEC) == []


@pytest.mark.parametrize(
    "overrides", [{"rotation": 1}, {"rotation": 6, "keyBits": 256}, {"mode": "cilium", "rotation": 2}]
)
def test_the_key_spec_is_plain_and_free_of_key_material(run: Any, overrides: dict[str, Any]) -> None:
    r = run(overrides)
    guard = r.one(KEY_SPEC)
    assert set(guard.inputs) == FIELDS | {"__provider"}
    assert not any(rpc.is_rpc_secret(v) for v in guard.inputs.values()), "nothing here is secret, so nothing is hidden"
    assert leaks(plain_strings(guard.inputs), key_forms(r)) == []
    key_spec = r.namespace["encryption"].keyring.key_spec
    outputs = {name: resolve(getattr(key_spec, name)) for name in FIELDS}
    assert outputs == {name: (value, False) for name, value in spec(overrides.get("keyBits", 128)).items()}


def test_the_key_spec_follows_key_bits_only(run: Any) -> None:
    small, big = key_spec_inputs(run({"keyBits": 128})), key_spec_inputs(run({"keyBits": 256}))
    assert {k for k in small if small[k] != big[k]} == {"keyBits"}, "__provider is the same bytes on every run"
