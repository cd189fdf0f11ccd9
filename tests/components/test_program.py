"""The program's resource graph per mode, its exports, and determinism.

Properties asserted:
- per mode, exactly the expected resources, each under the expected parent
  (so `pulumi preview` shows one tree: Stack > TransparentEncryption > ...);
- every Kubernetes resource uses the program's explicit provider, which has
  enableSecretMutable and the stack's context; no default provider is used;
- components use `sealnet:index:<Name>` tokens and register real outputs;
- the stack exports mode, rotation, keyId, secretName, daemonSetName;
- the same config twice gives identical inputs for every resource (a preview
  of an unchanged stack shows no diff).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.components.harness import ProgramRun

PROVIDER = "pulumi:providers:kubernetes"
ENC = "sealnet:index:TransparentEncryption"
KEYRING = "sealnet:index:Keyring"
AGENT = "sealnet:index:NodeAgent"
CILIUM = "sealnet:index:Cilium"
RANDOM = "random:index/randomBytes:RandomBytes"
SECRET = "kubernetes:core/v1:Secret"
KEY_SPEC = "pulumi-python:dynamic/sealnet:KeySpec"
AGENT_CHILDREN = [
    ("kubernetes:core/v1:ServiceAccount", "sealnet-agent-sa"),
    ("kubernetes:rbac.authorization.k8s.io/v1:ClusterRole", "sealnet-agent-role"),
    ("kubernetes:rbac.authorization.k8s.io/v1:ClusterRoleBinding", "sealnet-agent-binding"),
    ("kubernetes:core/v1:ConfigMap", "sealnet-agent-config"),
    ("kubernetes:apps/v1:DaemonSet", "sealnet-agent-ds"),
]
KEYRING_CHILDREN = [
    (KEY_SPEC, "sealnet-keys-key-spec"),
    (RANDOM, "sealnet-keys-slot0"),
    (RANDOM, "sealnet-keys-slot1"),
    (SECRET, "sealnet-keys-secret"),
]

# mode/settings -> {(type, name): parent name}; "" is the root Stack.
EXPECTED_GRAPHS: dict[str, tuple[dict[str, Any], dict[tuple[str, str], str]]] = {
    "ipsec": (
        {},
        {
            (PROVIDER, "k8s"): "",
            (ENC, "sealnet"): "",
            (KEYRING, "sealnet-keys"): "sealnet",
            (AGENT, "sealnet-agent"): "sealnet",
            **{child: "sealnet-keys" for child in KEYRING_CHILDREN},
            **{child: "sealnet-agent" for child in AGENT_CHILDREN},
        },
    ),
    "wireguard": (
        {"mode": "wireguard"},
        {
            (PROVIDER, "k8s"): "",
            (ENC, "sealnet"): "",
            (AGENT, "sealnet-agent"): "sealnet",
            **{child: "sealnet-agent" for child in AGENT_CHILDREN},
        },
    ),
    "cilium": (
        {"mode": "cilium"},
        {
            (PROVIDER, "k8s"): "",
            (ENC, "sealnet"): "",
            (KEYRING, "sealnet-keys"): "sealnet",
            **{child: "sealnet-keys" for child in KEYRING_CHILDREN},
        },
    ),
    "cilium+install": (
        {"mode": "cilium", "installCilium": True},
        {
            (PROVIDER, "k8s"): "",
            (ENC, "sealnet"): "",
            (KEYRING, "sealnet-keys"): "sealnet",
            (CILIUM, "sealnet-cilium"): "sealnet",
            ("kubernetes:helm.sh/v3:Release", "sealnet-cilium-release"): "sealnet-cilium",
            **{child: "sealnet-keys" for child in KEYRING_CHILDREN},
        },
    ),
}


def graph(run: ProgramRun) -> dict[tuple[str, str], str]:
    names = {r.urn: r.name for r in run.registrations}
    return {(r.type, r.name): names.get(r.parent, "") for r in run.registrations}


@pytest.mark.parametrize("case", list(EXPECTED_GRAPHS))
def test_resource_graph_per_mode(run: Any, case: str) -> None:
    overrides, expected = EXPECTED_GRAPHS[case]
    r = run(overrides)
    assert graph(r) == expected
    for reg in r.registrations:
        if reg.parent:
            assert reg.parent == r.stack_urn or reg.parent in r.by_urn, f"{reg.name}: dangling parent"
        else:
            pytest.fail(f"{reg.name} has no parent at all")


@pytest.mark.parametrize("case", list(EXPECTED_GRAPHS))
def test_kubernetes_resources_use_the_explicit_provider(run: Any, case: str) -> None:
    r = run(EXPECTED_GRAPHS[case][0])
    provider = r.one(PROVIDER)
    assert provider.inputs["enableSecretMutable"] == "true"
    for reg in r.registrations:
        if reg.custom and reg.type.startswith("kubernetes:"):
            assert reg.provider.startswith(provider.urn + "::"), f"{reg.name} uses {reg.provider or 'the default provider'}"


def test_provider_takes_the_stack_kubernetes_context(run: Any) -> None:
    r = run({"kubernetes:context": "prod-eu", "kubernetes:kubeconfig": "/etc/kube/config"})
    provider = r.one(PROVIDER)
    assert provider.inputs["context"] == "prod-eu" and provider.inputs["kubeconfig"] == "/etc/kube/config"


def test_components_register_real_outputs(run: Any) -> None:
    r = run({"rotation": 3})
    outputs = {r.by_urn[urn].type: value for urn, value in r.outputs.items() if urn in r.by_urn}
    assert outputs[KEYRING] == {"keyId": 4.0, "rotation": 3.0, "secretName": "sealnet-ipsec-keys", "secretNamespace": "kube-system"}
    assert outputs[AGENT]["daemonSetName"] == "sealnet-agent"
    assert len(outputs[AGENT]["configChecksum"]) == 64
    assert outputs[ENC] == {"mode": "ipsec", "rotation": 3.0, "keyId": 4.0, "secretName": "sealnet-ipsec-keys", "daemonSetName": "sealnet-agent"}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"rotation": 2}, {"mode": "ipsec", "rotation": 2, "keyId": 3, "secretName": "sealnet-ipsec-keys", "daemonSetName": "sealnet-agent"}),
        ({"mode": "wireguard", "rotation": 2}, {"mode": "wireguard", "rotation": 2, "daemonSetName": "sealnet-agent"}),
        ({"mode": "cilium"}, {"mode": "cilium", "rotation": 0, "keyId": 1, "secretName": "cilium-ipsec-keys"}),
    ],
)
def test_stack_exports(run: Any, overrides: dict[str, Any], expected: dict[str, Any]) -> None:
    # Outputs that are None (no key in wireguard, no agent in cilium) are not exported.
    assert run(overrides).stack_outputs == expected


def test_cilium_secret_lives_where_cilium_reads_it(run: Any) -> None:
    r = run({"mode": "cilium", "installCilium": True, "namespace": "sealnet"})
    secret = r.one(SECRET).inputs
    assert secret["metadata"]["name"] == "cilium-ipsec-keys" and secret["metadata"]["namespace"] == "kube-system"
    release = r.one("kubernetes:helm.sh/v3:Release")
    assert release.inputs["chart"] == "cilium" and release.inputs["namespace"] == "kube-system"
    assert release.inputs["version"] == "1.20.2"
    assert release.inputs["repositoryOpts"] == {"repo": "https://helm.cilium.io/"}
    assert release.inputs["values"]["encryption"]["ipsec"]["secretName"] == secret["metadata"]["name"]
    assert r.one(SECRET).urn in release.dependencies, "Cilium's agent needs the Secret before it starts"
    assert not r.of_type("kubernetes:apps/v1:DaemonSet"), "mode cilium runs no sealnet agent"


@pytest.mark.parametrize("overrides", [{}, {"mode": "wireguard", "rotation": 5}, {"mode": "cilium", "installCilium": True, "rotation": 17}])
def test_same_config_gives_identical_inputs(run: Any, overrides: dict[str, Any]) -> None:
    first, second = run(overrides), run(overrides)
    # Registration order is asynchronous; identity is the URN.
    assert sorted(first.by_urn) == sorted(second.by_urn)
    for urn, a in first.by_urn.items():
        b = second.by_urn[urn]
        assert a.inputs == b.inputs, f"{a.name} differs between two runs of the same config"
        assert sorted(a.dependencies) == sorted(b.dependencies) and a.parent == b.parent
    assert first.stack_outputs == second.stack_outputs


def test_preview_declares_what_up_applies(run: Any) -> None:
    preview, up = run({"rotation": 2}, preview=True), run({"rotation": 2})
    assert {u: r.inputs for u, r in preview.by_urn.items()} == {u: r.inputs for u, r in up.by_urn.items()}
