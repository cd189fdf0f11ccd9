"""Suite-wide gates.

Tests marked ``kernel_lab`` need ESP, gcm(aes) or kernel WireGuard, which
only the lab VM has. ``python -m lab run`` runs them there (with
SEALNET_IN_LAB=1); anywhere else they are skipped with the command that runs
them. The README's test command runs the host suite with
``-m "not kernel_lab"`` and then the lab, so in CI nothing is skipped: a lab
that cannot boot fails the run.

Tests marked ``privileged`` need root (network namespaces, XFRM policies).
"""

from __future__ import annotations

import os

import pytest

IN_LAB = os.environ.get("SEALNET_IN_LAB") == "1"

if IN_LAB:
    # The checkout is read-only inside the lab VM: keep hypothesis' example
    # database in memory instead of warning about .hypothesis/.
    from hypothesis import settings

    settings.register_profile("lab", database=None)
    settings.load_profile("lab")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    lab_skip = pytest.mark.skip(
        reason="kernel_lab: needs the lab kernel (ESP, gcm(aes), WireGuard); run: python -m lab run "
        "[this test's path]"
    )
    root_skip = pytest.mark.skip(reason="privileged: needs root (network namespaces); run as root")
    for item in items:
        if "kernel_lab" in item.keywords and not IN_LAB:
            item.add_marker(lab_skip)
        # Under CI a privileged test never skips: without root it fails.
        if "privileged" in item.keywords and os.geteuid() != 0 and not os.environ.get("CI"):
            item.add_marker(root_skip)
