"""Suite-wide settings.

Tests that need an external judge (dciodvfy, chromium, dcm2niix) skip with a clear reason when it is
absent. CI sets MEDIDIFF_REQUIRE_JUDGES=1 so such a skip becomes a failure there: the judges always run.
"""

from __future__ import annotations

import os

import pytest

_JUDGES = ("dciodvfy", "chromium", "dcm2niix")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("MEDIDIFF_REQUIRE_JUDGES") != "1" or not report.skipped:
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(judge in reason for judge in _JUDGES):
        report.outcome = "failed"
        report.longrepr = f"required judge missing in CI (MEDIDIFF_REQUIRE_JUDGES=1): {reason}"
