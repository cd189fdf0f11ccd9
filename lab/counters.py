"""Kernel counters that XFRM proofs rest on.

``/proc/net/xfrm_stat`` is per network namespace: read it inside the node's
namespace. A datapath that is right leaves XfrmInNoStates (no SA for an
inbound SPI), XfrmInStateProtoError (ICV/decrypt failure: wrong key) and
XfrmInStateSeqError (replay window) unchanged while traffic flows.

    before = xfrm_stat(node.ns)
    ...
    assert delta(before, xfrm_stat(node.ns))["XfrmInStateProtoError"] == 0
"""

from __future__ import annotations

from lab.topology import in_ns


def parse_xfrm_stat(text: str) -> dict[str, int]:
    """Parse the ``Name   value`` lines of /proc/net/xfrm_stat."""
    stats: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            stats[parts[0]] = int(parts[1])
    return stats


def xfrm_stat(ns: str) -> dict[str, int]:
    """The XFRM error counters of namespace ``ns``."""
    return parse_xfrm_stat(in_ns(ns, "cat", "/proc/net/xfrm_stat").stdout)


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Counters that changed, as after - before."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
