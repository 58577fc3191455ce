"""Prometheus and Alertmanager for the local stack (Debian packages, no Docker).

The rules, the Alertmanager routing and the dashboards live under ``monitoring/`` and are
shared with docker-compose.yml. What differs between the two deployments is rendered here into
the run directory: the scrape targets (local ports instead of compose service names), the
scrape and evaluation intervals, the Alertmanager address, and the paths of the secret files
(placeholders under the run directory instead of ``/etc/alertmanager/secrets``)::

    mon = MonitoringSettings.for_stack(stack_settings, os.environ)
    for spec in monitoring_specs(mon):          # alertmanager, then prometheus
        supervisor.start(spec)

Layout under the run directory::

    prometheus/prometheus.yml          rendered config (JSON, which is YAML)
    prometheus/targets/<job>.json      file_sd targets, rewritten on every start
    prometheus/rules/*.yml             the mixin's rules for this stack's job names, ditto
    prometheus/data/                   TSDB
    alertmanager/alertmanager.yml      monitoring/alertmanager/alertmanager.yml, secret paths local
    alertmanager/secrets/              placeholder secret files (kept if you replace them)
    alertmanager/data/                 silences and notification log

Also a command line, ``python -m devtools.monitoring_stack``:

* ``render`` writes both configurations and the rules for the current CRM_EVENTS_* settings
  and prints where;
* ``kafka-lag`` shows a consumer group's committed offsets, end offsets and lag per partition
  (what ``kafka-consumer-groups.sh --describe`` shows; the local Kafka has no tools jar).

Settings (environment, all optional):

================================  ========  ==================================================
variable                          default   meaning
================================  ========  ==================================================
CRM_EVENTS_PROMETHEUS_PORT        9090      Prometheus web/API port (127.0.0.1)
CRM_EVENTS_ALERTMANAGER_PORT      9093      Alertmanager web/API port (127.0.0.1)
CRM_EVENTS_SCRAPE_INTERVAL        15s       scrape interval of the local Prometheus
CRM_EVENTS_EVALUATION_INTERVAL    15s       rule evaluation interval of the local Prometheus
CRM_EVENTS_REMOTE_WRITE_URL       (none)    send every sample (scraped and recorded) on to a
                                            long-term store's remote-write endpoint (Thanos
                                            Receive, Mimir, a Prometheus with
                                            --web.enable-remote-write-receiver)
================================  ========  ==================================================

The rules are not read from ``monitoring/prometheus/rules/``: they are rendered on every start
from the mixin's source (``monitoring/mixin/``, see devtools/mixin.py) for the job names this
Prometheus scrapes under, into ``prometheus/rules/``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from devtools.atomic import write_text_atomically
from devtools.mixin import MixinError, Selectors, render_to
from devtools.probes import HttpReady
from devtools.supervisor import ProcessSpec

__all__ = [
    "ALERTMANAGER_CONFIG",
    "DEFAULT_ALERTMANAGER_PORT",
    "DEFAULT_PROMETHEUS_PORT",
    "EDGE_JOB",
    "INGEST_JOB",
    "MONITORING_DIR",
    "RULES_DIR",
    "SECRET_FILES",
    "GroupDescription",
    "MonitoringSettings",
    "MonitoringSettingsError",
    "PartitionLag",
    "alertmanager_argv",
    "alertmanager_config_text",
    "alertmanager_spec",
    "describe_consumer_group",
    "format_group",
    "main",
    "monitoring_specs",
    "prometheus_argv",
    "prometheus_config",
    "prometheus_spec",
    "render_alertmanager",
    "render_prometheus",
    "shorten_for",
]

HOST = "127.0.0.1"
MONITORING_DIR = Path(__file__).resolve().parent.parent / "monitoring"
RULES_DIR = MONITORING_DIR / "prometheus" / "rules"
ALERTMANAGER_CONFIG = MONITORING_DIR / "alertmanager" / "alertmanager.yml"

EDGE_JOB = "crm-events-edge"
INGEST_JOB = "crm-events-ingest"
DEFAULT_PROMETHEUS_PORT = 9090
DEFAULT_ALERTMANAGER_PORT = 9093
DEFAULT_INTERVAL = "15s"

#: Where alertmanager.yml reads its secrets in a container, and the files it reads there.
SECRETS_MOUNT = "/etc/alertmanager/secrets/"
SECRET_FILES = ("slack_api_url", "pagerduty_routing_key", "smtp_password")
#: Placeholder contents: well-formed enough for Alertmanager, unmistakably not secrets. The
#: URL points at the discard port of this machine, so a notification fails at once, locally.
_PLACEHOLDERS = {
    "slack_api_url": "http://127.0.0.1:9/placeholder-not-a-slack-webhook\n",
    "pagerduty_routing_key": "placeholder-not-a-pagerduty-key\n",
    "smtp_password": "placeholder-not-a-password\n",
}

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

_URL_RE = re.compile(r"^https?://[^\s/?#]+(/[^\s]*)?$")
_DURATION_RE = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
_FOR_RE = re.compile(r"^(?P<indent>\s+)for:\s*\S+\s*$", re.MULTILINE)


class MonitoringSettingsError(ValueError):
    """A monitoring setting has a bad value; the message is one line and names the variable."""


class _StackLike(Protocol):
    """What :meth:`MonitoringSettings.for_stack` needs of ``devtools.stack.StackSettings``
    (not imported, so that stack.py can import this module)."""

    @property
    def run_dir(self) -> Path: ...
    @property
    def edge_ports(self) -> tuple[int, ...]: ...
    @property
    def ingest_port(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class MonitoringSettings:
    """One local Prometheus + Alertmanager pair over a set of edges and ingest workers."""

    run_dir: Path
    edge_targets: tuple[str, ...]
    ingest_targets: tuple[str, ...]
    prometheus_port: int = DEFAULT_PROMETHEUS_PORT
    alertmanager_port: int = DEFAULT_ALERTMANAGER_PORT
    scrape_interval: str = DEFAULT_INTERVAL
    evaluation_interval: str = DEFAULT_INTERVAL
    #: Folder whose ``*.yml`` are the rule files; None: the mixin's rules rendered for
    #: ``edge_job``/``ingest_job`` into ``prometheus/rules`` on every start (the live test
    #: passes a copy with short ``for:`` instead).
    rules_dir: Path | None = None
    #: The scrape jobs' names (the ``job`` label of every series the rules select).
    edge_job: str = EDGE_JOB
    ingest_job: str = INGEST_JOB
    #: Remote-write endpoint every sample is also sent to; empty: none.
    remote_write_url: str = ""
    alertmanager_template: Path = ALERTMANAGER_CONFIG
    host: str = HOST

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir).resolve())
        if self.rules_dir is not None:
            object.__setattr__(self, "rules_dir", Path(self.rules_dir).resolve())
        if self.remote_write_url and not _URL_RE.match(self.remote_write_url):
            raise MonitoringSettingsError(
                "CRM_EVENTS_REMOTE_WRITE_URL: expected an http:// or https:// URL such as "
                f"http://receiver:19291/api/v1/receive, got {self.remote_write_url!r}"
            )
        # Fails here, naming the job, rather than at Prometheus's start.
        try:
            Selectors.for_jobs(self.edge_job, self.ingest_job)
        except MixinError as exc:
            raise MonitoringSettingsError(str(exc)) from None
        object.__setattr__(self, "edge_targets", tuple(self.edge_targets))
        object.__setattr__(self, "ingest_targets", tuple(self.ingest_targets))
        for var, value in (
            ("CRM_EVENTS_SCRAPE_INTERVAL", self.scrape_interval),
            ("CRM_EVENTS_EVALUATION_INTERVAL", self.evaluation_interval),
        ):
            if not _DURATION_RE.match(value):
                raise MonitoringSettingsError(
                    f"{var}: expected a Prometheus duration such as 15s or 1m, got {value!r}"
                )
        for var, port in (
            ("CRM_EVENTS_PROMETHEUS_PORT", self.prometheus_port),
            ("CRM_EVENTS_ALERTMANAGER_PORT", self.alertmanager_port),
        ):
            if not 1 <= port <= 65535:
                raise MonitoringSettingsError(f"{var}: expected a TCP port 1-65535, got {port}")
        if self.prometheus_port == self.alertmanager_port:
            raise MonitoringSettingsError(
                f"CRM_EVENTS_ALERTMANAGER_PORT: port {self.alertmanager_port} is also "
                "CRM_EVENTS_PROMETHEUS_PORT"
            )

    @classmethod
    def for_stack(
        cls, stack: _StackLike, env: Mapping[str, str] | None = None
    ) -> MonitoringSettings:
        """Settings scraping the local stack's edges and ingest worker, from ``CRM_EVENTS_*``."""
        env = {} if env is None else env

        def port(var: str, default: int) -> int:
            raw = env.get(var, "").strip()
            if not raw:
                return default
            try:
                return int(raw)
            except ValueError:
                raise MonitoringSettingsError(
                    f"{var}: expected a TCP port 1-65535, got {raw!r}"
                ) from None

        return cls(
            run_dir=stack.run_dir,
            edge_targets=tuple(f"{HOST}:{p}" for p in stack.edge_ports),
            ingest_targets=(f"{HOST}:{stack.ingest_port}",),
            prometheus_port=port("CRM_EVENTS_PROMETHEUS_PORT", DEFAULT_PROMETHEUS_PORT),
            alertmanager_port=port("CRM_EVENTS_ALERTMANAGER_PORT", DEFAULT_ALERTMANAGER_PORT),
            scrape_interval=env.get("CRM_EVENTS_SCRAPE_INTERVAL", "").strip() or DEFAULT_INTERVAL,
            evaluation_interval=env.get("CRM_EVENTS_EVALUATION_INTERVAL", "").strip()
            or DEFAULT_INTERVAL,
            remote_write_url=env.get("CRM_EVENTS_REMOTE_WRITE_URL", "").strip(),
        )

    # -- paths and addresses -------------------------------------------------------------------

    @property
    def prometheus_home(self) -> Path:
        return self.run_dir / "prometheus"

    @property
    def prometheus_config_file(self) -> Path:
        return self.prometheus_home / "prometheus.yml"

    @property
    def rule_files_dir(self) -> Path:
        """Where Prometheus reads its ``*.yml`` rule files from."""
        return self.rules_dir if self.rules_dir is not None else self.prometheus_home / "rules"

    @property
    def selectors(self) -> Selectors:
        """The mixin's selectors for this Prometheus's job names."""
        return Selectors.for_jobs(self.edge_job, self.ingest_job)

    @property
    def alertmanager_home(self) -> Path:
        return self.run_dir / "alertmanager"

    @property
    def alertmanager_config_file(self) -> Path:
        return self.alertmanager_home / "alertmanager.yml"

    @property
    def secrets_dir(self) -> Path:
        return self.alertmanager_home / "secrets"

    @property
    def prometheus_address(self) -> str:
        return f"{self.host}:{self.prometheus_port}"

    @property
    def alertmanager_address(self) -> str:
        return f"{self.host}:{self.alertmanager_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.prometheus_address}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://{self.alertmanager_address}"


# -- Prometheus ----------------------------------------------------------------------------------


def prometheus_config(settings: MonitoringSettings) -> dict[str, Any]:
    """The local counterpart of monitoring/prometheus/prometheus.yml: the same jobs and rules,
    local targets (file_sd files in the run directory) and the configured intervals."""
    targets_dir = settings.prometheus_home / "targets"

    def job(name: str) -> dict[str, Any]:
        return {
            "job_name": name,
            "metrics_path": "/metrics",
            "file_sd_configs": [
                {"files": [str(targets_dir / f"{name}.json")], "refresh_interval": "1m"}
            ],
        }

    # A scrape may not take longer than the interval it runs at.
    timeout = "10s" if settings.scrape_interval == DEFAULT_INTERVAL else settings.scrape_interval
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": settings.scrape_interval,
            "scrape_timeout": timeout,
            "evaluation_interval": settings.evaluation_interval,
            "external_labels": {"deployment": "crm-events-local"},
        },
        "rule_files": [str(settings.rule_files_dir / "*.yml")],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [settings.alertmanager_address]}]}]
        },
        "scrape_configs": [
            job(settings.edge_job),
            job(settings.ingest_job),
            {
                "job_name": "prometheus",
                "static_configs": [{"targets": [settings.prometheus_address]}],
            },
        ],
    }
    if settings.remote_write_url:
        # Recorded series go too: a long-term store can then answer the dashboards' queries
        # of recording rules without evaluating them again.
        config["remote_write"] = [{"url": settings.remote_write_url, "name": "long-term"}]
    return config


def render_prometheus(settings: MonitoringSettings) -> Path:
    """Write the config and the file_sd target files; returns the config's path."""
    for name, targets in (
        (settings.edge_job, settings.edge_targets),
        (settings.ingest_job, settings.ingest_targets),
    ):
        write_text_atomically(
            settings.prometheus_home / "targets" / f"{name}.json",
            json.dumps([{"targets": list(targets), "labels": {}}], indent=2) + "\n",
        )
    (settings.prometheus_home / "data").mkdir(parents=True, exist_ok=True)
    header = (
        "# Generated by devtools/monitoring_stack.py on every start; edit the source instead.\n"
    )
    write_text_atomically(
        settings.prometheus_config_file,
        header + json.dumps(prometheus_config(settings), indent=2) + "\n",
    )
    return settings.prometheus_config_file


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found is not None:
            return found
        for d in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
            if (Path(d) / name).is_file():
                return str(Path(d) / name)
    return names[0]  # spawning then fails with "cannot run '<name>'", at start time


def prometheus_argv(settings: MonitoringSettings) -> list[str]:
    return [
        _binary("prometheus"),
        f"--config.file={settings.prometheus_config_file}",
        f"--storage.tsdb.path={settings.prometheus_home / 'data'}",
        "--storage.tsdb.retention.time=7d",
        f"--web.listen-address={settings.prometheus_address}",
        f"--web.external-url={settings.prometheus_url}/",
        # POST /-/reload picks up edited rules without a restart.
        "--web.enable-lifecycle",
    ]


def prometheus_spec(settings: MonitoringSettings) -> ProcessSpec:
    return ProcessSpec(
        name="prometheus",
        argv=prometheus_argv(settings),
        cwd=settings.prometheus_home,
        ready=HttpReady(f"{settings.prometheus_url}/-/ready"),
        ready_timeout_s=READY_TIMEOUT_S,
        stop_timeout_s=STOP_TIMEOUT_S,
        port=settings.prometheus_port,
        prepare=lambda: _prepare_prometheus(settings),
    )


def _prepare_prometheus(settings: MonitoringSettings) -> None:
    if settings.rules_dir is None:
        render_to(settings.prometheus_home, settings.selectors, only="rules", prune=True)
    if not any(settings.rule_files_dir.glob("*.yml")):
        raise ValueError(f"no rule files (*.yml) in {settings.rule_files_dir}")
    render_prometheus(settings)


# -- Alertmanager --------------------------------------------------------------------------------


def alertmanager_config_text(settings: MonitoringSettings) -> str:
    """monitoring/alertmanager/alertmanager.yml with its secret files in the run directory."""
    text = settings.alertmanager_template.read_text()
    if SECRETS_MOUNT not in text:
        raise ValueError(f"{settings.alertmanager_template}: no secret path under {SECRETS_MOUNT}")
    header = (
        "# Generated by devtools/monitoring_stack.py from "
        "monitoring/alertmanager/alertmanager.yml on every start.\n"
    )
    return header + text.replace(SECRETS_MOUNT, f"{settings.secrets_dir}/")


def render_alertmanager(settings: MonitoringSettings) -> Path:
    """Write the config, and a placeholder for every secret file that does not exist yet."""
    settings.secrets_dir.mkdir(parents=True, exist_ok=True)
    for name in SECRET_FILES:
        path = settings.secrets_dir / name
        if not path.exists():
            path.write_text(_PLACEHOLDERS[name])
            path.chmod(0o600)
    (settings.alertmanager_home / "data").mkdir(parents=True, exist_ok=True)
    write_text_atomically(settings.alertmanager_config_file, alertmanager_config_text(settings))
    return settings.alertmanager_config_file


def alertmanager_argv(settings: MonitoringSettings) -> list[str]:
    return [
        _binary("prometheus-alertmanager", "alertmanager"),
        f"--config.file={settings.alertmanager_config_file}",
        f"--storage.path={settings.alertmanager_home / 'data'}",
        f"--web.listen-address={settings.alertmanager_address}",
        f"--web.external-url={settings.alertmanager_url}/",
        # One instance: no gossip (the default would listen on 0.0.0.0:9094).
        "--cluster.listen-address=",
    ]


def alertmanager_spec(settings: MonitoringSettings) -> ProcessSpec:
    return ProcessSpec(
        name="alertmanager",
        argv=alertmanager_argv(settings),
        cwd=settings.alertmanager_home,
        ready=HttpReady(f"{settings.alertmanager_url}/-/ready"),
        ready_timeout_s=READY_TIMEOUT_S,
        stop_timeout_s=STOP_TIMEOUT_S,
        port=settings.alertmanager_port,
        prepare=lambda: _prepare_alertmanager(settings),
    )


def _prepare_alertmanager(settings: MonitoringSettings) -> None:
    render_alertmanager(settings)


def monitoring_specs(settings: MonitoringSettings) -> list[ProcessSpec]:
    """Both parts in start order: Alertmanager first, so Prometheus finds it."""
    return [alertmanager_spec(settings), prometheus_spec(settings)]


# -- rules with short `for:` (tests) -------------------------------------------------------------


def shorten_for(src_dir: Path, dst_dir: Path, duration: str = "5s") -> list[Path]:
    """Copy every ``*.yml`` rule file of ``src_dir`` to ``dst_dir`` with each alert's ``for:``
    set to ``duration``, so that a test sees an alert fire within seconds. Returns the copies."""
    if not _DURATION_RE.match(duration):
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    dst_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sorted(Path(src_dir).glob("*.yml")):
        text = _FOR_RE.sub(lambda m: f"{m.group('indent')}for: {duration}", src.read_text())
        dst = dst_dir / src.name
        dst.write_text(text)
        written.append(dst)
    return written


# -- consumer group lag (what kafka-consumer-groups.sh --describe shows) -------------------------


@dataclasses.dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None
    end: int

    @property
    def lag(self) -> int:
        return self.end - (self.committed or 0)


@dataclasses.dataclass(frozen=True)
class GroupDescription:
    group: str
    #: Kafka's group state: Stable, PreparingRebalance, CompletingRebalance, Empty, Dead.
    state: str
    #: ``client_id@host`` of every member.
    members: tuple[str, ...]
    partitions: tuple[PartitionLag, ...]

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.partitions)


def _group_state(response: Any) -> tuple[str, tuple[str, ...]]:
    """State and members from aiokafka's raw DescribeGroups response."""
    groups = response.to_object().get("groups", [])
    if not groups:
        return "Unknown", ()
    first = groups[0]
    members = tuple(
        f"{m.get('client_id', '?')}@{str(m.get('client_host', '?')).lstrip('/')}"
        for m in first.get("members", [])
    )
    return str(first.get("state", "Unknown")), members


async def describe_consumer_group(
    bootstrap: str, group: str, topic: str | None = None, timeout_s: float = 10.0
) -> GroupDescription:
    """State, members, and the committed offset, end offset and lag of ``group`` for every
    partition of ``topic`` (default: every topic the group has committed offsets for)."""
    timeout_ms = int(timeout_s * 1000)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        await consumer.start()
        try:
            state, members = _group_state((await admin.describe_consumer_groups([group]))[0])
            committed = await admin.list_consumer_group_offsets(group)
            if topic is not None:
                described = await admin.describe_topics([topic])
                tps = {
                    TopicPartition(topic, int(p["partition"]))
                    for p in described[0].get("partitions", [])
                }
            else:
                tps = set(committed)
            ends = await consumer.end_offsets(list(tps)) if tps else {}
        finally:
            await consumer.stop()
    finally:
        await admin.close()
    rows = []
    for tp in sorted(tps, key=lambda t: (t.topic, t.partition)):
        meta = committed.get(tp)
        offset = None if meta is None or meta.offset < 0 else int(meta.offset)
        rows.append(PartitionLag(tp.topic, tp.partition, offset, int(ends[tp])))
    return GroupDescription(group, state, members, tuple(rows))


def format_group(desc: GroupDescription) -> str:
    """A table like ``kafka-consumer-groups.sh --describe``."""
    lines = [
        f"group {desc.group}: state {desc.state}, {len(desc.members)} member(s)"
        + (f": {', '.join(desc.members)}" if desc.members else ""),
        f"{'TOPIC':<32} {'PARTITION':>9} {'COMMITTED':>12} {'END':>12} {'LAG':>10}",
    ]
    for r in desc.partitions:
        committed = "-" if r.committed is None else str(r.committed)
        lines.append(f"{r.topic:<32} {r.partition:>9} {committed:>12} {r.end:>12} {r.lag:>10}")
    lines.append(f"total lag: {desc.total_lag}")
    return "\n".join(lines)


# -- CLI -----------------------------------------------------------------------------------------


def _stack_settings_from_env() -> _StackLike:
    # Imported here: devtools.stack imports this module to add these parts to the stack.
    from devtools.stack import StackSettings  # noqa: PLC0415

    return StackSettings.from_env(os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.monitoring_stack",
        description="Local Prometheus/Alertmanager configuration, and Kafka consumer-group lag.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("render", help="write the Prometheus and Alertmanager configs to the run dir")
    lag = sub.add_parser("kafka-lag", help="committed offset, end offset and lag per partition")
    lag.add_argument("--bootstrap", default=os.environ.get("CRM_EVENTS_KAFKA_BOOTSTRAP", ""))
    lag.add_argument(
        "--group", default=os.environ.get("CRM_EVENTS_KAFKA_GROUP", "crm-events-ingest")
    )
    lag.add_argument("--topic", default=os.environ.get("CRM_EVENTS_KAFKA_TOPIC", ""))
    args = parser.parse_args(argv)
    try:
        if args.command == "render":
            mon = MonitoringSettings.for_stack(_stack_settings_from_env(), os.environ)
            _prepare_prometheus(mon)
            print(mon.prometheus_config_file)
            print(mon.rule_files_dir)
            print(render_alertmanager(mon))
            return 0
        bootstrap = args.bootstrap or f"{HOST}:{os.environ.get('CRM_EVENTS_KAFKA_PORT', '9092')}"
        desc = asyncio.run(describe_consumer_group(bootstrap, args.group, args.topic or None))
        print(format_group(desc))
        if not desc.partitions:
            print("no committed offsets: unknown group, or it has consumed nothing yet")
            return 1
        return 0
    except (MonitoringSettingsError, ValueError, OSError) as exc:
        print(f"monitoring_stack: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a Kafka client error: one line, not a traceback
        print(f"monitoring_stack: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
