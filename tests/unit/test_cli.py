"""shared.cli.load and the real console modules: a wrong argument or setting ends the process
with status 2 and one stderr line naming the culprit."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from shared.cli import load
from shared.settings import EdgeSettings, IngestSettings


def edge_from_env(env: Mapping[str, str]) -> EdgeSettings:
    """``EdgeSettings.from_env`` with auth off: auth defaults to jwt and needs a key, which
    tests/unit/test_security_settings.py covers."""
    return EdgeSettings.from_env({"CRM_EVENTS_AUTH_MODE": "off", **env})


REPO = Path(__file__).resolve().parents[2]
PROG = "crm-events-test"
FromEnv = Callable[[Mapping[str, str]], Any]


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    ("argv", "culprit"),
    [
        pytest.param(["--bogus"], "'--bogus'", id="unknown-flag"),
        pytest.param(["check"], "'check'", id="positional"),
        pytest.param(["--check-config", "-x"], "'-x'", id="after-a-good-one"),
        pytest.param(["--check-config=yes"], "'--check-config=yes'", id="flag-with-value"),
        pytest.param(["--bo\ngus"], "'--bo\\ngus'", id="newline-in-argument"),
    ],
)
def test_unknown_argument_exits_2_with_one_line_naming_it(
    argv: list[str], culprit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        load(PROG, argv, {}, edge_from_env)

    assert info.value.code == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith(f"{PROG}: error: ")
    assert culprit in lines[0]


@pytest.mark.parametrize(
    ("from_env", "env"),
    [
        pytest.param(edge_from_env, {"CRM_EVENTS_EDGE_PORT": "abc"}, id="edge-port"),
        pytest.param(edge_from_env, {"CRM_EVENTS_EDGE_PORT": "1\n2"}, id="port-newline"),
        pytest.param(edge_from_env, {"CRM_EVENTS_LOG_LEVEL": "LO\nUD"}, id="level-newline"),
        pytest.param(
            IngestSettings.from_env, {"CRM_EVENTS_KAFKA_TOPIC": "bad topic"}, id="ingest-topic"
        ),
        pytest.param(
            IngestSettings.from_env, {"CRM_EVENTS_KAFKA_BOOTSTRAP": "nohost"}, id="bootstrap"
        ),
    ],
)
def test_bad_setting_exits_2_with_one_line_naming_the_variable(
    from_env: FromEnv, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    (var,) = env

    with pytest.raises(SystemExit) as info:
        load(PROG, [], env, from_env)

    assert info.value.code == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith(f"{PROG}: error: ")
    assert var in lines[0]


@pytest.mark.parametrize(
    ("argv", "check_only"),
    [
        pytest.param([], False, id="no-arguments"),
        pytest.param(["--check-config"], True, id="check-config"),
        pytest.param(["--check-config", "--check-config"], True, id="check-config-twice"),
    ],
)
def test_load_returns_settings_and_check_only(argv: list[str], check_only: bool) -> None:
    settings, got_check_only = load(PROG, argv, {"CRM_EVENTS_EDGE_PORT": "9100"}, edge_from_env)

    assert isinstance(settings, EdgeSettings)
    assert settings.port == 9100
    assert got_check_only is check_only


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0_with_usage_even_when_settings_are_bad(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        load(PROG, [flag], {"CRM_EVENTS_EDGE_PORT": "abc"}, edge_from_env)

    assert info.value.code == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"usage: {PROG} [--check-config]")
    assert "--check-config" in out.out
    assert out.err == ""


# --- the real console modules, as subprocesses -----------------------------------------------

# Two runs, one per console module (each pays ~0.7 s of imports). The edge run also has a bad
# setting: arguments are checked first, so its one line names the argument.
CONSOLE_CASES: dict[str, tuple[list[str], dict[str, str], str]] = {
    "edge-bogus-argument": (
        ["-m", "edge", "--bogus"],
        {"CRM_EVENTS_EDGE_PORT": "notaport"},
        "'--bogus'",
    ),
    "ingest-bad-topic": (
        ["-m", "ingest"],
        {"CRM_EVENTS_KAFKA_TOPIC": "bad topic"},
        "CRM_EVENTS_KAFKA_TOPIC",
    ),
}


@pytest.fixture(scope="module")
def console_runs() -> dict[str, tuple[int, str]]:
    """Run every console case at once (each pays the interpreter's start-up), then collect."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CRM_EVENTS_")}
    procs = {
        name: subprocess.Popen(
            [sys.executable, *args],
            env={**base, **env},
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, env, _) in CONSOLE_CASES.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=30)
            results[name] = (proc.returncode, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.parametrize("case", list(CONSOLE_CASES))
def test_console_module_refuses_with_one_line(
    case: str, console_runs: dict[str, tuple[int, str]]
) -> None:
    returncode, err = console_runs[case]
    culprit = CONSOLE_CASES[case][2]

    assert returncode == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert culprit in lines[0]
