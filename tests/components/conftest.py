"""Shared fixtures for the Pulumi program's tests (mock engine, no CLI).

``run`` runs __main__.py on fresh mocks with Pulumi.yaml's defaults, a test
agent image and the given overrides, and fails the test if the program
raised; tests that expect an error call harness.run_program directly.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest

from tests.components.harness import ProgramRun, run_program

#: What every agent-mode test stack needs besides Pulumi.yaml's defaults.
BASE: dict[str, Any] = {"agentImage": "registry.test/sealnet-agent:1.0"}


@pytest.fixture
def run() -> Callable[..., ProgramRun]:
    def _run(overrides: Optional[dict[str, Any]] = None, **kwargs: Any) -> ProgramRun:
        result = run_program({**BASE, **(overrides or {})}, **kwargs)
        if result.error is not None:
            raise AssertionError(f"program failed: {result.error!r}") from result.error
        return result

    return _run
