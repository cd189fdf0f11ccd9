"""`make deploy` on a machine that lacks the Pulumi CLI, kubectl or a cluster
says exactly what is missing and how to get it, and never shows a stack trace.
The tools are replaced by small fakes on PATH; nothing is deployed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _fake(bin_dir: Path, name: str, exit_code: int) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    path.chmod(0o755)


def _deploy(bin_dir: Path) -> subprocess.CompletedProcess[str]:
    for tool in ("bash", "sed", "tr", "dirname", "env", "cat", "printf"):
        real = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if real and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(real)
    return subprocess.run([str(ROOT / "scripts" / "deploy")], capture_output=True, text=True,
                          env={"PATH": str(bin_dir), "HOME": str(bin_dir)}, timeout=30)


@pytest.mark.parametrize(
    "tools, expect",
    [
        ({}, ["the Pulumi CLI is not installed", "curl -fsSL https://get.pulumi.com | sh"]),
        ({"pulumi": 0}, ["kubectl is not installed", "kubernetes.io/docs/tasks/tools"]),
        ({"pulumi": 0, "kubectl": 1}, ["no Kubernetes cluster answers for context kind-kind",
                                       "kind create cluster --config docs/kind-cluster.yaml",
                                       "kind load docker-image sealnet-agent:dev"]),
    ],
    ids=["no-pulumi", "no-kubectl", "no-cluster"],
)
def test_deploy_names_what_is_missing_and_how_to_get_it(tmp_path: Path, tools: dict[str, int],
                                                         expect: list[str]) -> None:
    for name, code in tools.items():
        _fake(tmp_path, name, code)
    proc = _deploy(tmp_path)
    assert proc.returncode == 1
    for text in expect:
        assert text in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (ROOT / ".pulumi-state").exists() or os.listdir(ROOT / ".pulumi-state") == []
