"""agent.cluster.nodes: Nodes translated at the edge, and the store the loop reads.

Properties asserted:
- a Node as the API returns it becomes the model.Node the planners take:
  InternalIPs in order (Hostname and ExternalIP ignored), spec.podCIDRs (or
  the older spec.podCIDR), bootID, the WireGuard key from our annotation;
- bad values are tolerated per Node and named: a bad podCIDR is dropped, a
  Node without a usable InternalIP cannot be a peer, a bad key-ID
  annotation is reported; nothing raises;
- the store keeps a deleted Node for the grace period, then drops it, and
  a full list counts missing Nodes as deleted.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

import pytest
from lightkube.resources.core_v1 import Node as KubeNode

from agent.cluster import annotations as ann
from agent.cluster.nodes import NodeStore, translate


def kube_node(name: str, addresses: list[tuple[str, str]], cidrs: Optional[list[str]] = None,
              boot_id: Optional[str] = "b-1", annotations: Optional[dict[str, str]] = None,
              single_cidr: Optional[str] = None) -> Any:
    spec: dict[str, Any] = {}
    if cidrs is not None:
        spec["podCIDRs"] = cidrs
        spec["podCIDR"] = cidrs[0] if cidrs else None
    if single_cidr:
        spec["podCIDR"] = single_cidr
    status: dict[str, Any] = {"addresses": [{"type": t, "address": a} for t, a in addresses]}
    if boot_id is not None:
        status["nodeInfo"] = {"bootID": boot_id, "machineID": "m", "systemUUID": "s", "kernelVersion": "6.1",
                              "osImage": "Debian", "containerRuntimeVersion": "containerd://1.7",
                              "kubeletVersion": "v1.31.0", "kubeProxyVersion": "", "operatingSystem": "linux",
                              "architecture": "amd64"}
    return KubeNode.from_dict({"apiVersion": "v1", "kind": "Node",
                               "metadata": {"name": name, "uid": f"uid-{name}", "annotations": annotations or {}},
                               "spec": spec, "status": status})


def test_a_kind_node() -> None:
    view = translate(kube_node("kind-worker", [("Hostname", "kind-worker"), ("InternalIP", "172.18.0.3"),
                                              ("InternalIP", "fc00:f853:ccd:e793::3"), ("ExternalIP", "1.2.3.4")],
                               ["10.244.1.0/24", "fd00:10:244:1::/64"], annotations={
                                   ann.WIREGUARD_PUBLIC_KEY: "k" * 43 + "=", ann.IPSEC_KEYS: "3,4",
                                   "node.alpha.kubernetes.io/ttl": "0"}))
    assert view.problems == ()
    node = view.node
    assert node is not None and node.name == "kind-worker" and view.uid == "uid-kind-worker"
    assert node.ips == (ipaddress.ip_address("172.18.0.3"), ipaddress.ip_address("fc00:f853:ccd:e793::3"))
    assert node.pod_cidrs == (ipaddress.ip_network("10.244.1.0/24"), ipaddress.ip_network("fd00:10:244:1::/64"))
    assert node.boot_id == "b-1" and node.wireguard_public_key == "k" * 43 + "="
    assert view.ipsec_keys == frozenset({3, 4})
    assert set(view.annotations) == {ann.WIREGUARD_PUBLIC_KEY, ann.IPSEC_KEYS}


def test_older_single_pod_cidr_and_no_annotations() -> None:
    view = translate(kube_node("n", [("InternalIP", "10.0.0.5")], single_cidr="10.244.7.0/24", boot_id=None))
    assert view.node is not None and view.node.pod_cidrs == (ipaddress.ip_network("10.244.7.0/24"),)
    assert view.node.boot_id is None and view.ipsec_keys is None and view.node.wireguard_public_key is None


@pytest.mark.parametrize("addresses, cidrs, annotations, problem, usable", [
    ([("InternalIP", "172.18.0.9")], ["10.244.1.0/33", "10.244.2.0/24"], {},
     "spec.podCIDRs '10.244.1.0/33' is not a network in CIDR form (ignored)", True),
    ([("InternalIP", "10.244.1.1/24"), ("InternalIP", "172.18.0.9")], ["10.244.2.0/24"], {},
     "status.addresses InternalIP '10.244.1.1/24' is not an IP address (ignored)", True),
    ([("Hostname", "n"), ("ExternalIP", "1.2.3.4")], ["10.244.2.0/24"], {},
     "no usable InternalIP in status.addresses: cannot be a peer", False),
    ([("InternalIP", "172.18.0.9")], ["10.244.2.0/24"], {ann.IPSEC_KEYS: "3,16"},
     "annotation sealnet.io/ipsec-keys='3,16': key IDs must be integers 1..15 separated by commas", True),
], ids=["bad-cidr", "bad-ip", "no-internal-ip", "bad-key-ids"])
def test_bad_values_are_tolerated_and_named(addresses: list[tuple[str, str]], cidrs: list[str],
                                            annotations: dict[str, str], problem: str, usable: bool) -> None:
    view = translate(kube_node("n", addresses, cidrs, annotations=annotations))
    assert problem in view.problems
    assert (view.node is not None) is usable
    if usable:
        assert view.node is not None and view.node.ips == (ipaddress.ip_address("172.18.0.9"),)
        assert view.node.pod_cidrs == (ipaddress.ip_network("10.244.2.0/24"),)


def test_store_grace_period_and_relist() -> None:
    now = [100.0]
    reasons: list[str] = []
    store = NodeStore(on_change=reasons.append, clock=lambda: now[0])
    a, b = (translate(kube_node(n, [("InternalIP", ip)], ["10.244.1.0/24"])) for n, ip in
            (("a", "172.18.0.2"), ("b", "172.18.0.3")))
    store.replace([a, b])
    assert store.synced.is_set() and reasons == ["list"]
    store.upsert(a)  # unchanged: no trigger
    assert reasons == ["list"]
    store.delete("b")
    snap = store.snapshot(grace=60)
    assert [(v.name, v.deleted) for v in snap.views] == [("a", False), ("b", True)]
    assert snap.next_expiry == 160.0
    now[0] = 160.0
    assert [v.name for v in store.snapshot(grace=60).views] == ["a"]
    # A relist that misses a Node deletes it (the watch missed the event).
    store.replace([b])
    snap = store.snapshot(grace=60)
    assert [(v.name, v.deleted) for v in snap.views] == [("b", False), ("a", True)]
    # Coming back within the grace period: live again, not deleting.
    store.upsert(a)
    assert sorted((v.name, v.deleted) for v in store.snapshot(grace=60).views) == [("a", False), ("b", False)]
