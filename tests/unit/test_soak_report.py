"""bench/soak_report.py: the soak's verdict, table and plot from its samples (issue 18)."""

from __future__ import annotations

import json
import random
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from bench.soak import SoakSettings, padded_event
from bench.soak_report import PLATEAU_PCT, edge_verdict, slope_per_hour, write_report
from devtools.producer import EventFactory

MB = 1_000_000


def sample(t_s: float, rss: dict[str, float], **edge: Any) -> dict[str, Any]:
    return {
        "t_s": t_s,
        "rss_bytes": {name: int(mb * MB) for name, mb in rss.items()},
        "edges": {
            name: {
                "pid": 1000,
                "cache_bytes": {"replay": 10 * MB, "history": 0},
                "ring_bytes": 33 * MB,
                "python": edge.get("python", {}).get(name),
            }
            for name in rss
        },
        "loadgen": {"connected": 300, "events": int(t_s) * 1000, "gaps": 0, "dups": 0, "drops": 5},
    }


def series(per_minute: list[float], name: str = "edge1") -> list[dict[str, Any]]:
    return [sample(60.0 * i, {name: mb}) for i, mb in enumerate(per_minute)]


def test_a_warm_up_then_a_flat_line_is_a_plateau() -> None:
    # 30 minutes filling the ring and caches, then 90 flat minutes with noise within 1 MB.
    rng = random.Random(1)
    mbs = [70 + i * 1.5 for i in range(30)] + [115 + rng.uniform(-0.5, 0.5) for _ in range(91)]
    verdict = edge_verdict(series(mbs), "edge1")
    assert verdict["verdict"] == "plateau"
    assert abs(verdict["second_half_growth_pct"]) <= PLATEAU_PCT
    assert verdict["end_t_min"] == 120 and verdict["mid_t_min"] == 60
    assert abs(verdict["second_half_slope_mb_per_h"]) < 1.0


def test_the_issues_slow_growth_is_growth_with_its_rate_per_hour() -> None:
    # The issue's shape: ~16 MB an hour after the warm-up.
    mbs = [94 + i * 16 / 60 for i in range(121)]
    verdict = edge_verdict(series(mbs), "edge1")
    assert verdict["verdict"] == "growth"
    assert verdict["second_half_growth_pct"] == pytest.approx(16 / 110 * 100, rel=0.05)
    assert verdict["second_half_slope_mb_per_h"] == pytest.approx(16.0, rel=0.02)


def with_pids(samples: list[dict[str, Any]], pid_at: Any) -> list[dict[str, Any]]:
    for s in samples:
        for name, edge in s["edges"].items():
            edge["pid"] = pid_at(s["t_s"], name)
    return samples


def test_a_restart_in_the_judged_half_fails_and_one_before_it_is_reported() -> None:
    # A leak hidden by an out-of-memory kill: 100 -> 150 MB, restarted at minute 90.
    mbs = [100 + i * 0.5 if i < 90 else 70.0 + (i - 90) * 0.1 for i in range(121)]
    samples = with_pids(series(mbs), lambda t, _: 1 if t < 90 * 60 else 2)
    verdict = edge_verdict(samples, "edge1")
    assert verdict["verdict"] == "restarted"
    assert verdict["restarts_at_min"] == [90]
    # A restart in the first half (a rolling deploy while warming up) is only reported.
    flat = [70 + min(i, 20) * 2.0 for i in range(121)]
    samples = with_pids(series(flat), lambda t, _: 1 if t < 15 * 60 else 2)
    verdict = edge_verdict(samples, "edge1")
    assert verdict["verdict"] == "plateau" and verdict["restarts_at_min"] == [15]


def test_a_low_last_sample_does_not_pass_a_rising_half() -> None:
    mbs = [100 + i * 0.1 for i in range(120)] + [110.0]
    mbs[60] = 110.0  # the middle sample as high as the end
    verdict = edge_verdict(series(mbs), "edge1")
    assert verdict["second_half_growth_pct"] <= PLATEAU_PCT
    assert verdict["second_half_line_pct"] > PLATEAU_PCT
    assert verdict["verdict"] == "growth"


def test_samples_missing_in_the_judged_half_fail_it_and_before_it_are_counted() -> None:
    samples = series([100.0] * 121)
    for s in samples[10:30]:
        del s["rss_bytes"]["edge1"]
    verdict = edge_verdict(samples, "edge1")
    assert verdict["verdict"] == "plateau" and verdict["missing_samples"] == 20
    samples = series([100.0] * 121)
    for s in samples[80:82]:
        del s["rss_bytes"]["edge1"]
    verdict = edge_verdict(samples, "edge1")
    assert verdict["verdict"] == "gaps_in_samples" and verdict["missing_samples"] == 2


def test_an_edge_gone_before_the_end_or_without_pids_is_not_judged() -> None:
    samples = series([100.0] * 121)
    for s in samples[118:]:  # gone for the last 3 minutes (under 5 % of the samples)
        del s["rss_bytes"]["edge1"]
    assert edge_verdict(samples, "edge1")["verdict"] == "gaps_in_samples"
    # A pid that is unknown in the judged half: a restart there could not be seen.
    samples = with_pids(series([100.0] * 121), lambda t, _: None if t > 70 * 60 else 5)
    assert edge_verdict(samples, "edge1")["verdict"] == "plateau"  # carried from earlier
    samples = with_pids(series([100.0] * 121), lambda t, _: None)
    assert edge_verdict(samples, "edge1")["verdict"] == "no_pid"
    # A zero reading is no reading (and no division by zero).
    samples = series([100.0] * 121)
    samples[90]["rss_bytes"]["edge1"] = 0
    assert edge_verdict(samples, "edge1")["verdict"] == "gaps_in_samples"


def test_slope_is_per_hour_and_zero_without_enough_points() -> None:
    assert slope_per_hour([(0, 0.0), (1800, 5.0), (3600, 10.0)]) == pytest.approx(10.0)
    assert slope_per_hour([(0, 3.0)]) == 0.0
    assert slope_per_hour([(5, 1.0), (5, 2.0)]) == 0.0


def test_growth_names_the_types_that_grew() -> None:
    samples = []
    for i in range(61):
        counts = {"Entry": 30_000, "RequestHandler": 150 + 20 * i, "dict": 2000}
        samples.append(
            sample(
                60.0 * i, {"edge1": 100 + i * 0.5}, python={"edge1": {"gc_counts_by_type": counts}}
            )
        )
    verdict = edge_verdict(samples, "edge1")
    assert verdict["verdict"] == "growth"
    assert verdict["grew_types"][0] == "RequestHandler +600"
    assert all("Entry" not in grew for grew in verdict["grew_types"])


def write_run(tmp_path: Path, samples: list[dict[str, Any]], final: dict[str, Any]) -> Path:
    (tmp_path / "settings.json").write_text(json.dumps(SoakSettings().__dict__))
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (tmp_path / "final.json").write_text(json.dumps(final))
    return tmp_path


FINAL = {
    "clients": 300,
    "clients_caught_up": 300,
    "gaps": 0,
    "dups": 0,
    "resets": 0,
    "drops": 14_000,
    "events": 216_000_000,
    "produced": 720_000,
    "produce_failed": 0,
    "parse_errors": 0,
    "expect_last": "1,2,3",
    "http_errors": {},
}


def test_the_report_passes_only_with_a_plateau_and_perfect_delivery(tmp_path: Path) -> None:
    flat = [sample(60.0 * i, {"edge1": 110.0, "edge2": 111.0}) for i in range(121)]
    run = write_run(tmp_path / "ok", flat, FINAL) if (tmp_path / "ok").mkdir() is None else None
    assert run is not None
    summary = write_report(run)
    assert summary["passed"] and summary["delivery_ok"] and summary["memory_ok"]
    report = (run / "report.md").read_text()
    assert "Verdict: PASS" in report
    assert "| 120 | 110.0 | 111.0 |" in report  # the table's last row
    assert report.count("\n| ") == 1 + 13  # the header, one row each 10 minutes to the end
    svg = ET.fromstring((run / "memory.svg").read_text())
    assert len(svg.findall("{http://www.w3.org/2000/svg}polyline")) == 4  # RSS and caches x 2

    for name, final in (
        ("lost", {**FINAL, "clients_caught_up": 299}),
        ("dup", {**FINAL, "dups": 1}),
        ("gap", {**FINAL, "gaps": 2}),
        ("unsent", {**FINAL, "produce_failed": 1}),
        ("reset", {**FINAL, "resets": 1}),
        ("unparsable", {**FINAL, "parse_errors": 1}),
        ("unknown", {k: v for k, v in FINAL.items() if k != "resets"}),
    ):
        (tmp_path / name).mkdir()
        bad = write_report(write_run(tmp_path / name, flat, final))
        assert not bad["passed"] and not bad["delivery_ok"], name

    (tmp_path / "still").mkdir()
    still = write_report(write_run(tmp_path / "still", flat, {**FINAL, "drops": 100}))
    assert still["delivery_ok"] and not still["churn_ok"] and not still["passed"]

    growing = [sample(60.0 * i, {"edge1": 100 + i * 0.3, "edge2": 111.0}) for i in range(121)]
    (tmp_path / "grow").mkdir()
    summary = write_report(write_run(tmp_path / "grow", growing, FINAL))
    assert summary["delivery_ok"] and not summary["memory_ok"] and not summary["passed"]
    assert "Verdict: FAIL" in (tmp_path / "grow" / "report.md").read_text()


def test_padded_events_have_the_size_asked_and_varied_filler() -> None:
    rng = random.Random(3)
    factory = EventFactory(random.Random(4))
    values = [padded_event(factory, rng, 256)[1] for _ in range(200)]
    assert {len(v) for v in values} == {256}
    events = [json.loads(v) for v in values]
    assert len({e["Data"]["Note"] for e in events}) > 190  # not one repeated string
    assert len({e["Type"] for e in events}) > 3
    # An envelope longer than the size asked is sent whole.
    assert len(padded_event(factory, rng, 64)[1]) > 64


@pytest.mark.parametrize(
    ("field", "value"),
    [("clients", 0), ("rate", 0.0), ("life_min_s", 0.0), ("sample_s", 0.5), ("diagnostics", "x")],
)
def test_wrong_soak_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError):
        SoakSettings(**{field: value})  # type: ignore[arg-type]
