"""The anomaly-detection rules (monitoring/prometheus/rules/crm_events_anomaly.yml), beyond what
promtool runs: the promtool test file is its generator's output and judges with 1, 2 and 3
weeks of history, the two signals share one method, the three weekly predictions differ only in
their week, the error is what a majority of the weeks agree on, the selectors are the three the
mixin substitutes, and the runbooks state the thresholds the rules use and what they imply."""

from __future__ import annotations

import importlib.util
import random
import re
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .support import NEEDS_HISTORY, RULE_TESTS_DIR, RULES_DIR, RUNBOOKS, load_yaml

ANOMALY_RULES = RULES_DIR / "crm_events_anomaly.yml"
GENERATOR = RULE_TESTS_DIR / "gen_anomaly_test.py"
GENERATED = RULE_TESTS_DIR / "anomaly_test.yml"

#: The signals, and what each derived record is called after them.
MESSAGES = "job:crm_events_messages:flow_rate5m"
CLIENTS = "job:crm_events_sse_clients:sum"
DERIVED = ("_avg1d", "_prediction", "_error", "_error_stddev1w", "_zscore")
ALERTS = {"CrmEventsTrafficAnomaly": MESSAGES, "CrmEventsClientsAnomaly": CLIENTS}

#: The job matchers the rule files may use: the mixin replaces exactly these strings.
SELECTORS = (
    'job="crm-events-edge"',
    'job="crm-events-ingest"',
    'job=~"crm-events-edge|crm-events-ingest"',
)


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_anomaly_test", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _rules() -> dict[str, dict[str, Any]]:
    """Record or alert name -> rule, of the anomaly file."""
    return {
        r.get("record") or r["alert"]: r
        for g in load_yaml(ANOMALY_RULES)["groups"]
        for r in g["rules"]
    }


def _section(alert: str) -> str:
    text = RUNBOOKS.read_text()
    start = text.index(f"\n## {alert}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


# -- the generated promtool test ----------------------------------------------------------------


def test_committed_rule_test_is_the_generator_output() -> None:
    gen = _generator()
    assert GENERATED.read_text() == gen.render(gen.groups()), (
        f"{GENERATED.name} differs from its generator: run python3 {GENERATOR.name}"
    )


def test_every_anomaly_alert_fires_on_a_drop_and_on_a_spike() -> None:
    """The generated cases: each alert fires once with a negative and once with a positive
    z-score, and the groups of normal traffic check that neither was ever pending."""
    tests = load_yaml(GENERATED)["tests"]
    for alert in ALERTS:
        signs = {
            exp["exp_annotations"]["description"].removeprefix("z-score ")[0]
            for t in tests
            for case in t.get("alert_rule_test", [])
            if case["alertname"] == alert
            for exp in case.get("exp_alerts", [])
        }
        assert signs == {"-", "+"}, alert
    never = [
        t["name"]
        for t in tests
        for case in t.get("promql_expr_test", [])
        if case["expr"].startswith("count_over_time(ALERTS{") and not case.get("exp_samples")
    ]
    assert len(never) >= 2, "the weeks before and after the incidents of day 15 are checked whole"


def test_rule_tests_judge_with_one_two_and_three_weeks() -> None:
    """Some case is evaluated with 3 weeks of history (from day 22) and sees the prediction from
    3 weeks ago, and the echo of an incident is checked quiet with 2 weeks and with 3."""

    minutes = _generator()._minutes

    def days(eval_time: str) -> float:
        return minutes(eval_time) / (24 * 60)

    tests = load_yaml(GENERATED)["tests"]
    cases = [c for t in tests for c in t.get("promql_expr_test", [])]
    assert any(
        days(c["eval_time"]) >= 22 and 'weeks_ago="3"' in s["labels"]
        for c in cases
        for s in c.get("exp_samples") or []
    )
    quiet = {
        days(c["eval_time"])
        for t in tests
        for c in t.get("alert_rule_test", [])
        if not c.get("exp_alerts")
    }
    assert any(15 < d < 22 for d in quiet) and any(d > 22 for d in quiet)


def test_generator_check_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--check says whether the file is current, without writing it."""
    gen = _generator()
    copy = tmp_path / GENERATED.name
    copy.write_text(GENERATED.read_text())
    monkeypatch.setattr(gen, "OUT", copy)
    assert gen.main(["gen", "--check"]) == 0
    copy.write_text(GENERATED.read_text().replace("value: 1.5", "value: 1.6", 1))
    assert gen.main(["gen", "--check"]) == 1
    assert gen.main(["gen"]) == 0
    assert copy.read_text() == GENERATED.read_text()


def test_encode_series_notation() -> None:
    gen = _generator()
    assert gen.encode([0, 60, 120, 180, 200, 220, 220]) == "0+60x3 200+20x1 220"
    assert gen.encode([5, 5, 5, 0, 0]) == "5x2 0x1"
    assert gen.encode([3]) == "3"
    assert gen.encode([9, 7, 5]) == "9-2x2"


# -- the rules ----------------------------------------------------------------------------------


def test_both_signals_share_one_method() -> None:
    """Every derived record of the clients is the events' one with the signal renamed, so the
    value checks of either hold for both."""
    rules = _rules()
    for suffix in DERIVED:
        events = rules[MESSAGES + suffix]["expr"]
        clients = rules[CLIENTS + suffix]["expr"]
        assert clients == events.replace(MESSAGES, CLIENTS), suffix


def test_prediction_branches_differ_only_in_their_week() -> None:
    expr = _rules()[MESSAGES + "_prediction"]["expr"]
    branches = re.findall(r"label_replace\((.*?)\"weeks_ago\", \"(\d)\", \"\", \"\"\)", expr, re.S)
    assert [week for _, week in branches] == ["1", "2", "3"]
    first = branches[0][0]
    for body, week in branches:
        k = int(week)
        expected = (
            first.replace("offset 167h30m", f"offset {168 * k - 1}h30m")
            .replace("offset 1w", f"offset {k}w")
            .replace("offset 8d", f"offset {7 * k + 1}d")
        )
        assert body == expected, f"week {k}"


def test_error_is_what_a_majority_of_the_weeks_agree_on() -> None:
    """The error record: the second largest of the weeks' errors if positive, plus the second
    smallest if negative; checked here against what the rule file's header promises."""
    for signal in (MESSAGES, CLIENTS):
        expr = " ".join(_rules()[signal + "_error"]["expr"].split())
        weekly = f"{signal} - ignoring (weeks_ago) group_right () {signal}_prediction"
        assert expr == (
            f"clamp_min( min without (weeks_ago) ( topk without (weeks_ago) (2, {weekly} ) ), 0 )"
            f" + clamp_max( max without (weeks_ago) ( bottomk without (weeks_ago) (2, {weekly} ) ),"
            " 0 )"
        )

    def vote(errors: list[float]) -> float:
        """The expression above, on one job's weekly errors."""
        top2, bottom2 = sorted(errors)[-2:], sorted(errors)[:2]
        return max(min(top2), 0) + min(max(bottom2), 0)

    rng = random.Random(14)
    for _ in range(2000):
        errors = [rng.choice([rng.uniform(-9, 9), 0.0, 3.0]) for _ in range(rng.randint(1, 3))]
        if len(errors) == 1:
            assert vote(errors) == errors[0]
        elif len(errors) == 2:
            same_sign = min(errors) > 0 or max(errors) < 0
            assert vote(errors) == (min(errors, key=abs) if same_sign else 0), errors
        else:
            assert vote(errors) == statistics.median(errors), errors


def test_job_matchers_are_the_three_selectors_and_only_on_exported_metrics() -> None:
    """The mixin swaps the three selector strings for a deployment's own; a recorded series
    keeps only the labels it was aggregated by, so a selector on one could match nothing."""
    text = ANOMALY_RULES.read_text()
    matchers = re.findall(r'\bjob\s*[!=]~?\s*"[^"]*"', text)
    assert matchers
    assert set(matchers) <= set(SELECTORS), set(matchers) - set(SELECTORS)
    for rule in _rules().values():
        assert not re.search(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\s*\{", rule["expr"]), rule


#: How each runbook section states its alert's minimum-traffic floor.
FLOOR_IN_RUNBOOK = {
    "CrmEventsTrafficAnomaly": "under {} events/s on the same day last week",
    "CrmEventsClientsAnomaly": "at least {} clients on the same day last week",
}


def test_alerts_are_symmetric_with_a_floor_and_the_runbooks_state_them() -> None:
    rules = _rules()
    for alert, signal in ALERTS.items():
        expr = rules[alert]["expr"]
        assert f"{signal}_zscore > 3" in expr and f"{signal}_zscore < -3" in expr
        match = re.search(rf"{re.escape(signal)}_avg1d offset 1w >= (\d+)", expr)
        assert match, f"{alert}: no minimum-traffic floor on last week's average"
        section = " ".join(_section(alert).split())
        assert FLOOR_IN_RUNBOOK[alert].format(match.group(1)) in section, alert
        assert rules[alert]["for"] == "15m" and "for 15 minutes" in section
    assert "without 8 days of history" in _section("CrmEventsTrafficAnomaly")


def test_off_peak_blindness_is_stated() -> None:
    """The divisor's floor (a share of the daily average) makes |z| > 3 impossible for any
    deviation under 3 times that share: the rule file and the runbook say what it means for a
    complete stop at quiet hours."""
    expr = " ".join(_rules()[MESSAGES + "_zscore"]["expr"].split())
    match = re.search(rf"or ([0-9.]+) \* {re.escape(MESSAGES)}_avg1d", expr)
    assert match
    share = f"{round(3 * float(match.group(1)) * 100)}%"
    header = " ".join(
        line.lstrip("# ") for line in ANOMALY_RULES.read_text().splitlines() if line.startswith("#")
    )
    assert f"deviation of more than {share} of it" in header
    section = " ".join(_section("CrmEventsTrafficAnomaly").split())
    assert f"above about {share} of the daily average" in section


def test_zscore_divisor_has_floors() -> None:
    """max(stddev of the error, 10% of the daily average, 1): never a division by zero."""
    for signal in (MESSAGES, CLIENTS):
        expr = " ".join(_rules()[signal + "_zscore"]["expr"].split())
        assert expr == (
            f"{signal}_error / clamp_min( {signal}_error_stddev1w >= 0.1 * {signal}_avg1d "
            f"or 0.1 * {signal}_avg1d, 1 )"
        )


def records_needing_history() -> set[str]:
    """Records that stay empty until Prometheus holds more than a week of data: those that
    read an offset of a week or more, and those that read them."""
    rules = {name: r for name, r in _rules().items() if "record" in r}
    needing = {name for name, r in rules.items() if re.search(r"offset \d+(w|d|h)", r["expr"])}
    grew = True
    while grew:
        before = len(needing)
        needing |= {
            name
            for name, r in rules.items()
            if any(re.search(rf"(?<![\w:]){re.escape(n)}(?![\w:])", r["expr"]) for n in needing)
        }
        grew = len(needing) > before
    return needing


def test_records_needing_history() -> None:
    """What a live test of a fresh Prometheus cannot see; the promtool tests check their
    values (anomaly_test.yml, group "the value of every rule")."""
    assert records_needing_history() == NEEDS_HISTORY
