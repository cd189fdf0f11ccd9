"""Stack configuration: Pulumi.yaml's schema, the stack files, and validation.

Properties asserted:
- the program reads exactly the keys Pulumi.yaml declares, and Pulumi.yaml
  is the only place a default lives (components/config.py has none);
- the dev and prod stack files pass the CLI's type check and the program's
  validation, and mean what the README says (kind context, 256-bit keys...);
- every bad value fails the run with its own message naming the key, the
  value and what is allowed, and the program then registers no resource
  at all (not even the provider);
- several bad values give one message each, in one error.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from components import config
from tests.components.conftest import BASE
from tests.components.harness import (
    REPO,
    CliTypeError,
    project_defaults,
    project_schema,
    run_program,
    stack_config,
)


def parse(**overrides: Any) -> config.Settings:
    raw = {key.split(":", 1)[1]: value for key, value in project_defaults().items()}
    raw.update(BASE)
    raw.update(overrides)
    return config.parse(raw)


def test_program_reads_exactly_the_declared_keys() -> None:
    assert sorted(config.KEYS) == sorted(project_schema())


def test_every_key_has_a_default_and_a_description() -> None:
    for key, decl in project_schema().items():
        assert "default" in decl, key
        assert decl.get("description", "").strip(), key
        assert "|" not in decl["description"], f"{key}: a pipe would break the README table"


def test_no_default_lives_in_the_program() -> None:
    source = (REPO / "components" / "config.py").read_text()
    for value in ("51871", "sealnet_wg0", "kube-system", "9878", "300"):
        assert value not in source, f"{value!r} is a default; it belongs in Pulumi.yaml only"


def test_defaults_parse_to_the_documented_settings() -> None:
    s = parse()
    assert (s.mode, s.rotation, s.key_bits, s.per_node_keys, s.node_encryption) == ("ipsec", 0, 128, True, False)
    assert (s.namespace, s.rotation_grace_period, s.wireguard_port, s.spi_prefix) == ("kube-system", 300, 51871, 5)
    assert s.tolerations == ({"operator": "Exists"},)
    assert s.allow_key_regeneration is False and s.install_cilium is False


def test_dev_stack() -> None:
    run = run_program(stack="dev", stack_file=True)
    assert run.error is None, run.error
    assert run.config["kubernetes:context"] == "kind-kind"
    provider = run.one("pulumi:providers:kubernetes")
    assert provider.inputs["context"] == "kind-kind"
    ds = run.one("kubernetes:apps/v1:DaemonSet")
    assert ds.inputs["spec"]["template"]["spec"]["containers"][0]["image"] == "sealnet-agent:dev"


def test_prod_stack() -> None:
    values = {k: v for k, v in {**project_defaults(), **stack_config("prod")}.items() if k.startswith("sealnet:")}
    s = config.parse({k.split(":", 1)[1]: v for k, v in values.items()})
    assert (s.key_bits, s.node_encryption, s.per_node_keys, s.mode) == (256, True, True, "ipsec")
    run = run_program(stack="prod", stack_file=True)
    assert run.error is None, run.error
    assert {r.inputs["length"] for r in run.of_type("random:index/randomBytes:RandomBytes")} == {36.0}
    text = (REPO / "Pulumi.prod.yaml").read_text()
    assert "--secrets-provider" in text  # the non-default secrets provider is documented


def test_cli_type_check_is_emulated() -> None:
    # The CLI rejects a non-integer for `type: integer` before the program runs.
    with pytest.raises(CliTypeError, match="'rotation' must be of type 'integer'"):
        run_program({**BASE, "rotation": "soon"})


# (key, value, message). Values pass the CLI's type check unless marked raw:
# the program's own validation is what catches them.
BAD_VALUES = [
    ("mode", "tls", 'sealnet:mode must be one of ipsec, wireguard, cilium, got "tls"'),
    ("rotation", -1, "sealnet:rotation must be an integer >= 0, got -1"),
    ("keyBits", 192, "sealnet:keyBits must be 128 or 256, got 192"),
    ("keyBits", 0, "sealnet:keyBits must be 128 or 256, got 0"),
    ("namespace", "Kube_System", 'sealnet:namespace must be a namespace name (DNS-1123 label: a-z, 0-9, \'-\', at most 63 characters), got "Kube_System"'),
    ("agentImage", "", 'sealnet:agentImage must be the node agent\'s image reference (e.g. registry.example.com/sealnet-agent:0.1.0) in mode ipsec, got ""'),
    ("agentImage", "my image", 'sealnet:agentImage must be the node agent\'s image reference (e.g. registry.example.com/sealnet-agent:0.1.0) in mode ipsec, got "my image"'),
    ("rotationGracePeriod", 90000, "sealnet:rotationGracePeriod must be a number of seconds in 0..86400, got 90000"),
    ("tolerations", [{"operator": "Sometimes"}], 'sealnet:tolerations must be a list of Kubernetes tolerations'),
    ("tolerations", [{"operator": "Exists", "value": "x"}], 'got [{"operator":"Exists","value":"x"}]'),
    ("tolerations", {"operator": "Exists"}, 'sealnet:tolerations must be a list of Kubernetes tolerations'),
    ("nodeSelector", {"disk": 1}, 'sealnet:nodeSelector must be a map of node label to value (strings), got {"disk":1}'),
    ("resources", {"requests": {"cpu": "lots"}}, 'sealnet:resources must be an object {"requests": {...}, "limits": {...}}'),
    ("resources", {"requests": {"memory": "1Gi"}, "limits": {"memory": "256Mi"}}, "each request at most its limit"),
    ("resources", {"requests": {"gpu": "1"}}, 'got {"requests":{"gpu":"1"}}'),
    ("logLevel", "verbose", 'sealnet:logLevel must be one of debug, info, warning, error, got "verbose"'),
    ("ciliumVersion", "latest", 'sealnet:ciliumVersion must be a chart version such as 1.20.2, got "latest"'),
    ("wireguardPort", 70000, "sealnet:wireguardPort must be an integer in 1..65535, got 70000"),
    ("wireguardInterface", "sealnet-wireguard0", 'sealnet:wireguardInterface must be a Linux interface name (1..15 characters of A-Z a-z 0-9 _ . -), got "sealnet-wireguard0"'),
    ("wireguardInterface", "wg/0", 'got "wg/0"'),
    ("spiPrefix", 16, "sealnet:spiPrefix must be a 4-bit SPI prefix in 1..15, got 16"),
    ("spiPrefix", 0, "sealnet:spiPrefix must be a 4-bit SPI prefix in 1..15, got 0"),
    ("metricsPort", 0, "sealnet:metricsPort must be an integer in 1..65535, got 0"),
    ("healthPort", 9878, "sealnet:healthPort must differ from sealnet:metricsPort, got 9878 for both"),
    ("installCilium", True, "sealnet:installCilium must be false unless sealnet:mode is cilium, got true (mode ipsec)"),
]

# Values the CLI's type check would stop, for a Pulumi.yaml without types.
RAW_BAD_VALUES = [
    ("rotation", "next", 'sealnet:rotation must be an integer >= 0, got "next"'),
    ("keyBits", "128bit", 'sealnet:keyBits must be 128 or 256, got "128bit"'),
    ("perNodeKeys", "yes", 'sealnet:perNodeKeys must be true or false, got "yes"'),
    ("nodeEncryption", "1", 'sealnet:nodeEncryption must be true or false, got "1"'),
    ("allowKeyRegeneration", "True", 'sealnet:allowKeyRegeneration must be true or false, got "True"'),
    ("nodeSelector", "{not json", 'sealnet:nodeSelector must be a map of node label to value (strings), got "{not json"'),
]


def _assert_rejected(overrides: dict[str, Any], message: str, cli_checks: bool = True) -> None:
    run = run_program({**BASE, **overrides}, cli_checks=cli_checks)
    assert isinstance(run.error, config.ConfigError), run.error
    lines = str(run.error).splitlines()
    assert any(message in line for line in lines), lines
    assert len(lines) == 1, f"one bad value, one message: {lines}"
    assert run.registrations == [], "validation must run before any resource is registered"


@pytest.mark.parametrize(("key", "value", "message"), BAD_VALUES, ids=[f"{k}={json.dumps(v)}" for k, v, _ in BAD_VALUES])
def test_bad_value_fails_before_any_resource(key: str, value: Any, message: str) -> None:
    _assert_rejected({key: value}, message)


@pytest.mark.parametrize(("key", "value", "message"), RAW_BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in RAW_BAD_VALUES])
def test_untyped_bad_value_fails_before_any_resource(key: str, value: str, message: str) -> None:
    _assert_rejected({key: value}, message, cli_checks=False)


def test_several_bad_values_one_line_each() -> None:
    run = run_program({**BASE, "keyBits": 192, "mode": "tls", "spiPrefix": 99})
    assert isinstance(run.error, config.ConfigError)
    assert sorted(str(run.error).splitlines()) == sorted(
        [
            "sealnet:keyBits must be 128 or 256, got 192",
            'sealnet:mode must be one of ipsec, wireguard, cilium, got "tls"',
            "sealnet:spiPrefix must be a 4-bit SPI prefix in 1..15, got 99",
        ]
    )
    assert run.registrations == []


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("keybits", "sealnet:keybits is not a setting of this program; did you mean sealnet:keyBits? (Pulumi.yaml lists them)"),
        ("rotations", "sealnet:rotations is not a setting of this program; did you mean sealnet:rotation?"),
        ("cipher", "sealnet:cipher is not a setting of this program (Pulumi.yaml lists them)"),
    ],
)
def test_misspelt_key_is_an_error_not_a_silent_default(key: str, message: str) -> None:
    # prod with `sealnet:keybits: 256` must not deploy 128-bit keys quietly.
    _assert_rejected({key: 256}, message)


def test_other_namespaces_are_not_ours(run: Any) -> None:
    run({"kubernetes:context": "kind-kind", "aws:region": "eu-west-1"})


def test_missing_value_names_pulumi_yaml() -> None:
    run = run_program({}, defaults=False)
    assert isinstance(run.error, config.ConfigError)
    assert "sealnet:mode is not set; its default is declared in Pulumi.yaml" in str(run.error)
    assert run.registrations == []


def test_agent_image_is_optional_in_cilium_mode() -> None:
    s = parse(mode="cilium", agentImage="", installCilium="true")
    assert s.install_cilium and not s.runs_agent
