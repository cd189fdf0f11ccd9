"""Boot the kernel lab once and run the kernel_lab tests inside it.

Our machines' kernel has no ESP, no gcm(aes) and no WireGuard module, so the
datapath is proven on Debian's stock kernel booted by virtme-ng under TCG
(software emulation; KVM guests hang on these machines). The VM shares the
host's root filesystem read-only, so the checkout and its virtualenv are the
same inside; one directory (``lab-results/``) is writable and brings back the
JUnit report, the guest's log and any captures.

    python -m lab run                       # every kernel_lab test
    python -m lab run tests/lab/test_seed.py -k esp   # one test while developing
    python -m lab exec -- python bench/ipsec_rotation.py   # any command (benchmarks); its exit code

Everything runs in one boot (~40 s under TCG). If the lab cannot boot, the
run fails with a message that says what is missing and how to install it;
``--optional`` turns that into a skip (exit 0) for machines without the lab.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
#: Each run writes into its own directory under here (runs may overlap while
#: developing); ``lab-results/latest`` points at the newest.
RESULTS_ROOT = ROOT / "lab-results"
# Modules the datapath tests need; loaded before pytest starts so that a
# missing one fails loudly here rather than as a confusing netlink error.
MODULES = ("esp4", "esp6", "xfrm_user", "xfrm4_tunnel", "wireguard")
#: Seconds one lab test may take (TCG is slow; the slowest test takes ~3 min alone).
TEST_TIMEOUT = 900
#: What ``python -m lab run`` runs when given no pytest arguments.
LAB_TESTS = ("tests/lab",)
#: The lab's watchdog: on a slow day TCG runs 3-4x slower than on an idle one
#: (the whole lab 738 s there); CI's limit is 90 minutes for everything.
LAB_TIMEOUT = 4800.0
INSTALL_HINT = "install them with: sudo scripts/install-deps (apt packages listed in apt-packages.txt)"


class LabUnavailable(Exception):
    """The lab cannot boot on this machine; the message says why and how to fix it."""


@dataclass(frozen=True)
class LabRun:
    returncode: int
    tests: int
    failures: int
    errors: int
    skipped: int
    boot_seconds: float
    wall_seconds: float

    def summary(self) -> str:
        passed = self.tests - self.failures - self.errors - self.skipped
        return (f"kernel lab: {passed} passed, {self.failures} failed, {self.errors} errors, "
                f"{self.skipped} skipped in {self.wall_seconds:.0f} s wall "
                f"(boot and module load {self.boot_seconds:.0f} s)")


def find_kernel() -> str:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"), key=_version_key)
    if not kernels:
        raise LabUnavailable(f"no kernel image in /boot (Debian package linux-image-amd64); {INSTALL_HINT}")
    return kernels[-1]


def _version_key(path: str) -> list[object]:
    parts: list[object] = []
    for chunk in os.path.basename(path).replace("-", ".").split("."):
        parts.append((0, int(chunk)) if chunk.isdigit() else (1, chunk))
    return parts


def check_tools() -> str:
    """Return the vng executable, or raise LabUnavailable naming what is missing."""
    vng = shutil.which("vng") or str(Path(sys.executable).parent / "vng")
    missing = []
    if not os.access(vng, os.X_OK):
        missing.append("vng (PyPI virtme-ng, in requirements-dev.txt)")
    if not shutil.which("qemu-system-x86_64"):
        missing.append("qemu-system-x86_64 (Debian qemu-system-x86)")
    if not any(os.path.exists(p) for p in ("/bin/busybox", "/usr/bin/busybox")):
        missing.append("a static busybox (Debian busybox-static)")
    if missing:
        raise LabUnavailable(f"the kernel lab needs {', '.join(missing)}; {INSTALL_HINT}")
    return vng


def guest_script(pytest_args: Sequence[str], results: Path, command: Optional[Sequence[str]] = None) -> str:
    """The shell script the guest runs: load modules, run pytest (or ``command``), record the exit code."""
    # Only tests/lab by default: collecting the whole suite imports Pulumi and
    # every host test under TCG, minutes of CPU for no kernel test.
    args = " ".join(shlex.quote(a) for a in (pytest_args or LAB_TESTS))
    if command is not None:
        body = " ".join(shlex.quote(a) for a in command)
    else:
        # A hung test fails with its stack (pytest-timeout) instead of eating the run.
        body = (f"python -m pytest -m kernel_lab -p no:cacheprovider --timeout={TEST_TIMEOUT} \\\n"
                f"  --junitxml={results}/junit.xml -v {args}")
    return f"""#!/bin/sh
set -u
export PATH={shlex.quote(str(Path(sys.executable).parent))}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 SEALNET_IN_LAB=1 HOME=/tmp SEALNET_LAB_RESULTS={results}
cd {shlex.quote(str(ROOT))}
for m in {' '.join(MODULES)}; do
  modprobe "$m" || {{ echo "lab: modprobe $m failed" >&2; echo 3 > {results}/rc; exit 3; }}
done
date +%s.%N > {results}/booted
{body}
echo $? > {results}/rc
"""


def run(pytest_args: Sequence[str], memory: str = "2G", timeout: float = LAB_TIMEOUT,
        command: Optional[Sequence[str]] = None) -> LabRun:
    vng = check_tools()
    kernel = find_kernel()
    results = RESULTS_ROOT / time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")
    results.mkdir(parents=True)
    latest = RESULTS_ROOT / "latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(results.name)
    script = results / "guest.sh"
    script.write_text(guest_script(pytest_args, results, command))
    script.chmod(0o755)
    argv = [vng, "--disable-kvm", "--force-9p", "--run", kernel, "--user", "root", "-m", memory,
            "--cpus", str(os.cpu_count() or 1), "--rwdir", str(results), "--exec", str(script)]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    print(f"kernel lab: booting {os.path.basename(kernel)} under TCG ...", flush=True)
    start = time.time()
    # qemu reopens its output by path: pipe it through us rather than into a
    # file, or the guest's stdout and stderr overwrite each other.
    with open(results / "console.log", "w") as log:
        # Its own session, so a timeout (or ^C) takes qemu down with vng.
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                errors="replace", start_new_session=True)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _kill_group(proc)

        watchdog = threading.Timer(timeout, expire)
        watchdog.start()
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                log.flush()
        finally:
            watchdog.cancel()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
    if expired.is_set():
        raise LabUnavailable(f"the lab VM did not finish within {timeout:.0f} s; see {results / 'console.log'}")
    wall = time.time() - start
    rc_file = results / "rc"
    if not rc_file.exists():
        raise LabUnavailable(f"the lab VM exited ({proc.returncode}) before running {'it' if command else 'pytest'}; "
                             f"see {results / 'console.log'}")
    booted = results / "booted"
    boot = float(booted.read_text()) - start if booted.exists() else wall
    counts = _junit_counts(results / "junit.xml")
    return LabRun(int(rc_file.read_text().strip() or 1), *counts, boot_seconds=boot, wall_seconds=wall)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _junit_counts(path: Path) -> tuple[int, int, int, int]:
    if not path.exists():
        return (0, 0, 0, 0)
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = [0, 0, 0, 0]
    for suite in suites:
        for i, key in enumerate(("tests", "failures", "errors", "skipped")):
            total[i] += int(suite.get(key, 0))
    return (total[0], total[1], total[2], total[3])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["exec"]:
        return _exec(args[1:])
    if not args or args[0] != "run":
        print(__doc__)
        return 2
    args = args[1:]
    optional = "--optional" in args
    args = [a for a in args if a != "--optional"]
    try:
        result = run(args)
    except LabUnavailable as e:
        if optional:
            print(f"kernel lab SKIPPED: {e}")
            return 0
        print(f"kernel lab FAILED: {e}", file=sys.stderr)
        return 1
    print(result.summary(), flush=True)
    if result.tests == 0:
        print("kernel lab FAILED: no test ran", file=sys.stderr)
        return 1
    if result.skipped and os.environ.get("CI"):
        print("kernel lab FAILED: tests were skipped inside the lab under CI", file=sys.stderr)
        return 1
    return result.returncode


def _exec(args: list[str]) -> int:
    """``exec [--timeout S] -- CMD ...``: boot once, run CMD (cwd: the checkout), return its exit code."""
    timeout = LAB_TIMEOUT
    if args[:1] == ["--timeout"] and len(args) > 1:
        timeout, args = float(args[1]), args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m lab exec [--timeout SECONDS] -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    try:
        result = run([], timeout=timeout, command=args)
    except LabUnavailable as e:
        print(f"kernel lab FAILED: {e}", file=sys.stderr)
        return 1
    print(f"kernel lab: {shlex.join(args)} exited {result.returncode} in {result.wall_seconds:.0f} s wall "
          f"(boot and module load {result.boot_seconds:.0f} s)", flush=True)
    return result.returncode
