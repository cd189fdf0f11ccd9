"""Benchmark: configure N WireGuard peers and their routes into a fresh interface.

For each N the same peers (X25519 public key, endpoint node IP:51871, one /24
pod CIDR each) go into a new interface in a throwaway network namespace by

- ``sealnet``: one agent process that plans the N+1-node cluster and runs
  the agent's reconcile (device, peers in one UAPI/netlink transaction, the
  routes in our table, the policy rule), exactly what ``agent apply`` does;
  then, on the same device, a no-op pass (plan + reconcile, nothing to
  change: what a daemon does every resync period; the first one, then the
  median of three more) and a pass with one peer changed;
- ``wg setconf + ip -batch``: the reference for the same end state: one
  ``wg setconf IF FILE`` with all peers, then one ``ip -batch`` with exactly
  the routes and rule the agent's plan holds (per peer a route ``dev IF`` and
  a fail-closed ``unreachable`` route below it, so 2N routes, and one
  ``from <local pods> lookup`` rule). Its N = 0 run (empty config, empty
  batch) in the same round is the two processes' start, subtracted for the
  "beyond start" figure;
- ``wg set per peer``: one ``wg set IF peer K endpoint E allowed-ips A``
  process per peer (a shell loop), as a script around wg(8) would (one run).

"work" is the agent's time inside its process from after the imports
(reading the node list, key, netlink sockets, plan, reconcile): its marginal
cost, to compare with the reference beyond start; "peers" is the peer
transaction alone, the part ``wg setconf`` does; "wall" is the agent
process, interpreter start and all four passes included. Each cell is the
median of ``--runs`` rounds (methods interleaved within a round, a fresh
namespace each run); peak RSS is the largest process of each run (GNU
time). After each run the interface must hold exactly N peers and the table
2N routes; with ``--verify`` the device must equal the plan.

    sudo .venv/bin/python bench/wireguard_peers.py                      # userspace (wireguard-go), host
    sudo .venv/bin/python bench/wireguard_peers.py --backend kernel     # kernel module: lab VM only
    sudo .venv/bin/python bench/wireguard_peers.py --n 100 1000 --runs 5 --per-peer-max 1000 --verify
    sudo .venv/bin/python bench/wireguard_peers.py --json               # rows as JSON after the tables

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
import statistics
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
METHODS = ("sealnet", "wg setconf + ip -batch", "wg set per peer")
TABLE = 51871
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
        out["noop_changes"] = 0
        noops = []
        for _ in range(4):  # the first no-op pass, then a daemon's steady state (median of three)
            t = time.perf_counter()
            noop = reconcile(plan(nodes[0], nodes, public, settings), private, dev, ipr)
            noops.append(time.perf_counter() - t)
            out["noop_changes"] += (noop.peers_added + noop.peers_updated + noop.peers_removed + noop.routes_added
                                    + noop.routes_removed + noop.rules_added + noop.rules_removed
                                    + len(noop.device_changed))
        out["noop_s"], out["noop_again_s"] = noops[0], statistics.median(noops[1:])
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

    def route_count(self) -> int:
        proc = sh("ip", "netns", "exec", self.ns, "ip", "route", "show", "table", str(TABLE), "proto", "94",
                  check=False)
        return len(proc.stdout.splitlines()) if proc.returncode == 0 else 0  # no table yet: none

    def run(self, method: str, nodes: list[dict[str, Any]], verify: bool) -> dict[str, Any]:
        n = len(nodes) - 1
        self.fresh_interface()
        try:
            result: dict[str, Any] = {"n": n, "method": method}
            want_routes = 2 * n  # per peer: the tunnel route and the fail-closed one
            if method == "sealnet":
                spec = self.tmp / "nodes.json"
                spec.write_text(json.dumps({"nodes": nodes}))
                wall, rss, out = timed_run(self.ns,
                    [sys.executable, __file__, "_worker", "--spec", str(spec),
                     "--interface", self.ifname, "--backend", self.backend, "--key-file", str(self.key_file)]
                    + (["--verify"] if verify else []),
                    env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
                result.update(json.loads(out))
            elif method == "wg set per peer":
                script = self.tmp / "wgset.sh"
                script.write_text("".join(
                    f"wg set {self.ifname} peer {p['wireguardPublicKey']} endpoint {p['ips'][0]}:{PORT} "
                    f"allowed-ips {p['podCIDRs'][0]}\n" for p in nodes[1:]))
                wall, rss, _ = timed_run(self.ns, ["sh", "-e", str(script)])
                want_routes = 0
            else:
                conf = self.tmp / "wg.conf"
                conf.write_text(f"[Interface]\nPrivateKey = {self.key_file.read_text().strip()}\nListenPort = {PORT}\n"
                                + "".join(f"\n[Peer]\nPublicKey = {p['wireguardPublicKey']}\n"
                                          f"Endpoint = {p['ips'][0]}:{PORT}\nAllowedIPs = {p['podCIDRs'][0]}\n"
                                          for p in nodes[1:]))
                conf.chmod(0o600)
                batch = self.tmp / "routes.batch"
                batch.write_text(ip_batch(nodes, self.ifname))
                wall_wg, rss_wg, _ = timed_run(self.ns, ["wg", "setconf", self.ifname, str(conf)])
                wall_ip, rss_ip, _ = timed_run(self.ns, ["ip", "-batch", str(batch)])
                conf.unlink()
                wall, rss = wall_wg + wall_ip, max(rss_wg, rss_ip)
                result.update(setconf_s=wall_wg, batch_s=wall_ip)
            peers_left = self.peer_count()  # sealnet: after the one-peer change, still N
            routes_left = self.route_count()
            result.update(wall_s=wall, rss_mib=rss, peers_ok=peers_left == n, routes_ok=routes_left == want_routes)
            return result
        finally:
            self.drop_interface()


def ip_batch(nodes: list[dict[str, Any]], ifname: str) -> str:
    """The agent's plan for ``nodes`` as ``ip -batch`` lines: the same routes and rule it writes."""
    from agent import nodesfile
    from agent.wireguard.plan import Settings, plan

    parsed = nodesfile.parse({"nodes": nodes})
    config = plan(parsed[0], parsed, "", Settings(interface=ifname, table=TABLE))
    lines = []
    for r in sorted(config.routes, key=lambda r: (int(r.dst.network_address), r.metric)):
        if r.type == "unicast":
            lines.append(f"route replace {r.dst} dev {ifname} table {TABLE} proto 94 scope link metric {r.metric}")
        else:
            lines.append(f"route replace unreachable {r.dst} table {TABLE} proto 94 metric {r.metric}")
    for rule in config.rules:
        lines.append(f"rule add from {rule.src} lookup {TABLE} priority {rule.priority} protocol 94")
    return "".join(x + "\n" for x in lines)


def med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarize(n: int, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians of one N's rounds; the reference beyond start is paired with its N = 0 run per round.

    Checks hold for every run: ``peers_ok`` (N peers left), ``routes_ok``
    (2N routes left), ``verified`` (device == plan, with --verify)."""
    sn = runs["sealnet"]
    row: dict[str, Any] = {
        "n": n, "runs": len(sn),
        "peers_ok": all(r["peers_ok"] for rs in runs.values() for r in rs),
        "routes_ok": all(r["routes_ok"] for rs in runs.values() for r in rs),
        "added": min(r["added"] for r in sn),
        "noop_changes": max(r["noop_changes"] for r in sn),
        "one_change": sn[0]["one_change"] if all(r["one_change"] == sn[0]["one_change"] for r in sn) else None,
    }
    if any("verified" in r for r in sn):
        row["verified"] = all(r.get("verified", False) for r in sn)
    for key in ("wall_s", "work_s", "peers_s", "noop_s", "noop_again_s", "one_change_s"):
        row[key] = med(sn, key)
    row["rss_mib"] = max(r["rss_mib"] for r in sn)
    ref, ref0 = runs.get("wg setconf + ip -batch"), runs.get("ref0")
    if ref and ref0:
        row["setconf_s"], row["batch_s"], row["ref_s"] = med(ref, "setconf_s"), med(ref, "batch_s"), med(ref, "wall_s")
        row["ref_start_s"] = med(ref0, "wall_s")
        row["ref_beyond_s"] = statistics.median(a["wall_s"] - b["wall_s"] for a, b in zip(ref, ref0))
        row["ref_rss_mib"] = max(r["rss_mib"] for r in ref)
        row["ratio"] = row["work_s"] / row["ref_s"]
        row["ratio_beyond"] = row["work_s"] / max(row["ref_beyond_s"], 1e-3)
    per = runs.get("wg set per peer")
    if per:
        row["per_peer_s"] = med(per, "wall_s")
    row["ok"] = (row["peers_ok"] and row["routes_ok"] and row.get("verified", True) and not row["noop_changes"]
                 and row["added"] == n)
    return row


def tables(rows: list[dict[str, Any]], header: str) -> str:
    out = [header, "",
           "| N peers | sealnet work s (first apply; peers) | sealnet no-op pass s (first; steady) "
           "| one peer changed s | wg setconf s | ip -batch s (2N routes, rule) | wg setconf + ip -batch s "
           "(beyond start) | sealnet work / wg setconf + ip -batch (beyond start) | wg set per peer s "
           "| sealnet wall s | peak RSS MiB: sealnet, wg/ip |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(r: dict[str, Any], key: str, fmt: str = "{:.3f}") -> str:
        return fmt.format(r[key]) if key in r else "–"

    for r in rows:
        flag = "" if r["ok"] else " **CHECK FAILED**"
        ref = f"{cell(r, 'ref_s')} ({cell(r, 'ref_beyond_s')})" if "ref_s" in r else "–"
        ratio = f"{cell(r, 'ratio', '{:.2f}x')} ({cell(r, 'ratio_beyond', '{:.2f}x')})" if "ratio" in r else "–"
        rss = f"{r['rss_mib']:.0f}, {cell(r, 'ref_rss_mib', '{:.1f}')}"
        out.append(f"| {r['n']:,}{flag} | {r['work_s']:.3f} ({r['peers_s']:.3f}) | {r['noop_s']:.3f} "
                   f"({r['noop_again_s']:.3f}) | {r['one_change_s']:.3f} | {cell(r, 'setconf_s')} | {cell(r, 'batch_s')} "
                   f"| {ref} | {ratio} | {cell(r, 'per_peer_s')} | {r['wall_s']:.3f} | {rss} |")
    return "\n".join(out)


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
    parser.add_argument("--runs", type=int, default=3, help="rounds per N (medians)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + ("wg setconf",),
                        help="sealnet always runs; 'wg setconf' is short for the reference")
    parser.add_argument("--verify", action="store_true", help="compare the device with the plan after sealnet")
    parser.add_argument("--per-peer-max", type=int, default=None,
                        help="skip 'wg set per peer' above this N (one process per peer is slow)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON after the table")
    args = parser.parse_args(argv)
    args.methods = ["wg setconf + ip -batch" if m == "wg setconf" else m for m in args.methods]
    if args.cmd == "_worker":
        print(json.dumps(worker(args.spec, args.interface, args.backend, args.key_file, args.verify)))
        return 0
    if args.backend == "userspace" and shutil.which("wireguard-go") is None:
        parser.error("wireguard-go is not installed")
    load_before = os.getloadavg()
    reference = "wg setconf + ip -batch" in args.methods
    rows = []
    with tempfile.TemporaryDirectory(prefix="wgbench-") as tmp:
        bench = Bench(args.backend, Path(tmp))
        empty = make_nodes(0)
        for n in args.n:
            nodes = make_nodes(n)
            runs: dict[str, list[dict[str, Any]]] = {"sealnet": []}
            if reference:
                runs["wg setconf + ip -batch"], runs["ref0"] = [], []
            for i in range(args.runs):  # methods interleaved, so a burst of load hits both
                runs["sealnet"].append(bench.run("sealnet", nodes, args.verify))
                note = f"sealnet work {runs['sealnet'][-1]['work_s']:.3f} s, no-op {runs['sealnet'][-1]['noop_s']:.3f} s"
                if reference:
                    runs["wg setconf + ip -batch"].append(bench.run("wg setconf + ip -batch", nodes, False))
                    runs["ref0"].append(bench.run("wg setconf + ip -batch", empty, False))
                    note += f"; reference {runs['wg setconf + ip -batch'][-1]['wall_s']:.3f} s"
                print(f"  N={n} round {i + 1}: {note}", file=sys.stderr, flush=True)
            if "wg set per peer" in args.methods and (args.per_peer_max is None or n <= args.per_peer_max):
                runs["wg set per peer"] = [bench.run("wg set per peer", nodes, False)]
                print(f"  N={n} wg set per peer: {runs['wg set per peer'][0]['wall_s']:.3f} s", file=sys.stderr,
                      flush=True)
            rows.append(summarize(n, runs))
    load_after = os.getloadavg()
    label = "kernel module" if args.backend == "kernel" else "wireguard-go (userspace)"
    header = (f"backend: {label}; kernel {os.uname().release}; {os.cpu_count()} CPUs; load average "
              f"{', '.join(f'{x:.2f}' for x in load_before)} before, {', '.join(f'{x:.2f}' for x in load_after)} "
              f"after; median of {args.runs} rounds (wg set per peer: 1 run)")
    print(tables(rows, header))
    if args.json:
        print(json.dumps(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
