"""Scenario F of the benchmark (scaling on this machine): the arithmetic that turns samples
into per-unit costs and the verdict "flat within ±15 %", and its report. No services."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report
from bench.scenario_f import (
    Sample,
    capacity_model,
    combine_cells,
    f1_order,
    f1_summary,
    f2_analysis,
    flatness,
    heads_reached,
    least_squares,
    measure_window,
    merge_visits,
    per_edge_increments,
    visit_order,
)

# -- flatness -----------------------------------------------------------------------------------


def test_flat_means_every_value_within_15_percent_of_the_one_unit_value() -> None:
    out = flatness([10.0, 11.4, 8.6])
    assert out["flat"] is True
    assert out["from_first"] == pytest.approx(0.14)
    # max/min - 1 is reported beside it, and is stricter.
    assert out["spread"] == pytest.approx(11.4 / 8.6 - 1, abs=1e-4)


def test_one_value_beyond_15_percent_is_not_flat() -> None:
    out = flatness([10.0, 10.5, 11.6])
    assert out["flat"] is False
    assert out["from_first"] == pytest.approx(0.16)


def test_a_missing_value_or_a_single_one_gives_no_verdict() -> None:
    assert flatness([10.0, None, 10.0])["flat"] is None
    assert flatness([10.0])["flat"] is None
    assert flatness([])["flat"] is None


def test_a_cost_that_is_not_positive_is_noise_and_not_flat() -> None:
    out = flatness([1.0, -0.2])
    assert out["flat"] is False
    assert out["spread"] is None


# -- F1 -----------------------------------------------------------------------------------------


def samples(backlog: int, rate: float, ingest_us: float, redis_us: float) -> list[Sample]:
    """A steady run: ``rate`` events/s from t=1, sampled every 0.1 s, with the CPU that
    those per-event costs give (plus an idle start that must stay out of the window)."""
    out = [Sample(0.0, 0, 0.5, 0.1, 0.2)]
    t, added = 1.0, 0
    while added < backlog:
        added = min(backlog, added + int(rate * 0.1))
        t += 0.1
        out.append(
            Sample(t, added, 0.5 + added * ingest_us / 1e6, 0.1 + added * redis_us / 1e6, 0.2)
        )
    return out


def test_the_window_runs_from_10_to_90_percent_and_leaves_the_start_out() -> None:
    win = measure_window(samples(100_000, 40_000, 12.5, 11.0), 100_000)
    assert win is not None
    assert win["events_per_s"] == pytest.approx(40_000, rel=1e-6)
    assert win["from_fraction"] == pytest.approx(0.12)
    assert win["to_fraction"] == pytest.approx(0.92)
    assert win["ingest_us_per_event"] == pytest.approx(12.5)
    assert win["redis_us_per_event"] == pytest.approx(11.0)
    assert win["kafka_us_per_event"] == 0


def test_no_window_when_the_backlog_was_not_reached_or_jumped_over() -> None:
    assert measure_window(samples(100_000, 40_000, 1, 1)[:10], 100_000) is None
    jump = [Sample(0.0, 0, 0, 0, 0), Sample(1.0, 100_000, 1, 1, 1)]
    assert measure_window(jump, 100_000) is None


def test_the_model_is_bound_by_the_slower_kind_of_unit() -> None:
    # 2 workers at 12.5 µs: 160,000/s; 3 masters at 10 µs per event in all: 300,000/s.
    assert capacity_model(2, 3, 12.5, 10.0) == 160_000
    assert capacity_model(3, 1, 12.5, 10.0) == 100_000


def test_the_grid_goes_up_then_down() -> None:
    assert f1_order([1, 2], [1, 2], 1) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert f1_order([2, 1], [1, 2], 2) == [
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
        (2, 2),
        (2, 1),
        (1, 2),
        (1, 1),
    ]


def cell(m: int, w: int, ingest: float, redis: float, rate: int = 40_000) -> dict[str, Any]:
    return {
        "masters": m,
        "workers": w,
        "events_per_s": rate,
        "ingest_us_per_event": ingest,
        "redis_us_per_event": redis,
        "kafka_us_per_event": 3.0,
    }


def test_visits_of_a_cell_are_averaged_and_a_failed_one_is_kept_aside() -> None:
    visits = [
        cell(1, 1, 12.0, 10.0, 30_000),
        cell(1, 2, 13.0, 11.0),
        {"masters": 1, "workers": 2, "error": "exited"},
        cell(1, 1, 14.0, 12.0, 34_000),
        {"masters": 2, "workers": 1, "error": "never stable"},
    ]
    cells = combine_cells(visits)
    assert [(c["masters"], c["workers"]) for c in cells] == [(1, 1), (1, 2), (2, 1)]
    first = cells[0]
    assert first["ingest_us_per_event"] == 13.0 and first["redis_us_per_event"] == 11.0
    assert first["events_per_s"] == 32_000
    assert first["ingest_us_per_event_visits"] == [12.0, 14.0]
    assert cells[1]["failed_visits"] == ["exited"] and cells[1]["visits"] == 1
    assert cells[2]["error"] == "never stable"


def test_the_issue_criterion_is_ingest_cost_flat_over_masters_at_every_worker_count() -> None:
    flat = [cell(m, w, 12.0 + 0.5 * m, 11.0) for m in (1, 2, 3) for w in (1, 2)]
    summary = f1_summary(flat)
    assert summary["ingest_flat_over_masters"] is True
    assert summary["ingest_from_first_over_masters"] == pytest.approx(1.0 / 12.5, abs=1e-4)
    rows = [ln for ln in summary["flatness"] if ln["along"] == "workers"]
    assert {(ln["cost"], ln["masters"]) for ln in rows} == {
        (cost, m) for cost in ("ingest_us_per_event", "redis_us_per_event") for m in (1, 2, 3)
    }
    # 20 % more at 3 masters with 2 workers fails it.
    steep = [c if (c["masters"], c["workers"]) != (3, 2) else cell(3, 2, 15.6, 11.0) for c in flat]
    assert f1_summary(steep)["ingest_flat_over_masters"] is False
    # A cell without figures leaves the verdict open.
    holed = [c if (c["masters"], c["workers"]) != (2, 1) else {**c, "error": "x"} for c in flat]
    assert f1_summary(holed)["ingest_flat_over_masters"] is None


# -- F2 -----------------------------------------------------------------------------------------


def test_edge_counts_are_visited_up_and_back_down() -> None:
    assert visit_order([4, 1, 2]) == [0, 1, 2, 4, 2, 1, 0]


def test_the_increment_of_n_edges_is_their_cost_over_no_edges_divided_by_n() -> None:
    assert per_edge_increments({0: 20.0, 1: 21.0, 4: 28.0}) == {1: 1.0, 4: 2.0}


def test_least_squares_recovers_exact_coefficients_and_refuses_dependent_columns() -> None:
    rows = [[1.0, 2.0, 0.0], [1.0, 3.0, 4.0], [2.0, 1.0, 1.0], [5.0, 2.0, 3.0]]
    ys = [3 * a - 2 * b + 0.5 * c for a, b, c in rows]
    assert least_squares(rows, ys) == pytest.approx([3.0, -2.0, 0.5])
    with pytest.raises(ValueError):
        least_squares([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        least_squares([[1.0, 2.0]], [1.0])


def window(batches: int, events: int, redis_us: float) -> dict[str, Any]:
    return {
        "events": events,
        "batches": batches,
        "publishes": batches,
        "seconds": 3.0,
        "redis_s": redis_us / 1e6,
        "edges_s": 0.1,
        "ingest_s": 0.2,
    }


def visits_from(per_edge: dict[int, float], jitter: float = 0.0) -> list[dict[str, Any]]:
    """Windows whose Redis CPU is 50 µs per script run + 30 µs per event + per_edge[n] µs
    per script run and edge, with batches of a drifting size (the thing the model absorbs)."""
    out = []
    for i, n in enumerate(visit_order([k for k in per_edge if k])):
        windows = []
        for j in range(2):
            batches = 1200 + 37 * i + 11 * j
            events = int(batches * (2.6 - 0.05 * i))
            sign = 1 if (i + j) % 2 else -1
            us = batches * (50 + n * per_edge[n]) + 30 * events + sign * jitter * batches
            windows.append(window(batches, events, us))
        out.append(
            {
                "edges": n,
                "windows": windows,
                "subscribers_per_channel": [n, n, n],
                "edge_lag_max_s": 0.01 if n else None,
                "bus_reconnects": 0,
                "not_keeping_up": [],
            }
        )
    return out


def test_the_fan_out_model_separates_batches_events_and_edges() -> None:
    costs = {0: 0.0, 1: 4.0, 2: 4.0, 4: 4.0, 8: 4.0, 16: 4.0}
    out = f2_analysis(visits_from(costs, jitter=0.05))
    assert out["base_us_per_batch"] == pytest.approx(50, abs=0.5)
    assert out["per_event_us"] == pytest.approx(30, abs=0.5)
    assert out["per_edge_us_per_batch"] == pytest.approx(4.0, abs=0.05)
    for n in ("1", "2", "4", "8", "16"):
        assert out["increment_us_per_edge"][n] == pytest.approx(4.0, abs=0.1)
    assert out["resolved_edges"] == [1, 2, 4, 8, 16]
    assert out["increment_flatness"]["flat"] is True


def test_a_fan_out_cost_that_grows_with_the_edges_is_not_flat() -> None:
    costs = {0: 0.0, 1: 3.0, 2: 3.2, 4: 3.6, 8: 4.4, 16: 6.0}
    out = f2_analysis(visits_from(costs))
    assert out["increment_flatness"]["flat"] is False
    assert out["increment_us_per_edge"]["16"] > out["increment_us_per_edge"]["1"]


def test_noisy_windows_leave_the_small_edge_counts_unjudged() -> None:
    costs = dict.fromkeys((0, 1, 2, 4, 8, 16), 4.0)
    costs[0] = 0.0
    out = f2_analysis(visits_from(costs, jitter=6.0))
    assert 1 not in out["resolved_edges"]
    assert 16 in out["resolved_edges"]
    unc = out["increment_uncertainty_us"]
    assert unc["1"] > unc["16"]


def test_steps_merge_both_visits_of_a_count_and_check_the_subscribers() -> None:
    visits = visits_from({0: 0.0, 1: 4.0, 2: 4.0})
    visits[1]["not_keeping_up"] = ["edge1"]
    visits[2]["subscribers_per_channel"] = [2, 2, 1]
    steps = {s["edges"]: s for s in merge_visits(visits)}
    assert [s["visits"] for s in steps.values()] == [2, 2, 1]
    assert steps[0]["kept_up"] is True
    assert steps[1]["kept_up"] is False and steps[1]["not_keeping_up"] == ["edge1"]
    assert steps[2]["kept_up"] is False and "subscribers" in steps[2]["why"]
    assert steps[0]["windows"] == 4
    assert len(steps[0]["redis_us_per_event_visits"]) == 2


def test_an_edge_shows_the_heads_only_when_every_partition_reached_them() -> None:
    assert heads_reached({0: 5, 1: 9}, {0: 5, 1: 8})
    assert not heads_reached({0: 5}, {0: 5, 1: 0})
    assert not heads_reached({0: 4, 1: 9}, {0: 5, 1: 8})


# -- report -------------------------------------------------------------------------------------


def test_the_report_shows_the_grid_the_verdict_the_fan_out_and_the_storm() -> None:
    cells = [cell(m, 1, 12.0 + 0.5 * m, 11.0) for m in (1, 2, 3)]
    f2 = {
        "rate": 1000.0,
        "partitions": 3,
        "stream_maxlen": 2000,
        "placement": "edges on core 0",
        "order": visit_order([1, 2]),
        "windows_per_visit": 2,
        "window_s": 3.0,
        "steps": merge_visits(visits_from({0: 0.0, 1: 4.0, 2: 4.0})),
        "drift_no_edges": 0.01,
        **f2_analysis(visits_from({0: 0.0, 1: 4.0, 2: 4.0})),
    }
    f3 = {
        "clients": 2000,
        "behind": 1000,
        "edges": 4,
        "masters": 3,
        "clients_per_edge": [500] * 4,
        "placement": "edges on core 0",
        "all_caught_up_s": 1.5,
        "correct": True,
        "wall_s": 1.6,
        "server_cpu_s": 2.0,
        "loadgen_cpu_s": 1.0,
    }
    results: dict[str, Any] = {
        "C": [
            {
                "server": "edge",
                "clients": 2000,
                "behind": 1000,
                "all_caught_up_s": 1.2,
                "correct": True,
                "gaps": 0,
                "dups": 0,
            }
        ],
        "F": {
            "F1": {
                "partitions": 12,
                "backlog": 150_000,
                "stream_maxlen": 1000,
                "placement": "workers on core 0",
                "rounds": 1,
                "cells": cells,
                **f1_summary(cells),
            },
            "F2": f2,
            "F3": f3,
            "model_note": "Extrapolated: the model column",
        },
    }
    text = "\n".join(report.f_details(results))
    assert "| 3 | 1 | 40,000 | 13.50 | 11.00 | 3.00 |" in text
    assert "| ingest | masters 1 → 3 | 1 worker(s) | 12.50, 13.00, 13.50 |" in text
    assert "each edge adds" in text
    assert "| 2,000 | 1,000 | 4 | 3 | 1.50 | yes | 1.20 | 1.25 |" in text
    assert "Extrapolated: the model column." in text
    row = next(ln for ln in report.side_by_side(results) if ln.startswith("| F1"))
    assert "8.0 %" in row and row.endswith("| yes |")
