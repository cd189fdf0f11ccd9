"""Which IPsec keys a node keeps installed during a rotation: a pure state machine.

The keys file says which key is current (its last line) and may carry the
previous one. What the kernel must hold is more than that during a rotation:
a peer that has not yet switched still sends with the old key, and a Secret
patched to one line (the seed's ``kubectl patch``) no longer carries it.
So the agent keeps the older keys it has seen ("retained") until it is safe
to drop them::

    state, active = step(state, file_keys, advertised, now, grace)
    plan(local, nodes, active, config, egress=choose(active, advertised))

The protocol (shared/DESIGN.md): every key in ``active`` has its SAs
installed (inbound and outbound) and is advertised on the own Node
(``sealnet.io/ipsec-keys``); egress to a peer moves to the current key once
the peer advertises it. Older keys go once *every* peer advertises the
current key and ``grace`` seconds have passed since that was first seen (by
then each peer has seen our advertisement too and switched its egress to
us). A peer that never catches up keeps the old keys alive, and its
traffic on them: nothing is dropped and nothing goes in clear.

A peer that advertises nothing (no agent yet, or an agent before this
protocol) puts no constraint on dropping: it cannot be sending with a key
it never announced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from agent.ipsec.keys import IpsecKey, KeySet

#: What each peer advertises: the key IDs it has installed, None if nothing.
Advertised = Mapping[str, Optional[frozenset[int]]]


@dataclass(frozen=True)
class RotationState:
    #: older keys still installed, oldest first (not the current one)
    retained: tuple[IpsecKey, ...] = ()
    #: the current key when this state was made
    current: Optional[IpsecKey] = None
    #: when every peer was first seen advertising the current key (None: not yet)
    caught_up_since: Optional[float] = None
    #: older key IDs already dropped under this current key: the file's
    #: previous line must not bring them back
    dropped: frozenset[int] = frozenset()

    def drop_at(self, grace: float) -> Optional[float]:
        """When the retained keys may go (None: nothing to drop, or not yet known)."""
        if not self.retained or self.caught_up_since is None:
            return None
        return self.caught_up_since + grace


def step(state: RotationState, file_keys: KeySet, advertised: Advertised, now: float,
         grace: float) -> tuple[RotationState, KeySet]:
    """The next state and the keys to install, from the file and the peers' advertisements."""
    current = file_keys.current
    same = state.current is not None and state.current.spi == current.spi
    dropped = state.dropped if same else frozenset()
    in_file = {k.spi for k in file_keys}
    # Older keys: the previous current one and those remembered (unless the
    # file carries their ID: it wins), then the file's own older lines.
    remembered = [*state.retained, *([state.current] if state.current is not None and not same else [])]
    older = [k for k in remembered if k.spi not in in_file]
    older += [k for k in file_keys.keys[:-1] if k not in older and k.spi not in dropped]
    since = state.caught_up_since if same else None
    if older and all(ids is None or current.spi in ids for ids in advertised.values()):
        since = now if since is None else since
        if now - since >= grace:
            dropped = dropped | {k.spi for k in older}
            older = []
    else:
        since = None
    active = KeySet(tuple(older) + (current,))
    return RotationState(tuple(older), current, since if older else None, dropped), active


def choose_egress(active: KeySet, advertised: Advertised) -> dict[str, int]:
    """Per peer, the key ID to send with: the newest of ours that it advertises.

    "Newest" is file order (the current key last), not the numeric ID, so the
    15 -> 1 wrap needs nothing special. A peer that advertises none of our
    keys, or nothing at all, is sent the current key.
    """
    newest_first = [k.spi for k in reversed(active.keys)]
    egress = {}
    for peer, ids in advertised.items():
        if ids is None:
            egress[peer] = newest_first[0]
        else:
            egress[peer] = next((spi for spi in newest_first if spi in ids), newest_first[0])
    return egress


def laggards(active: KeySet, advertised: Advertised) -> tuple[str, ...]:
    """Peers that do not yet advertise the current key (status and metrics name them)."""
    current = active.current.spi
    return tuple(sorted(p for p, ids in advertised.items() if ids is not None and current not in ids))
