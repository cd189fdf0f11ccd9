"""Annotation keys the agent publishes on its own Node: the contract between agents.

Declared once, here. Each agent patches only its own Node (merge patch of
``metadata.annotations``); peers read them from the Node watch.

- ``IPSEC_KEYS``: the IPsec key IDs whose inbound SAs this node has
  installed for every peer it serves, e.g. ``"3,4"``. A peer may send with a
  key once this node lists it (the zero-drop rotation protocol).
- ``WIREGUARD_PUBLIC_KEY``: this node's WireGuard public key (base64, as
  ``wg`` prints it); peers configure it.
- ``WIREGUARD_KEY_EPOCH``: the key epoch that public key belongs to.
- ``WIREGUARD_PORT``: the UDP port of that key's interface (absent: the
  cluster's port).
- ``WIREGUARD_PREVIOUS``: during a key epoch rotation, the previous key
  still up: ``"<epoch> <port> <public key>"``; absent otherwise. A peer
  pairs each of its interfaces with the key of the same epoch
  (agent.wireguard.epochs).
"""

from __future__ import annotations

from typing import Mapping, Optional

from agent.wireguard.epochs import PeerKey

PREFIX = "sealnet.io/"
IPSEC_KEYS = PREFIX + "ipsec-keys"
WIREGUARD_PUBLIC_KEY = PREFIX + "wireguard-public-key"
WIREGUARD_KEY_EPOCH = PREFIX + "wireguard-key-epoch"
WIREGUARD_PORT = PREFIX + "wireguard-port"
WIREGUARD_PREVIOUS = PREFIX + "wireguard-previous-key"
OURS = (IPSEC_KEYS, WIREGUARD_PUBLIC_KEY, WIREGUARD_KEY_EPOCH, WIREGUARD_PORT, WIREGUARD_PREVIOUS)


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
        if not _decimal(part) or not 1 <= int(part) <= 15:
            return None, f"annotation {IPSEC_KEYS}={value!r}: key IDs must be integers 1..15 separated by commas"
        ids.add(int(part))
    return frozenset(ids), None


def changes(have: Mapping[str, str], want: Mapping[str, Optional[str]]) -> dict[str, Optional[str]]:
    """The merge patch that turns ``have`` into ``want`` for our keys (None deletes)."""
    return {k: v for k, v in want.items() if have.get(k) != v and not (v is None and k not in have)}


def format_previous(epoch: int, port: int, public_key: str) -> str:
    return f"{epoch} {port} {public_key}"


def parse_wireguard(ours: Mapping[str, str]) -> tuple[tuple[PeerKey, ...], list[str]]:
    """A Node's WireGuard keys, current first, and what was wrong with the annotations.

    A bad epoch or port is a problem and that key is used without it (the
    cluster's port; no epoch: paired with our current key, as before epochs)."""
    problems: list[str] = []
    keys: list[PeerKey] = []
    current = ours.get(WIREGUARD_PUBLIC_KEY)
    if current is not None:
        epoch = _number(ours, WIREGUARD_KEY_EPOCH, 0, 2**31 - 1, problems)
        port = _number(ours, WIREGUARD_PORT, 1, 65535, problems)
        keys.append(PeerKey(current, epoch, port))
    previous = ours.get(WIREGUARD_PREVIOUS)
    if previous is not None:
        parts = previous.split()
        if (len(parts) != 3 or not _decimal(parts[0]) or not _decimal(parts[1])
                or not 1 <= int(parts[1]) <= 65535 or int(parts[0]) >= 2**31):
            problems.append(f"annotation {WIREGUARD_PREVIOUS}={previous!r}: expected '<epoch> <port> <public key>'")
        else:
            keys.append(PeerKey(parts[2], int(parts[0]), int(parts[1])))
    return tuple(keys), problems


def _number(ours: Mapping[str, str], key: str, low: int, high: int, problems: list[str]) -> Optional[int]:
    value = ours.get(key)
    if value is None:
        return None
    if not _decimal(value) or not low <= int(value) <= high:
        problems.append(f"annotation {key}={value!r}: expected an integer {low}..{high}")
        return None
    return int(value)


def _decimal(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts "²", which ``int`` refuses."""
    return text.isascii() and text.isdigit()
