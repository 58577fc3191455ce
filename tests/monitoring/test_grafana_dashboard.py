"""The Grafana dashboards and their provisioning, offline: the JSON schemas (vendored in
monitoring/grafana/schemas/), what every panel must carry, every query parses (promtool) and
reads only metrics the services export or rules record. Every dashboard of
monitoring/grafana/dashboards/ (the pipeline's and, issue 16, the ops team's alerts) is
checked; the alert dashboard's own properties are in test_alerts_dashboard.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from .support import (
    DASHBOARD,
    DASHBOARDS,
    DASHBOARDS_DIR,
    GRAFANA_SCHEMAS,
    PROMETHEUS_SERIES,
    PROVISIONING,
    REFRESH_SCRIPT,
    REPO,
    SERVICE_METRICS,
    describe,
    load_dashboard,
    load_yaml,
    metric_names,
    panel_queries,
    panels,
    record_names,
    run,
    substitute,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


#: Panel kinds grafana-foundation-sdk publishes no schema for (its jsonschema/ has none for
#: the alert list), checked against the options Grafana's panel defines instead.
UNPUBLISHED_SCHEMAS = {"alertlist"}
#: Grafana's alert list (unified alerting): the options of its panelcfg, as a JSON schema.
ALERTLIST_OPTIONS = {
    "type": "object",
    "additionalProperties": False,
    "required": ["viewMode", "groupMode", "maxItems", "sortOrder", "stateFilter"],
    "properties": {
        "viewMode": {"enum": ["list", "stat"]},
        "groupMode": {"enum": ["default", "custom"]},
        "groupBy": {"type": "array", "items": {"type": "string"}},
        "maxItems": {"type": "integer", "minimum": 1},
        "sortOrder": {"enum": [1, 2, 3, 4, 5]},
        "dashboardAlerts": {"type": "boolean"},
        "alertName": {"type": "string"},
        "alertInstanceLabelFilter": {"type": "string"},
        "datasource": {"type": "string"},
        "folder": {"type": ["object", "null"]},
        "showInstances": {"type": "boolean"},
        "stateFilter": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                k: {"type": "boolean"}
                for k in ("firing", "pending", "noData", "normal", "error", "recovering")
            },
        },
    },
}


@pytest.fixture(scope="module", params=DASHBOARDS, ids=lambda p: p.stem)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    path: Path = request.param
    return load_dashboard(path)


@pytest.fixture(scope="module")
def pipeline() -> dict[str, Any]:
    """The pipeline dashboard (the seed's), for what only it shows."""
    return load_dashboard(DASHBOARD)


def _all_panels() -> list[dict[str, Any]]:
    return [
        {**p, "_dashboard": path.stem} for path in DASHBOARDS for p in panels(load_dashboard(path))
    ]


def _panel_id(p: dict[str, Any]) -> str:
    return f"{p['_dashboard']}-{p['id']}-{p['type']}"


def test_every_committed_dashboard_is_checked() -> None:
    assert sorted(DASHBOARDS_DIR.glob("*.json")) == sorted(DASHBOARDS)


# -- the JSON schema ----------------------------------------------------------------------------


def _schema(name: str) -> dict[str, Any]:
    path = GRAFANA_SCHEMAS / name
    assert path.is_file(), f"no vendored {name}: add it to {REFRESH_SCRIPT.name} and rerun it"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _validate(instance: Any, schema: dict[str, Any], definition: str | None = None) -> None:
    import jsonschema

    if definition is not None:
        schema = {"$ref": f"#/definitions/{definition}", "definitions": schema["definitions"]}
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:10]
    )


def _script_schema_names() -> set[str]:
    """The SCHEMAS=(...) list of the refresh script, as file names."""
    match = re.search(r"^SCHEMAS=\(([^)]*)\)$", REFRESH_SCRIPT.read_text(), re.MULTILINE)
    assert match, f"no SCHEMAS=(...) line in {REFRESH_SCRIPT.name}"
    return {f"{name}.jsonschema.json" for name in match.group(1).split()}


def test_the_schemas_are_vendored_with_their_licence_and_version() -> None:
    """The tests read the project's own copy (no folder outside the checkout), which is what
    the refresh script writes, under upstream's Apache-2.0 licence, at a recorded commit."""
    assert GRAFANA_SCHEMAS.resolve().is_relative_to(REPO)
    vendored = {p.name for p in GRAFANA_SCHEMAS.glob("*.jsonschema.json")}
    assert vendored == _script_schema_names()
    licence = (GRAFANA_SCHEMAS / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    notice = (GRAFANA_SCHEMAS / "NOTICE").read_text()
    assert "grafana-foundation-sdk" in notice and "Apache License, Version 2.0" in notice
    commit = re.search(r"^Commit:\s+([0-9a-f]{40})\b", notice, re.MULTILINE)
    assert commit, "NOTICE records no upstream commit"
    readme = (GRAFANA_SCHEMAS / "README.md").read_text()
    assert commit.group(1) in readme, "README.md and NOTICE name different versions"


@pytest.mark.parametrize("name", sorted(_script_schema_names()))
def test_vendored_schema_is_a_valid_draft7_schema(name: str) -> None:
    import jsonschema

    schema = _schema(name)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)


def test_dashboard_matches_the_grafana_schema(dashboard: dict[str, Any]) -> None:
    _validate(dashboard, _schema("dashboard.jsonschema.json"))


@pytest.mark.parametrize("panel", _all_panels(), ids=_panel_id)
def test_panel_options_match_their_panel_schema(panel: dict[str, Any]) -> None:
    """options and fieldConfig.defaults.custom against <type>.jsonschema.json, targets
    against prometheus.jsonschema.json. A panel kind without a vendored schema fails: vendor
    it rather than leave the panel unchecked (the alert list, which upstream publishes no
    schema for, against Grafana's options for it)."""
    if panel["type"] in UNPUBLISHED_SCHEMAS:
        assert not (GRAFANA_SCHEMAS / f"{panel['type']}.jsonschema.json").exists(), (
            "a schema is vendored now: use it"
        )
        import jsonschema

        jsonschema.Draft7Validator.check_schema(ALERTLIST_OPTIONS)
        _validate(panel["options"], ALERTLIST_OPTIONS)
        assert "targets" not in panel and "custom" not in panel["fieldConfig"]["defaults"]
        return
    schema = _schema(f"{panel['type']}.jsonschema.json")
    _validate(panel["options"], schema, "Options")
    custom = panel["fieldConfig"]["defaults"].get("custom")
    if custom is not None and "FieldConfig" in schema["definitions"]:
        _validate(custom, schema, "FieldConfig")
    for target in panel.get("targets", []):
        _validate(target, _schema("prometheus.jsonschema.json"))


# -- what every panel carries -------------------------------------------------------------------


def test_datasource_is_a_template_variable(dashboard: dict[str, Any]) -> None:
    """File provisioning does not resolve __inputs/${DS_...}: a `datasource` variable does."""
    assert "__inputs" not in dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE


@pytest.mark.parametrize("panel", _all_panels(), ids=lambda p: f"{_panel_id(p)}-{p['title']}")
def test_panel_has_title_unit_description_and_the_datasource_variable(
    panel: dict[str, Any],
) -> None:
    assert panel["title"].strip()
    assert panel["description"].strip()
    assert panel["fieldConfig"]["defaults"]["unit"].strip()
    assert panel["datasource"] == DATASOURCE
    for target in panel.get("targets", []):
        assert target["datasource"] == DATASOURCE
        assert target["expr"].strip() and target["refId"]
    if panel["type"] not in ("text", "alertlist"):
        assert panel.get("targets"), "a data panel without a query"


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], int] = {}
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dashboard):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = p["id"]


SEED_PANELS = [
    "SSE clients connected",
    "Service status",
    "Messages total",
    "Availability SLO (5m)",
    "Message throughput",
    "SSE clients per edge",
    "HTTP requests by endpoint",
    "Service uptime",
    "Service labels & metadata",
    "Message rate",
    "Service info",
    "Active alerts",
]


def test_the_seed_panels_and_the_new_ones_exist(pipeline: dict[str, Any]) -> None:
    titles = [p["title"] for p in panels(pipeline)]
    assert set(SEED_PANELS) <= set(titles)
    exprs = " ".join(q.expr for q in panel_queries(pipeline))
    for metric in (
        "crm_events_consumer_lag",
        "crm_events_delivery_latency_seconds_bucket",
        "crm_events_dead_letters_total",
        'reason="slow"',
        "crm_events_sse_resets_total",
        # issue 12: Redis rebuilt from Kafka, positions by partition
        "crm_events_stream_length",
        "crm_events_refills_total",
        "crm_events_refilled_records_total",
        "crm_events_partition_resets_total",
        "crm_events_redis_wait_timeouts_total",
        # issue 18: the edge's memory, its bounded caches and its client objects
        "process_resident_memory_bytes",
        "crm_events_cache_bytes",
        "crm_events_replay_ring_bytes",
        "crm_events_client_objects",
    ):
        assert metric in exprs, f"no panel shows {metric}"


def test_per_partition_panels_keep_the_partition(pipeline: dict[str, Any]) -> None:
    """Stream length, refills and resets are shown by partition: a panel that summed them over
    partitions would hide the one partition Redis lost."""
    for metric in (
        "crm_events_stream_length",
        "crm_events_refills_total",
        "crm_events_refilled_records_total",
        "crm_events_partition_resets_total",
    ):
        (query,) = [q for q in panel_queries(pipeline) if metric in q.expr]
        grouping = re.match(r"\w+ by \(([^)]*)\)", query.expr)
        assert grouping, f"{query.key}: not aggregated by label"
        assert "partition" in {g.strip() for g in grouping.group(1).split(",")}, query.key


# -- every query parses and reads real metrics --------------------------------------------------


def _instance_variable_selector(dashboard: dict[str, Any]) -> str:
    (var,) = [v for v in dashboard["templating"]["list"] if v["name"] == "instance"]
    query: str = var["query"]
    assert query.startswith("label_values(") and query.endswith(", instance)")
    return query.removeprefix("label_values(").removesuffix(", instance)")


def test_every_query_parses(promtool: str, dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Each panel expression, variables substituted as Grafana does, as a recording rule that
    promtool parses (and the instance variable's selector too)."""
    rules = [
        {
            "record": f"dashboard:panel_{q.panel_id}:{q.ref.lower()}",
            "expr": substitute(q.expr, dashboard=dashboard),
        }
        for q in panel_queries(dashboard)
    ]
    rules.append(
        {"record": "dashboard:variable:instance", "expr": _instance_variable_selector(dashboard)}
    )
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, describe(result)
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_substitution_leaves_no_variable(dashboard: dict[str, Any]) -> None:
    """(``$1`` and the like: label_replace's group references, not variables.)"""
    for q in panel_queries(dashboard):
        assert not re.search(r"\$(?!\d)", substitute(q.expr, dashboard=dashboard)), q.key


def test_every_query_reads_exported_or_recorded_metrics(dashboard: dict[str, Any]) -> None:
    known = SERVICE_METRICS | PROMETHEUS_SERIES | set(record_names())
    for q in panel_queries(dashboard):
        used = metric_names(substitute(q.expr, dashboard=dashboard))
        assert used, f"{q.key}: selects no metric"
        assert used <= known, f"{q.key}: unknown metrics {sorted(used - known)}"
    assert metric_names(_instance_variable_selector(dashboard)) <= known


# -- provisioning -------------------------------------------------------------------------------


def test_datasource_provisioning(dashboard: dict[str, Any]) -> None:
    files = sorted((PROVISIONING / "datasources").glob("*.yaml"))
    assert files
    config = load_yaml(files[0])
    assert config["apiVersion"] == 1
    (ds,) = config["datasources"]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http://")
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == ds["uid"], "the variable defaults to this datasource"


def test_dashboard_provisioning() -> None:
    """One file provider loads the whole folder: every dashboard in it is provisioned, in
    the one crm-events folder, and Grafana needs their uids and titles distinct."""
    files = sorted((PROVISIONING / "dashboards").glob("*.yaml"))
    assert files
    config = load_yaml(files[0])
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    assert provider["folder"] == "crm-events"
    assert all(path.parent == DASHBOARDS_DIR for path in DASHBOARDS)
    loaded = [load_dashboard(path) for path in DASHBOARDS]
    for key in ("uid", "title"):
        values = [d[key] for d in loaded]
        assert len(set(values)) == len(values), f"two dashboards share a {key}: {values}"
