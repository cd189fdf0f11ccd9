"""Cilium: Cilium's Helm release with IPsec encryption (mode cilium, installCilium).

In mode cilium sealnet runs no agent of its own: the Keyring writes the keys
Secret under Cilium's name (``kube-system/cilium-ipsec-keys``) and Cilium's
agent does the datapath. When ``installCilium`` is true this component also
installs Cilium, with the values of the tutorial's ``cilium install
--encryption ipsec`` (see render.cilium_values); otherwise the Secret is all
we declare and Cilium is installed by whoever owns the CNI.

Usage::

    Cilium("sealnet-cilium", CiliumArgs(settings=settings,
           wait_for=(keyring.secret,)), opts)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import pulumi
import pulumi_kubernetes as k8s

from components import render
from components.config import Settings


@dataclass(frozen=True)
class CiliumArgs:
    """Inputs of a :class:`Cilium`.

    :param settings: validated settings (ciliumVersion, nodeEncryption,
        rotationGracePeriod are used).
    :param wait_for: resources to create first (the keys Secret: Cilium's
        agent does not start without it when IPsec is enabled).
    """

    settings: Settings
    wait_for: Sequence[pulumi.Resource] = ()


class Cilium(pulumi.ComponentResource):
    """Cilium's Helm release with IPsec on, reading sealnet's keys Secret."""

    release_name: pulumi.Output[str]
    release: k8s.helm.v3.Release

    def __init__(self, name: str, args: CiliumArgs, opts: Optional[pulumi.ResourceOptions] = None) -> None:
        super().__init__("sealnet:index:Cilium", name, None, opts)
        child_opts = pulumi.ResourceOptions(parent=self)
        self.release = k8s.helm.v3.Release(
            f"{name}-release",
            k8s.helm.v3.ReleaseArgs(
                name="cilium",
                chart="cilium",
                version=args.settings.cilium_version,
                namespace=render.CILIUM_NAMESPACE,
                repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=render.CILIUM_CHART_REPO),
                values=render.cilium_values(args.settings),
            ),
            opts=pulumi.ResourceOptions.merge(child_opts, pulumi.ResourceOptions(depends_on=list(args.wait_for))),
        )
        self.release_name = self.release.name.apply(lambda n: n or "")
        self.register_outputs({"releaseName": self.release_name, "chartVersion": args.settings.cilium_version})
