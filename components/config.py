"""Typed, validated stack configuration (namespace ``sealnet``).

Pulumi.yaml declares every key with its type, default and description; the
Pulumi CLI merges those defaults into the program's config, so this module
holds no defaults of its own. It turns the raw strings the CLI hands over
into a frozen :class:`Settings`, or fails with one :class:`ConfigError` that
has one line per bad value, naming the key, the value and what is allowed::

    sealnet:keyBits must be 128 or 256, got 192

Validation happens before the program declares any resource, so a bad value
never leaves a half-built stack.

Usage::

    settings = load()                       # reads pulumi.Config("sealnet")
    settings = parse({"mode": "ipsec", ...})  # pure, for tests and tools
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterable, Mapping, Optional

import pulumi

from components.rotation import RotationConfig

NAMESPACE = "sealnet"

MODES = ("ipsec", "wireguard", "cilium")
#: Modes in which sealnet's own node agent runs.
AGENT_MODES = ("ipsec", "wireguard")
LOG_LEVELS = ("debug", "info", "warning", "error")
KEY_BITS = (128, 256)

#: Every key this program reads; a test keeps it equal to Pulumi.yaml's `config:`.
KEYS = (
    "mode", "rotation", "keyBits", "perNodeKeys", "nodeEncryption", "namespace",
    "agentImage", "rotationGracePeriod", "tolerations", "nodeSelector", "resources",
    "logLevel", "installCilium", "ciliumVersion", "wireguardPort", "wireguardInterface",
    "spiPrefix", "metricsPort", "healthPort", "allowKeyRegeneration",
)

_DNS_LABEL = re.compile(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_IMAGE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._/:@-]*\Z")
_IFNAME = re.compile(r"\A[A-Za-z0-9_.-]{1,15}\Z")  # IFNAMSIZ 16 incl. NUL, no '/', ':' or space
_CHART_VERSION = re.compile(r"\A[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?\Z")
_QUANTITY = re.compile(r"\A([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?\Z")
_SUFFIX = {
    None: Decimal(1), "m": Decimal("0.001"), "k": Decimal(10) ** 3, "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}
_RESOURCE_NAMES = ("cpu", "memory", "ephemeral-storage")
_TOLERATION_FIELDS = {"key", "operator", "value", "effect", "tolerationSeconds"}
_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")


class ConfigError(pulumi.RunError, ValueError):
    """Invalid stack configuration. A RunError, so `pulumi up` prints the
    message without a Python traceback."""


@dataclass(frozen=True)
class Settings:
    """Every sealnet setting, validated. Field names are the config keys in snake_case."""

    mode: str
    rotation: int
    key_bits: int
    per_node_keys: bool
    node_encryption: bool
    namespace: str
    agent_image: str
    rotation_grace_period: int
    tolerations: tuple[dict[str, Any], ...]
    node_selector: dict[str, str]
    resources: dict[str, dict[str, str]]
    log_level: str
    install_cilium: bool
    cilium_version: str
    wireguard_port: int
    wireguard_interface: str
    spi_prefix: int
    metrics_port: int
    health_port: int
    allow_key_regeneration: bool

    @property
    def rotation_config(self) -> RotationConfig:
        return RotationConfig(self.rotation, self.key_bits, self.per_node_keys)

    @property
    def runs_agent(self) -> bool:
        return self.mode in AGENT_MODES


def load(config: Optional[pulumi.Config] = None) -> Settings:
    """Read and validate the ``sealnet`` namespace of the running stack."""
    config = config or pulumi.Config(NAMESPACE)
    return parse({key: config.get(key) for key in KEYS}, present=configured_keys())


def configured_keys() -> set[str]:
    """Every ``sealnet:`` key the stack sets, known or not (a misspelt key
    would otherwise be ignored silently and its default used). The language
    host hands config over in PULUMI_CONFIG; inline programs and the mock
    engine through set_all_config."""
    from pulumi.runtime import config as runtime_config

    keys = set(runtime_config.CONFIG.get()) | set(runtime_config.get_config_env())
    return {key.split(":", 1)[1] for key in keys if key.startswith(NAMESPACE + ":")}


def _shown(value: Any) -> str:
    """A config value as the user would type it: 192, true, "foo", {...}."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class _Parser:
    """Collects one message per bad key; returns None for a bad value."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw
        self.errors: list[str] = []

    def fail(self, key: str, allowed: str, got: Any) -> None:
        self.errors.append(f"{NAMESPACE}:{key} must be {allowed}, got {_shown(got)}")

    def text(self, key: str) -> Optional[str]:
        value = self.raw.get(key)
        if value is None:
            self.errors.append(
                f"{NAMESPACE}:{key} is not set; its default is declared in Pulumi.yaml, "
                "so run the program through the Pulumi CLI (or set the key)"
            )
            return None
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, str)):
            return str(value)
        return json.dumps(value)

    def choice(self, key: str, allowed: tuple[str, ...]) -> Optional[str]:
        value = self.text(key)
        if value is not None and value not in allowed:
            self.fail(key, "one of " + ", ".join(allowed), value)
            return None
        return value

    def integer(self, key: str, low: int, high: Optional[int] = None, allowed: str = "") -> Optional[int]:
        value = self.text(key)
        if value is None:
            return None
        allowed = allowed or (f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}")
        try:
            number = int(value, 10)
        except ValueError:
            self.fail(key, allowed, value)
            return None
        if number < low or (high is not None and number > high):
            self.fail(key, allowed, number)
            return None
        return number

    def boolean(self, key: str) -> Optional[bool]:
        value = self.text(key)
        if value is None:
            return None
        if value not in ("true", "false"):
            self.fail(key, "true or false", value)
            return None
        return value == "true"

    def pattern(self, key: str, regex: re.Pattern[str], allowed: str) -> Optional[str]:
        value = self.text(key)
        if value is not None and not regex.match(value):
            self.fail(key, allowed, value)
            return None
        return value

    def structured(self, key: str, check: Callable[[Any], bool], allowed: str) -> Any:
        value = self.text(key)
        if value is None:
            return None
        try:
            decoded = json.loads(value)
        except ValueError:
            self.fail(key, allowed, value)
            return None
        if not check(decoded):
            self.fail(key, allowed, decoded)
            return None
        return decoded


def _quantity(text: Any) -> Optional[Decimal]:
    match = _QUANTITY.match(text) if isinstance(text, str) else None
    if not match:
        return None
    try:
        return Decimal(match.group(1)) * _SUFFIX[match.group(2)]
    except InvalidOperation:
        return None


def _is_tolerations(value: Any) -> bool:
    if not isinstance(value, list):
        return False
    for item in value:
        if not isinstance(item, dict) or not set(item) <= _TOLERATION_FIELDS:
            return False
        operator = item.get("operator", "Equal")
        if operator not in ("Exists", "Equal"):
            return False
        if operator == "Exists" and item.get("value", "") != "":
            return False  # the API server rejects a value with Exists
        if item.get("effect", "") not in _EFFECTS:
            return False
        if not all(isinstance(item.get(f, ""), str) for f in ("key", "value")):
            return False
        seconds = item.get("tolerationSeconds", 0)
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            return False
    return True


def _is_node_selector(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and k and isinstance(v, str) for k, v in value.items())


def _is_resources(value: Any) -> bool:
    if not isinstance(value, dict) or not set(value) <= {"requests", "limits"}:
        return False
    for part in value.values():
        if not isinstance(part, dict) or not set(part) <= set(_RESOURCE_NAMES):
            return False
        if any(_quantity(q) is None for q in part.values()):
            return False
    requests, limits = value.get("requests", {}), value.get("limits", {})
    # The API server rejects a request above its limit; say so before `up`.
    return all(_quantity(requests[n]) <= _quantity(limits[n]) for n in requests if n in limits)  # type: ignore[operator]


def parse(raw: Mapping[str, Any], present: Iterable[str] = ()) -> Settings:
    """Validate raw config values (strings, as the CLI passes them) into Settings.

    ``present`` lists the keys the stack sets; any that this program does not
    read is an error (a typo such as ``sealnet:keybits``).
    """
    p = _Parser(raw)
    by_lower = {key.lower(): key for key in KEYS}
    for key in sorted(set(present) - set(KEYS)):
        close = difflib.get_close_matches(key.lower(), list(by_lower), n=1)
        hint = f"; did you mean {NAMESPACE}:{by_lower[close[0]]}?" if close else ""
        p.errors.append(f"{NAMESPACE}:{key} is not a setting of this program{hint} (Pulumi.yaml lists them)")
    values: dict[str, Any] = {
        "mode": p.choice("mode", MODES),
        "rotation": p.integer("rotation", 0),
        "key_bits": p.integer("keyBits", 0, allowed="128 or 256"),
        "per_node_keys": p.boolean("perNodeKeys"),
        "node_encryption": p.boolean("nodeEncryption"),
        "namespace": p.pattern(
            "namespace", _DNS_LABEL, "a namespace name (DNS-1123 label: a-z, 0-9, '-', at most 63 characters)"
        ),
        "agent_image": p.text("agentImage"),
        "rotation_grace_period": p.integer("rotationGracePeriod", 0, 86400, "a number of seconds in 0..86400"),
        "tolerations": p.structured(
            "tolerations", _is_tolerations,
            "a list of Kubernetes tolerations (fields key, operator Exists or Equal, value, "
            "effect NoSchedule, PreferNoSchedule or NoExecute, tolerationSeconds; no value with Exists)",
        ),
        "node_selector": p.structured("nodeSelector", _is_node_selector, "a map of node label to value (strings)"),
        "resources": p.structured(
            "resources", _is_resources,
            'an object {"requests": {...}, "limits": {...}} of cpu, memory or ephemeral-storage '
            'quantities such as "50m" or "64Mi", each request at most its limit',
        ),
        "log_level": p.choice("logLevel", LOG_LEVELS),
        "install_cilium": p.boolean("installCilium"),
        "cilium_version": p.pattern("ciliumVersion", _CHART_VERSION, "a chart version such as 1.20.2"),
        "wireguard_port": p.integer("wireguardPort", 1, 65535),
        "wireguard_interface": p.pattern(
            "wireguardInterface", _IFNAME, "a Linux interface name (1..15 characters of A-Z a-z 0-9 _ . -)"
        ),
        "spi_prefix": p.integer("spiPrefix", 1, 15, "a 4-bit SPI prefix in 1..15"),
        "metrics_port": p.integer("metricsPort", 1, 65535),
        "health_port": p.integer("healthPort", 1, 65535),
        "allow_key_regeneration": p.boolean("allowKeyRegeneration"),
    }
    if values["key_bits"] is not None and values["key_bits"] not in KEY_BITS:
        p.fail("keyBits", "128 or 256", values["key_bits"])
        values["key_bits"] = None
    if values["wireguard_interface"] in (".", ".."):
        p.fail("wireguardInterface", "a Linux interface name other than . and ..", values["wireguard_interface"])
    _check_combinations(p, values)
    if p.errors:
        raise ConfigError("\n".join(p.errors))
    values["tolerations"] = tuple(values["tolerations"])
    return Settings(**values)


def _check_combinations(p: _Parser, v: Mapping[str, Any]) -> None:
    """Rules that span keys; each is checked only when its keys parsed."""
    image = v["agent_image"]
    if v["mode"] in AGENT_MODES and image is not None and not _IMAGE.match(image):
        p.fail(
            "agentImage",
            f"the node agent's image reference (e.g. registry.example.com/sealnet-agent:0.1.0) in mode {v['mode']}",
            image,
        )
    if v["install_cilium"] and v["mode"] not in (None, "cilium"):
        p.errors.append(
            f"{NAMESPACE}:installCilium must be false unless {NAMESPACE}:mode is cilium, got true (mode {v['mode']})"
        )
    if v["metrics_port"] is not None and v["metrics_port"] == v["health_port"]:
        p.errors.append(
            f"{NAMESPACE}:healthPort must differ from {NAMESPACE}:metricsPort, got {v['health_port']} for both"
        )
