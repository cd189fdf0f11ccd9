"""Every Kubernetes object the program declares is valid for Kubernetes 1.29
and for the newest version kubernetes-validate ships, offline, strict mode
(unknown fields are errors, as with `kubectl apply --validate=strict`).

The objects are taken from what the program sent to the engine (so the test
sees exactly what pulumi-kubernetes would apply), in every mode. Helm's
Release is a Pulumi resource, not a Kubernetes object, and has no schema;
its values are checked in test_program.py. A deliberately broken DaemonSet
shows the validation does reject what the API server would.
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest

from tests.components.harness import unwrap

VERSIONS = ["1.29", kubernetes_validate.utils.latest_version()]
MODES = [
    {},
    {"mode": "wireguard", "rotation": 3, "nodeEncryption": True},
    {"mode": "cilium", "installCilium": True, "rotation": 1},
    {"rotation": 2, "keyBits": 256, "namespace": "sealnet",
     "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "net", "effect": "NoExecute", "tolerationSeconds": 30}]},
]
NOT_KUBERNETES_OBJECTS = {"kubernetes:helm.sh/v3:Release"}


def objects(run: Any, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    found = [unwrap(r.inputs) for r in run(overrides).kubernetes_objects() if r.type not in NOT_KUBERNETES_OBJECTS]
    assert found, "the program declared no Kubernetes object"
    return found


def test_newest_version_is_at_least_1_37() -> None:
    major, minor = (int(x) for x in VERSIONS[1].split(".")[:2])
    assert (major, minor) >= (1, 37)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overrides", MODES, ids=["ipsec", "wireguard", "cilium", "ipsec-custom"])
def test_objects_validate(run: Any, overrides: dict[str, Any], version: str) -> None:
    for obj in objects(run, overrides):
        assert obj["metadata"].get("name"), f"{obj['kind']} without an explicit name"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for {version}: {err.message} at {list(err.path)}")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("breakage", "why"),
    [
        (lambda spec: spec["template"]["spec"]["containers"][0].update(ports="9878"), "ports is a list"),
        (lambda spec: spec["template"]["spec"].update(hostNetwork="yes"), "hostNetwork is a boolean"),
        (lambda spec: spec["template"]["spec"]["containers"][0]["securityContext"].update(capabilites={}), "unknown field (strict)"),
        (lambda spec: spec.pop("selector"), "selector is required"),
    ],
    ids=["ports-string", "hostNetwork-string", "typo-field", "no-selector"],
)
def test_validation_rejects_a_broken_daemonset(run: Any, version: str, breakage: Any, why: str) -> None:
    (ds,) = [o for o in objects(run, {}) if o["kind"] == "DaemonSet"]
    kubernetes_validate.validate(ds, version, strict=True)  # the real one passes
    broken = copy.deepcopy(ds)
    breakage(broken["spec"])
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)
