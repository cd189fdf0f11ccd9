"""NodeAgent: the sealnet agent DaemonSet and what it needs to run.

Children (parented to the component, all explicitly named, see render.py):
ServiceAccount, ClusterRole (nodes get/list/watch/patch, events create),
ClusterRoleBinding, ConfigMap (the agent's config.json) and the DaemonSet.

The pod template's ``sealnet.io/config-checksum`` is the sha256 of the
ConfigMap data: a config change rolls the agents; an IPsec key rotation does
not (keys come from the mounted Secret, which the agent reloads).

Usage::

    agent = NodeAgent("sealnet-agent", NodeAgentArgs(
        settings=settings, keys_secret_name="sealnet-ipsec-keys",
        wait_for=(keyring.secret,)), opts)
    agent.daemon_set_name   # Output[str]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import pulumi
import pulumi_kubernetes as k8s

from components import render
from components.config import Settings


@dataclass(frozen=True)
class NodeAgentArgs:
    """Inputs of a :class:`NodeAgent`.

    :param settings: validated stack settings (image, namespace, ports, ...).
    :param keys_secret_name: the keys Secret to mount at /etc/sealnet/keys
        (ipsec); None mounts none (wireguard). A plain name, not an Output:
        an Output of the Secret would make every rotation look like a
        DaemonSet change in preview.
    :param wait_for: resources the DaemonSet must wait for (the keys Secret).
    """

    settings: Settings
    keys_secret_name: Optional[str] = None
    wait_for: Sequence[pulumi.Resource] = ()


class NodeAgent(pulumi.ComponentResource):
    """ServiceAccount, RBAC, ConfigMap and DaemonSet of the sealnet node agent."""

    daemon_set_name: pulumi.Output[str]
    namespace: pulumi.Output[str]
    config_checksum: pulumi.Output[str]
    daemon_set: k8s.apps.v1.DaemonSet
    config_map: k8s.core.v1.ConfigMap

    def __init__(self, name: str, args: NodeAgentArgs, opts: Optional[pulumi.ResourceOptions] = None) -> None:
        super().__init__("sealnet:index:NodeAgent", name, None, opts)
        child_opts = pulumi.ResourceOptions(parent=self)
        settings = args.settings
        namespace = settings.namespace

        data = render.configmap_data(render.agent_config(settings))
        checksum = render.config_checksum(data)

        sa: dict[str, Any] = render.service_account(namespace)
        self.service_account = k8s.core.v1.ServiceAccount(f"{name}-sa", metadata=sa["metadata"], opts=child_opts)
        role = render.cluster_role()
        self.cluster_role = k8s.rbac.v1.ClusterRole(
            f"{name}-role", metadata=role["metadata"], rules=role["rules"], opts=child_opts
        )
        binding = render.cluster_role_binding(namespace)
        self.binding = k8s.rbac.v1.ClusterRoleBinding(
            f"{name}-binding",
            metadata=binding["metadata"],
            role_ref=binding["roleRef"],
            subjects=binding["subjects"],
            opts=pulumi.ResourceOptions.merge(
                child_opts, pulumi.ResourceOptions(depends_on=[self.service_account, self.cluster_role])
            ),
        )
        cm = render.config_map(namespace, data)
        self.config_map = k8s.core.v1.ConfigMap(
            f"{name}-config", metadata=cm["metadata"], data=cm["data"], opts=child_opts
        )
        ds = render.daemonset(settings, args.keys_secret_name, checksum)
        self.daemon_set = k8s.apps.v1.DaemonSet(
            f"{name}-ds",
            metadata=ds["metadata"],
            spec=ds["spec"],
            opts=pulumi.ResourceOptions.merge(
                child_opts,
                pulumi.ResourceOptions(depends_on=[self.binding, self.config_map, *args.wait_for]),
            ),
        )

        self.daemon_set_name = self.daemon_set.metadata.name
        self.namespace = pulumi.Output.from_input(namespace)
        self.config_checksum = pulumi.Output.from_input(checksum)
        self.register_outputs(
            {
                "daemonSetName": self.daemon_set_name,
                "namespace": self.namespace,
                "configChecksum": self.config_checksum,
                "serviceAccountName": render.AGENT_NAME,
            }
        )
