"""Read the static node description used by ``python -m agent apply``.

The description uses Kubernetes Node field names so that a file can be
written by hand, generated from ``kubectl get nodes -o json`` or produced by
the lab's topology builder::

    {"nodes": [{"name": "node-1", "ips": ["172.18.0.2"],
                "podCIDRs": ["10.244.1.0/24"], "bootID": "<uuid>",
                "wireguardPublicKey": "<base64>"}, ...]}

``bootID`` and ``wireguardPublicKey`` are optional. Every error names the
node index, the field, the value and what is allowed.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from agent import jsonfile
from agent.errors import ConfigError
from agent.model import Node

_KNOWN = {"name", "ips", "podCIDRs", "bootID", "wireguardPublicKey"}


def load(path: str | Path) -> list[Node]:
    """Parse the file at ``path`` into nodes, in file order."""
    return parse(jsonfile.load("--nodes", path))


def parse(doc: Any) -> list[Node]:
    """Parse an already decoded description."""
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise ConfigError('nodes file: expected an object {"nodes": [...]}')
    nodes = [_node(i, entry) for i, entry in enumerate(doc["nodes"])]
    seen: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if node.name in seen:
            raise ConfigError(
                f"nodes[{i}].name: {node.name!r} repeats nodes[{seen[node.name]}].name; names must be unique"
            )
        seen[node.name] = i
    return nodes


def _node(i: int, entry: Any) -> Node:
    where = f"nodes[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _KNOWN)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(_KNOWN))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: must be a non-empty string, got {name!r}")
    ips = tuple(_ip(f"{where}.ips[{k}]", v) for k, v in enumerate(_list(f"{where}.ips", entry.get("ips"))))
    if not ips:
        raise ConfigError(f"{where}.ips: node {name!r} needs at least one IP")
    cidrs = tuple(
        _cidr(f"{where}.podCIDRs[{k}]", v)
        for k, v in enumerate(_list(f"{where}.podCIDRs", entry.get("podCIDRs", [])))
    )
    boot_id = entry.get("bootID")
    if boot_id is not None and (not isinstance(boot_id, str) or not boot_id):
        raise ConfigError(f"{where}.bootID: must be a non-empty string when present, got {boot_id!r}")
    pubkey = entry.get("wireguardPublicKey")
    if pubkey is not None and not isinstance(pubkey, str):
        raise ConfigError(f"{where}.wireguardPublicKey: must be a base64 string, got {pubkey!r}")
    return Node(name=name, ips=ips, pod_cidrs=cidrs, boot_id=boot_id, wireguard_public_key=pubkey)


def _list(field: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{field}: must be a list, got {value!r}")
    return value


def _ip(field: str, value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # ipaddress takes an int as an address (24 -> 0.0.0.24): only strings are.
    if not isinstance(value, str):
        raise ConfigError(f"{field}: {value!r} is not an IP address (expected a string like \"172.18.0.2\")")
    try:
        return ipaddress.ip_address(value)
    except ValueError as e:
        raise ConfigError(f"{field}: {value!r} is not an IP address") from e


def _cidr(field: str, value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ConfigError(f"{field}: {value!r} is not a network (expected CIDR text like \"10.244.1.0/24\")")
    try:
        return ipaddress.ip_network(value, strict=True)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{field}: {value!r} is not a network in CIDR form (host bits must be zero)") from e
