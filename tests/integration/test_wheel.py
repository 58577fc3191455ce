"""The crm-events wheel, built from this checkout and installed into a fresh virtualenv, runs
from what it carries alone: ``shared``, ``ingest`` and ``edge`` with their data (the Lua
script, the Command Center's static files, the OpenAPI document, ``py.typed``), and the
console scripts crm-events-ingest, crm-events-edge and crm-events-token. The local-stack
tooling (``devtools``, a well-known PyPI name) and the repository's other folders stay out.

No service is needed. The wheel is built without build isolation (``setuptools`` comes from
the test extra) and installed with ``--no-index``, so nothing is downloaded. The fresh
environment borrows only the third-party dependencies from the running one, through a
``.pth`` line appended after its own site-packages: each of our modules must come from the
wheel, never from the checkout.

The client distribution (``clients/python``, ``crm-events-client``) gets the same treatment in
an environment of its own: typed, its one dependency, its command, none of the server's
packages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNTIME_PACKAGES = {"shared", "ingest", "edge"}
CONSOLE_SCRIPTS = ("crm-events-ingest", "crm-events-edge", "crm-events-token")
# The repository-only tools: installed editable from devtools/pyproject.toml, never in the wheel.
REPO_ONLY_SCRIPTS = ("crm-events-stack", "crm-events-producer")
DATA_FILES = (
    "shared/apply_partition.lua",
    "shared/py.typed",
    "ingest/py.typed",
    "edge/py.typed",
    "edge/openapi.yaml",
    "edge/static/crm-events.html",
    "edge/static/crm-events.js",
    "edge/static/crm-events-client.js",
    "edge/static/crm-events.css",
    "edge/static/favicon.svg",
)
# Generated or heavy folders a build must not see (stale build/ output would end up in the
# wheel); everything else of the checkout is copied, devtools/, tests/ and bench/ included,
# so that the test proves the packaging excludes them.
NOT_COPIED = {
    ".git",
    ".venv",
    "run",
    "build",
    "dist",
    "node_modules",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
}
STEP_TIMEOUT_S = 180
PIP = [sys.executable, "-m", "pip", "-q"]

# The fresh interpreter reports where each module came from, and what it cannot import.
PROBE = r"""
import importlib, importlib.util, json, sys
found = {}
for name in ("shared", "ingest", "edge", "ingest.writer", "edge.openapi", "edge.ops_page"):
    found[name] = importlib.import_module(name).__file__
missing = [n for n in ("devtools", "tests", "bench") if importlib.util.find_spec(n) is None]
print(json.dumps({"found": found, "missing": missing}))
"""

# The edge app, built from the installed package, serves its packaged data.
SERVE_DATA = r"""
import asyncio, json
from aiohttp.test_utils import TestClient, TestServer
from edge.app import create_app
from edge.bus_memory import MemoryBus
from shared.settings import EdgeSettings

async def main():
    settings = EdgeSettings.from_env({"CRM_EVENTS_AUTH_MODE": "off"})
    app = create_app(settings, bus=MemoryBus(maxlen=10))
    statuses = {}
    async with TestClient(TestServer(app)) as client:
        for path in (
            "/ops/crm-events",
            "/ops/crm-events/assets/crm-events.js",
            "/ops/crm-events/assets/crm-events-client.js",
            "/openapi.yaml",
        ):
            resp = await client.get(path)
            body = await resp.read()
            statuses[path] = [resp.status, len(body)]
    print(json.dumps(statuses))

asyncio.run(main())
"""


def run(
    argv: Sequence[str | Path], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
    )


def checked(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


def clean_env() -> dict[str, str]:
    """No PYTHONPATH (it would reach the checkout) and no CRM_EVENTS_* setting."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("CRM_EVENTS_")
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def copy_ignore(_: str, names: list[str]) -> set[str]:
    return {n for n in names if n in NOT_COPIED or n.endswith(".egg-info")}


class Installed:
    def __init__(self, wheel: Path, venv: Path, outside: Path) -> None:
        self.wheel = wheel
        self.venv = venv
        self.outside = outside
        self.python = venv / "bin" / "python"
        purelib = run(
            [self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            outside,
            clean_env(),
        )
        self.site_packages = Path(checked(purelib).stdout.strip())

    def run(self, argv: Sequence[str | Path]) -> subprocess.CompletedProcess[str]:
        return run(argv, self.outside, clean_env())


def build_and_install(project: Path, base: Path, wheel_glob: str) -> Installed:
    """Copy ``project``, build its wheel (no isolation, no index) and install it alone into a
    fresh virtualenv that borrows only the running environment's third-party packages."""
    src, wheels, venv, outside = base / "src", base / "wheels", base / "venv", base / "elsewhere"
    shutil.copytree(project, src, ignore=copy_ignore, symlinks=True)
    outside.mkdir()
    env = clean_env()
    wheel_cmd = [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels]
    checked(run([*wheel_cmd, src], outside, env))
    (wheel,) = wheels.glob(wheel_glob)
    checked(run([sys.executable, "-m", "venv", "--without-pip", venv], outside, env))
    install = [*PIP, "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index"]
    checked(run([*install, wheel], outside, env))
    return borrow_dependencies(Installed(wheel, venv, outside))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return build_and_install(REPO, tmp_path_factory.mktemp("wheel"), "crm_events-*.whl")


def borrow_dependencies(result: Installed) -> Installed:
    """The running environment's third-party packages, visible to the fresh one."""
    # Third-party dependencies only: a .pth line is appended to sys.path after the fresh
    # site-packages, and .pth files inside the borrowed folder (our editable finders) are
    # not processed, so the checkout stays out of reach.
    borrowed = sysconfig.get_paths()["purelib"]
    (result.site_packages / "zz_borrowed_dependencies.pth").write_text(borrowed + "\n")
    return result


def test_the_wheel_holds_the_runtime_packages_and_their_data(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as zf:
        names = set(zf.namelist())
    tops = {n.split("/", 1)[0] for n in names if ".dist-info/" not in n}
    assert tops == RUNTIME_PACKAGES
    for path in DATA_FILES:
        assert path in names, f"{path} is not in the wheel"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_the_wheel_metadata_names_the_licence_and_only_the_runtime_scripts(
    installed: Installed,
) -> None:
    with zipfile.ZipFile(installed.wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        (entry_points,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        metadata = zf.read(meta).decode()
        scripts = zf.read(entry_points).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    for script in CONSOLE_SCRIPTS:
        assert f"{script} = " in scripts
    for script in REPO_ONLY_SCRIPTS:
        assert script not in scripts


def test_modules_come_from_the_fresh_environment_and_devtools_is_absent(
    installed: Installed,
) -> None:
    result = checked(installed.run([installed.python, "-c", PROBE]))
    report = json.loads(result.stdout)
    for name, file in report["found"].items():
        assert Path(file).is_relative_to(installed.site_packages), f"{name} from {file}"
    assert report["missing"] == ["devtools", "tests", "bench"]
    for path in DATA_FILES:
        assert (installed.site_packages / path).is_file(), path


def test_the_installed_edge_serves_its_packaged_files(installed: Installed) -> None:
    result = checked(installed.run([installed.python, "-c", SERVE_DATA]))
    statuses = json.loads(result.stdout)
    for path, (status, size) in statuses.items():
        assert status == 200 and size > 0, (path, status, size)


@pytest.mark.parametrize("script", CONSOLE_SCRIPTS)
def test_console_script_help_and_version(installed: Installed, script: str) -> None:
    exe = installed.venv / "bin" / script
    helped = checked(installed.run([exe, "--help"]))
    assert helped.stdout.startswith(f"usage: {script} ")
    versioned = checked(installed.run([exe, "--version"]))
    assert versioned.stdout.strip() == f"{script} {installed.wheel.name.split('-')[1]}"


def test_the_repository_only_scripts_are_not_installed(installed: Installed) -> None:
    for script in REPO_ONLY_SCRIPTS:
        assert not (installed.venv / "bin" / script).exists(), script


# The client distribution (clients/python): a fresh environment with its wheel alone.
CLIENT_PROBE = r"""
import importlib.util, json
import crm_events_client
print(json.dumps({
    "file": crm_events_client.__file__,
    "server_packages": [n for n in ("shared", "ingest", "edge") if importlib.util.find_spec(n)],
}))
"""


@pytest.fixture(scope="module")
def client_installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return build_and_install(
        REPO / "clients" / "python",
        tmp_path_factory.mktemp("client-wheel"),
        "crm_events_client-*.whl",
    )


def test_the_client_wheel_is_typed_stands_alone_and_installs_its_command(
    client_installed: Installed,
) -> None:
    with zipfile.ZipFile(client_installed.wheel) as zf:
        names = set(zf.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = zf.read(meta).decode().splitlines()
    assert {n.split("/", 1)[0] for n in names if ".dist-info/" not in n} == {"crm_events_client"}
    assert "crm_events_client/py.typed" in names
    requires = [line for line in metadata if line.startswith("Requires-Dist:")]
    assert len(requires) == 1 and requires[0].startswith("Requires-Dist: aiohttp"), requires
    report = json.loads(
        checked(client_installed.run([client_installed.python, "-c", CLIENT_PROBE])).stdout
    )
    assert Path(report["file"]).is_relative_to(client_installed.site_packages), report
    # The client speaks the public protocol only: the server's packages are not in reach.
    assert report["server_packages"] == [], report
    tail = client_installed.venv / "bin" / "crm-events-tail"
    assert checked(client_installed.run([tail, "--help"])).stdout.startswith(
        "usage: crm-events-tail"
    )
