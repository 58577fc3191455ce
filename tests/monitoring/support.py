"""What the monitoring tests share: paths, the metrics the services export, the rule and
dashboard files as data, a small PromQL metric-name scanner, and promtool/amtool runners."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
PROMETHEUS_DIR = MONITORING / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_TESTS_DIR = PROMETHEUS_DIR / "tests"
ALERTMANAGER_YML = MONITORING / "alertmanager" / "alertmanager.yml"
DASHBOARDS_DIR = MONITORING / "grafana" / "dashboards"
DASHBOARD = DASHBOARDS_DIR / "crm_events_pipeline.json"
#: issue 16: the ops team's alert dashboard.
ALERTS_DASHBOARD = DASHBOARDS_DIR / "crm_events_alerts.json"
#: Its source in the mixin (placeholders and generated values not filled in).
MIXIN_ALERTS_DASHBOARD = MONITORING / "mixin" / "dashboards" / "crm_events_alerts.json"
#: Every dashboard, as committed (the mixin's rendering for the default selectors).
DASHBOARDS = (DASHBOARD, ALERTS_DASHBOARD)
PROVISIONING = MONITORING / "grafana" / "provisioning"
RUNBOOKS = MONITORING / "runbooks.md"
#: The Grafana JSON schemas, vendored (see its README.md; scripts/refresh-grafana-schemas.sh).
GRAFANA_SCHEMAS = MONITORING / "grafana" / "schemas"
REFRESH_SCRIPT = REPO / "scripts" / "refresh-grafana-schemas.sh"

RUNBOOK_BASE = "https://github.com/aetherlink/crm-events/blob/main/monitoring/runbooks.md"
SEVERITIES = ("critical", "warning", "info")
EDGE_JOB = "crm-events-edge"
INGEST_JOB = "crm-events-ingest"

# -- the metrics the services export (names as exposed) ----------------------------------------

COMMON_METRICS = {
    "crm_events_http_requests_total",
    # Exported from the first scrape: the ops routes' children exist at start.
    "crm_events_http_request_duration_seconds_bucket",
    "crm_events_http_request_duration_seconds_count",
    "crm_events_http_request_duration_seconds_sum",
    "crm_events_messages_total",
    "crm_events_ready",
    "crm_events_build_info",
    "process_start_time_seconds",
    "crm_events_circuit_state",
    "crm_events_circuit_transitions_total",
    "crm_events_task_restarts_total",
    # issue 18: resident memory (prometheus_client's process collector, Linux)
    "process_resident_memory_bytes",
}
EDGE_METRICS = COMMON_METRICS | {
    "crm_events_limit_rejections_total",
    "crm_events_auth_failures_total",
    "crm_events_sse_clients",
    "crm_events_sse_connections_total",
    "crm_events_sse_disconnects_total",
    "crm_events_delivery_latency_seconds_bucket",
    "crm_events_delivery_latency_seconds_count",
    "crm_events_delivery_latency_seconds_sum",
    "crm_events_sse_resumes_total",
    "crm_events_sse_resets_total",
    "crm_events_sse_replayed_events_total",
    "crm_events_replay_ring_reads_total",
    "crm_events_replay_ring_events",
    "crm_events_bus_reconnects_total",
    "crm_events_bus_repaired_events_total",
    "crm_events_bad_messages_total",
    # issue 12: the partitions each reset moved (one child per partition and reason from the
    # start, so that a healthy edge exports it and rate() sees the first reset)
    "crm_events_partition_resets_total",
    # issue 18: what the edge's memory holds: the byte-bounded caches (a child per cache from
    # the start), the replay ring, and the stream client objects alive (connected or ended but
    # not yet released)
    "crm_events_cache_bytes",
    "crm_events_replay_ring_bytes",
    "crm_events_client_objects",
}
INGEST_METRICS = COMMON_METRICS | {
    "crm_events_consumer_lag",
    "crm_events_dead_letters_total",
    "crm_events_ingest_records_total",
    "crm_events_ingest_batch_duration_seconds_bucket",
    "crm_events_ingest_batch_duration_seconds_count",
    "crm_events_ingest_batch_duration_seconds_sum",
    "crm_events_backend_errors_total",
    "crm_events_ingest_last_applied_timestamp_seconds",
    # issue 12: Redis rebuilt from Kafka. Refill children exist per assigned partition from
    # its assignment on; the stream length per partition is sampled by ingest's probe.
    "crm_events_refills_total",
    "crm_events_refilled_records_total",
    "crm_events_redis_wait_timeouts_total",
    "crm_events_stream_length",
}
#: issue 15: only on an edge that fetches its keys from an identity provider
#: (CRM_EVENTS_AUTH_JWKS_URL or CRM_EVENTS_AUTH_OIDC_ISSUER), so not in EDGE_METRICS, which
#: the live test's edges (keys from a file) must export.
JWKS_METRICS = {
    "crm_events_jwks_fetches_total",
    "crm_events_jwks_refetches_limited_total",
    "crm_events_jwks_keys",
    "crm_events_jwks_last_success_timestamp_seconds",
}
SERVICE_METRICS = EDGE_METRICS | INGEST_METRICS | JWKS_METRICS
#: Label values of the per-partition counters (a child for each partition and reason).
REFILL_REASONS = frozenset({"lost", "rolled_back", "assigned"})
PARTITION_RESET_REASONS = frozenset({"trimmed", "not_retained", "topic_changed", "old_format"})
#: Recording rules that stay empty until Prometheus holds 8 days of data: the anomaly
#: detection's predictions from the same hour of past weeks and what is computed from them.
NEEDS_HISTORY = frozenset(
    f"{signal}{suffix}"
    for signal in ("job:crm_events_messages:flow_rate5m", "job:crm_events_sse_clients:sum")
    for suffix in ("_prediction", "_error", "_error_stddev1w", "_zscore")
)
#: Series Prometheus itself makes.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}

# -- rules and rule tests as data ---------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS_DIR.glob("*.yml"))


@functools.cache
def _rules() -> tuple[dict[str, Any], ...]:
    out = []
    for path in rule_files():
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                out.append({**rule, "_group": group["name"], "_file": path.name})
    return tuple(out)


def alert_rules() -> list[dict[str, Any]]:
    return [r for r in _rules() if "alert" in r]


def recording_rules() -> list[dict[str, Any]]:
    return [r for r in _rules() if "record" in r]


def alert_names() -> list[str]:
    return sorted({r["alert"] for r in alert_rules()})


def record_names() -> list[str]:
    return sorted({r["record"] for r in recording_rules()})


# -- the dashboard as data ----------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    panel_id: int
    title: str
    ref: str
    expr: str

    @property
    def key(self) -> str:
        return f"{self.panel_id}{self.ref} {self.title}"


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in rows."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_by_title(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    (panel,) = [p for p in panels(dashboard) if p["title"] == title]
    return panel


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(p["id"], p["title"], t.get("refId", "A"), t["expr"])
        for p in panels(dashboard)
        for t in p.get("targets", [])
        if "expr" in t
    ]


#: Values for Grafana's variables: the dashboard's own ``instance`` takes its "All" value.
def substitute(
    expr: str,
    *,
    rate_interval: str = "1m",
    interval: str = "15s",
    range_: str = "1h",
    dashboard: dict[str, Any] | None = None,
) -> str:
    """A panel expression as Grafana sends it, for the given interval values, with the
    variables of ``dashboard`` (default: the pipeline dashboard). ``$1`` and the like are
    label_replace's group references, which Grafana leaves alone too."""
    if dashboard is None:
        dashboard = load_dashboard()
    values = {
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__range": range_,
        "__interval_ms": str(_duration_ms(interval)),
        "__range_s": str(_duration_ms(range_) // 1000),
    }
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            values[var["name"]] = var.get("allValue") or ".+"

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{([a-zA-Z_]\w*)(?::\w+)?\}|\$([a-zA-Z_]\w*)", repl, expr)


def _duration_ms(text: str) -> int:
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)", text)
    if match is None:
        raise ValueError(f"unsupported duration {text!r}")
    return int(match.group(1)) * units[match.group(2)]


# -- PromQL: which metric names does an expression read? ---------------------------------------

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (``name{...}``, ``{__name__="name"}``). Enough PromQL
    for this project's rules and panels: strings, label matchers, ranges and grouping clauses
    are removed, then every identifier that is not a function call or keyword is a name."""
    names = set(re.findall(r'__name__\s*=\s*"([^"]+)"', expr))
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


# -- promtool / amtool --------------------------------------------------------------------------


def binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
        if (Path(d) / name).is_file():
            return str(Path(d) / name)
    return None


def run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"$ {' '.join(result.args)}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
