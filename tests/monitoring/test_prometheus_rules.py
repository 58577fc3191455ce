"""Prometheus rules and config: promtool's checks, the rule unit tests, and what every alert
and recording rule must carry or be covered by."""

from __future__ import annotations

import functools
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from .support import (
    JWKS_METRICS,
    PARTITION_RESET_REASONS,
    PROMETHEUS_DIR,
    PROMETHEUS_SERIES,
    REFILL_REASONS,
    RULES_DIR,
    RUNBOOK_BASE,
    RUNBOOKS,
    SERVICE_METRICS,
    SEVERITIES,
    alert_names,
    alert_rules,
    describe,
    load_yaml,
    metric_names,
    record_names,
    recording_rules,
    rule_files,
    rule_test_files,
    run,
)

# -- promtool -----------------------------------------------------------------------------------


def test_promtool_check_rules_lint_fatal(promtool: str) -> None:
    """All lint checks (duplicate rules), lint errors fatal (exit status 3)."""
    result = run(
        [promtool, "check", "rules", "--lint=all", "--lint-fatal", *map(str, rule_files())]
    )
    assert result.returncode == 0, describe(result)
    for path in rule_files():
        count = sum(len(g["rules"]) for g in load_yaml(path)["groups"])
        assert f"Checking {path}\n  SUCCESS: {count} rules found" in result.stdout, path.name


def test_promtool_check_config_production(promtool: str) -> None:
    """monitoring/prometheus/prometheus.yml (compose), with the rule files it loads."""
    result = run(
        [promtool, "check", "config", "--lint=all", "--lint-fatal", "prometheus.yml"],
        cwd=PROMETHEUS_DIR,
    )
    assert result.returncode == 0, describe(result)
    assert f"SUCCESS: {len(rule_files())} rule files found" in result.stdout


def test_promtool_test_rules(promtool: str) -> None:
    """The unit tests under monitoring/prometheus/tests/ (every alert fires and stays quiet,
    every recording rule has its value checked)."""
    # One promtool per file, two at a time: the anomaly tests alone take as long as all the
    # others, and promtool uses one core.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(
            pool.map(
                lambda f: run([promtool, "test", "rules", str(f)]),
                # the largest first, so that the two finish together
                sorted(rule_test_files(), key=lambda f: -f.stat().st_size),
            )
        )
    assert len(results) == len(rule_test_files()) >= 8
    for result in results:
        assert result.returncode == 0, describe(result)
        assert result.stdout.count("SUCCESS") == 1, describe(result)


def test_promtool_test_rules_catches_a_wrong_expectation(promtool: str, tmp_path: Path) -> None:
    """The rule tests are not vacuous: change one expected annotation and promtool fails."""
    source = RULES_DIR.parent / "tests" / "alerts_availability_test.yml"
    text = source.read_text().replace("../rules/", f"{RULES_DIR}/")
    broken = text.replace("has failed every scrape", "has failed some scrapes", 1)
    assert broken != text
    (tmp_path / "broken_test.yml").write_text(broken)
    result = run([promtool, "test", "rules", str(tmp_path / "broken_test.yml")])
    assert result.returncode != 0, describe(result)
    assert "CrmEventsServiceDown" in result.stdout + result.stderr


# -- what every rule carries --------------------------------------------------------------------


SEED_ALERTS = {
    "CrmEventsServiceDown",
    "CrmEventsConsumerStuck",
    "CrmEventsSLOAvailabilityBreach",
    "CrmEventsNoClients",
    "CrmEventsTooManyClients",
    "CrmEventsNoMessages",
    "CrmEventsHighErrorRate",
    "CrmEventsFrequentRestarts",
    "CrmEventsSLOThroughputDegraded",
}
NEW_ALERTS = {
    "CrmEventsConsumerLagHigh",
    "CrmEventsConsumerLagGrowing",
    "CrmEventsLatencySLOFastBurn",
    "CrmEventsLatencySLOSlowBurn",
    "CrmEventsDeadLetters",
    "CrmEventsEdgeNotReady",
    "CrmEventsSlowDisconnectsHigh",
    "CrmEventsResetsHigh",
    # issue 7: the circuit breakers and the edge's limits
    "CrmEventsCircuitOpen",
    "CrmEventsLimitRejectionsHigh",
    # issue 11: malformed input from Redis, and background tasks that ended and were restarted
    "CrmEventsBadMessages",
    "CrmEventsTaskRestarts",
    # issue 12: Redis is a rebuildable copy of Kafka's tail
    "CrmEventsRedisRefill",
    "CrmEventsRedisWaitTimeouts",
    "CrmEventsStreamEmpty",
    # issue 14: anomaly detection against the same hour of past weeks
    "CrmEventsTrafficAnomaly",
    "CrmEventsClientsAnomaly",
    # issue 15: an edge cannot refresh its identity provider's keys
    "CrmEventsJwksFetchFailing",
    # issue 18: an edge's memory growing for hours, client objects outliving their streams
    "CrmEventsEdgeMemoryGrowing",
    "CrmEventsEdgeClientObjectsLeaking",
}


def test_the_seed_alerts_and_the_new_ones_exist() -> None:
    assert set(alert_names()) == SEED_ALERTS | NEW_ALERTS
    assert len(alert_rules()) == len(alert_names()), "an alert name is defined twice"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_has_severity_summary_description_runbook(rule: dict[str, Any]) -> None:
    assert re.fullmatch(r"CrmEvents[A-Z][A-Za-z0-9]+", rule["alert"])
    assert rule.get("for"), "every alert waits a little before firing"
    labels = rule.get("labels", {})
    assert labels.get("severity") in SEVERITIES
    assert labels.get("service") == "crm-events"
    ann = rule.get("annotations", {})
    assert ann.get("summary") and "{{" not in ann["summary"], "summary: one static sentence"
    assert "{{" in ann.get("description", ""), "description: templated with labels or value"
    assert ann.get("runbook_url") == f"{RUNBOOK_BASE}#{rule['alert'].lower()}"


def test_latency_slo_alerts_are_multi_window_multi_burn_rate() -> None:
    """Google SRE workbook thresholds, each long window paired with its short one."""
    by_name = {r["alert"]: r for r in alert_rules()}
    pairs = {
        "CrmEventsLatencySLOFastBurn": [("1h", "5m", "14.4"), ("6h", "30m", "6")],
        "CrmEventsLatencySLOSlowBurn": [("1d", "2h", "3"), ("3d", "6h", "1")],
    }
    for alert, windows in pairs.items():
        expr = by_name[alert]["expr"]
        for long, short, factor in windows:
            for window in (long, short):
                assert f"ratio_rate{window}) > ({factor} * 0.01)" in expr, (alert, window)
    assert by_name["CrmEventsLatencySLOFastBurn"]["labels"]["severity"] == "critical"
    assert by_name["CrmEventsLatencySLOSlowBurn"]["labels"]["severity"] == "warning"


def test_latency_slo_threshold_is_a_bucket_boundary() -> None:
    from edge.metrics import LATENCY_BUCKETS_S

    exprs = [r["expr"] for r in recording_rules() if "good:ratio" in r["record"]]
    assert exprs
    for expr in exprs:
        (le,) = set(re.findall(r'le="([^"]+)"', expr))
        assert float(le) in LATENCY_BUCKETS_S
        # the Python client writes le="0.1", not "0.10" or "1e-1"
        assert le == repr(float(le))


def test_partition_reset_reasons_are_the_edges() -> None:
    """The live test expects a child per partition and reason; the runbook explains each."""
    from edge.resume import RESET_REASONS

    assert set(RESET_REASONS) == PARTITION_RESET_REASONS
    runbook = RUNBOOKS.read_text()
    for reason in PARTITION_RESET_REASONS | REFILL_REASONS:
        assert f"`{reason}`" in runbook, f"the runbooks do not explain {reason}"


def test_jwks_metrics_are_the_edges() -> None:
    """JWKS_METRICS is what an edge fetching its keys exports (the live test's edges do not),
    with the label values the rules select."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from edge.metrics import JWKS_FETCH_RESULTS, JwksMetrics

    registry = CollectorRegistry()
    JwksMetrics(registry)
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    samples = [s for f in families for s in f.samples if not s.name.endswith("_created")]
    assert {s.name for s in samples} == JWKS_METRICS
    results = {s.labels["result"] for s in samples if s.name == "crm_events_jwks_fetches_total"}
    assert results == set(JWKS_FETCH_RESULTS)
    for rule in alert_rules():
        if metric_names(rule["expr"]) & JWKS_METRICS:
            assert set(re.findall(r'result="(\w+)"', rule["expr"])) <= results, rule["alert"]


def test_recording_rule_names_follow_level_metric_operations() -> None:
    for name in record_names():
        level, metric, ops = name.split(":")
        assert level and ops and metric.startswith("crm_events_"), name


@pytest.mark.parametrize(
    "expr_owner",
    [r.get("alert") or r["record"] for r in alert_rules() + recording_rules()],
)
def test_rules_read_only_exported_metrics(expr_owner: str) -> None:
    """Every metric a rule selects is exported by the services, made by Prometheus, or a
    recording rule."""
    rule = next(
        r
        for r in alert_rules() + recording_rules()
        if expr_owner in (r.get("alert"), r.get("record"))
    )
    known = SERVICE_METRICS | PROMETHEUS_SERIES | set(record_names())
    used = metric_names(rule["expr"])
    unknown = used - known
    assert not unknown, f"{expr_owner} reads metrics nobody exports: {sorted(unknown)}"


def test_metric_name_scanner() -> None:
    expr = (
        'sum by (job, le) (rate(a_bucket{job="x", le="0.1"}[5m])) / on (job) group_left () '
        '(b:c:d offset 5m) or vector(0) and time() - max without (x) (e{__name__=~"q"})'
    )
    assert metric_names(expr) == {"a_bucket", "b:c:d", "e"}
    assert metric_names('{__name__="up", job="x"}') == {"up"}


# -- coverage of the rule unit tests ------------------------------------------------------------


@functools.cache
def _test_groups() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, t) for p in rule_test_files() for t in load_yaml(p)["tests"]]


def test_every_rule_test_group_has_an_explicit_interval() -> None:
    """promtool 2.42 has no default interval (it came in 2.49)."""
    for file, group in _test_groups():
        assert group.get("interval"), f"{file}: {group.get('name')} has no interval"


def test_rule_test_files_load_every_rule_file() -> None:
    for path in rule_test_files():
        loaded = {Path(f).name for f in load_yaml(path)["rule_files"]}
        assert "crm_events_recording.yml" in loaded, path.name


@pytest.mark.parametrize("alert", alert_names())
def test_every_alert_has_a_firing_and_a_quiet_case(alert: str) -> None:
    firing, quiet = [], []
    for file, group in _test_groups():
        for case in group.get("alert_rule_test", []):
            if case["alertname"] != alert:
                continue
            where = f"{file}: {group['name']} @ {case['eval_time']}"
            if case.get("exp_alerts"):
                firing.append(where)
                for exp in case["exp_alerts"]:
                    labels = exp.get("exp_labels", {})
                    assert labels.get("severity") in SEVERITIES, where
                    assert set(exp.get("exp_annotations", {})) == {
                        "summary",
                        "description",
                        "runbook_url",
                    }, f"{where}: annotations must be checked exactly"
            else:
                quiet.append(where)
    assert firing, f"{alert}: no case where it fires"
    assert quiet, f"{alert}: no case where it must stay quiet"


@pytest.mark.parametrize("record", record_names())
def test_every_recording_rule_has_a_value_check(record: str) -> None:
    checks = [
        case
        for _, group in _test_groups()
        for case in group.get("promql_expr_test", [])
        if re.search(rf"(?<![\w:]){re.escape(record)}(?![\w:])", case["expr"])
        and case.get("exp_samples")
    ]
    assert checks, f"{record}: no promql_expr_test checks its value"
