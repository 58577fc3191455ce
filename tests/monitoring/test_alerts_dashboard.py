"""The ops team's alert dashboard (issue 16), offline: it shows this project's alerts only, links
every alert of the rules to its runbook (the text panel and each table row, both generated from
the rules by the mixin, so they cannot drift), and its SLO panels read the recording rules'
series. What every dashboard must satisfy (schemas, queries parse, provisioning) is in
test_grafana_dashboard.py; the live test shows its firing-alerts query with a real alert."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools import mixin
from devtools.mixin import MixinError, render_dashboard

from .support import (
    ALERTS_DASHBOARD,
    MIXIN_ALERTS_DASHBOARD,
    RUNBOOK_BASE,
    alert_rules,
    describe,
    load_dashboard,
    metric_names,
    panel_by_title,
    panel_queries,
    panels,
    record_names,
    run,
    substitute,
)

#: The series of Prometheus's own alert state.
ALERT_SERIES = {"ALERTS", "ALERTS_FOR_STATE"}
RUNBOOK_LABEL = re.compile(r'"runbook", "([^"]*)", "alertname", "([^"]*)"')


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard(ALERTS_DASHBOARD)


def _anchors() -> dict[str, str]:
    """Alert name -> the anchor of its runbook_url, from the rendered rules."""
    out = {}
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base == RUNBOOK_BASE, url
        out[rule["alert"]] = anchor
    return out


def test_title_uid_and_the_panels_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"] == "CRM events \u2014 alerts"
    assert dashboard["uid"] == "crm-events-alerts"
    kinds = {p["title"]: p["type"] for p in panels(dashboard)}
    assert kinds["Firing alerts"] == kinds["Pending alerts"] == kinds["Active since"] == "table"
    assert kinds["Alert history"] == "timeseries"
    assert kinds["Alert rules"] == "alertlist"
    assert kinds["Runbooks"] == "text"
    exprs = {q.title: q.expr for q in panel_queries(dashboard)}
    assert 'alertstate="firing"' in exprs["Firing alerts"]
    assert 'alertstate="pending"' in exprs["Pending alerts"]
    assert metric_names(exprs["Active since"]) == {"ALERTS_FOR_STATE"}
    (history,) = panel_by_title(dashboard, "Alert history")["targets"]
    assert history["range"] and not history["instant"], "history is over the dashboard's range"
    assert metric_names(history["expr"]) == {"ALERTS"}


def test_every_alert_query_selects_this_projects_alerts_only(dashboard: dict[str, Any]) -> None:
    """The rules label every alert service="crm-events"; each query of the alert series (and
    the alert list's filter) selects that label, so other teams' alerts in the same
    Prometheus stay out, and the instance variable restricts them further."""
    assert {r["labels"]["service"] for r in alert_rules()} == {"crm-events"}
    seen = 0
    for q in panel_queries(dashboard):
        used = metric_names(q.expr)
        if used & ALERT_SERIES:
            seen += 1
            for selector in re.findall(r"\b(?:ALERTS|ALERTS_FOR_STATE)(\{[^}]*\})", q.expr):
                assert 'service="crm-events"' in selector, q.key
                assert 'instance=~"$instance"' in selector, q.key
            assert len(re.findall(r"\bALERTS(?:_FOR_STATE)?\b", q.expr)) == len(
                re.findall(r"\b(?:ALERTS|ALERTS_FOR_STATE)\{", q.expr)
            ), f"{q.key}: an alert series without a selector"
    assert seen >= 5
    alertlist = panel_by_title(dashboard, "Alert rules")
    assert alertlist["options"]["alertInstanceLabelFilter"] == '{service="crm-events"}'
    # All also shows the alerts about a whole role, which have no instance label.
    (instance,) = [v for v in dashboard["templating"]["list"] if v["name"] == "instance"]
    assert instance["allValue"] == ".*"


def test_the_runbooks_panel_links_every_alert_of_the_rules(dashboard: dict[str, Any]) -> None:
    content = panel_by_title(dashboard, "Runbooks")["options"]["content"]
    links = dict(re.findall(r"\[(\w+)\]\((https://[^)\s]+)\)", content))
    expected = {r["alert"]: r["annotations"]["runbook_url"] for r in alert_rules()}
    assert links == expected
    # one table row per alert, with its severity
    for rule in alert_rules():
        row = f"| [{rule['alert']}]({rule['annotations']['runbook_url']}) | "
        assert row + rule["labels"]["severity"] + " |" in content, rule["alert"]


@pytest.mark.parametrize("title", ["Firing alerts", "Pending alerts", "Active since"])
def test_each_table_row_links_its_alerts_runbook(dashboard: dict[str, Any], title: str) -> None:
    """Grafana cannot lower-case the alert name for the anchor: the query adds a runbook label
    with every alert's anchor, and the row's link is the runbook base and that label."""
    (query,) = [q for q in panel_queries(dashboard) if q.title == title]
    pairs = RUNBOOK_LABEL.findall(query.expr)
    assert {alert: anchor for anchor, alert in pairs} == _anchors()
    assert len(pairs) == len(_anchors()), "one label_replace per alert"
    (link,) = panel_by_title(dashboard, title)["fieldConfig"]["defaults"]["links"]
    assert link["url"] == f"{RUNBOOK_BASE}#${{__data.fields.runbook}}"


def test_the_runbook_label_on_real_alert_series(promtool: str, tmp_path: Path) -> None:
    """promtool evaluates the firing table's query over ALERTS series: this project's alert
    gets its anchor, another service's alert with the same name is left out."""
    dashboard = load_dashboard(ALERTS_DASHBOARD)
    (query,) = [q for q in panel_queries(dashboard) if q.title == "Firing alerts"]
    labels = 'alertname="CrmEventsServiceDown", instance="h:1", job="e", severity="critical"'
    rules = tmp_path / "none.yml"
    rules.write_text("groups: []\n")
    case = {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'ALERTS{{{labels}, alertstate="firing", service="crm-events"}}',
                        "values": "1x3",
                    },
                    {
                        "series": f'ALERTS{{{labels}, alertstate="firing", service="other"}}',
                        "values": "1x3",
                    },
                    {
                        "series": f'ALERTS{{{labels}, alertstate="pending", service="crm-events"}}',
                        "values": "1x3",
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": substitute(query.expr, dashboard=dashboard),
                        "eval_time": "2m",
                        "exp_samples": [
                            {
                                "labels": f'ALERTS{{{labels}, alertstate="firing", '
                                'service="crm-events", runbook="crmeventsservicedown"}',
                                "value": 1,
                            }
                        ],
                    }
                ],
            }
        ],
    }
    test_file = tmp_path / "firing_test.yml"
    test_file.write_text(yaml.safe_dump(case, sort_keys=False))
    result = run([promtool, "test", "rules", test_file.name], cwd=tmp_path)
    assert result.returncode == 0, describe(result)


def test_the_slo_panels_read_the_recording_rules(dashboard: dict[str, Any]) -> None:
    recorded = set(record_names())
    budgets = {
        "Latency error budget left (3d)": "job:crm_events_delivery_latency_good:ratio_rate3d",
        "Availability error budget left (3d)": "job:crm_events_availability:ratio_avg5m",
    }
    for title, series in budgets.items():
        (query,) = [q for q in panel_queries(dashboard) if q.title == title]
        assert series in recorded
        assert metric_names(query.expr) == {series}, query.key
        # budget left = 1 - (bad share) / (the SLO's 1% budget)
        assert query.expr.startswith("1 - (1 - ") and query.expr.endswith(") / 0.01"), query.key
        assert panel_by_title(dashboard, title)["fieldConfig"]["defaults"]["unit"] == "percentunit"
    burn = [q for q in panel_queries(dashboard) if q.title == "Latency SLO burn rate"]
    windows = {
        f"job:crm_events_delivery_latency_good:ratio_rate{w}" for w in ("1h", "6h", "1d", "3d")
    }
    assert windows <= recorded
    assert {next(iter(metric_names(q.expr))) for q in burn} == windows


# -- generation from the rules (devtools/mixin.py) ----------------------------------------------


def test_a_new_alert_reaches_the_dashboard_when_rendered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Render from a copy of the rules with one more alert: both the runbook panel and the
    tables' runbook label have it, with nothing edited in the dashboard's source."""
    rules = tmp_path / "rules"
    shutil.copytree(mixin.RULES_SOURCE, rules)
    url = f"{RUNBOOK_BASE}#crmeventsbrandnew"
    (rules / "extra.yml").write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "extra",
                        "rules": [
                            {
                                "alert": "CrmEventsBrandNew",
                                "expr": "vector(1)",
                                "labels": {"severity": "info", "service": "crm-events"},
                                "annotations": {"summary": "New | odd.", "runbook_url": url},
                            }
                        ],
                    }
                ]
            }
        )
    )
    monkeypatch.setattr(mixin, "RULES_SOURCE", rules)
    rendered = json.loads(render_dashboard(MIXIN_ALERTS_DASHBOARD))
    content = panel_by_title(rendered, "Runbooks")["options"]["content"]
    assert f"| [CrmEventsBrandNew]({url}) | info | New \\| odd. |" in content
    (query,) = [q for q in panel_queries(rendered) if q.title == "Firing alerts"]
    assert ("crmeventsbrandnew", "CrmEventsBrandNew") in RUNBOOK_LABEL.findall(query.expr)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("@generated:nothing@", "unknown generated value"),
        ("@generated:runbook_links(x)@", "unknown generated value"),
        ("see @generated:runbook_links@", "must be a whole JSON string"),
    ],
)
def test_a_bad_generated_value_is_an_error(tmp_path: Path, value: str, message: str) -> None:
    source = tmp_path / "d.json"
    source.write_text(json.dumps({"panels": [{"options": {"content": value}}]}))
    with pytest.raises(MixinError, match=message):
        render_dashboard(source)
