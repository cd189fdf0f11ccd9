"""A Kubernetes-like cluster made of network namespaces, for datapath tests.

Each node is a namespace on one L2 underlay (a bridge in its own namespace,
so the host's netfilter never sees the traffic) with a kind-like node IP
(172.18.0.<i+2>), a pod CIDR (10.244.<i+1>.0/24) and one or more pod
namespaces attached by veth. Nodes route to each other's pod CIDRs host-gw
style, as kindnet and flannel host-gw do (``<peer podCIDR> via <peer node
IP>``), so before anything is encrypted pod-to-pod traffic crosses the
underlay in clear::

    from lab.topology import Cluster

    with Cluster(nodes=3, name="t1") as c:
        a, b = c.nodes[0].pods[0], c.nodes[1].pods[0]
        c.run(a.ns, "ping", "-c1", str(b.ip))
        json.dump(c.description(), open("nodes.json", "w"))  # for `agent apply`

Works on the host (no ESP needed) and inside the kernel lab VM. Needs root.
Everything it creates is named after ``name`` and removed on exit, also
after a failed setup.
"""

from __future__ import annotations

import ipaddress
import subprocess
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

UNDERLAY = ipaddress.ip_network("172.18.0.0/24")
POD_SUPERNET = ipaddress.ip_network("10.244.0.0/16")
#: With ``api_address=True`` the underlay bridge holds this address, where
#: tests serve the fake Kubernetes API (lab.netns.listening_socket): the
#: agents reach it over the underlay, as kubelets reach a control plane.
API_IP = UNDERLAY.network_address + 1


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; raise with its stderr on failure."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def in_ns(ns: str, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command inside network namespace ``ns``."""
    return sh("ip", "netns", "exec", ns, *argv, check=check, timeout=timeout)


@dataclass
class Pod:
    ns: str
    ip: ipaddress.IPv4Address
    node: str


@dataclass
class LabNode:
    index: int
    name: str
    ns: str
    ip: ipaddress.IPv4Address
    pod_cidr: ipaddress.IPv4Network
    boot_id: str
    dev: str = "eth0"
    pods: list[Pod] = field(default_factory=list)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The node-side address pods use as their default gateway."""
        return self.pod_cidr.network_address + 1

    def description(self) -> dict[str, Any]:
        """This node as a Kubernetes-style entry of `agent apply --nodes`."""
        return {
            "name": self.name,
            "ips": [str(self.ip)],
            "podCIDRs": [str(self.pod_cidr)],
            "bootID": self.boot_id,
        }


class Cluster:
    """N nodes on one underlay, each with pods, routed host-gw style."""

    def __init__(self, nodes: int = 3, pods_per_node: int = 1, name: str = "sn", mtu: int = 1500,
                 api_address: bool = False) -> None:
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be 1..200, got {nodes}")
        if not name.isalnum() or len(name) > 5:
            # Interface names are limited to 15 bytes: "<name>n<ii>p<j>" must fit.
            raise ValueError(f"name must be 1..5 alphanumeric characters, got {name!r}")
        self.name = name
        self.mtu = mtu
        self.api_address = api_address
        self.underlay_ns = f"{name}-ul"
        self.bridge = "br0"
        self.nodes: list[LabNode] = []
        for i in range(nodes):
            node = LabNode(
                index=i,
                name=f"node-{i + 1}",
                ns=f"{name}-n{i + 1}",
                ip=UNDERLAY.network_address + i + 2,
                pod_cidr=ipaddress.ip_network(f"10.244.{i + 1}.0/24"),
                boot_id=str(uuid.uuid4()),
            )
            node.pods = [
                Pod(ns=f"{name}-n{i + 1}p{j}", ip=node.pod_cidr.network_address + 10 + j, node=node.name)
                for j in range(pods_per_node)
            ]
            self.nodes.append(node)

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> "Cluster":
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def namespaces(self) -> list[str]:
        names = [self.underlay_ns]
        for node in self.nodes:
            names.append(node.ns)
            names.extend(p.ns for p in node.pods)
        return names

    def create(self) -> None:
        for ns in self.namespaces():
            sh("ip", "netns", "add", ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        ul = self.underlay_ns
        in_ns(ul, "ip", "link", "add", self.bridge, "mtu", str(self.mtu), "type", "bridge")
        if self.api_address:
            # No IPv6 on the bridge: its link-local address would add ND/MLD chatter to underlay captures.
            in_ns(ul, "sysctl", "-qw", f"net.ipv6.conf.{self.bridge}.disable_ipv6=1")
            in_ns(ul, "ip", "addr", "add", f"{API_IP}/{UNDERLAY.prefixlen}", "dev", self.bridge)
        in_ns(ul, "ip", "link", "set", self.bridge, "up")
        for node in self.nodes:
            self._create_node(node)
        for node in self.nodes:
            for peer in self.nodes:
                if peer is not node:
                    in_ns(node.ns, "ip", "route", "add", str(peer.pod_cidr), "via", str(peer.ip))

    def _create_node(self, node: LabNode) -> None:
        ul, port = self.underlay_ns, f"{self.name}n{node.index + 1}"
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ):
            in_ns(node.ns, "sysctl", "-qw", f"{key}={value}")
        in_ns(ul, "ip", "link", "add", port, "mtu", str(self.mtu), "type", "veth",
              "peer", "name", node.dev, "netns", node.ns)
        in_ns(ul, "ip", "link", "set", port, "master", self.bridge, "up")
        in_ns(node.ns, "ip", "addr", "add", f"{node.ip}/{UNDERLAY.prefixlen}", "dev", node.dev)
        in_ns(node.ns, "ip", "link", "set", node.dev, "up")
        for j, pod in enumerate(node.pods):
            host_side = f"pod{j}"
            in_ns(node.ns, "ip", "link", "add", host_side, "type", "veth", "peer", "name", "eth0", "netns", pod.ns)
            in_ns(node.ns, "ip", "addr", "add", f"{node.gateway}/32", "dev", host_side)
            in_ns(node.ns, "ip", "link", "set", host_side, "up")
            in_ns(node.ns, "ip", "route", "add", f"{pod.ip}/32", "dev", host_side, "scope", "link")
            # Point-to-point style, as kindnet's ptp plugin sets up pods.
            in_ns(pod.ns, "ip", "addr", "add", f"{pod.ip}/32", "dev", "eth0")
            in_ns(pod.ns, "ip", "link", "set", "eth0", "up")
            in_ns(pod.ns, "ip", "route", "add", str(node.gateway), "dev", "eth0", "scope", "link")
            in_ns(pod.ns, "ip", "route", "add", "default", "via", str(node.gateway), "src", str(pod.ip))

    def destroy(self) -> None:
        for ns in reversed(self.namespaces()):
            sh("ip", "netns", "del", ns, check=False)

    # -- use ---------------------------------------------------------------

    def run(self, ns: str, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside namespace ``ns`` (a node's, a pod's or the underlay's)."""
        return in_ns(ns, *argv, check=check, timeout=timeout)

    def node(self, name: str) -> LabNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def pods(self) -> list[Pod]:
        return [p for n in self.nodes for p in n.pods]

    def description(self, boot_ids: bool = True, omit_boot_id: Optional[str] = None) -> dict[str, Any]:
        """The static node description for ``python -m agent apply --nodes``.

        ``omit_boot_id`` names a node whose bootID is left out (strict-mode tests).
        """
        nodes = []
        for node in self.nodes:
            entry = node.description()
            if not boot_ids or node.name == omit_boot_id:
                del entry["bootID"]
            nodes.append(entry)
        return {"nodes": nodes}

    def ping(self, src: Pod, dst: Pod, count: int = 1, timeout: int = 2) -> bool:
        """One or more pings between pods; True if all were answered."""
        proc = self.run(src.ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(timeout),
                        str(dst.ip), check=False, timeout=timeout * count + 10)
        return proc.returncode == 0
