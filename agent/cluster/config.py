"""The daemon's config document: ``/etc/sealnet/config.json``, from the ConfigMap.

components/render.py ``agent_config`` writes it; this module reads it and
checks every field before the agent touches the kernel::

    cfg = load("/etc/sealnet/config.json")   # ConfigError naming field, value and what is allowed
    cfg.mode, cfg.keys_file, cfg.wireguard.port

Fields the program renders are all required (a missing one means program and
agent disagree about the contract, which must not pass silently). A few
daemon tunables are optional with defaults: ``resyncPeriod`` (s between
full passes that repair drift), ``nodeGracePeriod`` (s a deleted Node's
datapath is kept, so a Node that is re-registered does not lose its
traffic) and ``wireguard.backend``. Unknown fields are errors, with the
nearest known name suggested.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from agent import jsonfile
from agent.errors import ConfigError

MODES = ("ipsec", "wireguard")
LOG_LEVELS = ("debug", "info", "warning", "error")
BACKENDS = ("auto", "kernel", "userspace")
_IFNAME = re.compile(r"\A[A-Za-z0-9_.-]{1,15}\Z")


@dataclass(frozen=True)
class WireguardConfig:
    interface: str = "sealnet_wg0"
    port: int = 51871
    key_epoch: int = 0
    backend: str = "auto"


@dataclass(frozen=True)
class AgentConfig:
    """The validated document (Python names; the file uses the camelCase ones)."""

    mode: str
    node_encryption: bool
    per_node_keys: bool
    spi_prefix: int
    rotation_grace_period: float
    wireguard: WireguardConfig
    log_level: str
    metrics_port: int
    health_port: int
    state_dir: str
    keys_file: Optional[str]
    allow_key_regeneration: bool
    resync_period: float = 60.0
    node_grace_period: float = 60.0


def load(path: str | Path) -> AgentConfig:
    """Read and check the file at ``path``."""
    return parse(jsonfile.load("--config", path))


def parse(doc: Any) -> AgentConfig:
    """Check an already decoded document."""
    if not isinstance(doc, dict):
        raise ConfigError(f"config: expected a JSON object, got {type(doc).__name__}")
    _check_fields("config", doc, _TOP_REQUIRED, _TOP_OPTIONAL)
    wg = doc["wireguard"]
    if not isinstance(wg, dict):
        raise ConfigError(f"config.wireguard: expected an object, got {wg!r}")
    _check_fields("config.wireguard", wg, _WG_REQUIRED, _WG_OPTIONAL)
    mode = _choice("mode", doc["mode"], MODES)
    keys_file = doc["keysFile"]
    if mode == "ipsec" and (not isinstance(keys_file, str) or not keys_file):
        raise ConfigError(f"config.keysFile: must be the keys file's path in ipsec mode, got {keys_file!r}")
    if keys_file is not None and not isinstance(keys_file, str):
        raise ConfigError(f"config.keysFile: must be a path or null, got {keys_file!r}")
    metrics, health = _port("metricsPort", doc["metricsPort"]), _port("healthPort", doc["healthPort"])
    wireguard = WireguardConfig(
        interface=_interface(wg["interface"]),
        port=_port("wireguard.port", wg["port"]),
        key_epoch=_integer("wireguard.keyEpoch", wg["keyEpoch"], 0, 2**31 - 1),
        backend=_choice("wireguard.backend", wg.get("backend", "auto"), BACKENDS),
    )
    if mode == "wireguard" and {wireguard.port, wireguard.port + 1} & {metrics, health}:
        raise ConfigError(f"config.wireguard.port: {wireguard.port} or the rotation interface's {wireguard.port + 1} "
                          f"is also metricsPort or healthPort (UDP and TCP may share a number, but keep them "
                          f"apart to avoid confusion)")
    if mode == "wireguard":
        from agent.wireguard.epochs import slot_names

        slot_names(wireguard.interface, wireguard.port)  # names the field if no second interface fits
    state_dir = doc["stateDir"]
    if not isinstance(state_dir, str) or not state_dir.startswith("/"):
        raise ConfigError(f"config.stateDir: must be an absolute path, got {state_dir!r}")
    return AgentConfig(
        mode=mode,
        node_encryption=_bool("nodeEncryption", doc["nodeEncryption"]),
        per_node_keys=_bool("perNodeKeys", doc["perNodeKeys"]),
        spi_prefix=_integer("spiPrefix", doc["spiPrefix"], 1, 15),
        rotation_grace_period=_seconds("rotationGracePeriod", doc["rotationGracePeriod"], 0, 86400),
        wireguard=wireguard,
        log_level=_choice("logLevel", doc["logLevel"], LOG_LEVELS),
        metrics_port=metrics,
        health_port=health,
        state_dir=state_dir,
        keys_file=keys_file if mode == "ipsec" else None,
        allow_key_regeneration=_bool("allowKeyRegeneration", doc["allowKeyRegeneration"]),
        resync_period=_seconds("resyncPeriod", doc.get("resyncPeriod", 60), 1, 3600),
        node_grace_period=_seconds("nodeGracePeriod", doc.get("nodeGracePeriod", 60), 0, 86400),
    )


_TOP_REQUIRED = ("mode", "nodeEncryption", "perNodeKeys", "spiPrefix", "rotationGracePeriod", "wireguard",
                 "logLevel", "metricsPort", "healthPort", "stateDir", "keysFile", "allowKeyRegeneration")
_TOP_OPTIONAL = ("resyncPeriod", "nodeGracePeriod")
_WG_REQUIRED = ("interface", "port", "keyEpoch")
_WG_OPTIONAL = ("backend",)


def _check_fields(where: str, doc: Mapping[str, Any], required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    known = required + optional
    for name in sorted(doc):
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; allowed: {', '.join(known)}"
            raise ConfigError(f"{where}.{name}: unknown field{hint}")
    for name in required:
        if name not in doc:
            raise ConfigError(f"{where}.{name}: required field is missing")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(field: str, value: Any, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise ConfigError(f"config.{field}: must be an integer {low}..{high}, got {value!r}")
    return int(value)


def _port(field: str, value: Any) -> int:
    return _integer(field, value, 1, 65535)


def _seconds(field: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"config.{field}: must be a number of seconds {low:g}..{high:g}, got {value!r}")
    return float(value)


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config.{field}: must be true or false, got {value!r}")
    return value


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"config.{field}: must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _interface(value: Any) -> str:
    if not isinstance(value, str) or not _IFNAME.match(value) or value in (".", ".."):
        raise ConfigError(f"config.wireguard.interface: {value!r} is not a Linux interface name "
                          f"(1..15 characters of A-Z a-z 0-9 _ . -)")
    return value

