"""TransparentEncryption: the whole of sealnet for one cluster, composed by mode.

========== =============================================== ==================
mode       children                                        keys Secret
========== =============================================== ==================
ipsec      Keyring, NodeAgent (keys mounted)               <namespace>/sealnet-ipsec-keys
wireguard  NodeAgent (nodes make their own key pairs)      none
cilium     Keyring, Cilium (only when installCilium)       kube-system/cilium-ipsec-keys
========== =============================================== ==================

The Kubernetes provider comes from the caller (``opts.providers``); children
inherit it. Outputs: ``mode``, ``rotation``, ``keyId`` (None in wireguard),
``secretName`` (None in wireguard), ``daemonSetName`` (None in cilium).

Usage::

    enc = TransparentEncryption("sealnet", TransparentEncryptionArgs(settings),
                                pulumi.ResourceOptions(providers={"kubernetes": p}))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pulumi

from components import render
from components.cilium import Cilium, CiliumArgs
from components.config import Settings
from components.keyring import Keyring, KeyringArgs
from components.node_agent import NodeAgent, NodeAgentArgs


@dataclass(frozen=True)
class TransparentEncryptionArgs:
    """Inputs of a :class:`TransparentEncryption`.

    :param settings: the validated stack settings (components.config.load()).
    """

    settings: Settings


class TransparentEncryption(pulumi.ComponentResource):
    """Encryption of pod (and optionally node) traffic for one cluster."""

    mode: pulumi.Output[str]
    rotation: pulumi.Output[int]
    key_id: pulumi.Output[Optional[int]]
    secret_name: pulumi.Output[Optional[str]]
    daemon_set_name: pulumi.Output[Optional[str]]
    keyring: Optional[Keyring]
    agent: Optional[NodeAgent]
    cilium: Optional[Cilium]

    def __init__(
        self, name: str, args: TransparentEncryptionArgs, opts: Optional[pulumi.ResourceOptions] = None
    ) -> None:
        super().__init__("sealnet:index:TransparentEncryption", name, None, opts)
        child_opts = pulumi.ResourceOptions(parent=self)
        settings = args.settings
        self.keyring = self.agent = self.cilium = None

        if settings.mode == "ipsec":
            self.keyring = Keyring(
                f"{name}-keys",
                KeyringArgs(settings.rotation_config, render.IPSEC_SECRET_NAME, settings.namespace),
                child_opts,
            )
        elif settings.mode == "cilium":
            self.keyring = Keyring(
                f"{name}-keys",
                KeyringArgs(settings.rotation_config, render.CILIUM_SECRET_NAME, render.CILIUM_NAMESPACE,
                            include_previous=False),
                child_opts,
            )

        if settings.runs_agent:
            self.agent = NodeAgent(
                f"{name}-agent",
                NodeAgentArgs(
                    settings=settings,
                    keys_secret_name=render.IPSEC_SECRET_NAME if self.keyring else None,
                    wait_for=(self.keyring.secret,) if self.keyring else (),
                ),
                child_opts,
            )
        elif settings.install_cilium and self.keyring is not None:
            self.cilium = Cilium(f"{name}-cilium", CiliumArgs(settings, wait_for=(self.keyring.secret,)), child_opts)

        self.mode = pulumi.Output.from_input(settings.mode)
        self.rotation = pulumi.Output.from_input(settings.rotation)
        self.key_id = self.keyring.key_id if self.keyring else pulumi.Output.from_input(None)
        self.secret_name = self.keyring.secret_name if self.keyring else pulumi.Output.from_input(None)
        self.daemon_set_name = self.agent.daemon_set_name if self.agent else pulumi.Output.from_input(None)
        self.register_outputs(
            {
                "mode": self.mode,
                "rotation": self.rotation,
                "keyId": self.key_id,
                "secretName": self.secret_name,
                "daemonSetName": self.daemon_set_name,
            }
        )
