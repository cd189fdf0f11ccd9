"""Benchmark: configure N WireGuard peers into a fresh interface, three ways.

For each N the same peers (X25519 public key, endpoint node IP:51871, one /24
pod CIDR each) go into a new interface in a throwaway network namespace by

- ``sealnet``: one agent process that plans the N+1-node cluster and runs
  the agent's reconcile (device, peers in batches, N routes in our table,
  the policy rule), exactly what ``agent apply`` does;
- ``wg set per peer``: one ``wg set IF peer K endpoint E allowed-ips A``
  process per peer (a shell loop), as a script around wg(8) would;
- ``wg setconf``: one ``wg setconf IF FILE`` with all peers.

wg(8) does no routes, so the sealnet row also shows the time inside the
process spent on peers alone ("peers s") next to the whole reconcile
("work s", without interpreter start and imports) and the process wall
time. Peak RSS is the largest process of each run (wait4()). After each
run the interface must hold exactly N peers. The sealnet run then measures
a no-op re-run and a one-peer change on the same device.

    sudo .venv/bin/python bench/wireguard_peers.py                      # userspace (wireguard-go), host
    sudo .venv/bin/python bench/wireguard_peers.py --backend kernel     # kernel module: lab VM only
    sudo .venv/bin/python bench/wireguard_peers.py --n 100 1000 --methods sealnet --verify --json
    sudo .venv/bin/python bench/wireguard_peers.py --backend kernel --per-peer-max 1000   # in the lab

The interface's private key is a throwaway key made for the run and never
printed.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.wireguard import keys as wgkeys  # noqa: E402  (after the path fix, for `python bench/...`)
from agent.model import KeyMaterial, Node  # noqa: E402

PORT = 51871
METHODS = ("sealnet", "wg set per peer", "wg setconf")
LOCAL_PODS = ipaddress.IPv4Network("10.255.255.0/24")


def make_nodes(n: int) -> list[dict[str, Any]]:
    """N peers plus the local node (first), in the agent's node description format."""
    nodes = [{"name": "local", "ips": ["172.31.255.254"], "podCIDRs": [str(LOCAL_PODS)]}]
    for i in range(n):
        nodes.append({
            "name": f"peer-{i}",
            "ips": [str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("172.20.0.1")) + i))],
            "podCIDRs": [str(ipaddress.IPv4Network((int(ipaddress.IPv4Address("10.0.0.0")) + (i << 8), 24)))],
            "wireguardPublicKey": wgkeys.generate().public_key,
        })
    return nodes


# -- inside the namespace: the agent's way -----------------------------------------


def worker(spec_path: str, interface: str, backend: str, key_file: str, verify: bool) -> dict[str, Any]:
    """Reconcile the spec into ``interface`` with the agent's code; timings in seconds."""
    from pyroute2 import IPRoute

    from agent import nodesfile
    from agent.kernel.wireguard import open_backend
    from agent.wireguard.plan import Settings, plan
    from agent.wireguard.datapath import reconcile

    start = time.perf_counter()
    nodes = nodesfile.parse(json.loads(Path(spec_path).read_text()))
    private = KeyMaterial(base64.b64decode(Path(key_file).read_text().strip()))
    public = wgkeys.public_key_of(bytes(private))
    settings = Settings(interface=interface, underlay_mtu=1500)
    out: dict[str, Any] = {}
    with IPRoute() as ipr:
        dev, _ = open_backend(interface, backend, ipr)
        peers_time = [0.0]
        orig = dev.apply_peers

        def timed(changes: Any) -> Any:
            t = time.perf_counter()
            try:
                return orig(changes)
            finally:
                peers_time[0] += time.perf_counter() - t

        dev.apply_peers = timed  # type: ignore[method-assign]
        config = plan(nodes[0], nodes, public, settings)
        report = reconcile(config, private, dev, ipr)
        out["work_s"] = time.perf_counter() - start
        out["peers_s"] = peers_time[0]
        out["added"] = report.peers_added
        t = time.perf_counter()
        noop = reconcile(plan(nodes[0], nodes, public, settings), private, dev, ipr)
        out["noop_s"] = time.perf_counter() - t
        out["noop_changes"] = (noop.peers_added + noop.peers_updated + noop.peers_removed + noop.routes_added
                               + noop.routes_removed + noop.rules_added + noop.rules_removed)
        moved = list(nodes)
        last = moved[-1]
        moved[-1] = Node(last.name, last.ips, (ipaddress.ip_network("10.254.0.0/24"),), None,
                         last.wireguard_public_key)
        t = time.perf_counter()
        one = reconcile(plan(nodes[0], moved, public, settings), private, dev, ipr)
        out["one_change_s"] = time.perf_counter() - t
        out["one_change"] = (one.peers_updated, one.routes_added, one.routes_removed)
        if verify:
            state = dev.read()
            want = {p.public_key: frozenset(p.allowed_ips) for p in plan(nodes[0], moved, public, settings).peers}
            out["verified"] = {k: v.allowed_ips for k, v in state.peers.items()} == want
        dev.close()
    return out


# -- the driver ----------------------------------------------------------------------


def sh(*argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


GNU_TIME = shutil.which("time", path="/usr/bin:/bin")


def timed_run(ns: str, argv: list[str], **kw: Any) -> tuple[float, float, str]:
    """Run ``argv`` in ``ns`` to completion; (wall s, peak RSS MiB, stdout).

    Peak RSS comes from GNU time, which forks the command itself: a child of
    this (large) Python process would report our own RSS as its peak, since
    exec() records the old memory map's high-water mark.
    """
    with tempfile.NamedTemporaryFile("w+") as rss, tempfile.TemporaryFile("w+") as out, \
            tempfile.TemporaryFile("w+") as err:
        wrapper = [GNU_TIME, "-f", "%M", "-o", rss.name] if GNU_TIME else []
        start = time.perf_counter()
        proc = subprocess.run(["ip", "netns", "exec", ns, *wrapper, *argv], stdout=out, stderr=err, text=True, **kw)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[:6]} exited {proc.returncode}: {err.read().strip()[-500:]}")
        text = rss.read().strip().splitlines()
        return wall, int(text[-1]) / 1024 if text else float("nan"), out.read()


class Bench:
    def __init__(self, backend: str, tmp: Path) -> None:
        self.backend = backend
        self.tmp = tmp
        self.ns = f"wgb{uuid.uuid4().hex[:6]}"
        self.ifname = f"wgb{uuid.uuid4().hex[:6]}"
        pair = wgkeys.generate()
        self.key_file = tmp / "private.key"
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, base64.b64encode(bytes(pair.private)) + b"\n")
        os.close(fd)

    def fresh_interface(self) -> None:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        if self.backend == "kernel":
            sh("ip", "netns", "exec", self.ns, "ip", "link", "add", self.ifname, "type", "wireguard")
        else:
            env = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"}
            sh("ip", "netns", "exec", self.ns, "wireguard-go", self.ifname, env=env)
        sh("ip", "netns", "exec", self.ns, "wg", "set", self.ifname, "private-key", str(self.key_file),
           "listen-port", str(PORT))
        sh("ip", "netns", "exec", self.ns, "ip", "link", "set", self.ifname, "up")

    def drop_interface(self) -> None:
        sh("ip", "netns", "exec", self.ns, "ip", "link", "del", self.ifname, check=False)
        sh("ip", "netns", "del", self.ns, check=False)
        time.sleep(0.2)  # wireguard-go notices its TUN is gone and removes its socket

    def peer_count(self) -> int:
        out = sh("ip", "netns", "exec", self.ns, "wg", "show", self.ifname, "peers").stdout
        return len(out.split())

    def run(self, method: str, nodes: list[dict[str, Any]], verify: bool) -> dict[str, Any]:
        n = len(nodes) - 1
        self.fresh_interface()
        try:
            result: dict[str, Any] = {"n": n, "method": method}
            if method == "sealnet":
                spec = self.tmp / "nodes.json"
                spec.write_text(json.dumps({"nodes": nodes}))
                wall, rss, out = timed_run(self.ns,
                    [sys.executable, __file__, "_worker", "--spec", str(spec),
                     "--interface", self.ifname, "--backend", self.backend, "--key-file", str(self.key_file)]
                    + (["--verify"] if verify else []),
                    env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
                result.update(json.loads(out))
                peers_left = self.peer_count()  # after the one-peer change: still N
            elif method == "wg set per peer":
                script = self.tmp / "wgset.sh"
                script.write_text("".join(
                    f"wg set {self.ifname} peer {p['wireguardPublicKey']} endpoint {p['ips'][0]}:{PORT} "
                    f"allowed-ips {p['podCIDRs'][0]}\n" for p in nodes[1:]))
                wall, rss, _ = timed_run(self.ns, ["sh", "-e", str(script)])
                peers_left = self.peer_count()
            else:
                conf = self.tmp / "wg.conf"
                conf.write_text(f"[Interface]\nPrivateKey = {self.key_file.read_text().strip()}\nListenPort = {PORT}\n"
                                + "".join(f"\n[Peer]\nPublicKey = {p['wireguardPublicKey']}\n"
                                          f"Endpoint = {p['ips'][0]}:{PORT}\nAllowedIPs = {p['podCIDRs'][0]}\n"
                                          for p in nodes[1:]))
                conf.chmod(0o600)
                wall, rss, _ = timed_run(self.ns, ["wg", "setconf", self.ifname, str(conf)])
                conf.unlink()
                peers_left = self.peer_count()
            result.update(wall_s=wall, rss_mib=rss, peers_ok=peers_left == n)
            return result
        finally:
            self.drop_interface()


def table(rows: list[dict[str, Any]], backend: str) -> str:
    head = f"{'N':>5}  {'method':<16} {'wall s':>7} {'work s':>7} {'peers s':>7} {'RSS MiB':>8}  notes"
    lines = [f"backend: {backend}", head, "-" * len(head)]
    for r in rows:
        work = f"{r['work_s']:7.3f}" if "work_s" in r else f"{'':>7}"
        peers = f"{r['peers_s']:7.3f}" if "peers_s" in r else f"{'':>7}"
        notes = [] if r["peers_ok"] else ["PEER COUNT WRONG"]
        if "noop_s" in r:
            notes.append(f"no-op re-run {r['noop_s']:.3f} s ({r['noop_changes']} changes), "
                         f"one peer changed {r['one_change_s']:.3f} s")
        if "verified" in r:
            notes.append("device == plan" if r["verified"] else "DEVICE != PLAN")
        lines.append(f"{r['n']:>5}  {r['method']:<16} {r['wall_s']:7.3f} {work} {peers} {r['rss_mib']:8.1f}  "
                     + "; ".join(notes))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    w = sub.add_parser("_worker")
    w.add_argument("--spec", required=True)
    w.add_argument("--interface", required=True)
    w.add_argument("--backend", required=True)
    w.add_argument("--key-file", required=True)
    w.add_argument("--verify", action="store_true")
    parser.add_argument("--backend", choices=["userspace", "kernel"], default="userspace")
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--verify", action="store_true", help="compare the device with the plan after sealnet")
    parser.add_argument("--per-peer-max", type=int, default=None,
                        help="skip 'wg set per peer' above this N (one process per peer is slow in the lab VM)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON after the table")
    args = parser.parse_args(argv)
    if args.cmd == "_worker":
        print(json.dumps(worker(args.spec, args.interface, args.backend, args.key_file, args.verify)))
        return 0
    if args.backend == "userspace" and shutil.which("wireguard-go") is None:
        parser.error("wireguard-go is not installed")
    rows = []
    with tempfile.TemporaryDirectory(prefix="wgbench-") as tmp:
        bench = Bench(args.backend, Path(tmp))
        for n in args.n:
            nodes = make_nodes(n)
            for method in args.methods:
                if method == "wg set per peer" and args.per_peer_max is not None and n > args.per_peer_max:
                    continue
                rows.append(bench.run(method, nodes, args.verify))
                print(f"  N={n} {method}: {rows[-1]['wall_s']:.3f} s", file=sys.stderr, flush=True)
    kernel = os.uname().release
    label = "kernel module" if args.backend == "kernel" else "wireguard-go (userspace)"
    print(table(rows, f"{label}, kernel {kernel}, {os.cpu_count()} CPUs"))
    if args.json:
        print(json.dumps(rows))
    return 0 if all(r["peers_ok"] and r.get("verified", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
