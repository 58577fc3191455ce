"""The seed's "test alert firing" step, made real: a real Prometheus (1 s scrape and rule
evaluation, every alert's ``for:`` shortened to 5 s in a generated copy of the rules) and a
real Alertmanager over a live deployment (ingest, two edges, nginx on the real Kafka and
Redis; tests/harness/cluster.py). It shows that

* every target is up;
* every recording rule, and every dashboard query with its variables substituted, returns data
  once there is a little traffic (events, SSE clients, history requests, one dead letter);
* stopping edge1 makes CrmEventsServiceDown fire for that instance and no other, Alertmanager
  routes it to PagerDuty and Slack, and it resolves once edge1 runs again; the alert
  dashboard's (issue 16) firing-alerts and active-since queries return it, with its runbook's
  anchor, while it fires and no longer once it resolved;
* the metrics the rules and panels read are the ones the processes really export, with the
  label values the rules expect (refill and reset reasons, a series for every partition);
* the first fill of a fresh deployment does not fire CrmEventsRedisRefill, and wiping a
  partition's keys in Redis fires it for that partition, with what the runbook names;
* the rules and the dashboard are the mixin's (devtools/mixin.py) rendered for job names other
  than the defaults (``live-edge``, ``live-ingest``): every rule and panel above works through
  the configured selectors, none through a hard-coded job;
* remote write: a second Prometheus, a receiver (``--web.enable-remote-write-receiver``) as a
  long-term store stands in for Thanos Receive, gets the scraped series and the recording
  rules' results, and answers queries of them.

Every wait polls the Prometheus (or Alertmanager) HTTP API against a deadline.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.mixin import render_to
from devtools.monitoring_stack import (
    MonitoringSettings,
    describe_consumer_group,
    main,
    monitoring_specs,
    shorten_for,
)
from devtools.probes import HttpReady, run_coroutine_blocking
from devtools.supervisor import ProcessSpec, Supervisor
from shared.contract import RedisKeys
from tests.harness.backends import Backends
from tests.harness.cluster import Cluster, crm_event, free_port
from tests.sse_client import Collector
from tests.waiting import eventually

from .support import (
    ALERTS_DASHBOARD,
    DASHBOARD,
    EDGE_METRICS,
    INGEST_METRICS,
    JWKS_METRICS,
    NEEDS_HISTORY,
    PARTITION_RESET_REASONS,
    PROMETHEUS_SERIES,
    REFILL_REASONS,
    alert_rules,
    binary,
    metric_names,
    panel_queries,
    record_names,
    recording_rules,
    substitute,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SCRAPE = "1s"
SHORT_FOR = "5s"
#: Grafana's $__rate_interval for a 1 s scrape is 4 s; one more scrape of slack.
RATE_INTERVAL = "5s"
EVENTS = 20
#: Job names unlike the defaults: the mixin is rendered for these.
EDGE_JOB = "live-edge"
INGEST_JOB = "live-ingest"

#: Dashboard panels whose query may rightly be empty on a healthy deployment, and where the
#: test shows them with data instead.
EMPTY_WHEN_HEALTHY = {
    "Active alerts": "ALERTS has series only while an alert is pending or firing; "
    "test_service_down_fires_for_the_stopped_edge_only shows it with CrmEventsServiceDown",
}
#: The same for the alert dashboard: its alert tables and history read ALERTS and
#: ALERTS_FOR_STATE (its counts fall back to 0, its SLO panels must have data).
ALERTS_EMPTY_WHEN_HEALTHY = {
    "Firing alerts": "shown with CrmEventsServiceDown in "
    "test_service_down_fires_for_the_stopped_edge_only",
    "Active since": "the same",
    "Pending alerts": "an alert is pending only for its for: (5 s here)",
    "Alert history": "ALERTS, as above",
}


@dataclass
class Live:
    cluster: Cluster
    mon: MonitoringSettings
    #: The mixin's dashboard rendered for this deployment's selectors.
    dashboard: dict[str, Any]
    #: The alert dashboard (issue 16), likewise.
    alerts_dashboard: dict[str, Any]
    #: The remote-write receiver's base URL.
    receiver_url: str

    def instance(self, name: str) -> str:
        if name.startswith("edge"):
            return f"127.0.0.1:{self.cluster.edge_ports[int(name[4:]) - 1]}"
        return f"127.0.0.1:{self.cluster.ingest_ports[int(name[6:]) - 1]}"

    @property
    def expected_targets(self) -> set[tuple[str, str]]:
        return {
            (EDGE_JOB, self.instance("edge1")),
            (EDGE_JOB, self.instance("edge2")),
            (INGEST_JOB, self.instance("ingest1")),
            ("prometheus", self.mon.prometheus_address),
        }


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(Path(tmp_path_factory.mktemp("live-cluster")), backends, edges=2).running() as c:
        yield c


def receiver_spec(prometheus_bin: str, home: Path, port: int) -> ProcessSpec:
    """A Prometheus that scrapes nothing and takes remote writes: the long-term store."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "receiver.yml"
    config.write_text("global:\n  scrape_interval: 1m\n")
    url = f"http://127.0.0.1:{port}"
    return ProcessSpec(
        name="receiver",
        argv=[
            prometheus_bin,
            f"--config.file={config}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-remote-write-receiver",
        ],
        cwd=home,
        ready=HttpReady(f"{url}/-/ready"),
        ready_timeout_s=30,
        stop_timeout_s=10,
        port=port,
    )


@pytest.fixture(scope="module")
def live(
    cluster: Cluster,
    prometheus_bin: str,
    alertmanager_bin: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Live]:
    run_dir = tmp_path_factory.mktemp("live-monitoring")
    receiver_port = free_port()
    mon = MonitoringSettings(
        run_dir,
        edge_targets=tuple(f"127.0.0.1:{p}" for p in cluster.edge_ports),
        ingest_targets=tuple(f"127.0.0.1:{p}" for p in cluster.ingest_ports),
        prometheus_port=free_port(),
        alertmanager_port=free_port(),
        scrape_interval=SCRAPE,
        evaluation_interval=SCRAPE,
        rules_dir=run_dir / "rules",
        edge_job=EDGE_JOB,
        ingest_job=INGEST_JOB,
        remote_write_url=f"http://127.0.0.1:{receiver_port}/api/v1/write",
    )
    # The mixin for this deployment's job names; then every alert's for: shortened.
    render_to(run_dir / "mixin", mon.selectors)
    shorten_for(run_dir / "mixin" / "rules", run_dir / "rules", SHORT_FOR)
    dashboard = json.loads((run_dir / "mixin" / "dashboards" / DASHBOARD.name).read_text())
    alerts_dashboard = json.loads(
        (run_dir / "mixin" / "dashboards" / ALERTS_DASHBOARD.name).read_text()
    )
    sup = Supervisor(run_dir)
    try:
        sup.start(receiver_spec(prometheus_bin, run_dir / "receiver", receiver_port))
        for spec in monitoring_specs(mon):
            sup.start(spec)
        yield Live(cluster, mon, dashboard, alerts_dashboard, f"http://127.0.0.1:{receiver_port}")
    finally:
        sup.stop("prometheus")
        sup.stop("alertmanager")
        sup.stop("receiver")


async def _generate_traffic(cluster: Cluster) -> None:
    """Two SSE clients (one per edge) receive EVENTS live events, each edge serves history,
    and one invalid record becomes a dead letter."""
    async with aiohttp.ClientSession() as session:
        clients = [Collector(cluster.edge_url(i, "/crm-events")).start(session) for i in (1, 2)]
        for c in clients:
            await eventually(lambda c=c: c.status == 200, 30, "an SSE stream to open")
        await cluster.produce([(f"k{i}".encode(), crm_event(i)) for i in range(EVENTS)])
        await cluster.produce([(b"bad", b"this is not json")])
        for c in clients:
            await eventually(
                lambda c=c: len(c.data_frames) >= EVENTS, 60, f"{EVENTS} events on {c.url}"
            )
        for i in (1, 2):
            async with session.get(cluster.edge_url(i, "/crm-events/history?n=5")) as resp:
                assert resp.status == 200
        # a resume with a Last-Event-ID (gap-free): counted as resumed, replays nothing
        last = clients[0].data_frames[-1].id
        assert last is not None
        resume = Collector(cluster.edge_url(2, "/crm-events"), {"Last-Event-ID": last})
        resume.start(session)
        await eventually(lambda: resume.status == 200, 30, "a resumed stream to open")
        for c in (*clients, resume):
            await c.stop()


@pytest.fixture(scope="module")
def traffic(live: Live) -> Live:
    run_coroutine_blocking(lambda: _generate_traffic(live.cluster), timeout_s=120)
    return live


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# -- Prometheus API -----------------------------------------------------------------------------


async def api(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    """GET a Prometheus API (``{"status", "data"}``: returns data) or Alertmanager API (the
    body itself) endpoint."""
    async with session.get(url, params=params) as resp:
        assert resp.status == 200, f"{url}: HTTP {resp.status}"
        body = await resp.json()
    if isinstance(body, dict) and "status" in body and "data" in body:
        assert body["status"] == "success", body
        return body["data"]
    return body


async def query(session: aiohttp.ClientSession, live: Live, expr: str) -> list[dict[str, Any]]:
    data = await api(session, f"{live.mon.prometheus_url}/api/v1/query", query=expr)
    result: list[dict[str, Any]] = data["result"]
    return result


async def wait_targets_up(session: aiohttp.ClientSession, live: Live) -> None:
    async def all_up() -> bool:
        data = await api(session, f"{live.mon.prometheus_url}/api/v1/targets", state="active")
        health = {
            (t["labels"]["job"], t["labels"]["instance"]): t["health"]
            for t in data["activeTargets"]
        }
        return set(health) == live.expected_targets and all(h == "up" for h in health.values())

    await eventually(all_up, 40, f"every target up: {sorted(live.expected_targets)}")


async def alerts_named(
    session: aiohttp.ClientSession, live: Live, name: str
) -> list[dict[str, Any]]:
    data = await api(session, f"{live.mon.prometheus_url}/api/v1/alerts")
    return [a for a in data["alerts"] if a["labels"]["alertname"] == name]


async def service_down_alerts(session: aiohttp.ClientSession, live: Live) -> list[dict[str, Any]]:
    return await alerts_named(session, live, "CrmEventsServiceDown")


async def alert_dashboard_rows(
    session: aiohttp.ClientSession, live: Live, title: str
) -> list[dict[str, Any]]:
    """What a panel of the alert dashboard shows: its query, taken from the dashboard as
    rendered for this deployment, with the variables substituted (instance: All)."""
    (panel_query,) = [q for q in panel_queries(live.alerts_dashboard) if q.title == title]
    expr = substitute(panel_query.expr, dashboard=live.alerts_dashboard)
    return await query(session, live, expr)


# -- the tests ----------------------------------------------------------------------------------


async def test_every_target_is_up(live: Live, session: aiohttp.ClientSession) -> None:
    await wait_targets_up(session, live)
    # and Prometheus loaded every rule of the generated copy, and found the Alertmanager
    groups = (await api(session, f"{live.mon.prometheus_url}/api/v1/rules"))["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(alert_rules()) + len(recording_rules())
    assert {r["duration"] for r in rules if r["type"] == "alerting"} == {5.0}
    data = await api(session, f"{live.mon.prometheus_url}/api/v1/alertmanagers")
    assert data["activeAlertmanagers"] == [{"url": f"{live.mon.alertmanager_url}/api/v2/alerts"}]


async def test_every_recording_rule_returns_data(
    traffic: Live, session: aiohttp.ClientSession
) -> None:
    live = traffic
    missing: list[str] = []

    async def all_recorded() -> bool:
        missing[:] = [
            r
            for r in record_names()
            if r not in NEEDS_HISTORY and not await query(session, live, r)
        ]
        return not missing

    try:
        await eventually(all_recorded, 45, "data from every recording rule")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still empty: {missing}") from None

    # The latency SLO ratio is a number (le="0.1" matched a real bucket), the dead letter
    # and the deliveries were counted.
    (good,) = await query(session, live, "job:crm_events_delivery_latency_good:ratio_rate5m")
    assert 0.0 <= float(good["value"][1]) <= 1.0
    (dead,) = await query(session, live, "job:crm_events_dead_letters:rate5m")
    assert float(dead["value"][1]) > 0
    reasons = await query(session, live, "job_reason:crm_events_dead_letters:rate5m")
    assert {r["metric"]["reason"] for r in reasons} == {"not_json"}
    (edges,) = await query(session, live, f'job:crm_events_messages:rate5m{{job="{EDGE_JOB}"}}')
    assert float(edges["value"][1]) > 0


async def test_remote_write_reaches_the_long_term_receiver(
    traffic: Live, session: aiohttp.ClientSession
) -> None:
    """The receiver holds what the local Prometheus scraped and recorded, with the external
    label that tells deployments apart, and answers queries over both."""
    live = traffic
    receiver = live.receiver_url

    async def ask(expr: str) -> list[dict[str, Any]]:
        data = await api(session, f"{receiver}/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    edges = {live.instance("edge1"), live.instance("edge2")}

    async def scraped_arrived() -> list[dict[str, Any]] | None:
        rows = await ask(f'crm_events_sse_connections_total{{job="{EDGE_JOB}"}}')
        return rows if {r["metric"]["instance"] for r in rows} >= edges else None

    rows = await eventually(scraped_arrived, 45, "the edges' scraped series at the receiver")
    assert {r["metric"].get("deployment") for r in rows} == {"crm-events-local"}
    assert all(float(r["value"][1]) >= 1 for r in rows), rows

    async def recorded_arrived() -> list[dict[str, Any]] | None:
        rows = await ask(f'job:crm_events_messages:rate5m{{job="{EDGE_JOB}"}} > 0')
        return rows or None

    (recorded,) = await eventually(recorded_arrived, 45, "a recorded series at the receiver")
    assert recorded["metric"]["deployment"] == "crm-events-local"
    # The receiver evaluates nothing itself: the series came over remote write.
    rules = (await api(session, f"{receiver}/api/v1/rules"))["groups"]
    assert rules == []
    # And a query over a range of it works, as a long-term store's dashboards would run it.
    data = await api(
        session,
        f"{receiver}/api/v1/query",
        query=f'max_over_time(job:crm_events_messages:rate5m{{job="{EDGE_JOB}"}}[5m])',
    )
    assert float(data["result"][0]["value"][1]) > 0


async def test_every_dashboard_query_returns_data(
    traffic: Live, session: aiohttp.ClientSession
) -> None:
    live = traffic
    expected: list[tuple[str, str]] = []
    for dashboard, exceptions in (
        (live.dashboard, EMPTY_WHEN_HEALTHY),
        (live.alerts_dashboard, ALERTS_EMPTY_WHEN_HEALTHY),
    ):
        queries = panel_queries(dashboard)
        titles = {q.title for q in queries}
        assert set(exceptions) <= titles, "an exception names a panel that is gone"
        expected += [
            (
                f"{dashboard['uid']} {q.key}",
                substitute(
                    q.expr, rate_interval=RATE_INTERVAL, interval=SCRAPE, dashboard=dashboard
                ),
            )
            for q in queries
            if q.title not in exceptions
        ]
    empty: list[str] = []

    async def all_have_data() -> bool:
        empty[:] = [key for key, expr in expected if not await query(session, live, expr)]
        return not empty

    try:
        await eventually(all_have_data, 45, "data from every dashboard query")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still empty: {empty}") from None

    # The instance variable: label_values(up{...}, instance) lists every process.
    var = next(v for v in live.dashboard["templating"]["list"] if v["name"] == "instance")
    selector = var["query"].removeprefix("label_values(").removesuffix(", instance)")
    values = await api(
        session, f"{live.mon.prometheus_url}/api/v1/label/instance/values", **{"match[]": selector}
    )
    assert {live.instance(n) for n in ("edge1", "edge2", "ingest1")} <= set(values)


async def test_service_down_fires_for_the_stopped_edge_only(
    live: Live, session: aiohttp.ClientSession
) -> None:
    await wait_targets_up(session, live)
    edge1 = live.instance("edge1")
    assert await service_down_alerts(session, live) == []

    await asyncio.to_thread(live.cluster.stop, "edge1")
    try:
        fired_elsewhere: set[str] = set()

        async def fired_for_edge1() -> bool:
            firing = [a for a in await service_down_alerts(session, live) if a["state"] == "firing"]
            fired_elsewhere.update(
                a["labels"]["instance"] for a in firing if a["labels"]["instance"] != edge1
            )
            return any(a["labels"]["instance"] == edge1 for a in firing)

        await eventually(fired_for_edge1, 40, f"CrmEventsServiceDown firing for {edge1}")
        firing = [a for a in await service_down_alerts(session, live) if a["state"] == "firing"]
        assert [(a["labels"]["job"], a["labels"]["instance"]) for a in firing] == [
            (EDGE_JOB, edge1)
        ], "only the stopped edge may be down"
        assert not fired_elsewhere, f"CrmEventsServiceDown also fired for {fired_elsewhere}"
        (alert,) = firing
        assert alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["runbook_url"].endswith("#crmeventsservicedown")

        # The dashboard's "Active alerts" panel shows it.
        (active,) = [q for q in panel_queries(live.dashboard) if q.title == "Active alerts"]
        rows = await query(session, live, substitute(active.expr))
        assert any(
            r["metric"]["alertname"] == "CrmEventsServiceDown" and r["metric"]["instance"] == edge1
            for r in rows
        )
        # So do the alert dashboard's firing table (with the runbook's anchor for the row's
        # link) and its active-since table.
        for title in ("Firing alerts", "Active since"):
            (row,) = [
                r["metric"]
                for r in await alert_dashboard_rows(session, live, title)
                if r["metric"]["alertname"] == "CrmEventsServiceDown"
            ]
            assert (row["instance"], row["job"], row["severity"]) == (
                edge1,
                EDGE_JOB,
                "critical",
            ), title
            assert alert["annotations"]["runbook_url"].endswith("#" + row["runbook"]), title

        # Alertmanager got it and routes it to PagerDuty and Slack.
        async def in_alertmanager() -> list[dict[str, Any]]:
            got = await api(session, f"{live.mon.alertmanager_url}/api/v2/alerts")
            return [
                a
                for a in got
                if a["labels"]["alertname"] == "CrmEventsServiceDown"
                and a["labels"]["instance"] == edge1
            ]

        (am_alert,) = await eventually(in_alertmanager, 20, "the alert in Alertmanager")
        assert {r["name"] for r in am_alert["receivers"]} == {
            "pagerduty-crm-events",
            "slack-crm-events",
        }
    finally:
        await asyncio.to_thread(live.cluster.start, "edge1")

    async def service_down_rows() -> list[dict[str, Any]]:
        return [
            r
            for r in await alert_dashboard_rows(session, live, "Firing alerts")
            if r["metric"]["alertname"] == "CrmEventsServiceDown"
        ]

    async def resolved() -> bool:
        return await service_down_alerts(session, live) == [] and not await service_down_rows()

    await eventually(resolved, 40, "CrmEventsServiceDown to resolve after edge1 restarted")
    # and the alert dashboard's firing table no longer lists it
    assert await service_down_rows() == []
    await wait_targets_up(session, live)

    # The restart is visible to CrmEventsFrequentRestarts' fallback signal.
    async def restart_counted() -> bool:
        expr = f'resets(crm_events_http_requests_total{{path="/metrics", instance="{edge1}"}}[5m])'
        return any(float(r["value"][1]) >= 1 for r in await query(session, live, expr))

    await eventually(restart_counted, 20, "the restart of edge1 as a reset of its /metrics counter")


def _metrics_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text: str = resp.read().decode()
    return text


def _exported(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def _label_pairs(text: str, sample: str) -> set[tuple[str, str]]:
    """(partition, reason) of every sample of a per-partition counter."""
    return {
        (s.labels["partition"], s.labels["reason"])
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample
    }


def _label_values(text: str, sample: str, label: str) -> set[str]:
    return {
        s.labels[label]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample
    }


def test_rules_and_panels_read_metrics_the_processes_export(traffic: Live) -> None:
    cluster = traffic.cluster
    edge_text = _metrics_text(cluster.edge_url(1, "/metrics"))
    ingest_text = _metrics_text(cluster.ingest_url(1, "/metrics"))
    edge, ingest = _exported(edge_text), _exported(ingest_text)
    assert edge >= EDGE_METRICS, f"edge lacks {sorted(EDGE_METRICS - edge)}"
    assert ingest >= INGEST_METRICS, f"ingest lacks {sorted(INGEST_METRICS - ingest)}"

    used: set[str] = set()
    for rule in alert_rules() + recording_rules():
        used |= metric_names(rule["expr"])
    for dashboard in (traffic.dashboard, traffic.alerts_dashboard):
        for q in panel_queries(dashboard):
            used |= metric_names(substitute(q.expr, dashboard=dashboard))
    # The edges here take their keys from a file: JWKS_METRICS, which only an edge fetching
    # them from an identity provider exports, are checked against edge/metrics.py in
    # test_prometheus_rules.py.
    missing = used - edge - ingest - JWKS_METRICS - PROMETHEUS_SERIES - set(record_names())
    assert not missing, f"read but not exported: {sorted(missing)}"

    # The per-partition series exist for every partition from the start (a counter child that
    # appears at its first increment is invisible to rate() and increase()), with the label
    # values the rules select.
    partitions = {str(p) for p in range(run_coroutine_blocking(cluster.partitions, timeout_s=30))}
    for sample in (
        "crm_events_stream_length",
        "crm_events_refills_total",
        "crm_events_refilled_records_total",
    ):
        assert _label_values(ingest_text, sample, "partition") == partitions, sample
    assert _label_pairs(edge_text, "crm_events_partition_resets_total") == {
        (p, r) for p in partitions for r in PARTITION_RESET_REASONS
    }
    assert _label_pairs(ingest_text, "crm_events_refills_total") == {
        (p, r) for p in partitions for r in REFILL_REASONS
    }

    # promtool's lint of the live exposition (naming conventions, HELP, units).
    promtool = binary("promtool")
    assert promtool is not None
    for text in (edge_text, ingest_text):
        lint = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr


async def test_consumer_group_lag_as_the_runbooks_show_it(traffic: Live) -> None:
    cluster = traffic.cluster

    async def caught_up() -> Any:
        desc = await describe_consumer_group(
            cluster.backends.kafka_bootstrap, cluster.group, cluster.topic
        )
        return desc if desc.total_lag == 0 and desc.state == "Stable" else None

    desc = await eventually(caught_up, 30, "the ingest group to be stable with no lag")
    assert len(desc.partitions) == await cluster.partitions()
    assert sum(p.committed or 0 for p in desc.partitions) == EVENTS + 1
    assert len(desc.members) == 1


def test_kafka_lag_command_of_the_runbooks(
    traffic: Live, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m devtools.monitoring_stack kafka-lag`, as the runbooks run it."""
    cluster = traffic.cluster
    argv = ["kafka-lag", "--bootstrap", cluster.backends.kafka_bootstrap]
    assert main([*argv, "--group", cluster.group, "--topic", cluster.topic]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"group {cluster.group}: state ")
    assert out.count(f"{cluster.topic} ") == 3
    assert main([*argv, "--group", f"{cluster.group}-nobody"]) == 1
    assert "no committed offsets" in capsys.readouterr().out


def test_exported_names_are_sample_names() -> None:
    """Histograms are read under their exposed sample names (_bucket, _count, _sum)."""
    text = (
        "# TYPE x_seconds histogram\n"
        'x_seconds_bucket{le="0.1"} 1.0\nx_seconds_bucket{le="+Inf"} 1.0\n'
        "x_seconds_count 1.0\nx_seconds_sum 0.05\n"
    )
    assert _exported(text) == {"x_seconds_bucket", "x_seconds_count", "x_seconds_sum"}


async def test_redis_refill_fires_for_the_wiped_partitions_only(
    traffic: Live, session: aiohttp.ClientSession
) -> None:
    """Last in this module: it wipes the deployment's Redis partitions and produces more."""
    live, cluster = traffic, traffic.cluster
    await wait_targets_up(session, live)
    # The fresh deployment filled every partition at assignment and re-applied nothing: quiet.
    assert await alerts_named(session, live, "CrmEventsRedisRefill") == []

    # Redis loses the partitions (as FLUSHALL would, the topic's meta aside), then events come.
    # Only a partition ingest had written to can be lost.
    keys = RedisKeys(cluster.prefix)
    count = await cluster.partitions()
    redis = cluster.redis()
    try:
        had = {str(p) for p in range(count) if await redis.exists(keys.state(p))}
        assert had, "the traffic wrote no partition"
        wiped = [k(p) for p in range(count) for k in (keys.stream, keys.state, keys.dead)]
        assert await redis.delete(*wiped) > 0
    finally:
        await redis.aclose()
    await cluster.produce([(f"w{i}".encode(), crm_event(1000 + i)) for i in range(10)])

    async def fired() -> list[dict[str, Any]] | None:
        firing = [
            a
            for a in await alerts_named(session, live, "CrmEventsRedisRefill")
            if a["state"] == "firing"
        ]
        return firing if {a["labels"]["partition"] for a in firing} >= had else None

    firing = await eventually(fired, 40, f"CrmEventsRedisRefill for partitions {sorted(had)}")
    assert {a["labels"]["partition"] for a in firing} == had
    ingest1 = live.instance("ingest1")
    for alert in firing:
        labels = alert["labels"]
        assert (labels["job"], labels["instance"], labels["severity"]) == (
            INGEST_JOB,
            ingest1,
            "warning",
        )
        # ingest was running: it found the state gone (not at an assignment)
        assert labels["reason"] == "lost", labels
        assert alert["annotations"]["runbook_url"].endswith("#crmeventsredisrefill")

    # and the wiped partitions' records were applied again from Kafka
    async def refilled() -> bool:
        rows = await query(
            session,
            live,
            f'sum by (partition) (crm_events_refilled_records_total{{job="{INGEST_JOB}"}}) > 0',
        )
        return {r["metric"]["partition"] for r in rows} >= had

    await eventually(refilled, 20, f"refilled records for partitions {sorted(had)}")
