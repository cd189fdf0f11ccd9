"""Test harness: a WireGuard key epoch rotation across DaemonCluster agents, counted packet by packet.

Shared by the wireguard-go run on the host
(tests/privileged/test_wireguard_epoch_host.py) and the kernel module run in
the lab (tests/lab/test_daemon_wireguard_lab.py):

- :func:`egress`: which epoch's interface each peer's routes use, read from
  the agent's ``sealnet_wireguard_peer_egress_epoch`` metric;
- :func:`links`: which of the node's two rotation interfaces exist;
- :class:`Counted`: a capture on the underlay and a UDP flow on every pair
  of the first three nodes (a ring) for the length of the rotation; its
  ``check`` asserts nothing lost, only WireGuard between node IPs, and both
  key pairs (ports 51871 and 51872) carrying traffic;
- :func:`finish_end_state`: after the grace period one interface per node,
  holding a new key that its Node advertises, and no previous key; node 0's
  ``python -m agent status`` shows that interface alone.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

from lab.capture import WIREGUARD_PORTS, Capture
from lab.topology import API_IP
from lab.udpflow import Flow
from tests.agents import DaemonCluster
from tests.wgcluster import wireguard_problems

PUBKEY, EPOCH, PREVIOUS = ("sealnet.io/wireguard-public-key", "sealnet.io/wireguard-key-epoch",
                           "sealnet.io/wireguard-previous-key")


def egress(d: DaemonCluster, i: int) -> dict[float, int]:
    """Epoch -> number of peers whose routes use that epoch's interface, from node i's metrics."""
    out: dict[float, int] = {}
    for k, v in d.metrics(i).items():
        if k.startswith("sealnet_wireguard_peer_egress_epoch{"):
            out[v] = out.get(v, 0) + 1
    return out


def links(d: DaemonCluster, i: int) -> set[str]:
    node = d.c.nodes[i]
    return {name for name in d.ifnames(i)
            if d.c.run(node.ns, "ip", "link", "show", name, check=False).returncode == 0}


class Counted:
    """A capture on the underlay and a UDP flow on every pair of nodes 0-2, around a rotation."""

    def __init__(self, d: DaemonCluster, rate: float) -> None:
        self.d, self.rate, self.stack = d, rate, ExitStack()

    def __enter__(self) -> "Counted":
        d = self.d
        self.cap = self.stack.enter_context(Capture(d.c.underlay_ns, d.c.bridge, bpf=f"not host {API_IP}",
                                                    directory=str(d.tmp)))
        pods = [n.pods[0] for n in d.c.nodes[:3]]
        self.flows = [self.stack.enter_context(Flow(pods[i].ns, pods[(i + 1) % 3].ns, str(pods[(i + 1) % 3].ip),
                                                    port=5001 + i, rate=self.rate)) for i in range(3)]
        time.sleep(1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def check(self, switched_after: float, what: str) -> None:
        results = [f.result for f in self.flows]
        print(f"\n{what}: last egress switch {switched_after:.1f} s after the first node's restart; "
              + "; ".join(str(r) for r in results))
        for r in results:
            assert r is not None and r.lost == 0 and r.sent > self.rate, str(r)
        summary = self.cap.summary()
        problems = wireguard_problems(summary, {str(n.ip) for n in self.d.c.nodes})
        first = str(summary.raw[problems[0][0]].summary()) if problems else ""  # headers only, never a payload
        assert problems == [], f"{[what for _, what in problems[:10]]}; {summary}; first: {first}"
        ports = {p.sport for p in summary.packets if p.kind == "wireguard"}
        assert ports == set(WIREGUARD_PORTS), ports  # both key pairs carried traffic


def finish_end_state(d: DaemonCluster, old: dict[int, str], grace: float, epoch: int = 1) -> None:
    """One interface per node after the grace period: the new key, advertised; no previous key."""
    d.wait("previous interfaces retired", lambda: all(len(links(d, i)) == 1 and PREVIOUS not in d.annotations(i)
                                                       for i in range(3)), timeout=grace + 60)
    for i in range(3):
        (iface,) = links(d, i)
        assert iface == d.ifnames(i)[epoch % 2]
        key = d.c.run(d.c.nodes[i].ns, "wg", "show", iface, "public-key").stdout.strip()
        ann = d.annotations(i)
        assert ann[PUBKEY] == key and ann[EPOCH] == str(epoch) and key not in old.values()
        assert d.metrics(i)["sealnet_wireguard_rotation_peers_behind"] == 0.0
        if i == 0:  # what an operator sees on the node (one agent start: a minute under TCG)
            line = d.status(0, "--mode", "wireguard", "--interface", d.ifname(0)).strip()
            assert line.startswith(f"Encryption: WireGuard [{iface} (Pubkey: {key}, Port: {WIREGUARD_PORTS[epoch % 2]}, "
                                   f"Peers: 2, backend ") and "rotation" not in line, line
    time.sleep(1)
