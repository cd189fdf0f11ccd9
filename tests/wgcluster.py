"""Test harness: run the WireGuard agent on every node of a lab.topology.Cluster.

Each node gets its own state dir and its own interface name (wireguard-go's
UAPI socket directory is shared by all namespaces of a host, so names must
differ), and ``python -m agent`` runs inside the node's namespace exactly as
an operator would run it. Every output of the agent is checked for the
nodes' private keys before a test sees it, so a leak fails the test without
printing the key. Teardown deletes the interfaces (wireguard-go exits with
its TUN) and then ends any wireguard-go still serving one of our names, by
pid.

    with Cluster(nodes=3, name="wgu") as c, WgCluster(c, tmp_path, backends="userspace") as wg:
        wg.publish_keys()
        wg.apply_all()
        wg.status(0)["peers"]  # 2
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from agent.kernel.wguapi import daemon_pids
from agent.wireguard.keys import KEY_FILE
from lab.capture import WIREGUARD_PORTS, Capture, classify
from lab.topology import Cluster

REPO = Path(__file__).resolve().parents[1]
PORT = 51871
#: One agent run. On the host it takes about a second; in the lab VM (TCG,
#: the checkout over 9p) importing the agent alone can take a minute.
TIMEOUT = 600


class WgCluster:
    def __init__(self, cluster: Cluster, tmp: Path, backends: Union[str, Sequence[str]] = "auto",
                 node_encryption: bool = False) -> None:
        self.c = cluster
        self.tmp = tmp
        n = len(cluster.nodes)
        self.backends = [backends] * n if isinstance(backends, str) else list(backends)
        self.node_encryption = node_encryption
        self.ifnames = [f"sw{cluster.name}{i + 1}" for i in range(n)]
        self.state_dirs = [tmp / f"state-{node.name}" for node in cluster.nodes]
        self.keys: dict[str, str] = {}
        self.nodes_file = tmp / "nodes.json"
        self.outputs: list[str] = []

    def __enter__(self) -> "WgCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    # -- running the agent ---------------------------------------------------

    def agent(self, ns: Optional[str], *argv: str, check: bool = True,
              timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        """``python -m agent --log-level debug ARGV`` (in ``ns``); output checked for private keys."""
        cmd = [sys.executable, "-m", "agent", "--log-level", "debug", *argv]
        if ns is not None:
            cmd = ["ip", "netns", "exec", ns, *cmd]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
        self.assert_no_secret(proc.stdout + proc.stderr)
        self.outputs.append(proc.stdout + proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"agent {argv[0]} exited {proc.returncode}: {proc.stderr[-2000:]}")
        return proc

    def secrets(self) -> list[str]:
        found = []
        for d in self.state_dirs:
            path = d / KEY_FILE
            if path.exists():
                raw = base64.b64decode(json.loads(path.read_text())["privateKey"])
                found += [base64.b64encode(raw).decode(), raw.hex()]
        return found

    def assert_no_secret(self, text: str) -> None:
        # Not `assert secret not in text`: pytest would print both operands.
        leaked = sum(1 for s in self.secrets() if s in text)
        assert leaked == 0, f"{leaked} private key(s) appeared in agent output"

    def publish_keys(self, epochs: Optional[dict[int, int]] = None) -> dict[str, str]:
        """Each node's public key via ``agent pubkey`` (the new one for nodes in ``epochs``); rewrite nodes.json."""
        argvs = []
        for i in range(len(self.c.nodes)):
            argv = ["pubkey", "--state-dir", str(self.state_dirs[i])]
            if epochs and i in epochs:
                argv += ["--key-epoch", str(epochs[i])]
            argvs.append((None, argv))
        for node, out in zip(self.c.nodes, self.parallel(argvs)):
            self.keys[node.name] = out.strip()
        self.write_nodes()
        return dict(self.keys)

    def parallel(self, runs: list[tuple[Optional[str], list[str]]]) -> list[str]:
        """Agent runs (ns, argv) at once; their stdout, in order. Each must succeed."""
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        procs = []
        for ns, argv in runs:
            cmd = [sys.executable, "-m", "agent", "--log-level", "debug", *argv]
            procs.append(subprocess.Popen((["ip", "netns", "exec", ns] if ns else []) + cmd, cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = []
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            self.assert_no_secret(out + err)
            self.outputs.append(out + err)
            assert proc.returncode == 0, err[-2000:]
            outs.append(out)
        return outs

    def write_nodes(self, edit: Optional[Any] = None, path: Optional[Path] = None) -> Path:
        """nodes.json with the published keys; ``edit(doc)`` may change it first."""
        doc = self.c.description()
        for entry in doc["nodes"]:
            if entry["name"] in self.keys:
                entry["wireguardPublicKey"] = self.keys[entry["name"]]
        if edit is not None:
            edit(doc)
        target = path or self.nodes_file
        target.write_text(json.dumps(doc, indent=1))
        return target

    def apply_argv(self, i: int, nodes: Optional[Path] = None, *extra: str) -> list[str]:
        argv = ["apply", "--mode", "wireguard", "--node", self.c.nodes[i].name,
                "--nodes", str(nodes or self.nodes_file), "--state-dir", str(self.state_dirs[i]),
                "--interface", self.ifnames[i], "--backend", self.backends[i], *extra]
        if self.node_encryption:
            argv.append("--node-encryption")
        return argv

    def apply(self, i: int, *extra: str, nodes: Optional[Path] = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.agent(self.c.nodes[i].ns, *self.apply_argv(i, nodes, *extra), check=check)

    def apply_all(self, nodes: Optional[Path] = None) -> list[str]:
        """Apply on every node (at once); the summary line of each."""
        runs = [(node.ns, self.apply_argv(i, nodes)) for i, node in enumerate(self.c.nodes)]
        return [out.strip() for out in self.parallel(runs)]

    def apply_parallel(self, extra: Optional[dict[int, list[str]]] = None) -> float:
        """Apply on every node at once (as agents reacting to one change would); wall time in s."""
        runs = [(node.ns, self.apply_argv(i, None, *((extra or {}).get(i, []))))
                for i, node in enumerate(self.c.nodes)]
        start = time.monotonic()
        self.parallel(runs)
        return time.monotonic() - start

    def status(self, i: int) -> dict[str, Any]:
        out = self.agent(self.c.nodes[i].ns, "status", "--mode", "wireguard", "--interface", self.ifnames[i],
                         "--json").stdout
        result: dict[str, Any] = json.loads(out)
        return result

    def peers(self, i: int) -> dict[str, dict[str, Any]]:
        """Node i's peers by public key, as wg(8) reports them (an oracle independent of the agent)."""
        ns, ifname = self.c.nodes[i].ns, self.ifnames[i]

        def show(what: str) -> list[list[str]]:
            out = self.c.run(ns, "wg", "show", ifname, what).stdout
            return [line.split("\t") for line in out.splitlines() if line.strip()]

        peers: dict[str, dict[str, Any]] = {}
        for key, ts in show("latest-handshakes"):
            peers[key] = {"publicKey": key, "latestHandshake": int(ts)}
        for key, rx, tx in show("transfer"):
            peers[key].update(rxBytes=int(rx), txBytes=int(tx))
        for key, endpoint in show("endpoints"):
            peers[key]["endpoint"] = endpoint
        for key, allowed in show("allowed-ips"):
            peers[key]["allowedIPs"] = sorted(allowed.split()) if allowed != "(none)" else []
        return peers

    def link_kind(self, i: int) -> str:
        """'wireguard' (kernel) or 'tun' (wireguard-go), from ``ip -d link``."""
        out = self.c.run(self.c.nodes[i].ns, "ip", "-d", "-o", "link", "show", self.ifnames[i]).stdout
        return "wireguard" if " wireguard " in out else "tun" if " tun " in out else out

    def ping_all(self, count: int = 2, pattern: Optional[str] = None) -> list[tuple[str, str]]:
        """Ping every pod from every other pod; the (src, dst) pairs that failed."""
        failed = []
        for a in self.c.pods():
            for b in self.c.pods():
                if a is b:
                    continue
                argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "3"]
                if pattern:
                    argv += ["-p", pattern]
                if self.c.run(a.ns, *argv, str(b.ip), check=False, timeout=30).returncode != 0:
                    failed.append((a.ns, b.ns))
        return failed

    def underlay_capture(self) -> Capture:
        return Capture(self.c.underlay_ns, self.c.bridge, directory=str(self.tmp))

    # -- cleanup -------------------------------------------------------------

    def teardown(self) -> None:
        for i, node in enumerate(self.c.nodes):
            self.c.run(node.ns, "ip", "link", "del", self.ifnames[i], check=False)
        deadline = time.monotonic() + 5
        for name in self.ifnames:
            while True:
                pids = [pid for pid, _ in daemon_pids(name) if _alive(pid)]
                if not pids or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            for pid in pids:  # still serving after its TUN went: ours, end it by pid
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def session_problems(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]],
                     keys: Optional[Sequence[str]] = None) -> list[str]:
    """Why the peers' sessions in ``after`` are not the ones in ``before`` ([] if they are).

    A peer that was removed and re-added starts again at zero bytes; a
    session that was reset shows a new handshake. WireGuard re-handshakes by
    itself once a session is two minutes old, so the handshake is only
    compared for sessions younger than 90 s.
    """
    problems = []
    for key in keys or list(before):
        b, a = before[key], after.get(key)
        if a is None:
            problems.append(f"{key}: peer gone")
            continue
        if a["rxBytes"] < b["rxBytes"] or a["txBytes"] < b["txBytes"] or not b["rxBytes"]:
            problems.append(f"{key}: counters reset ({b['rxBytes']}/{b['txBytes']} -> {a['rxBytes']}/{a['txBytes']})")
        if time.time() - b["latestHandshake"] < 90 and a["latestHandshake"] != b["latestHandshake"]:
            problems.append(f"{key}: handshake redone")
    return problems


def wireguard_problems(summary: Any, node_ips: set[str]) -> list[tuple[int, str]]:
    """Each frame of an underlay capture that should hold only WireGuard between node IPs and is not.

    Returns (index into ``summary.packets`` and ``summary.raw``, what is
    wrong). The kernel's own link-local control packets (IGMP, MLD, Neighbor
    Discovery: kind ``control``, see lab.capture) carry no payload and are
    no problem; anything else that is not WireGuard is. WireGuard is node to
    node, port to the same port: 51871, or 51872 for the second interface of
    a key epoch rotation.
    """
    problems = []
    for i, seen in enumerate(summary.packets):
        if seen.kind == "control":
            continue
        if seen.kind != "wireguard":
            problems.append((i, f"{seen.kind} {seen.src} -> {seen.dst} proto {seen.proto}"))
        elif {seen.src, seen.dst} - node_ips or seen.sport not in WIREGUARD_PORTS or seen.dport != seen.sport:
            problems.append((i, f"wireguard with unexpected ends {seen.src}:{seen.sport} -> {seen.dst}:{seen.dport}"))
    return problems


def wireguard_only(summary: Any, node_ips: set[str]) -> list[str]:
    """What is wrong with the frames :func:`wireguard_problems` flags ([] when the capture is clean)."""
    return [what for _, what in wireguard_problems(summary, node_ips)]


__all__ = ["WgCluster", "session_problems", "wireguard_only", "wireguard_problems", "classify", "REPO", "PORT", "TIMEOUT"]
