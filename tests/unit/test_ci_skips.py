"""The CI skip policy of tests/conftest.py, run for real: pytest in a subprocess, on a small test
file in a temporary folder, with the project's conftest loaded as a plugin (``-p
tests.conftest``), under ``CI=true`` and without it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CI_SKIP_ALLOWLIST, ci_enabled

REPO = Path(__file__).resolve().parents[2]
UNLISTED = "a reason nobody allowed"


def _run(tmp_path: Path, files: dict[str, str], ci: str | None) -> subprocess.CompletedProcess[str]:
    for name, source in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in {"CI", "PYTEST_ADDOPTS"}}
    # Only the policy is under test: the venv's third-party plugins would cost ~5 s a run.
    env.update(PYTHONPATH=str(REPO), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    if ci is not None:
        env["CI"] = ci
    argv = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    return subprocess.run(
        [*argv, "-rs"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )


def _out(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def _skip_test(reason: str, path: str = "test_sample.py") -> dict[str, str]:
    source = "import pytest\n\ndef test_ok():\n    pass\n\n"
    return {path: f"{source}def test_skips():\n    pytest.skip({reason!r})\n"}


def test_an_unlisted_skip_fails_the_run_under_ci(tmp_path: Path) -> None:
    result = _run(tmp_path, _skip_test(UNLISTED), ci="true")
    out = _out(result)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "1 skipped under CI=true, not allowed" in out
    assert f"SKIP NOT ALLOWED IN CI test_sample.py::test_skips: {UNLISTED}" in out
    assert "CI_SKIP_ALLOWLIST in tests/conftest.py" in out


def test_without_ci_a_skip_is_just_a_skip(tmp_path: Path) -> None:
    for ci in (None, "false", ""):
        result = _run(tmp_path, _skip_test(UNLISTED), ci=ci)
        out = _out(result)
        assert result.returncode == pytest.ExitCode.OK, out
        assert "1 passed, 1 skipped" in out and "not allowed" not in out


@pytest.mark.parametrize(("path", "reason"), sorted(CI_SKIP_ALLOWLIST))
def test_an_allowlisted_skip_passes_under_ci(tmp_path: Path, path: str, reason: str) -> None:
    result = _run(tmp_path, _skip_test(reason, path), ci="true")
    out = _out(result)
    assert result.returncode == pytest.ExitCode.OK, out
    assert "1 passed, 1 skipped" in out and "not allowed" not in out


@pytest.mark.parametrize(("path", "reason"), sorted(CI_SKIP_ALLOWLIST))
def test_an_allowlisted_reason_in_another_test_file_fails_under_ci(
    tmp_path: Path, path: str, reason: str
) -> None:
    """An entry allows its reason in its own file only: another test that reuses the words
    (a copy-paste, a generic message) is refused like any unlisted skip."""
    other = str(Path(path).with_name("test_other.py"))
    result = _run(tmp_path, _skip_test(reason, other), ci="true")
    out = _out(result)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert f"SKIP NOT ALLOWED IN CI {other}::test_skips: {reason}" in out


def test_skipif_marks_and_collection_skips_count_xfail_does_not(tmp_path: Path) -> None:
    """A ``skipif`` mark and a module-level skip (reported at collection) are refused like a
    ``pytest.skip`` in a test; an expected failure is not a skip."""
    files = {
        "test_module_skip.py": (
            "import pytest\n\npytest.skip('module not wanted', allow_module_level=True)\n"
        ),
        "test_sample.py": (
            "import pytest\n\n"
            "@pytest.mark.skipif(True, reason='marked off')\n"
            "def test_marked():\n    pass\n\n"
            "@pytest.mark.xfail(reason='known bug', strict=True)\n"
            "def test_known_bug():\n    assert False\n"
        ),
    }
    result = _run(tmp_path, files, ci="true")
    out = _out(result)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "2 skipped under CI=true, not allowed" in out
    refused = [line for line in out.splitlines() if line.startswith("SKIP NOT ALLOWED IN CI")]
    assert refused == [
        "SKIP NOT ALLOWED IN CI test_module_skip.py: module not wanted",
        "SKIP NOT ALLOWED IN CI test_sample.py::test_marked: marked off",
    ], out
    assert "1 xfailed" in out


def test_a_ci_run_with_no_skips_passes(tmp_path: Path) -> None:
    result = _run(tmp_path, {"test_sample.py": "def test_ok():\n    pass\n"}, ci="true")
    assert result.returncode == pytest.ExitCode.OK, _out(result)


def test_ci_detection() -> None:
    assert ci_enabled({"CI": "true"}) and ci_enabled({"CI": "TRUE"}) and ci_enabled({"CI": "1"})
    assert not ci_enabled({}) and not ci_enabled({"CI": "false"}) and not ci_enabled({"CI": ""})


def test_every_allowlisted_reason_is_a_skip_the_suite_has() -> None:
    """An entry whose skip is gone (fixed, reworded, or moved to another file) must leave the
    list rather than linger as a blanket permission: its file exists and states its reason."""
    for path, reason in CI_SKIP_ALLOWLIST:
        assert path.startswith("tests/") and path.endswith(".py"), path
        source = (REPO / path).read_text(encoding="utf-8")
        assert f'"{reason}"' in source or f"'{reason}'" in source, (path, reason)


def test_ci_run_turns_the_policy_on_when_the_runner_does_not(tmp_path: Path) -> None:
    """.ci/run is the project's own CI: the skip policy applies there even on a runner that
    sets no CI variable, and a runner's own value is kept. `make test` there leaves out only
    the unit tests `make unit` ran just before, keeping a runner's own pytest options."""
    stub = tmp_path / "make"
    stub.write_text('#!/bin/sh\necho "make $1 CI=${CI-unset} ADDOPTS=${PYTEST_ADDOPTS-}"\n')
    stub.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    base["PATH"] = f"{tmp_path}{os.pathsep}{base.get('PATH', '')}"
    for ci, expected in ((None, "true"), ("1", "1")):
        env = base if ci is None else {**base, "CI": ci}
        result = subprocess.run(
            [str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            f"make unit CI={expected} ADDOPTS=",
            f"make test CI={expected} ADDOPTS=--ignore=tests/unit",
        ]
    result = subprocess.run(
        [str(REPO / ".ci" / "run")],
        env={**base, "PYTEST_ADDOPTS": "-x"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.splitlines()[-1] == "make test CI=true ADDOPTS=-x --ignore=tests/unit"
