"""The agent's pure core type-checks under ``mypy --strict`` (STYLE.md section 11).

The list grows as modules join the strict set; a module here that stops
type-checking fails the suite with mypy's own report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STRICT = ["agent/model.py", "agent/ipsec/keys.py", "agent/ipsec/derive.py", "agent/ipsec/plan.py", "agent/ipsec/diff.py"]


def test_pure_core_is_mypy_strict_clean(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", f"--cache-dir={tmp_path}", *STRICT],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
