"""Benchmark: program N XFRM policies (or SAs) into a fresh netns, three ways.

For each N the same objects are written into a new network namespace by

- ``agent``: one process that opens an XFRM socket in the netns and calls
  ``Xfrm.apply`` once (batched netlink, agent.kernel.xfrm); and, to show
  what batching buys, the same with ``batch_size=1`` (one request, one wait);
- ``ip -batch``: one iproute2 process reading one command per object;
- ``ip per object``: one ``ip xfrm ...`` process per object (a shell loop);

plus each tool's process-start baseline (N = 0: the agent's interpreter,
imports and socket; ``ip -batch`` of an empty file). Wall time is the median
of ``--repeat`` rounds (the per-object way runs once). "Beyond start" is,
for the agent, its own time once imported and connected (building the
objects, the apply call); for ``ip -batch``, the paired difference N minus
0 within a round. Peak RSS comes
from wait4(). A warm-up run of each cell is discarded. Every run is checked: the netns must hold exactly N objects.

    sudo .venv/bin/python bench/xfrm_policies.py                 # policies, host
    sudo .venv/bin/python bench/xfrm_policies.py --sas           # SAs: kernel lab only
    sudo .venv/bin/python bench/xfrm_policies.py --n 100 1000 --repeat 5

Policies are what a node holds per peer (out with the SPI pinned, in, fwd);
SAs are rfc4106(gcm(aes)) with ESN and a 1024 window. The key is a fixed
benchmark key, never printed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence, Union

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.model import (  # noqa: E402  (after the path fix, for `python bench/...`)
    SA, AeadAlgorithm, Direction, KeyMaterial, Policy, Template,
)

REQID = 0x5EA1
BENCH_KEY = KeyMaterial(bytes(range(1, 21)))
LOCAL = ipaddress.IPv4Address("172.18.0.2")
LOCAL_PODS = ipaddress.IPv4Network("10.244.0.0/24")
Obj = Union[Policy, SA]


def _peer(i: int) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Network]:
    ip = ipaddress.IPv4Address(int(ipaddress.IPv4Address("172.19.0.1")) + i)
    pods = ipaddress.IPv4Network((int(ipaddress.IPv4Address("10.128.0.0")) + (i << 8), 24))
    return ip, pods


def make_policies(n: int) -> list[Policy]:
    """n policies: out (SPI pinned), in and fwd for peer 0, 1, ..."""
    out = []
    for i in range(n):
        peer, pods = _peer(i // 3)
        spi = 0x5 << 28 | (int(peer) & 0xFFFFFF) << 4 | 1
        if i % 3 == 0:
            out.append(Policy(Direction.OUT, LOCAL_PODS, pods, 10100,
                              templates=(Template(LOCAL, peer, REQID, spi),)))
        else:
            out.append(Policy(Direction.IN if i % 3 == 1 else Direction.FWD, pods, LOCAL_PODS, 10100,
                              templates=(Template(peer, LOCAL, REQID),)))
    return out


def make_sas(n: int) -> list[SA]:
    """n SAs: out and in for peer 0, 1, ..., each with its sender's SPI."""
    out = []
    for i in range(n):
        peer, _ = _peer(i // 2)
        src, dst = (LOCAL, peer) if i % 2 == 0 else (peer, LOCAL)
        spi = 0x5 << 28 | (int(src) & 0xFFFFFF) << 4 | 1
        out.append(SA(src, dst, spi, REQID, AeadAlgorithm("rfc4106(gcm(aes))", BENCH_KEY, 128),
                      replay_window=1024, esn=True))
    return out


def ip_args(obj: Obj) -> list[str]:
    """The iproute2 arguments that add ``obj`` (no shell quoting needed)."""
    if isinstance(obj, Policy):
        args = ["xfrm", "policy", "add", "src", str(obj.src), "dst", str(obj.dst),
                "dir", obj.direction.name.lower(), "priority", str(obj.priority)]
        for t in obj.templates:
            args += ["tmpl", "src", str(t.src), "dst", str(t.dst), "proto", "esp"]
            args += ["spi", f"{t.spi:#x}"] if t.spi else []
            args += ["reqid", str(t.reqid), "mode", "tunnel"]
        return args
    alg = obj.algorithm
    assert isinstance(alg, AeadAlgorithm)
    return ["xfrm", "state", "add", "src", str(obj.src), "dst", str(obj.dst), "proto", "esp",
            "spi", f"{obj.spi:#x}", "reqid", str(obj.reqid), "mode", "tunnel",
            "replay-window", str(obj.replay_window), "flag", "esn",
            "aead", alg.name, "0x" + bytes(alg.key).hex(), str(alg.icv_bits)]


def run(argv: Sequence[str]) -> tuple[float, int, str]:
    """Run a process; return (wall seconds, peak RSS KiB, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if proc.returncode:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {err.decode()[-500:]}")
    return wall, usage.ru_maxrss, out.decode()


class Netns:
    def __init__(self) -> None:
        self.name = f"sealnet-bench-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> str:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        return self.name

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def count(netns: str, sas: bool) -> int:
    text = subprocess.run(["ip", "-n", netns, "xfrm", "state" if sas else "policy", "count"],
                          capture_output=True, text=True, check=True).stdout.split()
    return int(text[-1]) if sas else sum(int(text[i]) for i in (2, 4, 6))


def measure(way: str, n: int, sas: bool, workdir: str) -> tuple[float, int, float, float]:
    """One run of one way into a fresh netns: (wall s, peak RSS KiB, and for
    the agent: seconds in the apply call, seconds after its imports)."""
    objs: list[Obj] = list(make_sas(n) if sas else make_policies(n))
    inner = work = 0.0
    with Netns() as netns:
        if way.startswith("agent"):
            batch = "1" if way == "agent unbatched" else "128"
            wall, rss, out = run([sys.executable, __file__, "--child", netns, str(n), batch]
                                 + (["--sas"] if sas else []))
            inner, work = json.loads(out)["apply_s"], json.loads(out)["work_s"]
        elif way == "ip -batch":
            path = os.path.join(workdir, "batch")
            with open(path, "w") as f:
                f.writelines(" ".join(ip_args(o)) + "\n" for o in objs)
            wall, rss, _ = run(["ip", "-n", netns, "-batch", path])
        else:
            start, rss = time.perf_counter(), 0
            for o in objs:
                rss = max(rss, run(["ip", "-n", netns, *ip_args(o)])[1])
            wall = time.perf_counter() - start
        got = count(netns, sas)
        if got != n:
            raise SystemExit(f"{way}: netns holds {got} objects, expected {n}")
    return wall, rss, inner, work


def child(netns: str, n: int, batch_size: int, sas: bool) -> None:
    """The agent side: what a node agent does to program n objects."""
    from agent.kernel.xfrm import Change, Verb, Xfrm

    with Xfrm.open(netns=netns, batch_size=batch_size) as xfrm:
        # process start ends here (interpreter, pyroute2 imported, socket open
        # in the netns), as ip's own start and netns switch are its N=0 run
        begin = time.perf_counter()
        objs: list[Obj] = list(make_sas(n) if sas else make_policies(n))
        start = time.perf_counter()
        failures = xfrm.apply(Change(Verb.ADD, o) for o in objs)
        elapsed = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{len(failures)} refused, first: {failures[0].error}")
    print(json.dumps({"apply_s": elapsed, "work_s": time.perf_counter() - begin}))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--sas", action="store_true", help="SAs instead of policies (needs ESP: lab)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per cell (median)")
    parser.add_argument("--per-object-max", type=int, default=5000,
                        help="skip one-ip-per-object above this N")
    parser.add_argument("--child", nargs=3, metavar=("NETNS", "N", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.sas)
        return 0

    kind = "SAs" if args.sas else "policies"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# {kind} into a fresh netns; kernel {os.uname().release}; {os.cpu_count()} CPUs, "
          f"load average {load}; median of {args.repeat} (unbatched and per-object: 1 run)",
          flush=True)

    def rounds(n: int) -> tuple[tuple, tuple, float, float]:
        """Medians over rounds. Beyond start: the agent times itself once
        imported and connected (interpreter and pyroute2 start vary by tens
        of ms from run to run, more than the work); ip's start is ~2 ms, so
        its N=0 run is subtracted, paired within the round."""
        for way in ("agent", "ip -batch"):  # warm-up (page cache, bytecode), not counted
            measure(way, n, args.sas, tmp)
        runs: dict[str, list] = {"a": [], "b0": [], "b": []}
        for _ in range(args.repeat):
            runs["a"].append(measure("agent", n, args.sas, tmp))
            runs["b0"].append(measure("ip -batch", 0, args.sas, tmp))
            runs["b"].append(measure("ip -batch", n, args.sas, tmp))

        def med(key: str) -> tuple[float, int, float]:
            return (statistics.median(r[0] for r in runs[key]), max(r[1] for r in runs[key]),
                    statistics.median(r[2] for r in runs[key]))

        a_net = statistics.median(r[3] for r in runs["a"])
        b_net = statistics.median(b[0] - z[0] for b, z in zip(runs["b"], runs["b0"]))
        return med("a"), med("b"), a_net, b_net

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        agent0 = ipb0 = (0.0, 0, 0.0)
        for n in [0] + list(args.n):
            agent, ipb, a_net, b_net = rounds(n)
            if n == 0:
                agent0, ipb0 = agent, ipb
                continue
            single = measure("agent unbatched", n, args.sas, tmp)
            per = measure("per-object", n, args.sas, tmp) if n <= args.per_object_max else None
            rows.append((n, agent, ipb, a_net, b_net, single, per))
            print(f"  N={n} done", file=sys.stderr, flush=True)

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:,.0f}"

    print(f"\n| N {kind} | agent: total (beyond start; apply call) ms | agent unbatched: apply call ms "
          f"| ip -batch: total (beyond start) ms | one ip per object: total ms "
          f"| agent / ip -batch, beyond start | per-object / agent: total, beyond start "
          f"| peak RSS MiB: agent, ip -batch, ip |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| 0 (process start) | {ms(agent0[0])} | – | {ms(ipb0[0])} | – | – | – | "
          f"{agent0[1] / 1024:.0f}, {ipb0[1] / 1024:.1f}, – |")
    for n, agent, ipb, a_net, b_net, single, per in rows:
        per_txt = f"{ms(per[0])}" if per else "skipped"
        ratios = f"{per[0] / agent[0]:.0f}x, {per[0] / a_net:.0f}x" if per else "–"
        per_rss = f"{per[1] / 1024:.1f}" if per else "–"
        print(f"| {n:,} | {ms(agent[0])} ({ms(a_net)}; {ms(agent[2])}) | {ms(single[2])} | "
              f"{ms(ipb[0])} ({ms(b_net)}) | "
              f"{per_txt} | {a_net / max(b_net, 1e-3):.1f}x | {ratios} | "
              f"{agent[1] / 1024:.0f}, {ipb[1] / 1024:.1f}, {per_rss} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
