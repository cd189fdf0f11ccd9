"""Run the real Pulumi program (__main__.py) in-process on Pulumi's mock engine.

What `pulumi preview` / `pulumi up` would do, minus the CLI and providers:

- config: Pulumi.yaml's `config:` defaults are merged the way the CLI's
  ``workspace.ApplyProjectConfig`` does (primitives as their string form,
  objects and lists as JSON), then the stack file (optional), then overrides.
  The CLI's type check of explicitly typed keys (integer/boolean/string) is
  emulated too, so values the CLI would reject never reach the program.
- engine: a :class:`FakeMocks` answers every resource registration (echoing
  inputs, as the stock mocks do); ``random.RandomBytes`` gets a deterministic
  fake ``hex`` derived from its name, length and keepers, so a test can tell
  "the same key" from "a new key" without real randomness.
- capture: :class:`RecordingMonitor` keeps each registration's parent,
  provider, dependencies and raw inputs (secret inputs stay wrapped, so a
  test can tell secret from plain) and the ``register_outputs`` calls the
  stock monitor drops; the engine logger (``pulumi.log``) is captured too.

Usage::

    run = run_program({"mode": "wireguard", "rotation": 3})
    run.error                      # exception raised by the program, or None
    run.one("kubernetes:apps/v1:DaemonSet").inputs["spec"]
    run.stack_outputs["keyId"]
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import pulumi
import yaml
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc, settings
from pulumi.runtime import stack as pulumi_stack
from pulumi.runtime.sync_await import _sync_await

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / "__main__.py"
PROJECT = "sealnet"
RANDOM_BYTES = "random:index/randomBytes:RandomBytes"


def cli_value(raw: Any) -> str:
    """A config value as the CLI passes it to the program (createConfigValue)."""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, (int, str)):
        return str(raw)
    return json.dumps(raw, sort_keys=True, separators=(",", ":"))


def project_schema() -> dict[str, dict[str, Any]]:
    """Pulumi.yaml's `config:` block, key -> declaration."""
    return yaml.safe_load((REPO / "Pulumi.yaml").read_text())["config"]


def project_defaults() -> dict[str, str]:
    return {f"{PROJECT}:{key}": cli_value(decl["default"]) for key, decl in project_schema().items() if "default" in decl}


def stack_config(stack: str) -> dict[str, str]:
    """The `config:` of Pulumi.<stack>.yaml, as the CLI passes it."""
    doc = yaml.safe_load((REPO / f"Pulumi.{stack}.yaml").read_text()) or {}
    return {key: cli_value(value) for key, value in (doc.get("config") or {}).items()}


class CliTypeError(Exception):
    """What the Pulumi CLI would report before running the program."""


def check_cli_types(values: Mapping[str, str], stack: str) -> None:
    """Emulate the CLI's ValidateConfigValue for explicitly typed keys."""
    for key, decl in project_schema().items():
        value = values.get(f"{PROJECT}:{key}")
        kind = decl.get("type")
        if value is None or kind is None:
            continue
        ok = {
            "string": True,
            "integer": value.lstrip("+-").isdigit(),
            "boolean": value in ("true", "false"),
        }.get(kind, True)
        if not ok:
            raise CliTypeError(f"Stack '{stack}' with configuration key '{key}' must be of type '{kind}'")


def fake_key_hex(name: str, length: int, keepers: Mapping[str, Any]) -> str:
    """Deterministic stand-in for RandomBytes' hex: new keepers -> new bytes."""
    seed = f"{name}|{length}|{json.dumps(dict(keepers), sort_keys=True)}".encode()
    out = b""
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return out[:length].hex()


class FakeMocks(pulumi.runtime.Mocks):
    """Echo inputs as outputs; give RandomBytes deterministic fake key bytes."""

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[Optional[str], dict[str, Any]]:
        state = dict(args.inputs)
        if args.typ == RANDOM_BYTES:
            hex_key = fake_key_hex(args.name, int(args.inputs["length"]), args.inputs.get("keepers") or {})
            state["hex"] = hex_key
            state["base64"] = base64.b64encode(bytes.fromhex(hex_key)).decode()
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], Optional[list[tuple[str, str]]]]:
        raise AssertionError(f"the program made an unexpected invoke: {args.token}")


@dataclass
class Registration:
    urn: str
    type: str
    name: str
    parent: str
    provider: str
    dependencies: list[str]
    custom: bool
    #: inputs as the engine received them; secret values stay wrapped.
    inputs: dict[str, Any]


class RecordingMonitor(pulumi_mocks.MockMonitor):
    """The stock MockMonitor, keeping what it would otherwise drop."""

    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.registrations: list[Registration] = []
        self.outputs: dict[str, dict[str, Any]] = {}

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            self.registrations.append(
                Registration(
                    urn=response.urn,
                    type=request.type,
                    name=request.name,
                    parent=request.parent,
                    provider=request.provider,
                    dependencies=list(request.dependencies),
                    custom=request.custom,
                    inputs=rpc.deserialize_properties(request.object),
                )
            )
        return response

    def RegisterResourceOutputs(self, request: Any) -> Any:
        self.outputs[request.urn] = rpc.deserialize_properties(request.outputs)
        return super().RegisterResourceOutputs(request)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class ProgramRun:
    config: dict[str, str]
    registrations: list[Registration]
    outputs: dict[str, dict[str, Any]]
    logs: list[str]
    error: Optional[BaseException] = None
    #: the program module's globals after the run (``encryption``, ``settings``...).
    namespace: dict[str, Any] = field(default_factory=dict)
    stack_urn: str = ""
    by_urn: dict[str, Registration] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_urn = {r.urn: r for r in self.registrations}

    @property
    def stack_outputs(self) -> dict[str, Any]:
        return self.outputs.get(self.stack_urn, {})

    def of_type(self, type_: str) -> list[Registration]:
        return [r for r in self.registrations if r.type == type_]

    def one(self, type_: str) -> Registration:
        found = self.of_type(type_)
        assert len(found) == 1, f"expected one {type_}, found {[r.name for r in found]}"
        return found[0]

    def named(self, name: str) -> Registration:
        found = [r for r in self.registrations if r.name == name]
        assert len(found) == 1, f"expected one resource named {name}, found {len(found)}"
        return found[0]

    def kubernetes_objects(self) -> list[Registration]:
        return [r for r in self.registrations if r.custom and r.type.startswith("kubernetes:") and "/" in r.type]


def run_program(
    overrides: Optional[Mapping[str, Any]] = None,
    *,
    stack: str = "dev",
    stack_file: bool = False,
    cli_checks: bool = True,
    defaults: bool = True,
    preview: bool = False,
) -> ProgramRun:
    """Run __main__.py once on fresh mocks and return what it declared."""
    values = project_defaults() if defaults else {}
    if stack_file:
        values.update(stack_config(stack))
    for key, value in (overrides or {}).items():
        values[key if ":" in key else f"{PROJECT}:{key}"] = cli_value(value)
    if cli_checks:
        check_cli_types(values, stack)

    mocks = FakeMocks()
    monitor = RecordingMonitor(mocks)
    capture = _Capture()
    logger = logging.getLogger(f"sealnet.tests.engine.{id(capture)}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(capture)

    pulumi.runtime.set_all_config(dict(values), [])
    # set_mocks makes (and finishes) a root Stack of its own when none exists;
    # drop it and run the program inside a fresh Stack, as the language host
    # does, so its exports are registered at the end.
    settings.ROOT.set(None)
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=preview, logger=logger, monitor=monitor)
    settings.ROOT.set(None)
    settings.SETTINGS.outputs.clear()
    monitor.outputs.clear()

    namespace: dict[str, Any] = {}
    error: Optional[BaseException] = None
    try:
        _sync_await(pulumi_stack.run_in_stack(lambda: namespace.update(runpy.run_path(str(MAIN), run_name="__main__"))))
    except Exception as exc:  # the test decides whether an error was expected
        error = exc
    finally:
        logger.removeHandler(capture)
    run = ProgramRun(
        config=values,
        registrations=monitor.registrations,
        outputs=dict(monitor.outputs),
        logs=capture.messages,
        error=error,
        namespace=namespace,
        stack_urn=f"urn:pulumi:{stack}::{PROJECT}::pulumi:pulumi:Stack::{PROJECT}-{stack}",
    )
    return run


def resolve(output: pulumi.Output[Any]) -> tuple[Any, bool]:
    """(value, is_secret) of an Output after the run."""
    return _sync_await(output.future()), _sync_await(output.is_secret())


def plain_strings(value: Any) -> Iterator[str]:
    """Every string in ``value`` that is NOT inside a secret wrapper (and keys)."""
    if rpc.is_rpc_secret(value):
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield str(key)
            yield from plain_strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from plain_strings(item)


def unwrap(value: Any) -> Any:
    """Drop secret wrappers and turn whole floats back into ints (the mock wire
    format carries every number as a float)."""
    if rpc.is_rpc_secret(value):
        return unwrap(rpc.unwrap_rpc_secret(value))
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [unwrap(v) for v in value]
    return value
