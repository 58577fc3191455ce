"""shared.cli and the console scripts: a wrong argument or setting ends the process with
status 2 and one stderr line naming the culprit, before anything starts; --help prints usage
and says where the settings are documented; --version prints the version. Every console
script (crm-events-ingest, -edge, -token, -stack, -producer) is held to it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import jwt
import pytest

from devtools import producer, stack
from edge import __main__ as edge_main
from edge import token_cli
from edge.auth import Authenticator
from ingest import __main__ as ingest_main
from shared.cli import load
from shared.httpkit import ApiError
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
        pytest.param(
            ["--check-config=yes"],
            "--check-config: ignored explicit argument 'yes'",
            id="flag-with-value",
        ),
        pytest.param(["--check"], "'--check'", id="no-abbreviations"),
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
    assert out.out.startswith(f"usage: {PROG} [-h] [--version] [--check-config]")
    assert "CRM_EVENTS_*" in out.out and "README" in out.out
    assert out.err == ""


def test_version_exits_0_with_the_installed_version_even_when_settings_are_bad(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CRM_EVENTS_REVISION", raising=False)
    with pytest.raises(SystemExit) as info:
        load(PROG, ["--version"], {"CRM_EVENTS_EDGE_PORT": "abc"}, edge_from_env)

    assert info.value.code == 0
    assert capsys.readouterr().out == f"{PROG} {metadata.version('crm-events')}\n"


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


# --- every console script's main(), in process ------------------------------------------------

Main = Callable[[Sequence[str] | None], object]
#: Console script -> its main (the entry points in pyproject.toml and devtools/pyproject.toml).
SCRIPTS: dict[str, Main] = {
    "crm-events-ingest": ingest_main.main,
    "crm-events-edge": edge_main.main,
    "crm-events-token": token_cli.main,
    "crm-events-stack": stack.main,
    "crm-events-producer": producer.main,
}
#: The commands whose settings are CRM_EVENTS_* variables (the token takes arguments only).
ENV_CONFIGURED = set(SCRIPTS) - {"crm-events-token"}


@pytest.fixture
def harmless_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Were an argument ignored, nothing would reach the running Kafka or the stack's run/:
    a closed port, one event, a private run directory."""
    for key in list(os.environ):
        if key.startswith("CRM_EVENTS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CRM_EVENTS_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setenv("CRM_EVENTS_PRODUCER_COUNT", "1")
    monkeypatch.setenv("CRM_EVENTS_RUN_DIR", str(tmp_path / "run"))


def exit_code(main: Main, argv: list[str]) -> object:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


@pytest.mark.usefixtures("harmless_env")
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_help_prints_usage_and_exits_0(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(SCRIPTS[script], ["--help"]) == 0

    out = capsys.readouterr()
    assert out.out.startswith(f"usage: {script} [-h] [--version]")
    assert out.err == ""
    if script in ENV_CONFIGURED:
        assert "CRM_EVENTS_* environment variables" in out.out
        assert "configuration table in the README" in out.out


@pytest.mark.usefixtures("harmless_env")
@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--help-me"], ["stray"]], ids=str)
def test_unknown_argument_exits_2_naming_it(
    script: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    if script == "crm-events-stack" and argv == ["stray"]:
        argv = ["status", "stray", "--no-such-flag"]  # parts are positional: the flag is unknown
    assert exit_code(SCRIPTS[script], argv) == 2

    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith(f"{script}: error: unknown argument ")
    culprit = argv[-1] if script == "crm-events-stack" else argv[0]
    assert repr(culprit) in lines[0]


@pytest.mark.usefixtures("harmless_env")
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_version_prints_the_version(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(SCRIPTS[script], ["--version"]) == 0

    assert capsys.readouterr().out == f"{script} {metadata.version('crm-events')}\n"


@pytest.mark.usefixtures("harmless_env")
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_version_names_the_revision_when_it_is_set(
    script: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_EVENTS_REVISION", "3f2c1ab")
    assert exit_code(SCRIPTS[script], ["--version"]) == 0

    assert capsys.readouterr().out.endswith(" (revision 3f2c1ab)\n")


# --- the installed console scripts, as subprocesses --------------------------------------------


@pytest.fixture(scope="module")
def installed_help(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    """``<script> --help`` for each console script next to this interpreter, all at once."""
    bin_dir = Path(sys.executable).parent
    base = {k: v for k, v in os.environ.items() if not k.startswith("CRM_EVENTS_")}
    env = {
        **base,
        "CRM_EVENTS_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "CRM_EVENTS_PRODUCER_COUNT": "1",
        "CRM_EVENTS_RUN_DIR": str(tmp_path_factory.mktemp("run")),
    }
    procs = {
        script: subprocess.Popen(
            [str(bin_dir / script), "--help"],
            env=env,
            cwd=tmp_path_factory.mktemp("elsewhere"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script in SCRIPTS
    }
    results = {}
    try:
        for script, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            results[script] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_installed_script_answers_help(
    script: str, installed_help: dict[str, tuple[int, str, str]]
) -> None:
    returncode, out, err = installed_help[script]

    assert returncode == 0, err
    assert out.startswith(f"usage: {script} "), out
    assert err == ""


# --- crm-events-token: the claims it is asked for, or a refusal ---------------------------------


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text("s3cret-for-tests-only-0123456789abcdef\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("argv", "culprit"),
    [
        pytest.param(["--tenant", ""], "--tenant", id="empty-tenant"),
        pytest.param(["--tenant", "  "], "--tenant", id="blank-tenant"),
        pytest.param(["--ttl", "nan"], "--ttl", id="ttl-nan"),
        pytest.param(["--ttl", "inf"], "--ttl", id="ttl-inf"),
        pytest.param(["--ttl", "0"], "--ttl", id="ttl-zero"),
        pytest.param(["--ttl", "-100"], "--ttl", id="ttl-negative"),
        pytest.param(["--types", ","], "--types", id="types-comma"),
        pytest.param(["--types", ""], "--types", id="types-empty"),
        pytest.param(["--types", "a,,b"], "--types", id="types-empty-item"),
        pytest.param(["--audience", ""], "--audience", id="audience-empty"),
        pytest.param(["--issuer", " "], "--issuer", id="issuer-blank"),
    ],
)
def test_token_refuses_a_claim_it_cannot_issue_as_asked(
    argv: list[str], culprit: str, secret_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty tenant would be a token for every tenant; an empty type or a lifetime that is
    NaN, infinite or not positive is not what anyone asked for."""
    assert exit_code(token_cli.main, ["--secret-file", str(secret_file), *argv]) == 2

    out = capsys.readouterr()
    assert out.out == "", "no token is printed"
    lines = out.err.splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("crm-events-token: error: argument ")
    assert culprit in lines[0]


def test_token_carries_the_tenant_types_and_lifetime_asked_for(
    secret_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--tenant", "acme", "--types", "a, b", "--ttl", "60"]
    assert token_cli.main(["--secret-file", str(secret_file), *argv]) == 0

    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["crm_match"] == {"TenantId": "acme"}
    assert claims["crm_types"] == ["a", "b"]
    assert claims["exp"] - claims["iat"] == 60


def test_token_with_audience_and_issuer_is_taken_by_an_edge_that_requires_them(
    secret_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An edge with CRM_EVENTS_JWT_AUDIENCE/ISSUER set refuses a token without aud/iss; the
    options make one it takes (the Helm chart's NOTES print them)."""
    env = {
        "CRM_EVENTS_JWT_SECRET_FILE": str(secret_file),
        "CRM_EVENTS_JWT_AUDIENCE": "crm-events",
        "CRM_EVENTS_JWT_ISSUER": "https://auth.example.com/",
    }
    auth = Authenticator(EdgeSettings.from_env(env).auth)
    argv = ["--secret-file", str(secret_file), "--types", "DealWon"]
    assert token_cli.main(argv) == 0
    plain = capsys.readouterr().out.strip()
    with pytest.raises(ApiError):
        auth.verify(plain)
    extra = ["--audience", "crm-events", "--issuer", "https://auth.example.com/"]
    assert token_cli.main([*argv, *extra]) == 0
    grant = auth.verify(capsys.readouterr().out.strip())
    assert grant.types == frozenset({b"DealWon"})
