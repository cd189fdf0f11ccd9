"""Annotation keys the agent publishes on its own Node: the contract between agents.

Declared once, here. Each agent patches only its own Node (merge patch of
``metadata.annotations``); peers read them from the Node watch.

- ``IPSEC_KEYS``: the IPsec key IDs whose inbound SAs this node has
  installed for every peer it serves, e.g. ``"3,4"``. A peer may send with a
  key once this node lists it (the zero-drop rotation protocol).
- ``WIREGUARD_PUBLIC_KEY``: this node's WireGuard public key (base64, as
  ``wg`` prints it); peers configure it.
- ``WIREGUARD_KEY_EPOCH``: the key epoch that public key belongs to.
"""

from __future__ import annotations

from typing import Mapping, Optional

PREFIX = "sealnet.io/"
IPSEC_KEYS = PREFIX + "ipsec-keys"
WIREGUARD_PUBLIC_KEY = PREFIX + "wireguard-public-key"
WIREGUARD_KEY_EPOCH = PREFIX + "wireguard-key-epoch"
OURS = (IPSEC_KEYS, WIREGUARD_PUBLIC_KEY, WIREGUARD_KEY_EPOCH)


def format_key_ids(key_ids: frozenset[int]) -> str:
    return ",".join(str(k) for k in sorted(key_ids))


def parse_key_ids(value: Optional[str]) -> tuple[Optional[frozenset[int]], Optional[str]]:
    """``"3,4"`` -> ({3, 4}, None); absent -> (None, None); bad -> (None, problem)."""
    if value is None:
        return None, None
    ids: set[int] = set()
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or not 1 <= int(part) <= 15:
            return None, f"annotation {IPSEC_KEYS}={value!r}: key IDs must be integers 1..15 separated by commas"
        ids.add(int(part))
    return frozenset(ids), None


def changes(have: Mapping[str, str], want: Mapping[str, Optional[str]]) -> dict[str, Optional[str]]:
    """The merge patch that turns ``have`` into ``want`` for our keys (None deletes)."""
    return {k: v for k, v in want.items() if have.get(k) != v and not (v is None and k not in have)}
