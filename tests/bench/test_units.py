"""Pure parts of the benchmark harness: no services, no processes."""

from __future__ import annotations

from typing import Any

from bench import report
from bench.profiles import QUICK
from bench.scenarios import _next_rate, _offsets, parse_wrk
from bench.servers import make_event

WRK = """Running 5s test @ http://127.0.0.1:1/crm-events/history?n=100
  1 threads and 32 connections
  Latency Distribution
     50%  635.91us
     75%    1.20ms
     90%    2.50ms
     99%   12.00ms
  1234 requests in 5.00s, 40.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:    246.80
"""


def test_event_is_exactly_the_asked_size_and_parsable() -> None:
    import json

    raw = make_event(7, 256)
    assert len(raw) == 256
    data = json.loads(raw)
    assert data["Type"] == "ContactCreated" and data["Seq"] == 7
    assert b"]" not in raw and b'"offset"' not in raw


def test_parse_wrk_reads_rate_percentiles_and_errors() -> None:
    out = parse_wrk(WRK)
    assert out["requests_per_s"] == 246.8
    assert out["requests"] == 1234
    assert out["p50_ms"] == 0.63591
    assert out["p99_ms"] == 12.0
    assert out["non_2xx"] == 3


def _step(rate: float, sustained: bool) -> dict[str, Any]:
    return {"target_rate": rate, "sustained": sustained}


def test_rate_search_doubles_then_bisects_then_stops() -> None:
    assert _next_rate([], QUICK, 20.0) == 20.0
    steps = [_step(20, True)]
    assert _next_rate(steps, QUICK, 20.0) == 40
    steps.append(_step(40, False))
    mid = _next_rate(steps, QUICK, 20.0)
    assert mid is not None and 20 < mid < 40
    steps.append(_step(mid, True))
    assert _next_rate(steps, QUICK, 20.0) is None  # QUICK refines once


def test_rate_search_goes_down_when_the_first_step_fails() -> None:
    steps = [_step(2, False)]
    assert _next_rate(steps, QUICK, 2.0) == 1
    steps += [_step(1, False), _step(0.5, False)]
    assert _next_rate(steps, QUICK, 2.0) is None


def _series(server: str, n: int, dps: int, p99: float) -> dict[str, Any]:
    step = {
        "event_rate": dps / n,
        "deliveries_per_s": dps,
        "latency_ms": {"p50": p99 / 2, "p99": p99, "max": p99 * 1.1},
        "server_cpu_pct": 90.0,
        "loadgen_cpu_pct": 30.0,
        "other_cpu_on_server_core_pct": 1.0,
        "pipeline_ms": None,
        "passed": p99 <= 100,
        "sustained": True,
        "why": "",
    }
    return {
        "server": server,
        "clients": n,
        "steps": [step],
        "best": step if p99 <= 100 else None,
        "best_p99_50": step if p99 <= 50 else None,
        "capacity": step,
        "saturated": True,
    }


def test_side_by_side_table_has_ratios_and_targets() -> None:
    results = {
        "meta": {
            "profile": "quick",
            "started_utc": "20260101T000000Z",
            "command": "python -m bench",
            "duration_s": 1.0,
            "machine": {"cpu": "x", "cores": 2, "ram_gib": 1, "os": "y", "kernel": "z"},
            "versions": {"python": "3"},
            "pinning": {"what": "core 0"},
            "notes": [],
        },
        "A": [
            _series("edge", 10000, 30000, 40.0),
            _series("centrifugo", 10000, 60000, 45.0),
        ],
        "B": [
            {"server": "edge", "clients": 100, "rss_per_conn_kb": 10.0, "cpu_pct": 5.0},
            {"server": "centrifugo", "clients": 100, "rss_per_conn_kb": 40.0, "cpu_pct": 4.0},
        ],
        "D": {"backlog": 10, "events_per_s": 60000},
    }
    text = report.markdown(results, [], None)  # type: ignore[arg-type]
    assert "| A 10,000 clients | same, with p99 ≤ 50 ms" in text
    assert "| 0.50 |" in text  # 30,000 / 60,000
    assert "ratio ≥ 1.0 | **no** |" in text
    assert "| 0.25 |" in text  # memory 10 / 40
    assert "≥ 50,000 | yes |" in text


def test_offsets_for_the_load_generator_name_every_partition_in_order() -> None:
    assert _offsets([17, None, 4]) == "17,-,4"
    assert _offsets([None, None, None]) == "-,-,-"
