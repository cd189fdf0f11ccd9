"""The contract between the Pulumi program and the agent it deploys.

agent.cluster.config reads exactly what components/render.py renders, and
the DaemonSet's command, env, ports, probes and mounts are what the daemon
and the image (Dockerfile) expect.

Properties asserted:
- the document components/render.py writes, for every mode of the program,
  loads, and each field lands where the daemon reads it (the contract);
- every bad value is refused with one line naming field, value and rule;
- unknown fields are errors with a did-you-mean, missing ones are named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.cluster import config
from agent.errors import ConfigError
from components import render
from components import config as program_config
from tests.components.conftest import BASE
from tests.components.harness import project_defaults


def settings_for(overrides: dict[str, Any]) -> program_config.Settings:
    raw: dict[str, Any] = {key.split(":", 1)[1]: value for key, value in project_defaults().items()}
    raw.update(BASE)
    raw.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in overrides.items()})
    return program_config.parse(raw)


@pytest.mark.parametrize("mode", ["ipsec", "wireguard"])  # cilium mode deploys no sealnet agent
def test_rendered_document_loads(mode: str, tmp_path: Path) -> None:
    settings = settings_for({"mode": mode, "rotation": 4, "nodeEncryption": True})
    data = render.configmap_data(render.agent_config(settings))
    path = tmp_path / render.CONFIG_FILE
    path.write_text(data[render.CONFIG_FILE])
    cfg = config.load(path)
    assert cfg.mode == mode
    assert cfg.node_encryption is True
    assert cfg.metrics_port == settings.metrics_port and cfg.health_port == settings.health_port
    assert cfg.state_dir == render.STATE_DIR
    if mode == "wireguard":
        assert cfg.keys_file is None
        assert cfg.wireguard.key_epoch == 4 and cfg.wireguard.port == settings.wireguard_port
    else:
        assert cfg.keys_file == render.KEYS_PATH


def _doc(**changes: object) -> dict:
    doc = render.agent_config(settings_for({}))
    doc = json.loads(json.dumps(doc))
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            doc[outer][inner] = value
        else:
            doc[key] = value
    return doc


@pytest.mark.parametrize("field, value, message", [
    ("mode", "ipsecc", "config.mode: must be one of ipsec, wireguard, got 'ipsecc'"),
    ("spiPrefix", 0, "config.spiPrefix: must be an integer 1..15, got 0"),
    ("spiPrefix", True, "config.spiPrefix: must be an integer 1..15, got True"),
    ("metricsPort", 70000, "config.metricsPort: must be an integer 1..65535, got 70000"),
    ("healthPort", "9879", "config.healthPort: must be an integer 1..65535, got '9879'"),
    ("nodeEncryption", "yes", "config.nodeEncryption: must be true or false, got 'yes'"),
    ("logLevel", "trace", "config.logLevel: must be one of debug, info, warning, error, got 'trace'"),
    ("rotationGracePeriod", -1, "config.rotationGracePeriod: must be a number of seconds 0..86400, got -1"),
    ("resyncPeriod", 0, "config.resyncPeriod: must be a number of seconds 1..3600, got 0"),
    ("stateDir", "var/lib", "config.stateDir: must be an absolute path, got 'var/lib'"),
    ("keysFile", None, "config.keysFile: must be the keys file's path in ipsec mode, got None"),
    ("wireguard.interface", "x" * 16, "config.wireguard.interface: 'xxxxxxxxxxxxxxxx' is not a Linux interface"),
    ("wireguard.backend", "bpf", "config.wireguard.backend: must be one of auto, kernel, userspace, got 'bpf'"),
    ("wireguard.keyEpoch", -1, "config.wireguard.keyEpoch: must be an integer 0..2147483647, got -1"),
])
def test_bad_values_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.parse(_doc(**{field: value}))
    assert str(e.value).startswith(message)


def test_unknown_and_missing_fields() -> None:
    doc = _doc()
    doc["metricPort"] = doc.pop("metricsPort")
    with pytest.raises(ConfigError, match=r"config.metricPort: unknown field; did you mean 'metricsPort'\?"):
        config.parse(doc)
    doc = _doc()
    del doc["wireguard"]["port"]
    with pytest.raises(ConfigError, match=r"config.wireguard.port: required field is missing"):
        config.parse(doc)


def test_not_json_and_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text("{mode: ipsec}")
    with pytest.raises(ConfigError, match=r"is not JSON: .* at line 1"):
        config.load(path)
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        config.parse([])


# -- the DaemonSet, the daemon and the image agree ---------------------------------

REPO = Path(__file__).resolve().parents[2]


def _container(mode: str) -> tuple[dict[str, Any], dict[str, Any], program_config.Settings]:
    settings = settings_for({"mode": mode})
    ds = render.daemonset(settings, render.IPSEC_SECRET_NAME if mode == "ipsec" else None, checksum="x")
    spec = ds["spec"]["template"]["spec"]
    return spec["containers"][0], spec, settings


@pytest.mark.parametrize("mode", ["ipsec", "wireguard"])
def test_daemonset_runs_what_the_daemon_and_image_expect(mode: str) -> None:
    from agent import cli

    container, spec, settings = _container(mode)
    cfg = config.parse(render.agent_config(settings))
    # The command is the daemon's, parsed by the agent's own CLI.
    assert container["command"][:3] == ["python", "-m", "agent"]
    args = cli.build_parser().parse_args(container["command"][3:])
    assert args.command == "run" and args.config == render.CONFIG_PATH and args.node is None
    # NODE_NAME from the downward API: the daemon's default for --node.
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # Ports and probes: what the daemon serves.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == cfg.metrics_port and ports["health"] == cfg.health_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert spec["hostNetwork"] is True
    if mode == "wireguard":
        assert ports["wireguard"] == cfg.wireguard.port
    # Mounts: the config file, the keys directory (the kubelet swaps files in it),
    # the state dir, a writable /tmp; wireguard-go's device and socket directory.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[render.CONFIG_PATH]["subPath"] == render.CONFIG_FILE
    assert cfg.state_dir in mounts and "/tmp" in mounts
    if cfg.keys_file is not None:
        keys_dir = str(Path(cfg.keys_file).parent)
        assert mounts[keys_dir]["readOnly"] is True and "subPath" not in mounts[keys_dir]
    else:
        assert render.TUN_DEVICE in mounts and render.WIREGUARD_RUN_DIR in mounts
    sc = container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]} and sc["readOnlyRootFilesystem"] is True


def test_image_holds_the_agent_and_its_runtime_needs_only() -> None:
    import ast

    dockerfile = (REPO / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines()]
    assert any(line.startswith("ARG BASE_IMAGE=python:") and "slim" in line for line in lines)
    assert "FROM ${BASE_IMAGE}" in lines
    assert "COPY agent/ agent/" in lines and "WORKDIR /opt/sealnet" in lines
    assert "COPY requirements-agent.txt ." in lines and not any("components" in line for line in lines)
    # A read-only root filesystem: bytecode compiled at build time, never written at run time.
    assert "RUN python -m compileall -q agent" in lines and "PYTHONDONTWRITEBYTECODE=1" in dockerfile
    assert "iproute2 wireguard-tools wireguard-go" in dockerfile
    # Every third-party module the agent imports is pinned in requirements-agent.txt.
    pinned = {line.split("==")[0].lower() for line in (REPO / "requirements-agent.txt").read_text().splitlines()
              if "==" in line}
    dist = {"prometheus_client": "prometheus-client", "pyroute2": "pyroute2", "cryptography": "cryptography",
            "lightkube": "lightkube", "watchfiles": "watchfiles"}
    imported = set()
    for path in (REPO / "agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            imported.update(n.split(".")[0] for n in names)
    import sys
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "agent"}
    assert third_party <= set(dist), f"agent imports {sorted(third_party - set(dist))}: add them to the image"
    assert {dist[m] for m in third_party} <= pinned
    assert "components" not in imported and "pulumi" not in imported
