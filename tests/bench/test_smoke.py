"""A tiny run of the benchmark harness (``python -m bench --profile smoke``): 20 clients,
200 events, a 200-event resume, a 2,000-event ingest backlog, a second of history requests.

It checks that the harness measures what it claims - every frame counted, no gap, no
duplicate, resumes exact, the backlog fully ingested - and never how fast anything is.
Centrifugo joins when it has already been built (``make bench`` builds it once, in about ten
minutes on two cores); the smoke run never builds it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.tools import ROOT, centrifugo_path, go_binary

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if go_binary() is None:
        pytest.skip("Go is not installed: the load generator (bench/loadgen) needs it")
    out = tmp_path_factory.mktemp("bench")
    argv = [
        sys.executable,
        "-m",
        "bench",
        "--profile",
        "smoke",
        "--out",
        str(out),
        "--run-dir",
        str(out / "run"),
        "--no-build",
        "--no-readme",
        "--no-plots",
        "--no-pin-backends",
    ]
    env = dict(os.environ)
    kafka, redis = env.get("CRM_EVENTS_TEST_KAFKA"), env.get("CRM_EVENTS_TEST_REDIS_URL")
    if not (kafka and redis):
        pytest.skip("CRM_EVENTS_TEST_KAFKA / CRM_EVENTS_TEST_REDIS_URL are not set (make test)")
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data: dict[str, Any] = json.loads((out / "latest.json").read_text())
    data["_stdout"] = proc.stdout
    return data


def expected_servers() -> list[str]:
    return ["edge", "centrifugo"] if centrifugo_path().exists() else ["edge"]


def test_no_case_failed(results: dict[str, Any]) -> None:
    for key in ("A", "B", "C", "E"):
        for row in results.get(key, []):
            assert "error" not in row, (key, row)
    assert "error" not in results["D"], results["D"]


def test_fan_out_counts_every_frame(results: dict[str, Any]) -> None:
    series = {s["server"]: s for s in results["A"]}
    assert set(series) == {*expected_servers(), "naive"}
    for server, s in series.items():
        assert s["clients"] == 20
        (step,) = s["steps"]
        assert step["published"] == 200, server
        assert step["clients"] == 20, server
        assert step["expected"] == 200 * 20, server
        assert step["delivered"] == step["expected"], (server, step)
        assert step["loss"] == step["gaps"] == step["dups"] == step["disconnects"] == 0, step
        lat = step["latency_ms"]
        assert 0 <= lat["p50"] <= lat["p99"] <= lat["max"], lat
        assert step["loadgen_cpu_s"] >= 0 and step["server_cpu_s"] > 0


def test_resume_is_exact(results: dict[str, Any]) -> None:
    rows = {r["server"]: r for r in results["C"]}
    assert set(rows) == set(expected_servers())
    for r in rows.values():
        assert r["correct"], r
        assert r["caught"] == r["at_expect"] == r["clients"] == 20, r
        assert r["events_min"] == r["events_max"] == r["behind"] == 200, r
        assert r["gaps"] == r["dups"] == r["resets"] == 0, r
        assert r["all_caught_up_s"] is not None and r["all_caught_up_s"] > 0
    assert rows["edge"]["last_offsets_ok"] == 20


def test_ingest_backlog_fully_written(results: dict[str, Any]) -> None:
    d = results["D"]
    assert d["written"] == d["backlog"] == 2000
    assert d["events_per_s"] > 0


def test_history_requests_answered(results: dict[str, Any]) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed")
    rows = {r["server"]: r for r in results["E"]}
    assert set(rows) == set(expected_servers())
    for server, r in rows.items():
        assert r["items_per_response"] == 100, r
        assert r["non_2xx"] == 0 and r["socket_errors"] == 0, (server, r)
        assert r["requests"] and r["requests"] > 0


def test_report_written(results: dict[str, Any]) -> None:
    assert "| scenario | measure |" in results["_stdout"]
    meta = results["meta"]
    assert meta["profile"] == "smoke"
    assert meta["versions"]["python"]
    text = json.dumps(results)
    assert str(Path.home()) not in text or str(Path.home()) == "/"
