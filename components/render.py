"""Pure rendering: Settings -> Kubernetes manifests and the agent's config file.

Nothing here touches the Pulumi engine; the components hand these plain dicts
to pulumi-kubernetes, and the tests read them directly. Manifests use the
Kubernetes API's own (camelCase) field names, so they validate against the
official OpenAPI schemas as they are.

The agent config file (``/etc/sealnet/config.json``, from the ConfigMap) is
defined here, and is the contract with ``agent/``::

    {
      "mode": "ipsec",                  # ipsec | wireguard
      "nodeEncryption": false,          # also encrypt node IP <-> node IP
      "perNodeKeys": true,              # keys lines carry '+': derive per pair
      "spiPrefix": 5,                   # SPI = prefix<<28 | ip low 24<<4 | key ID
      "rotationGracePeriod": 300,       # s to keep the old key after switch-over
      "wireguard": {"interface": "sealnet_wg0", "port": 51871,
                    "keyEpoch": 0},     # = rotation in wireguard mode, else 0
      "logLevel": "info",               # debug | info | warning | error
      "metricsPort": 9878,              # /metrics, all addresses, host network
      "healthPort": 9879,               # /healthz and /readyz, likewise
      "stateDir": "/var/lib/sealnet",   # hostPath, survives restarts
      "keysFile": "/etc/sealnet/keys/keys",  # null in wireguard mode
      "allowKeyRegeneration": false     # may replace a lost WireGuard key
    }

The agent reads this file once at start. The DaemonSet's pod template carries
its sha256 (``sealnet.io/config-checksum``), so any change to it rolls the
agents. Keys are not in it: the keys Secret is a separate volume that the
kubelet refreshes in place and the agent reloads, so an IPsec rotation
restarts nothing.

Usage::

    cfg = agent_config(settings)
    data = configmap_data(cfg)
    ds = daemonset(settings, keys_secret_name="sealnet-ipsec-keys",
                   checksum=config_checksum(data))
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from components.config import Settings

AGENT_NAME = "sealnet-agent"
CONFIGMAP_NAME = "sealnet-agent-config"
IPSEC_SECRET_NAME = "sealnet-ipsec-keys"
#: Cilium's agent reads this Secret from its own namespace (the tutorial's names).
CILIUM_SECRET_NAME = "cilium-ipsec-keys"
CILIUM_NAMESPACE = "kube-system"
CILIUM_CHART_REPO = "https://helm.cilium.io/"

#: Name of the one entry of the keys Secret, hence the file name in the volume.
KEYS_ENTRY = "keys"
CONFIG_FILE = "config.json"
CONFIG_PATH = f"/etc/sealnet/{CONFIG_FILE}"
KEYS_DIR = "/etc/sealnet/keys"
KEYS_PATH = f"{KEYS_DIR}/{KEYS_ENTRY}"
STATE_DIR = "/var/lib/sealnet"
TUN_DEVICE = "/dev/net/tun"
WIREGUARD_RUN_DIR = "/var/run/wireguard"

CHECKSUM_ANNOTATION = "sealnet.io/config-checksum"
AGENT_COMMAND = ["python", "-m", "agent", "run", "--config", CONFIG_PATH]

SELECTOR = {"app.kubernetes.io/name": AGENT_NAME}
LABELS = {**SELECTOR, "app.kubernetes.io/part-of": "sealnet", "app.kubernetes.io/managed-by": "pulumi"}


def agent_config(settings: Settings) -> dict[str, Any]:
    """The agent's config document (see the module docstring)."""
    wireguard = settings.mode == "wireguard"
    return {
        "mode": settings.mode,
        "nodeEncryption": settings.node_encryption,
        "perNodeKeys": settings.per_node_keys,
        "spiPrefix": settings.spi_prefix,
        "rotationGracePeriod": settings.rotation_grace_period,
        "wireguard": {
            "interface": settings.wireguard_interface,
            "port": settings.wireguard_port,
            # The WireGuard analogue of an IPsec rotation: a new epoch makes
            # every node generate a new key pair. Outside wireguard mode it is
            # pinned to 0 so that an IPsec rotation leaves this file, and so
            # the pods, untouched.
            "keyEpoch": settings.rotation if wireguard else 0,
        },
        "logLevel": settings.log_level,
        "metricsPort": settings.metrics_port,
        "healthPort": settings.health_port,
        "stateDir": STATE_DIR,
        "keysFile": None if wireguard else KEYS_PATH,
        "allowKeyRegeneration": settings.allow_key_regeneration,
    }


def configmap_data(config: dict[str, Any]) -> dict[str, str]:
    """ConfigMap ``data``: the config document as stable (sorted) JSON."""
    return {CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True) + "\n"}


def config_checksum(data: dict[str, str]) -> str:
    """sha256 (hex) of the ConfigMap data, for the pod template annotation."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def metadata(name: str, namespace: Optional[str] = None) -> dict[str, Any]:
    """Object metadata with an explicit name (never auto-named: the keys
    Secret and ConfigMap are referred to by name from the pod spec)."""
    meta: dict[str, Any] = {"name": name, "labels": dict(LABELS)}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def service_account(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(AGENT_NAME, namespace)}


def cluster_role() -> dict[str, Any]:
    """Least privilege: read and annotate Nodes, record Events. Nothing else
    (no Secrets: the keys arrive as a mounted volume, not through the API)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": metadata(AGENT_NAME),
        "rules": [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "patch"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        ],
    }


def cluster_role_binding(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": metadata(AGENT_NAME),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": AGENT_NAME},
        "subjects": [{"kind": "ServiceAccount", "name": AGENT_NAME, "namespace": namespace}],
    }


def config_map(namespace: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(CONFIGMAP_NAME, namespace), "data": data}


def _security_context() -> dict[str, Any]:
    """Root with exactly one capability, not privileged.

    - NET_ADMIN: XFRM states and policies (netlink), WireGuard links, routes,
      and TUNSETIFF for wireguard-go. All the datapath needs.
    - No NET_RAW: netlink sockets are not raw packet sockets, and the agent
      opens no AF_PACKET or SOCK_RAW socket.
    - uid 0: the capability must be in the init user namespace and Kubernetes
      grants no ambient capabilities to non-root users; state files in the
      hostPath are owned by root (so no DAC_OVERRIDE is needed either).
    """
    return {
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsUser": 0,
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _volumes(settings: Settings, keys_secret_name: Optional[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": CONFIGMAP_NAME, "defaultMode": 0o444}},
        {"name": "state", "hostPath": {"path": STATE_DIR, "type": "DirectoryOrCreate"}},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
    mounts: list[dict[str, Any]] = [
        # subPath: a single file, so the keys volume can sit beside it under
        # /etc/sealnet (a mount point inside a read-only ConfigMap mount cannot
        # be created). subPath files are never refreshed, which is right here:
        # a config change rolls the pods through the checksum anyway.
        {"name": "config", "mountPath": CONFIG_PATH, "subPath": CONFIG_FILE, "readOnly": True},
        {"name": "state", "mountPath": STATE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if keys_secret_name is not None:
        volumes.append({"name": "keys", "secret": {"secretName": keys_secret_name, "defaultMode": 0o400}})
        # A whole-directory mount, NOT subPath: the kubelet swaps the files in
        # place on a Secret update, which is how a rotation reaches the agent.
        mounts.append({"name": "keys", "mountPath": KEYS_DIR, "readOnly": True})
    if settings.mode == "wireguard":
        # Userspace fallback (wireguard-go) opens /dev/net/tun. The container
        # runtimes' default device allow-list already admits the tun device
        # (char 10:200), so the node's device file is enough; no privileged.
        # CharDevice makes a node without it fail visibly instead of the
        # kubelet creating an empty directory there.
        volumes.append({"name": "dev-net-tun", "hostPath": {"path": TUN_DEVICE, "type": "CharDevice"}})
        mounts.append({"name": "dev-net-tun", "mountPath": TUN_DEVICE})
        # wireguard-go puts its UAPI socket here; the root filesystem is read-only.
        volumes.append({"name": "wireguard-run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
        mounts.append({"name": "wireguard-run", "mountPath": WIREGUARD_RUN_DIR})
    return volumes, mounts


def _container(settings: Settings, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    ports: list[dict[str, Any]] = [
        {"name": "metrics", "containerPort": settings.metrics_port, "protocol": "TCP"},
        {"name": "health", "containerPort": settings.health_port, "protocol": "TCP"},
    ]
    if settings.mode == "wireguard":
        ports.append({"name": "wireguard", "containerPort": settings.wireguard_port, "protocol": "UDP"})
    return {
        "name": "agent",
        "image": settings.agent_image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(AGENT_COMMAND),
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "ports": ports,
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "health"},
            "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 6,
        },
        "readinessProbe": {
            # /readyz turns true after the first successful apply.
            "httpGet": {"path": "/readyz", "port": "health"},
            "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3,
        },
        "resources": {part: dict(values) for part, values in settings.resources.items()},
        "securityContext": _security_context(),
        "volumeMounts": mounts,
    }


def daemonset(settings: Settings, keys_secret_name: Optional[str], checksum: str) -> dict[str, Any]:
    """The node agent DaemonSet. ``keys_secret_name`` None mounts no keys (wireguard)."""
    volumes, mounts = _volumes(settings, keys_secret_name)
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": metadata(AGENT_NAME, settings.namespace),
        "spec": {
            "selector": {"matchLabels": dict(SELECTOR)},
            # maxSurge 0: a second agent pod cannot share the node's host ports.
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}},
            "template": {
                "metadata": {"labels": dict(LABELS), "annotations": {CHECKSUM_ANNOTATION: checksum}},
                "spec": {
                    "serviceAccountName": AGENT_NAME,
                    "hostNetwork": True,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    # Encryption is part of the node's network: evict it last.
                    "priorityClassName": "system-node-critical",
                    "tolerations": [dict(t) for t in settings.tolerations],
                    "nodeSelector": dict(settings.node_selector),
                    "terminationGracePeriodSeconds": 30,
                    "containers": [_container(settings, mounts)],
                    "volumes": volumes,
                },
            },
        },
    }


def secret_metadata(name: str, namespace: str) -> dict[str, Any]:
    return metadata(name, namespace)


def cilium_values(settings: Settings) -> dict[str, Any]:
    """Helm values for Cilium with IPsec, after the tutorial's `cilium install
    --encryption ipsec` (kind: tunnel mode, Kubernetes IPAM, one operator)."""
    return {
        "encryption": {
            "enabled": True,
            "type": "ipsec",
            "nodeEncryption": settings.node_encryption,
            "ipsec": {
                "secretName": CILIUM_SECRET_NAME,
                "keyFile": KEYS_ENTRY,
                # Cilium's own name for our rotationGracePeriod.
                "keyRotationDuration": f"{settings.rotation_grace_period}s",
            },
        },
        "ipam": {"mode": "kubernetes"},
        "routingMode": "tunnel",
        "tunnelProtocol": "vxlan",
        "operator": {"replicas": 1},
    }
