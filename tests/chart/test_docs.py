"""docs/kubernetes.md works as pasted: its values file installs under the names its commands
use, its other values snippets render as it says, its prometheus-adapter rule serves the
metric the HPA asks for, the rollout it describes is the chart's, and the rolling restart
section holds measured figures and names the test that measures them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from edge.metrics import EdgeMetrics

from .support import REPO, Tools, describe, env_of, helm_template, of_kind, one, parse, rendered

pytestmark = pytest.mark.timeout(60)

DOC = REPO / "docs" / "kubernetes.md"


def blocks(language: str) -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def test_the_documented_install_renders_under_the_documented_names(
    tools: Tools, tmp_path: Path
) -> None:
    (values_text,) = [b for b in blocks("yaml") if b.startswith("# my-values.yaml\n")]
    values = tmp_path / "my-values.yaml"
    values.write_text(values_text, encoding="utf-8")
    install = next(b for b in blocks("sh") if "helm install" in b)
    release, namespace = re.search(
        r"helm install (\S+) deploy/helm/crm-events -n (\S+) ", install
    ).groups()
    result = helm_template(tools.helm, [values], release=release, namespace=namespace)
    assert result.returncode == 0, describe(result)
    docs = parse(result.stdout)
    deployments = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    text = DOC.read_text(encoding="utf-8")
    for named in set(re.findall(r"deployment/([a-z0-9-]+)", text)):
        assert named in deployments, named
    secret = re.search(r"create secret generic (\S+) \\\n\s+--from-literal=(\w+)=", text)
    assert secret
    jwt = yaml.safe_load(values_text)["auth"]["jwt"]
    assert (jwt["existingSecret"], jwt["existingSecretKey"]) == secret.groups()


def test_the_adapter_rule_serves_the_metric_the_hpa_reads(tools: Tools) -> None:
    (adapter,) = [yaml.safe_load(b) for b in blocks("yaml") if b.startswith("rules:\n")]
    (rule,) = adapter["rules"]["custom"]
    served = rule["name"]["as"]
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    registry = CollectorRegistry()
    EdgeMetrics(registry, "docs")
    assert series in {m.name for m in registry.collect()}
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    values = yaml.safe_load((REPO / "deploy/helm/crm-events/values.yaml").read_text())
    assert served == values["edge"]["autoscaling"]["clientsMetricName"]


NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "ten": 10}


def section(title: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    assert text.count(title) == 1, title
    return text.split(title, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]


def test_the_rolling_restart_section_holds_measured_figures() -> None:
    """The measurement is in its place: the conditions, a table of results over the stated
    number of runs, each with a figure, and the test that measures it, which exists."""
    body = section("### Rolling restart, measured")
    assert "<!--" not in body and "TODO" not in body and "TBD" not in body
    conditions = body.split("Conditions:", 1)[1].split("\n\n", 1)[0]
    for condition in (r"\d+ edges", r"[\d,]+\s+events/s", r"\d+ SSE clients", r"\d+ partitions"):
        assert re.search(condition, conditions.replace("*", "")), condition
    (word,) = re.findall(r"(\w+) runs:", conditions)
    runs = int(word) if word.isdigit() else NUMBERS[word.lower()]
    rows = [line for line in body.splitlines() if line.startswith("|")]
    header, rule, *results = rows
    assert re.fullmatch(r"\|-+\|-+\|", rule)
    assert f"result ({runs} runs)" in header
    assert len(results) >= 5
    for row in results:
        figure, result = row.strip("|").split("|")
        assert figure.strip() and re.search(r"\d", result), row
    assert any("exactly once" in row for row in results)
    (named,) = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", body))
    path, name = named
    source = (REPO / path).read_text(encoding="utf-8")
    assert re.search(rf"^(async )?def {name}\(", source, re.M), named


def test_the_docs_state_the_charts_rollout(tools: Tools) -> None:
    """Where the docs name the chart's maxSurge and maxUnavailable, they are the rendered
    ones."""
    text = DOC.read_text(encoding="utf-8")
    stated = re.findall(r"chart's maxSurge (\d+) / maxUnavailable (\d+)", text)
    stated += re.findall(r"`maxSurge: (\d+)`, `maxUnavailable: (\d+)`", text)
    assert len(stated) >= 2
    docs = rendered(tools.helm, REPO / "deploy/helm/crm-events/ci/default-values.yaml")
    strategy = one(docs, "Deployment", "edge")["spec"]["strategy"]["rollingUpdate"]
    for surge, unavailable in stated:
        assert (int(surge), int(unavailable)) == (strategy["maxSurge"], strategy["maxUnavailable"])


def test_the_identity_provider_snippet_renders_as_described(tools: Tools, tmp_path: Path) -> None:
    """Pasted over my-values.yaml: the edges get the issuer and mount no key."""
    (values_text,) = [b for b in blocks("yaml") if b.startswith("# my-values.yaml\n")]
    (provider,) = [b for b in blocks("yaml") if "oidcIssuer:" in b]
    files = [tmp_path / "my-values.yaml", tmp_path / "provider.yaml"]
    for path, text in zip(files, (values_text, provider), strict=True):
        path.write_text(text, encoding="utf-8")
    result = helm_template(tools.helm, files)
    assert result.returncode == 0, describe(result)
    env = env_of(one(parse(result.stdout), "Deployment", "edge"))
    jwt = yaml.safe_load(provider)["auth"]["jwt"]
    assert env["CRM_EVENTS_AUTH_OIDC_ISSUER"] == jwt["oidcIssuer"]
    assert env["CRM_EVENTS_JWT_AUDIENCE"] == jwt["audience"]
    assert not [n for n in env if n.startswith("CRM_EVENTS_JWT_") and n.endswith("_FILE")]


def test_the_documented_snippets_render_as_described(tools: Tools, tmp_path: Path) -> None:
    """The trusted-proxies and Prometheus examples, pasted into my-values.yaml."""
    (values_text,) = [b for b in blocks("yaml") if b.startswith("# my-values.yaml\n")]
    (proxies,) = [b for b in blocks("yaml") if b.startswith("edge:\n  trustedProxies:")]
    (prometheus,) = [b for b in blocks("yaml") if b.startswith("metrics:\n")]
    files = []
    for name, text in (("my-values", values_text), ("proxies", proxies), ("prom", prometheus)):
        files.append(tmp_path / f"{name}.yaml")
        files[-1].write_text(text, encoding="utf-8")
    result = helm_template(tools.helm, files)
    assert result.returncode == 0, describe(result)
    docs = parse(result.stdout)
    env = env_of(one(docs, "Deployment", "edge"))
    assert env["CRM_EVENTS_TRUSTED_PROXIES"] == ",".join(
        yaml.safe_load(proxies)["edge"]["trustedProxies"]
    )
    assert env["CRM_EVENTS_MAX_CONNECTIONS_PER_IP"] == "200"
    spec = one(docs, "Prometheus")["spec"]
    assert spec["alerting"]["alertmanagers"] and "volumeClaimTemplate" in spec["storage"]
