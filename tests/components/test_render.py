"""components/render.py and the objects the program sends: the agent's contract.

Properties asserted:
- the agent config file has exactly the documented fields, per mode;
- the ConfigMap checksum changes with any config value and the pod template
  carries it;
- RBAC is least privilege: nodes get/list/watch/patch, events create, nothing
  else, bound to the agent's ServiceAccount;
- the DaemonSet: host network, NET_ADMIN only and not privileged, every taint
  tolerated, system-node-critical, NODE_NAME from the downward API, keys
  Secret mounted read-only as a refreshable directory (ipsec only), state
  hostPath, probes on the health port, metrics port, resources, RollingUpdate;
- Cilium's Helm values carry the encryption settings from config.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from components import config, render
from tests.components.conftest import BASE
from tests.components.harness import ProgramRun, project_defaults, unwrap

DOCUMENTED_FIELDS = {
    "mode", "nodeEncryption", "perNodeKeys", "spiPrefix", "rotationGracePeriod", "wireguard", "logLevel",
    "metricsPort", "healthPort", "stateDir", "keysFile", "allowKeyRegeneration",
}


def settings(**overrides: Any) -> config.Settings:
    raw: dict[str, Any] = {key.split(":", 1)[1]: value for key, value in project_defaults().items()}
    raw.update(BASE)
    raw.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in overrides.items()})
    return config.parse(raw)


def pod_spec(run: ProgramRun) -> dict[str, Any]:
    ds = unwrap(run.one("kubernetes:apps/v1:DaemonSet").inputs)
    return ds["spec"]["template"]["spec"]


def test_agent_config_ipsec() -> None:
    cfg = render.agent_config(settings(nodeEncryption=True, rotation=7, spiPrefix=9, logLevel="debug"))
    assert set(cfg) == DOCUMENTED_FIELDS
    assert cfg["mode"] == "ipsec" and cfg["nodeEncryption"] is True and cfg["spiPrefix"] == 9
    assert cfg["keysFile"] == "/etc/sealnet/keys/keys" and cfg["stateDir"] == "/var/lib/sealnet"
    assert cfg["wireguard"] == {"interface": "sealnet_wg0", "port": 51871, "keyEpoch": 0}
    assert cfg["logLevel"] == "debug" and cfg["rotationGracePeriod"] == 300


def test_agent_config_wireguard_epoch_is_rotation() -> None:
    cfg = render.agent_config(settings(mode="wireguard", rotation=4, wireguardPort=51000))
    assert cfg["keysFile"] is None
    assert cfg["wireguard"] == {"interface": "sealnet_wg0", "port": 51000, "keyEpoch": 4}


def test_configmap_is_stable_json_and_checksummed() -> None:
    data = render.configmap_data(render.agent_config(settings()))
    assert list(data) == ["config.json"]
    assert json.loads(data["config.json"]) == render.agent_config(settings())
    same = render.config_checksum(render.configmap_data(render.agent_config(settings())))
    assert render.config_checksum(data) == same and len(same) == 64
    for change in ({"logLevel": "debug"}, {"spiPrefix": 6}, {"allowKeyRegeneration": True}, {"healthPort": 9000}):
        other = render.configmap_data(render.agent_config(settings(**change)))
        assert render.config_checksum(other) != same, change


def test_cluster_role_is_least_privilege() -> None:
    rules = render.cluster_role()["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {("", "nodes", v) for v in ("get", "list", "watch", "patch")} | {("", "events", "create")}


def test_rbac_objects(run: Any) -> None:
    r = run()
    binding = unwrap(r.one("kubernetes:rbac.authorization.k8s.io/v1:ClusterRoleBinding").inputs)
    sa = unwrap(r.one("kubernetes:core/v1:ServiceAccount").inputs)
    role = unwrap(r.one("kubernetes:rbac.authorization.k8s.io/v1:ClusterRole").inputs)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "kube-system"}]
    assert pod_spec(r)["serviceAccountName"] == sa["metadata"]["name"]


def test_daemonset_spec_ipsec(run: Any) -> None:
    r = run({"metricsPort": 9100, "healthPort": 9101})
    ds = unwrap(r.one("kubernetes:apps/v1:DaemonSet").inputs)
    assert ds["metadata"]["name"] == "sealnet-agent" and ds["metadata"]["namespace"] == "kube-system"
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]  # no key, no effect: every taint
    (container,) = spec["containers"]
    assert container["command"] == ["python", "-m", "agent", "run", "--config", "/etc/sealnet/config.json"]
    sc = container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in container["env"]
    ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in container["ports"]}
    assert ports == {"metrics": (9100, "TCP"), "health": (9101, "TCP")}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert container["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}}

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["keys"]["secret"]["secretName"] == "sealnet-ipsec-keys"
    assert mounts["keys"] == {"name": "keys", "mountPath": "/etc/sealnet/keys", "readOnly": True}
    assert "subPath" not in mounts["keys"], "a subPath mount never sees a rotated Secret"
    assert volumes["config"]["configMap"]["name"] == "sealnet-agent-config"
    assert mounts["config"]["mountPath"] == "/etc/sealnet/config.json" and mounts["config"]["readOnly"] is True
    assert volumes["state"]["hostPath"] == {"path": "/var/lib/sealnet", "type": "DirectoryOrCreate"}
    assert mounts["state"]["mountPath"] == "/var/lib/sealnet"
    assert "dev-net-tun" not in volumes


def test_daemonset_points_at_the_objects_it_needs(run: Any) -> None:
    r = run()
    secret = unwrap(r.one("kubernetes:core/v1:Secret").inputs)
    cm = unwrap(r.one("kubernetes:core/v1:ConfigMap").inputs)
    spec = pod_spec(r)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert secret["metadata"]["namespace"] == cm["metadata"]["namespace"] == "kube-system"
    ds = r.one("kubernetes:apps/v1:DaemonSet")
    assert r.one("kubernetes:core/v1:Secret").urn in ds.dependencies


def test_checksum_annotation_is_the_configmap_sha256(run: Any) -> None:
    r = run()
    cm = unwrap(r.one("kubernetes:core/v1:ConfigMap").inputs)
    ds = unwrap(r.one("kubernetes:apps/v1:DaemonSet").inputs)
    annotation = ds["spec"]["template"]["metadata"]["annotations"]["sealnet.io/config-checksum"]
    assert annotation == render.config_checksum(cm["data"])
    assert json.loads(cm["data"]["config.json"])["keysFile"] == "/etc/sealnet/keys/keys"


def test_daemonset_spec_wireguard(run: Any) -> None:
    spec = pod_spec(run({"mode": "wireguard"}))
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "keys" not in volumes, "wireguard nodes make their own keys; no Secret is mounted"
    assert volumes["dev-net-tun"]["hostPath"] == {"path": "/dev/net/tun", "type": "CharDevice"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/dev/net/tun"] == "dev-net-tun"
    # read-only root filesystem: wireguard-go's UAPI socket dir must be writable
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in volumes[mounts["/var/run/wireguard"]]
    assert container["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert container["securityContext"]["privileged"] is False
    assert {"name": "wireguard", "containerPort": 51871, "protocol": "UDP"} in container["ports"]


def test_scheduling_settings_reach_the_pod(run: Any) -> None:
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "net", "effect": "NoSchedule"}]
    spec = pod_spec(run({"tolerations": tolerations, "nodeSelector": {"pool": "edge"}, "namespace": "sealnet"}))
    assert spec["tolerations"] == tolerations
    assert spec["nodeSelector"] == {"pool": "edge"}


@pytest.mark.parametrize("node_encryption", [True, False])
def test_cilium_values(node_encryption: bool) -> None:
    values = render.cilium_values(settings(mode="cilium", nodeEncryption=node_encryption, rotationGracePeriod=600))
    assert values["encryption"]["enabled"] is True and values["encryption"]["type"] == "ipsec"
    assert values["encryption"]["nodeEncryption"] is node_encryption
    assert values["encryption"]["ipsec"] == {"secretName": "cilium-ipsec-keys", "keyFile": "keys", "keyRotationDuration": "600s"}
