"""Suite-wide policy: under ``CI=true`` a skipped test fails the run (issue 17).

A check that skips proves nothing, and a skip is easy to miss in a green run: a folder that
exists on one machine only once skipped 35 tests for every user. So in CI every skip is a
failure unless :data:`CI_SKIP_ALLOWLIST` lists its test file together with its reason, word for
word (a reason allowed in one file is not allowed in another that happens to reuse it). A new
entry goes there consciously, with a comment saying why it may skip in CI. Outside CI a skip
is a skip.

The skipped tests still show as skipped (``-ra`` lists them); after the run a section names the
refused ones and the session's exit status becomes "tests failed". Skips at collection (a
module-level ``pytest.skip``/``importorskip``) count too; ``xfail`` outcomes are not skips.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest

#: Skips allowed under CI=true: (test file, as in the node id; reason, exactly as the test
#: states it).
CI_SKIP_ALLOWLIST: frozenset[tuple[str, str]] = frozenset(
    {
        # The benchmark's load generator needs Go >= 1.22 (bench/loadgen/go.mod). `make
        # install` does not install Go (Debian 12 ships 1.19), so a CI image built by it alone
        # has none; the product code needs no Go.
        (
            "tests/bench/test_smoke.py",
            "Go is not installed: the load generator (bench/loadgen) needs it",
        ),
        # The Kafka-restart fault test stops and starts the stack's own Kafka. scripts/test.sh
        # supports running the suite against a broker the stack does not run
        # (CRM_EVENTS_TEST_KAFKA pointing elsewhere), which this test has no way to restart;
        # every other test still runs against that broker.
        (
            "tests/integration/test_faults.py",
            "the test Kafka is not the stack's own, so it cannot be restarted here",
        ),
    }
)

CI_VALUES = frozenset({"true", "1"})
SKIPPED_PREFIX = "Skipped: "


def ci_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """``CI=true`` (as CI services set it) or ``CI=1``."""
    return environ.get("CI", "").strip().lower() in CI_VALUES


def report_file(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The test file a report belongs to (its node id up to the first ``::``)."""
    return report.nodeid.split("::", 1)[0]


def skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The reason a skipped report carries, without pytest's "Skipped: " prefix."""
    longrepr = report.longrepr
    message = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return message.removeprefix(SKIPPED_PREFIX)


class CiSkipPolicy:
    """Collects the skips whose reason is not allowlisted and fails the session on them."""

    def __init__(self) -> None:
        self.refused: list[tuple[str, str]] = []

    def _check(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        reason = skip_reason(report)
        if (report_file(report), reason) not in CI_SKIP_ALLOWLIST:
            self.refused.append((report.nodeid, reason))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._check(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._check(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.refused and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.refused:
            return
        tr = terminalreporter
        tr.write_sep("=", f"{len(self.refused)} skipped under CI=true, not allowed", red=True)
        for nodeid, reason in self.refused:
            tr.write_line(f"SKIP NOT ALLOWED IN CI {nodeid}: {reason}")
        tr.write_line(
            "Under CI=true a skip fails the run: fix its cause, or add its test file and "
            "reason to CI_SKIP_ALLOWLIST in tests/conftest.py with a comment saying why it may "
            "skip in CI."
        )


def pytest_configure(config: pytest.Config) -> None:
    if ci_enabled():
        config.pluginmanager.register(CiSkipPolicy(), "crm-events-ci-skip-policy")
