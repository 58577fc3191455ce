"""The chart's monitoring objects come from monitoring/, one source: the PrometheusRule's
groups are the rule files' groups, the dashboards ConfigMap holds the dashboards, and the
ServiceMonitors give the targets the job labels those rules select. The release's own
Prometheus sends its alerts somewhere and keeps its history on a volume, or is refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .support import (
    CHART,
    CHART_DASHBOARDS,
    CHART_RULES,
    MONITORING_DASHBOARDS,
    MONITORING_RULES,
    NAMESPACE,
    Doc,
    Tools,
    describe,
    helm_template,
    of_kind,
    one,
    parse,
    rendered,
    rule_groups,
    values_of,
)

pytestmark = pytest.mark.timeout(120)

FULL = CHART / "ci" / "sentinel-values.yaml"


def names(directory: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in directory.glob(pattern))


def test_the_charts_copies_are_monitorings_files() -> None:
    """files/ holds the same files as monitoring/ (the mixin generator writes both)."""
    assert names(CHART_RULES, "*.yml") == names(MONITORING_RULES, "*.yml")
    assert names(CHART_DASHBOARDS, "*.json") == names(MONITORING_DASHBOARDS, "*.json")
    for name in names(MONITORING_RULES, "*.yml"):
        assert (CHART_RULES / name).read_bytes() == (MONITORING_RULES / name).read_bytes(), name
    for name in names(MONITORING_DASHBOARDS, "*.json"):
        chart = (CHART_DASHBOARDS / name).read_bytes()
        assert chart == (MONITORING_DASHBOARDS / name).read_bytes(), name


def test_the_prometheus_rule_is_the_union_of_monitorings_rule_files(tools: Tools) -> None:
    rule = one(rendered(tools.helm, FULL), "PrometheusRule")
    expected = rule_groups(MONITORING_RULES)
    assert expected, "monitoring/ has rule groups"
    assert rule["spec"]["groups"] == expected


def test_the_dashboards_configmap_holds_monitorings_dashboards(tools: Tools) -> None:
    configmap = one(rendered(tools.helm, FULL), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    data = configmap["data"]
    assert sorted(data) == names(MONITORING_DASHBOARDS, "*.json")
    for name, text in data.items():
        assert json.loads(text) == json.loads((MONITORING_DASHBOARDS / name).read_text())


def jobs_in_rules() -> set[str]:
    """Every job the rules name: job="x" and the alternatives of job=~"x|y"."""
    found: set[str] = set()
    for group in rule_groups(MONITORING_RULES):
        for rule in group["rules"]:
            for op, value in re.findall(r'job(=~?)"([^"]+)"', rule["expr"]):
                found |= set(value.split("|")) if op == "=~" else {value}
    return found


def selected_service(docs: list[Doc], monitor: Doc) -> Doc:
    wanted = monitor["spec"]["selector"]["matchLabels"]
    services = [
        s for s in of_kind(docs, "Service") if wanted.items() <= s["metadata"]["labels"].items()
    ]
    assert len(services) == 1
    return services[0]


def test_the_service_monitors_produce_the_jobs_the_rules_select(tools: Tools) -> None:
    docs = rendered(tools.helm, FULL)
    monitors = of_kind(docs, "ServiceMonitor")
    jobs = set()
    for monitor in monitors:
        service = selected_service(docs, monitor)
        jobs.add(service["metadata"]["labels"][monitor["spec"]["jobLabel"]])
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert jobs == {"crm-events-edge", "crm-events-ingest"}
    assert jobs == jobs_in_rules()


def test_the_releases_prometheus_selects_its_objects_and_remote_writes(tools: Tools) -> None:
    docs = rendered(tools.helm, FULL)
    prometheus = one(docs, "Prometheus")["spec"]
    for kind, selector in (
        ("ServiceMonitor", "serviceMonitorSelector"),
        ("PrometheusRule", "ruleSelector"),
    ):
        wanted = prometheus[selector]["matchLabels"].items()
        assert all(wanted <= doc["metadata"]["labels"].items() for doc in of_kind(docs, kind))
    values = values_of(FULL)["prometheus"]
    assert prometheus["remoteWrite"] == values["remoteWrite"]
    assert prometheus["alerting"]["alertmanagers"] == values["alerting"]["alertmanagers"]
    assert prometheus["storage"] == values["storage"]
    assert "volumeClaimTemplate" in prometheus["storage"]


def test_the_prometheus_may_discover_its_alertmanagers(tools: Tools) -> None:
    """The Prometheus's service account can list endpoints in its own namespace (its
    targets) and in each namespace of an Alertmanager it sends to."""
    docs = rendered(tools.helm, FULL)
    prometheus = one(docs, "Prometheus")["spec"]
    account = prometheus["serviceAccountName"]
    wanted = {NAMESPACE} | {
        a.get("namespace", NAMESPACE) for a in prometheus["alerting"]["alertmanagers"]
    }
    assert wanted == {NAMESPACE, "monitoring"}
    roles = {
        (r["metadata"].get("namespace", NAMESPACE), r["metadata"]["name"]): r
        for r in of_kind(docs, "Role")
    }
    granted = set()
    for binding in of_kind(docs, "RoleBinding"):
        namespace = binding["metadata"].get("namespace", NAMESPACE)
        (subject,) = binding["subjects"]
        assert (subject["name"], subject["namespace"]) == (account, NAMESPACE)
        role = roles[(namespace, binding["roleRef"]["name"])]
        rules = {
            (g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
        }
        assert {("", "endpoints"), ("discovery.k8s.io", "endpointslices")} <= rules
        assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in role["rules"])
        granted.add(namespace)
    assert granted == wanted


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["metrics.prometheusRule.enabled=false"],
            "prometheus.enabled evaluates this release's PrometheusRule",
        ),
        (
            ["prometheus.storage=null"],
            "prometheus.enabled needs prometheus.storage.volumeClaimTemplate",
        ),
        (["prometheus.ephemeralStorage=true"], "prometheus.ephemeralStorage is true, but"),
    ],
    ids=["no-rules", "no-volume", "volume-and-ephemeral"],
)
def test_a_prometheus_that_would_page_nobody_or_forget_is_refused(
    tools: Tools, sets: list[str], message: str
) -> None:
    result = helm_template(tools.helm, [FULL], sets)
    assert result.returncode != 0, describe(result)
    assert message in result.stderr, describe(result)


def test_an_ephemeral_prometheus_is_allowed_when_asked_for(tools: Tools) -> None:
    result = helm_template(
        tools.helm,
        [FULL],
        ["prometheus.storage=null", "prometheus.ephemeralStorage=true"],
    )
    assert result.returncode == 0, describe(result)
    assert "storage" not in one(parse(result.stdout), "Prometheus")["spec"]


def test_no_prometheus_by_default(tools: Tools) -> None:
    docs = rendered(tools.helm, CHART / "ci" / "default-values.yaml")
    for kind in ("Prometheus", "PrometheusRule", "ServiceMonitor", "ConfigMap"):
        assert not of_kind(docs, kind), kind
