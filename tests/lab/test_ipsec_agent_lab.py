"""The IPsec agent on a real kernel: the 3-node lab cluster, programmed by
``python -m agent apply`` from a static node description, one run per node.

Properties asserted:
- every pod pair reaches every other (all 6 directions) through ESP only,
  with XfrmInNoStates and XfrmInStateProtoError unchanged on every node;
- each sender puts its own SPI on the wire: prefix 5 | low 24 bits of its
  node IP | key ID, so the key ID is the last hex digit tcpdump shows;
- scapy decrypts every captured packet with the per-pair key computed here
  independently (SHA-256 of global key, IPs, boot IDs, truncated), and finds
  the ICMP that was sent;
- a second apply, and an apply by a new process (an agent restart), change
  nothing: same SAs and policies, sequence numbers not reset;
- foreign XFRM state is left alone;
- a peer without a boot ID is blocked: its pods get no traffic through, and
  nothing crosses the underlay in clear; the other pairs are unaffected.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from scapy.layers.inet import ICMP, IP

from agent import cli
from lab.capture import Capture
from lab.counters import xfrm_stat
from lab.esp import decrypt
from lab.topology import Cluster, LabNode

pytestmark = pytest.mark.kernel_lab

GLOBAL_KEY = bytes.fromhex("5c7dc606a6e901eb92accc3063c5259ddca19049")
KEY_ID = 3


def _write_inputs(tmp: Path, c: Cluster, omit_boot_id: str | None = None) -> tuple[Path, Path]:
    nodes = tmp / "nodes.json"
    nodes.write_text(json.dumps(c.description(omit_boot_id=omit_boot_id)))
    keys = tmp / "keys"
    keys.write_text(f"{KEY_ID}+ rfc4106(gcm(aes)) {GLOBAL_KEY.hex()} 128\n")
    return nodes, keys


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def agent(capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """The agent's CLI, run in-process against a node's namespace (--netns).

    Same code path as ``python -m agent``; in-process because a new Python
    process pays over a minute of imports over 9p under TCG. The CLI as a
    process is exercised on the host (tests/privileged).
    """

    def run(*argv: str) -> Run:
        capsys.readouterr()
        code = cli.main(["--log-level", "warning", *argv])
        out, err = capsys.readouterr()
        return Run(code, out, err)

    return run


def _apply(agent: Callable[..., Run], node: LabNode, nodes: Path, keys: Path) -> Run:
    return agent("apply", "--netns", node.ns, "--node", node.name, "--nodes", str(nodes), "--keys", str(keys))


def _kernel_state(c: Cluster, node: LabNode) -> tuple[str, str]:
    states = c.run(node.ns, "ip", "xfrm", "state").stdout
    policies = c.run(node.ns, "ip", "xfrm", "policy").stdout
    return states, policies


def _expected_key(src: LabNode, dst: LabNode) -> bytes:
    material = (GLOBAL_KEY + src.ip.packed + dst.ip.packed + src.boot_id[:36].encode() + dst.boot_id[:36].encode())
    return hashlib.sha256(material).digest()[: len(GLOBAL_KEY)]


def _spi(node: LabNode) -> int:
    return 0x5 << 28 | (int(node.ip) & 0xFFFFFF) << 4 | KEY_ID


def test_agent_encrypts_every_pod_pair_with_per_sender_spis_and_pair_keys(tmp_path: Path, agent: Callable[..., Run]) -> None:
    with Cluster(nodes=3, name="ia") as c:
        nodes, keys = _write_inputs(tmp_path, c)
        # A foreign policy (say, an IKE daemon's) that the agent must not touch.
        c.run(c.nodes[0].ns, "ip", "xfrm", "policy", "add", "src", "192.0.2.0/24", "dst", "198.51.100.0/24",
              "dir", "out", "priority", "500000", "action", "block")
        for node in c.nodes:
            proc = _apply(agent, node, nodes, keys)
            assert proc.returncode == 0, proc.stderr
        before = {n.name: xfrm_stat(n.ns) for n in c.nodes}
        with Capture(c.underlay_ns, c.bridge) as cap:
            reach = {(a.node, b.node): c.ping(a, b, count=2) for a, b in itertools.permutations(c.pods(), 2)}
        assert all(reach.values()), reach
        for n in c.nodes:
            after = xfrm_stat(n.ns)
            for counter in ("XfrmInNoStates", "XfrmInStateProtoError", "XfrmOutNoStates"):
                assert after[counter] == before[n.name][counter], (n.name, counter)

        seen = cap.summary()
        assert seen.kinds() == {"esp"}, seen
        by_ip = {str(n.ip): n for n in c.nodes}
        spis = seen.spis()
        assert len(spis) == 6
        for (src, dst), found in spis.items():
            assert found == {_spi(by_ip[src])}, (src, dst, [hex(s) for s in found])
            assert all(s & 0xF == KEY_ID for s in found)

        pods = {str(p.ip) for p in c.pods()}
        for pkt in seen.esp_packets():
            src, dst = by_ip[pkt[IP].src], by_ip[pkt[IP].dst]
            inner = decrypt(pkt, _expected_key(src, dst), icv_bits=128, esn=True)
            assert ICMP in inner and inner[IP].src in pods and inner[IP].dst in pods
            assert ipaddress.ip_address(inner[IP].src) in src.pod_cidr

        # A second run, and a new process (an agent restart), change nothing.
        state_before = {n.name: _kernel_state(c, n) for n in c.nodes}
        seq_before = c.run(c.nodes[0].ns, "ip", "-s", "xfrm", "state").stdout
        for node in c.nodes:
            proc = _apply(agent, node, nodes, keys)
            assert proc.returncode == 0 and "no change" in proc.stdout, proc.stdout + proc.stderr
            assert _kernel_state(c, node) == state_before[node.name]
        assert "192.0.2.0/24" in c.run(c.nodes[0].ns, "ip", "xfrm", "policy").stdout
        # Sequence numbers continue: no SA was deleted and re-added.
        with Capture(c.underlay_ns, c.bridge) as cap2:
            assert c.ping(c.nodes[0].pods[0], c.nodes[1].pods[0])
        seqs = [p.seq for p in cap2.summary().packets
                if p.kind == "esp" and p.src == str(c.nodes[0].ip) and p.dst == str(c.nodes[1].ip)]
        assert seqs and min(seqs) > 2, (seqs, seq_before.count("seq"))

        status = agent("status", "--netns", c.nodes[0].ns, "--keys", str(keys)).stdout
        assert status.startswith(f"Encryption: IPsec [key {KEY_ID}+, peers 2/2 on key {KEY_ID}, max seq 0x"), status
        assert status.rstrip().endswith("errors 0]"), status


def test_peer_without_boot_id_is_blocked_never_in_clear(tmp_path: Path, agent: Callable[..., Run]) -> None:
    with Cluster(nodes=3, name="ib") as c:
        nodes, keys = _write_inputs(tmp_path, c, omit_boot_id="node-3")
        codes = {node.name: _apply(agent, node, nodes, keys) for node in c.nodes}
        assert codes["node-1"].returncode == 3 and "peer node-3 blocked" in codes["node-1"].stderr
        assert codes["node-2"].returncode == 3
        # node-3 has no boot ID of its own: it cannot derive any pair key.
        assert codes["node-3"].returncode in (2, 3), codes["node-3"].stderr
        one, two, three = (n.pods[0] for n in c.nodes)
        with Capture(c.underlay_ns, c.bridge) as cap:
            assert c.ping(one, two) and c.ping(two, one)
            assert not c.ping(one, three, timeout=1)
            assert not c.ping(three, one, timeout=1)
        seen = cap.summary()
        assert "plaintext" not in seen.kinds(), seen
        assert seen.kinds() == {"esp"}, seen
        node3 = str(c.nodes[2].ip)
        assert all(node3 not in (p.src, p.dst) for p in seen.payload()), seen
