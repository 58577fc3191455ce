"""Every Makefile target that runs a part of the test suite collects on its own.

`make unit` once failed at collection (``No module named 'tests'``) while `make test` passed,
because the full run happened to collect a folder that put the checkout on ``sys.path``
first. Each selection is collected here in a fresh interpreter started like the ``pytest``
console script (``-P``: the working directory is not put on ``sys.path``), so a selection
that only works beside another one fails this test."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEST_SH = "scripts/test.sh"
# scripts/test.sh --unit runs exactly this folder.
UNIT_SELECTION = ["tests/unit"]
# Like the pytest console script: -P keeps the working directory off sys.path.
PYTEST = [sys.executable, "-P", "-m", "pytest"]


def makefile_selections() -> dict[str, list[str]]:
    """Target -> the test paths its `scripts/test.sh` call selects ([] = the whole suite)."""
    selections: dict[str, list[str]] = {}
    target = None
    for line in (REPO / "Makefile").read_text(encoding="utf-8").splitlines():
        rule = re.match(r"^([A-Za-z][\w-]*)\s*:(?!=)", line)
        if rule:
            target = rule.group(1)
            continue
        if target is None or not line.startswith("\t") or TEST_SH not in line:
            continue
        args = shlex.split(line.split(TEST_SH, 1)[1])
        if "--unit" in args:
            selections[target] = UNIT_SELECTION
        else:
            selections[target] = [a for a in args if a.startswith("tests/")]
    return selections


SELECTIONS = makefile_selections()


def test_the_documented_targets_are_found() -> None:
    """The parser above still understands the Makefile (else the test below checks nothing)."""
    assert SELECTIONS.get("unit") == UNIT_SELECTION
    assert SELECTIONS.get("test") == []
    assert SELECTIONS.get("chaos") == ["tests/integration/test_chaos.py"]
    assert SELECTIONS.get("browser") == ["tests/browser"]


# The whole suite (`make test`) is left out: it is what every full run collects anyway.
PARTIAL = {target: paths for target, paths in SELECTIONS.items() if paths}


@pytest.fixture(scope="module")
def collections() -> dict[str, tuple[int, str]]:
    """Collect every partial selection at once (each pays the interpreter's start-up)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    procs = {
        target: subprocess.Popen(
            [*PYTEST, *paths, "--collect-only", "-q", "-p", "no:cacheprovider"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for target, paths in PARTIAL.items()
    }
    results = {}
    try:
        for target, proc in procs.items():
            out, _ = proc.communicate(timeout=180)
            results[target] = (proc.returncode, out)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.parametrize("target", sorted(PARTIAL))
def test_make_target_selection_collects_alone(
    target: str, collections: dict[str, tuple[int, str]]
) -> None:
    returncode, out = collections[target]
    tail = "\n".join(out.splitlines()[-30:])
    assert returncode == 0, f"`make {target}` ({' '.join(PARTIAL[target])}) fails:\n{tail}"
    assert re.search(r"^\d+ tests? collected", out, re.MULTILINE), tail
