"""agent.nodesfile: the static node description of `python -m agent apply`.

Properties asserted: Kubernetes Node field names map onto model.Node in file
order, optional fields stay optional, and every bad input fails with a
ConfigError naming the node index, the field, the value and what is allowed.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from agent import nodesfile
from agent.errors import ConfigError
from agent.model import Node

BOOT = "0b5a9a43-6a0c-4d2e-9a57-3c1f1d2f7a11"


def entry(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "node-1", "ips": ["172.18.0.2"], "podCIDRs": ["10.244.1.0/24"], "bootID": BOOT}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def test_full_description(tmp_path: Path) -> None:
    doc = {
        "nodes": [
            entry(),
            entry(name="node-2", ips=["fd00::3", "172.18.0.3"], podCIDRs=["10.244.2.0/24", "fd10:2::/64"],
                  bootID=..., wireguardPublicKey="cHVibGlj"),
        ]
    }
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps(doc))
    nodes = nodesfile.load(path)
    assert nodes == [
        Node("node-1", (ipaddress.ip_address("172.18.0.2"),), (ipaddress.ip_network("10.244.1.0/24"),), BOOT),
        Node(
            "node-2",
            (ipaddress.ip_address("fd00::3"), ipaddress.ip_address("172.18.0.3")),
            (ipaddress.ip_network("10.244.2.0/24"), ipaddress.ip_network("fd10:2::/64")),
            None,
            "cHVibGlj",
        ),
    ]
    assert nodes[1].ip == ipaddress.ip_address("fd00::3")  # the first IP is the tunnel endpoint


def test_pod_cidrs_optional() -> None:
    assert nodesfile.parse({"nodes": [entry(podCIDRs=...)]})[0].pod_cidrs == ()


@pytest.mark.parametrize(
    "doc, expected",
    [
        ([], ['expected an object {"nodes": [...]}']),
        ({"nodes": {}}, ['expected an object {"nodes": [...]}']),
        ({"nodes": ["node-1"]}, ["nodes[0]", "expected an object", "str"]),
        ({"nodes": [entry(zone="a")]}, ["nodes[0]", "unknown field 'zone'", "allowed: bootID, ips, name, podCIDRs"]),
        ({"nodes": [entry(name="")]}, ["nodes[0].name", "non-empty string", "''"]),
        ({"nodes": [entry(name=7)]}, ["nodes[0].name", "got 7"]),
        ({"nodes": [entry(), entry(ips=["172.18.0.3"])]}, ["nodes[1].name", "'node-1' repeats nodes[0].name", "unique"]),
        ({"nodes": [entry(ips="172.18.0.2")]}, ["nodes[0].ips", "must be a list", "'172.18.0.2'"]),
        ({"nodes": [entry(ips=[])]}, ["nodes[0].ips", "node 'node-1' needs at least one IP"]),
        ({"nodes": [entry(), entry(name="n2", ips=["172.18.0.3", "300.1.2.3"])]}, ["nodes[1].ips[1]", "'300.1.2.3'", "not an IP address"]),
        ({"nodes": [entry(podCIDRs=["10.244.1.1/24"])]}, ["nodes[0].podCIDRs[0]", "'10.244.1.1/24'", "host bits must be zero"]),
        ({"nodes": [entry(podCIDRs="10.244.1.0/24")]}, ["nodes[0].podCIDRs", "must be a list"]),
        ({"nodes": [entry(bootID="")]}, ["nodes[0].bootID", "non-empty string", "''"]),
        ({"nodes": [entry(bootID=5)]}, ["nodes[0].bootID", "got 5"]),
        ({"nodes": [entry(wireguardPublicKey=1)]}, ["nodes[0].wireguardPublicKey", "base64 string", "got 1"]),
    ],
    ids=lambda v: "-" if not isinstance(v, list) or not v or not isinstance(v[0], str) else v[0][:40],
)
def test_errors_name_index_field_and_value(doc: Any, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        nodesfile.parse(doc)
    for part in expected:
        assert part in str(info.value)


# ipaddress takes an int as an address (24 would become 0.0.0.24/32): a
# JSON number is an error, not an address.
@pytest.mark.parametrize("field, value", [("podCIDRs", [24]), ("ips", [3])])
def test_numbers_are_not_addresses(field: str, value: list[int]) -> None:
    with pytest.raises(ConfigError, match=rf"nodes\[0\]\.{field}\[0\]"):
        nodesfile.parse({"nodes": [entry(**{field: value})]})


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--nodes: cannot read .*absent\.json"):
        nodesfile.load(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [\n')
    with pytest.raises(ConfigError, match=r"--nodes: .*bad\.json is not JSON: .* at line 2"):
        nodesfile.load(bad)
