"""Benchmark: one agent, N simulated peers, an IPsec key rotation from Secret change to last peer switched.

The daemon's own code path, pass by pass: agent.cluster.datapaths
``IpsecDatapath.reconcile`` (agent.ipsec.rotation ``step`` / ``choose_egress``,
then agent.ipsec.datapath ``reconcile``: plan, diff, XFRM netlink) on
``PeerView`` objects made by agent.cluster.nodes ``translate`` from v1 Node
objects (decoded by lightkube, as the watch does), the keys file read and
watched by agent.cluster.keyswatch ``KeysFile`` in a Secret volume written
the way the kubelet writes it. For each N, in a fresh network namespace:

- initial: the keys file holds key 1 (one line); every peer advertises
  key 1 (``sealnet.io/ipsec-keys: "1"``): N out + N in SAs, N out / in / fwd
  policies, every out policy pinning our key-1 SPI;
- detect: the Secret changes to two lines (key 1 previous, key 2 current,
  as the Pulumi program writes it); the time from the kubelet-style swap
  until the watch has read and parsed the new file;
- pass A: key 2's SAs go in for every peer (in and out) and ``1,2`` is
  published; the peers still advertise ``1``, so egress stays on key 1;
- decode: the N peers' Nodes now advertise ``1,2``: the N watch events
  decoded and translated (lightkube model + translate, as kube.py does);
- pass B: every peer's out policy is updated to pin our key-2 SPI (one
  atomic policy update each); "Secret change -> last peer switched" is
  A + B (the detect and decode columns are given on their own);
- drop: ``--grace`` s after every peer advertised key 2 (the daemon's
  ``rotationGracePeriod``, 300 s by default; short here), key 1's SAs go
  and only ``2`` is published;
- no-op: one more pass on the unchanged state (a resync) changes nothing.

Each pass is split into netlink (time inside the XFRM socket's dump and
apply calls, measured by a wrapper around the datapath's Xfrm object) and
the rest (rotation, plan, diff, building messages). Every run is checked
after each pass: SAs per key ID and direction (the agent's dump), the
kernel's own totals (``ip xfrm state count``) and every policy as
``ip xfrm policy list`` prints it (count per direction, the SPI each out
policy pins), and what the pass publishes. Peak RSS is the child process's
(``ru_maxrss``). The keys are fixed benchmark keys, never printed.

    sudo .venv/bin/python -m lab exec -- python bench/ipsec_rotation.py    # SAs need ESP: the kernel lab
    .venv/bin/python bench/ipsec_rotation.py --no-kernel                   # host: same passes, in-memory XFRM
    sudo .venv/bin/python bench/ipsec_rotation.py --n 100 1000 --runs 3 --grace 1

``--no-kernel`` runs the same passes against an in-memory stand-in for the
XFRM socket (dump returns what was applied): planning, diff and message-free
bookkeeping only, for comparison with the kernel runs.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
NS = "sbrot"
LOCAL_NAME, LOCAL_IP, LOCAL_POD = "local", "172.31.0.1", "10.99.0.0/24"
SPI_PREFIX = 0x5
PHASES = ("initial", "detect", "a", "decode", "b", "drop", "noop")


def bench_key(key_id: int) -> bytes:
    """A fixed 20-byte benchmark key (AES-128 + salt); never printed."""
    return hashlib.sha256(f"sealnet ipsec rotation bench key {key_id}".encode()).digest()[:20]


def key_line(key_id: int) -> str:
    return f"{key_id}+ rfc4106(gcm(aes)) {bench_key(key_id).hex()} 128"


def peer_ip(i: int) -> str:
    return f"172.31.{1 + i // 250}.{1 + i % 250}"


def our_spi(key_id: int) -> int:
    low24 = int(ipaddress.ip_address(LOCAL_IP)) & 0xFFFFFF
    return (SPI_PREFIX << 28) | (low24 << 4) | key_id


# -- child: one N in one process ------------------------------------------------


class TimedXfrm:
    """The datapath's Xfrm, with the time spent inside its socket calls added up."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds = inner, 0.0

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - start

    def dump_sas(self) -> list:
        return self._timed(self.inner.dump_sas)

    def dump_policies(self) -> list:
        return self._timed(self.inner.dump_policies)

    def apply(self, changes: Iterable[Any]) -> list:
        changes = list(changes)  # built outside the timed part
        return self._timed(self.inner.apply, changes)

    def close(self) -> None:
        self.inner.close()


class MemoryXfrm:
    """--no-kernel: holds what was applied, keyed as the kernel identifies objects."""

    def __init__(self) -> None:
        self.sas: dict[tuple, Any] = {}
        self.policies: dict[tuple, Any] = {}

    def dump_sas(self) -> list:
        return list(self.sas.values())

    def dump_policies(self) -> list:
        return list(self.policies.values())

    def apply(self, changes: Iterable[Any]) -> list:
        from agent.kernel.xfrm import Verb
        from agent.model import SA

        for c in changes:
            table, key = ((self.sas, (c.obj.dst, c.obj.spi)) if isinstance(c.obj, SA)
                          else (self.policies, (c.obj.direction, c.obj.src, c.obj.dst)))
            if c.verb is Verb.DELETE:
                del table[key]
            else:
                table[key] = c.obj
        return []

    def close(self) -> None:
        pass


def node_dict(i: int, advertised: str) -> dict:
    from tests.fakeapi import node_object

    return node_object(f"peer-{i}", peer_ip(i), f"10.{100 + i // 250}.{i % 250}.0/24",
                       boot_id=f"{i:08x}-5ea1-4e7b-9c3d-000000000000",
                       annotations={"sealnet.io/ipsec-keys": advertised})


def local_dict() -> dict:
    from tests.fakeapi import node_object

    return node_object(LOCAL_NAME, LOCAL_IP, LOCAL_POD, boot_id="10ca1000-5ea1-4e7b-9c3d-000000000000")


def views_of(dicts: list[dict]) -> list:
    """As the watch does: lightkube's model of each Node, then agent.cluster.nodes.translate."""
    from lightkube.resources.core_v1 import Node as KubeNode

    from agent.cluster.nodes import translate

    return [translate(KubeNode.from_dict(d)) for d in dicts]


def kernel_state(xfrm: Any, netns: Optional[str]) -> dict:
    """What the kernel holds: SAs per (key ID, direction) and policies, checked two ways in a netns."""
    local = ipaddress.ip_address(LOCAL_IP)
    sas = xfrm.inner.dump_sas() if isinstance(xfrm, TimedXfrm) else xfrm.dump_sas()
    per_key = Counter((sa.spi & 0xF, "out" if sa.src == local else "in") for sa in sas if sa.spi >> 28 == SPI_PREFIX)
    state: dict[str, Any] = {"sas": {f"{k}/{d}": n for (k, d), n in sorted(per_key.items())}, "sa_total": len(sas)}
    if netns is None:
        pols = xfrm.inner.dump_policies()
        state["policies"] = dict(Counter(p.direction.name.lower() for p in pols))
        state["out_spis"] = dict(Counter(f"{p.templates[0].spi:#010x}" for p in pols
                                         if p.direction.name == "OUT" and p.templates))
        return state
    # The kernel's own accounts, not our codec's: iproute2 counts and prints them.
    count = subprocess.run(["ip", "-n", netns, "xfrm", "state", "count"], check=True, capture_output=True,
                           text=True).stdout.split()
    state["ip_sa_total"] = int(count[-1])
    text = subprocess.run(["ip", "-n", netns, "xfrm", "policy", "list"], check=True, capture_output=True,
                          text=True).stdout
    dirs: Counter = Counter()
    out_spis: Counter = Counter()
    direction = None
    for line in text.splitlines():
        m = re.match(r"\s+dir (\w+) ", line)
        if m:
            direction = m.group(1)
            dirs[direction] += 1
        m = re.search(r"proto esp spi (0x[0-9a-f]+)", line)
        if m and direction == "out":
            out_spis[f"{int(m.group(1), 16):#010x}"] += 1
    state["policies"], state["out_spis"] = dict(dirs), dict(out_spis)
    return state


def expect(state: dict, n: int, keys: tuple[int, ...], egress: int, netns: Optional[str]) -> None:
    want_sas = {f"{k}/{d}": n for k in sorted(keys) for d in ("in", "out")}
    problems = []
    if state["sas"] != want_sas:
        problems.append(f"SAs per key/direction {state['sas']}, expected {want_sas}")
    if netns is not None and state["ip_sa_total"] != 2 * n * len(keys):
        problems.append(f"ip xfrm state count {state['ip_sa_total']}, expected {2 * n * len(keys)}")
    if state["policies"] != {"out": n, "in": n, "fwd": n}:
        problems.append(f"policies per direction {state['policies']}, expected {n} each")
    if state["out_spis"] != {f"{our_spi(egress):#010x}": n}:
        problems.append(f"out policies pin {state['out_spis']}, expected all {n} on {our_spi(egress):#010x}")
    if problems:
        raise SystemExit(f"N={n}: kernel not in the expected state: " + "; ".join(problems))


def child(n: int, netns: Optional[str], grace: float, log_level: str) -> dict:
    from agent.cluster import annotations as ann
    from agent.cluster.config import AgentConfig, WireguardConfig
    from agent.cluster.datapaths import IpsecDatapath
    from agent.cluster.keyswatch import KeysFile
    from tests.kubelet import SecretVolume

    tmp = Path(tempfile.mkdtemp(prefix="ipsec-rotation-"))
    # Logged as the daemon logs (agent.cli: one line per change at info), into a file.
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        filename=str(tmp / "agent.log"))
    for name in ("pyroute2", "watchfiles"):
        logging.getLogger(name).setLevel(logging.INFO)
    volume = SecretVolume(tmp / "keys")
    volume.write({"keys": key_line(1) + "\n"})
    config = AgentConfig(mode="ipsec", node_encryption=False, per_node_keys=True, spi_prefix=SPI_PREFIX,
                         rotation_grace_period=grace, wireguard=WireguardConfig(), log_level="info",
                         metrics_port=0, health_port=0, state_dir=str(tmp / "state"),
                         keys_file=str(volume.path("keys")), allow_key_regeneration=False)
    changed = threading.Event()
    keys = KeysFile(volume.path("keys"), on_change=lambda reason: changed.set())
    if keys.load() is None:
        raise SystemExit(f"keys file refused: {keys.error}")
    stop = threading.Event()
    watcher = threading.Thread(target=keys.watch, args=(stop,), daemon=True)
    watcher.start()

    dp = IpsecDatapath(config, netns=netns)
    if netns is None:
        dp.xfrm.close()
        dp.xfrm = MemoryXfrm()
    xfrm = TimedXfrm(dp.xfrm)
    dp.xfrm = xfrm
    # The daemon's snapshot holds every Node, its own included (the planner takes the whole list).
    [own] = views_of([local_dict()])
    local = own.node
    on_key1 = [own, *views_of([node_dict(i, "1") for i in range(n)])]
    times: dict[str, float] = {}
    netlink: dict[str, float] = {}
    changes: dict[str, int] = {}
    checks: dict[str, dict] = {}

    def one_pass(name: str, views: list, published: str) -> Any:
        xfrm.seconds = 0.0
        start = time.perf_counter()
        outcome = dp.reconcile(local, views, keys.current)
        times[name] = time.perf_counter() - start
        netlink[name] = xfrm.seconds
        changes[name] = outcome.changes
        if outcome.failures:
            raise SystemExit(f"N={n} pass {name}: kernel refused {len(outcome.failures)} change(s): "
                             f"{outcome.failures[0]}")
        if outcome.publish.get(ann.IPSEC_KEYS) != published or len(outcome.served) != n:
            raise SystemExit(f"N={n} pass {name}: published {outcome.publish}, served {len(outcome.served)}")
        return outcome

    one_pass("initial", on_key1, "1")
    expect(checks.setdefault("initial", kernel_state(xfrm, netns)), n, (1,), 1, netns)

    # The Secret changes (kubelet swap) -> the watch has the new keys.
    time.sleep(0.7)  # let the watch settle on the first file (its 0.5 s re-read included)
    changed.clear()
    start = time.perf_counter()
    volume.write({"keys": key_line(1) + "\n" + key_line(2) + "\n"})
    if not changed.wait(30):
        raise SystemExit("the keys watch did not see the new file within 30 s")
    times["detect"], netlink["detect"], changes["detect"] = time.perf_counter() - start, 0.0, 0
    stop.set()
    if keys.current is None or keys.current.current.spi != 2:
        raise SystemExit("the watch did not load key 2 as current")

    a = one_pass("a", on_key1, "1,2")
    expect(checks.setdefault("a", kernel_state(xfrm, netns)), n, (1, 2), 1, netns)
    if set(a.egress.values()) != {1} or len(a.behind) != n:
        raise SystemExit(f"N={n} pass A: egress {Counter(a.egress.values())}, behind {len(a.behind)}")

    advertised = [node_dict(i, "1,2") for i in range(n)]
    start = time.perf_counter()
    on_both = [own, *views_of(advertised)]
    times["decode"], netlink["decode"], changes["decode"] = time.perf_counter() - start, 0.0, 0

    b = one_pass("b", on_both, "1,2")
    expect(checks.setdefault("b", kernel_state(xfrm, netns)), n, (1, 2), 2, netns)
    if set(b.egress.values()) != {2} or b.behind or b.wake_at is None:
        raise SystemExit(f"N={n} pass B: egress {Counter(b.egress.values())}, behind {len(b.behind)}")

    time.sleep(max(0.0, b.wake_at - time.monotonic()) + 0.01)  # the loop wakes for the drop
    c = one_pass("drop", on_both, "2")
    expect(checks.setdefault("drop", kernel_state(xfrm, netns)), n, (2,), 2, netns)
    if c.keys_installed != (2,):
        raise SystemExit(f"N={n} drop pass: keys installed {c.keys_installed}")
    one_pass("noop", on_both, "2")
    if changes["noop"]:
        raise SystemExit(f"N={n} no-op pass changed {changes['noop']} object(s)")
    dp.close()
    logging.shutdown()
    log_text = (tmp / "agent.log").read_text(errors="replace")
    if any(bench_key(k).hex() in log_text.lower() for k in (1, 2)):
        raise SystemExit("key material in the agent's log")
    return {"log_lines": log_text.count("\n"), "n": n, "times": times, "netlink": netlink, "changes": changes, "checks": checks,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# -- parent: one child per N and run ---------------------------------------------


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def measure(n: int, kernel: bool, grace: float, log_level: str) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--grace", str(grace),
            "--log-level", log_level]
    if kernel:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
        sh("ip", "netns", "add", NS)
        argv += ["--netns", NS]
    else:
        argv += ["--no-kernel"]
    try:
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    finally:
        if kernel:
            subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"N={n}: the run failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_s(seconds: float) -> str:
    return f"{seconds:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--runs", type=int, default=1, help="runs per N (median per cell)")
    parser.add_argument("--grace", type=float, default=1.0, help="rotationGracePeriod for the drop pass, s")
    parser.add_argument("--no-kernel", action="store_true", help="in-memory XFRM stand-in (planning only)")
    parser.add_argument("--log-level", default="info", help="the agent's log level (the daemon's default: info)")
    parser.add_argument("--netns", help=argparse.SUPPRESS)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, None if args.no_kernel else args.netns, args.grace,
                               args.log_level)))
        return 0
    kernel = not args.no_kernel
    if kernel and os.geteuid() != 0:
        raise SystemExit("needs root (a network namespace); or --no-kernel")
    where = "kernel lab VM (TCG emulation, no KVM)" if os.environ.get("SEALNET_IN_LAB") else "host"
    print(f"IPsec rotation, {'XFRM in a fresh netns' if kernel else 'no kernel (in-memory XFRM)'}; {where}; "
          f"kernel {platform.release()}; {os.cpu_count()} CPUs; load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; grace {args.grace} s; "
          f"agent log level {args.log_level} (to a file); {args.runs} run(s) per N, median\n", flush=True)
    rows = []
    for n in args.n:
        runs = []
        for _ in range(args.runs):
            started = time.time()
            runs.append(measure(n, kernel, args.grace, args.log_level))
            print(f"  N={n}: run done in {time.time() - started:.0f} s wall, checks passed "
                  f"(after B: SAs {runs[-1]['checks']['b']['sas']}, out policies pin "
                  f"{runs[-1]['checks']['b']['out_spis']}; after drop: SAs {runs[-1]['checks']['drop']['sas']})",
                  flush=True)
        med = {k: statistics.median(r["times"][k] for r in runs) for k in PHASES}
        nl = {k: statistics.median(r["netlink"][k] for r in runs) for k in PHASES}
        total = statistics.median(r["times"]["a"] + r["times"]["b"] for r in runs)
        rows.append((n, med, nl, total, runs[0]["changes"], max(r["rss_mib"] for r in runs)))
    print()
    print("| N peers | initial, key 1 s (netlink) | keys file change detected s | pass A: key 2 in, published s "
          "(netlink) | N advertisements decoded s | pass B: every egress switched s (netlink) | "
          "**Secret change -> last peer switched (A + B) s** | drop after grace s (netlink) | no-op pass s | "
          "changes: initial, A, B, drop | peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, med, nl, total, ch, rss in rows:
        print(f"| {n:,} | {fmt_s(med['initial'])} ({fmt_s(nl['initial'])}) | {fmt_s(med['detect'])} | "
              f"{fmt_s(med['a'])} ({fmt_s(nl['a'])}) | {fmt_s(med['decode'])} | {fmt_s(med['b'])} "
              f"({fmt_s(nl['b'])}) | **{fmt_s(total)}** | {fmt_s(med['drop'])} ({fmt_s(nl['drop'])}) | "
              f"{fmt_s(med['noop'])} | {ch['initial']}, {ch['a']}, {ch['b']}, {ch['drop']} | {rss:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
