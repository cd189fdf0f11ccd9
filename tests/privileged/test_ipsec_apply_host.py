"""`python -m agent apply` as a process, on the host kernel.

The host kernel has XFRM policies but no ESP, so the kernel refuses our SAs
here: a realistic failure. Properties asserted:
- bad input (a broken keys line) exits 2 with the line and field named, no
  key material in the message, and nothing written to the kernel;
- the policies `ip xfrm policy` shows are exactly the planned ones (out
  pinned to the sender's SPI, in and fwd unpinned, our priority and reqid);
- a refused SA exits 1 naming the SA and the kernel's reason, and pod
  traffic is dropped by the policies, never sent in clear;
- a second run changes no policy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.capture import Capture
from lab.topology import Cluster

pytestmark = pytest.mark.privileged

ROOT = Path(__file__).resolve().parents[2]
KEY_HEX = "5c7dc606a6e901eb92accc3063c5259ddca19049"


def _apply(c: Cluster, ns: str, node: str, nodes: Path, keys: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "agent", "apply", "--node", node,
                           "--nodes", str(nodes), "--keys", str(keys)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_static_apply_on_the_host_kernel(tmp_path: Path) -> None:
    with Cluster(nodes=3, name="ha") as c:
        one = c.nodes[0]
        nodes = tmp_path / "nodes.json"
        nodes.write_text(json.dumps(c.description()))
        keys = tmp_path / "keys"

        keys.write_text(f"3+ rfc4106(gcm(aes)) {KEY_HEX}0 128\n")  # odd number of hex digits
        bad = _apply(c, one.ns, "node-1", nodes, keys)
        assert bad.returncode == 2, bad.stderr
        assert "line 1" in bad.stderr and "key" in bad.stderr and "Traceback" not in bad.stderr
        assert KEY_HEX[:8] not in bad.stderr + bad.stdout
        assert c.run(one.ns, "ip", "xfrm", "policy").stdout == ""

        keys.write_text(f"3+ rfc4106(gcm(aes)) {KEY_HEX} 128\n")
        first = _apply(c, one.ns, "node-1", nodes, keys)
        assert KEY_HEX[:8] not in first.stderr + first.stdout
        if first.returncode == 1:  # this kernel has no ESP: each SA refused, by name
            assert "kernel refused: add sa src=172.18.0.3 dst=172.18.0.2 spi=0x51200033" in first.stderr
        else:
            assert first.returncode == 0, first.stderr
        policies = c.run(one.ns, "ip", "xfrm", "policy").stdout
        assert policies.count("priority 10020") == 6
        assert policies.count("dir out") == 2 and policies.count("dir in") == 2 and policies.count("dir fwd") == 2
        assert policies.count("spi 0x51200023 reqid 24225 mode tunnel") == 2  # node-1 sends with its own SPI
        assert "tmpl src 172.18.0.3 dst 172.18.0.2" in policies

        with Capture(c.underlay_ns, c.bridge) as cap:
            c.ping(one.pods[0], c.nodes[1].pods[0], timeout=1)
        assert "plaintext" not in cap.summary().kinds()

        second = _apply(c, one.ns, "node-1", nodes, keys)
        assert "add_policy" not in second.stdout and "update_policy" not in second.stdout, second.stdout
        assert c.run(one.ns, "ip", "xfrm", "policy").stdout == policies
