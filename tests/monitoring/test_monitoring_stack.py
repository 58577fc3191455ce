"""devtools/monitoring_stack.py: the local Prometheus/Alertmanager configs it renders are
valid and match the compose ones, and the process specs really start both daemons."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from devtools.monitoring_stack import (
    DEFAULT_ALERTMANAGER_PORT,
    DEFAULT_PROMETHEUS_PORT,
    GroupDescription,
    MonitoringSettings,
    MonitoringSettingsError,
    PartitionLag,
    alertmanager_spec,
    format_group,
    main,
    monitoring_specs,
    prometheus_config,
    prometheus_spec,
    render_alertmanager,
    shorten_for,
)
from devtools.stack import StackSettings
from devtools.supervisor import Supervisor
from tests.harness.cluster import free_port

from .support import (
    PROMETHEUS_DIR,
    RULES_DIR,
    alert_rules,
    describe,
    load_yaml,
    recording_rules,
    rule_files,
    run,
)


def settings(tmp_path: Path, **kw: Any) -> MonitoringSettings:
    base: dict[str, Any] = {
        "run_dir": tmp_path,
        "edge_targets": ("127.0.0.1:9011", "127.0.0.1:9012"),
        "ingest_targets": ("127.0.0.1:9020",),
    }
    return MonitoringSettings(**{**base, **kw})


def test_for_stack_uses_the_stack_ports_and_the_environment(tmp_path: Path) -> None:
    stack = StackSettings(run_dir=tmp_path, edge_ports=(9111, 9112, 9113), ingest_port=9120)
    mon = MonitoringSettings.for_stack(stack, {})
    assert mon.run_dir == tmp_path.resolve()
    assert mon.edge_targets == ("127.0.0.1:9111", "127.0.0.1:9112", "127.0.0.1:9113")
    assert mon.ingest_targets == ("127.0.0.1:9120",)
    assert (mon.prometheus_port, mon.alertmanager_port) == (
        DEFAULT_PROMETHEUS_PORT,
        DEFAULT_ALERTMANAGER_PORT,
    )
    assert mon.scrape_interval == mon.evaluation_interval == "15s"
    env = {
        "CRM_EVENTS_PROMETHEUS_PORT": "19190",
        "CRM_EVENTS_ALERTMANAGER_PORT": "19193",
        "CRM_EVENTS_SCRAPE_INTERVAL": "5s",
        "CRM_EVENTS_EVALUATION_INTERVAL": "10s",
    }
    mon = MonitoringSettings.for_stack(stack, env)
    assert (mon.prometheus_port, mon.alertmanager_port) == (19190, 19193)
    assert (mon.scrape_interval, mon.evaluation_interval) == ("5s", "10s")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"CRM_EVENTS_SCRAPE_INTERVAL": "fast"}, "CRM_EVENTS_SCRAPE_INTERVAL"),
        ({"CRM_EVENTS_EVALUATION_INTERVAL": "15"}, "CRM_EVENTS_EVALUATION_INTERVAL"),
        ({"CRM_EVENTS_PROMETHEUS_PORT": "x"}, "CRM_EVENTS_PROMETHEUS_PORT"),
        ({"CRM_EVENTS_ALERTMANAGER_PORT": "70000"}, "CRM_EVENTS_ALERTMANAGER_PORT"),
        ({"CRM_EVENTS_ALERTMANAGER_PORT": "9090"}, "CRM_EVENTS_ALERTMANAGER_PORT"),
        ({"CRM_EVENTS_REMOTE_WRITE_URL": "thanos:19291"}, "CRM_EVENTS_REMOTE_WRITE_URL"),
        ({"CRM_EVENTS_REMOTE_WRITE_URL": "ftp://x/y"}, "CRM_EVENTS_REMOTE_WRITE_URL"),
    ],
)
def test_bad_settings_name_the_variable(tmp_path: Path, env: dict[str, str], variable: str) -> None:
    stack = StackSettings(run_dir=tmp_path)
    with pytest.raises(MonitoringSettingsError, match=variable):
        MonitoringSettings.for_stack(stack, env)


def _prepare(mon: MonitoringSettings) -> Path:
    """What starting the Prometheus part writes: its config, targets and rules."""
    spec = prometheus_spec(mon)
    assert spec.prepare is not None
    spec.prepare()
    return mon.prometheus_config_file


def test_rendered_prometheus_config_is_valid(promtool: str, tmp_path: Path) -> None:
    mon = settings(tmp_path, scrape_interval="1s", evaluation_interval="2s")
    path = _prepare(mon)
    result = run([promtool, "check", "config", "--lint=all", "--lint-fatal", str(path)])
    assert result.returncode == 0, describe(result)
    assert f"SUCCESS: {len(rule_files())} rule files found" in result.stdout
    # The rules are the mixin's for the stack's job names: the defaults, as committed.
    for committed in rule_files():
        assert (mon.rule_files_dir / committed.name).read_text() == committed.read_text()
    assert "remote_write" not in load_yaml(path)
    config = load_yaml(path)
    assert config["global"]["scrape_interval"] == "1s"
    assert config["global"]["evaluation_interval"] == "2s"
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        mon.alertmanager_address
    ]
    edge_sd = json.loads((tmp_path / "prometheus" / "targets" / "crm-events-edge.json").read_text())
    assert edge_sd[0]["targets"] == ["127.0.0.1:9011", "127.0.0.1:9012"]


def test_local_and_compose_configs_have_the_same_jobs_and_rules(tmp_path: Path) -> None:
    """The two deployments differ in targets and intervals only."""
    compose = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    local = prometheus_config(settings(tmp_path))

    def jobs(config: dict[str, Any]) -> dict[str, str]:
        return {j["job_name"]: j.get("metrics_path", "/metrics") for j in config["scrape_configs"]}

    assert jobs(local) == jobs(compose)
    assert compose["global"]["scrape_interval"] == compose["global"]["evaluation_interval"] == "15s"
    assert [Path(p).name for p in local["rule_files"]] == ["*.yml"]
    assert Path(local["rule_files"][0]).parent == tmp_path.resolve() / "prometheus" / "rules"
    assert compose["rule_files"] == ["rules/*.yml"]
    for job in ("crm-events-edge", "crm-events-ingest"):
        sd = load_yaml(PROMETHEUS_DIR / "targets" / f"{job}.yml")
        assert sd[0]["targets"], job


def test_remote_write_and_job_names_are_configurable(promtool: str, tmp_path: Path) -> None:
    """CRM_EVENTS_REMOTE_WRITE_URL adds a remote_write; other job names get rules rendered for
    them (no default job left in any expression); the config stays valid for promtool."""
    stack = StackSettings(run_dir=tmp_path)
    url = "http://127.0.0.1:19291/api/v1/receive"
    env = {"CRM_EVENTS_REMOTE_WRITE_URL": url}
    base = MonitoringSettings.for_stack(stack, env)
    assert base.remote_write_url == url
    mon = MonitoringSettings(
        **{**base.__dict__, "edge_job": "k8s-edge", "ingest_job": "k8s-ingest"}
    )
    path = _prepare(mon)
    config = load_yaml(path)
    assert config["remote_write"] == [{"url": url, "name": "long-term"}]
    assert {j["job_name"] for j in config["scrape_configs"]} == {
        "k8s-edge",
        "k8s-ingest",
        "prometheus",
    }
    result = run([promtool, "check", "config", "--lint=all", "--lint-fatal", str(path)])
    assert result.returncode == 0, describe(result)
    rendered = "".join(p.read_text() for p in sorted(mon.rule_files_dir.glob("*.yml")))
    assert 'job="k8s-edge"' in rendered and 'job="k8s-ingest"' in rendered
    assert 'job=~"k8s-edge|k8s-ingest"' in rendered
    assert 'crm-events-edge"' not in rendered and 'crm-events-ingest"' not in rendered
    with pytest.raises(MonitoringSettingsError, match="edge job"):
        MonitoringSettings(**{**base.__dict__, "edge_job": "edge|x"})


def test_compose_remote_write_block_works_once_uncommented(promtool: str, tmp_path: Path) -> None:
    """The compose config ships remote_write commented out (no receiver in compose); the block
    a user uncomments is valid and is the only change."""
    compose = PROMETHEUS_DIR / "prometheus.yml"
    lines = compose.read_text().splitlines()
    start = lines.index("# remote_write:")
    block = [start]
    while lines[block[-1] + 1].startswith("#   "):
        block.append(block[-1] + 1)
    for i in block:
        lines[i] = lines[i][2:]
    copy = tmp_path / "prometheus.yml"
    copy.write_text("\n".join(lines) + "\n")
    for sub in ("rules", "targets"):
        shutil.copytree(PROMETHEUS_DIR / sub, tmp_path / sub)
    result = run([promtool, "check", "config", "--lint=all", "--lint-fatal", str(copy)])
    assert result.returncode == 0, describe(result)
    uncommented = load_yaml(copy)
    assert uncommented["remote_write"][0]["url"].endswith("/api/v1/receive")
    assert {k: v for k, v in uncommented.items() if k != "remote_write"} == load_yaml(compose)


def test_rendered_alertmanager_keeps_replaced_secrets(tmp_path: Path) -> None:
    mon = settings(tmp_path)
    render_alertmanager(mon)
    real = mon.secrets_dir / "slack_api_url"
    real.write_text("http://127.0.0.1:9/my-own-test-hook\n")
    render_alertmanager(mon)
    assert real.read_text() == "http://127.0.0.1:9/my-own-test-hook\n"


def test_shorten_for_rewrites_every_alert_and_stays_valid(promtool: str, tmp_path: Path) -> None:
    written = shorten_for(RULES_DIR, tmp_path / "rules", "3s")
    assert sorted(p.name for p in written) == sorted(p.name for p in rule_files())
    text = "".join(p.read_text() for p in written)
    assert text.count("for: 3s") == len(alert_rules())
    result = run([promtool, "check", "rules", "--lint=all", "--lint-fatal", *map(str, written)])
    assert result.returncode == 0, describe(result)
    for path in written:
        count = sum(len(g["rules"]) for g in load_yaml(path)["groups"])
        assert f"Checking {path}\n  SUCCESS: {count} rules found" in result.stdout, path.name
    with pytest.raises(ValueError, match="duration"):
        shorten_for(RULES_DIR, tmp_path / "x", "soon")


def test_specs_run_the_debian_binaries_in_the_run_dir(tmp_path: Path) -> None:
    mon = settings(tmp_path, prometheus_port=19090, alertmanager_port=19093)
    am, prom = monitoring_specs(mon)
    assert (am.name, prom.name) == ("alertmanager", "prometheus")
    assert Path(prom.argv[0]).name == "prometheus"
    assert f"--storage.tsdb.path={tmp_path.resolve() / 'prometheus' / 'data'}" in prom.argv
    assert "--web.listen-address=127.0.0.1:19090" in prom.argv
    assert "--web.enable-lifecycle" in prom.argv
    assert prom.port == 19090 and am.port == 19093
    assert Path(am.argv[0]).name in ("prometheus-alertmanager", "alertmanager")
    assert f"--storage.path={tmp_path.resolve() / 'alertmanager' / 'data'}" in am.argv
    assert "--web.listen-address=127.0.0.1:19093" in am.argv
    assert "--cluster.listen-address=" in am.argv


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def test_prometheus_and_alertmanager_start_load_the_rules_and_find_each_other(
    prometheus_bin: str, alertmanager_bin: str, tmp_path: Path
) -> None:
    mon = settings(
        tmp_path,
        prometheus_port=free_port(),
        alertmanager_port=free_port(),
        scrape_interval="1s",
        evaluation_interval="1s",
    )
    sup = Supervisor(tmp_path)
    try:
        sup.start(alertmanager_spec(mon))
        sup.start(prometheus_spec(mon))
        groups = _get(f"{mon.prometheus_url}/api/v1/rules")["data"]["groups"]
        loaded = [r["name"] for g in groups for r in g["rules"]]
        assert len(loaded) == len(alert_rules()) + len(recording_rules())
        assert all(r["health"] != "err" for g in groups for r in g["rules"])
        deadline = time.monotonic() + 20
        active: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            active = _get(f"{mon.prometheus_url}/api/v1/alertmanagers")["data"][
                "activeAlertmanagers"
            ]
            if active:
                break
            time.sleep(0.2)
        assert active == [{"url": f"{mon.alertmanager_url}/api/v2/alerts"}]
        status = _get(f"{mon.alertmanager_url}/api/v2/status")
        assert status["cluster"]["status"] == "disabled"
    finally:
        sup.stop("prometheus")
        sup.stop("alertmanager")


def test_cli_render_writes_both_configs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CRM_EVENTS_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("CRM_EVENTS_SCRAPE_INTERVAL", "5s")
    assert main(["render"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [
        str(tmp_path.resolve() / "prometheus" / "prometheus.yml"),
        str(tmp_path.resolve() / "prometheus" / "rules"),
        str(tmp_path.resolve() / "alertmanager" / "alertmanager.yml"),
    ]
    assert sorted(p.name for p in Path(out[1]).glob("*.yml")) == [p.name for p in rule_files()]
    assert load_yaml(Path(out[0]))["global"]["scrape_interval"] == "5s"


def test_format_group_reads_like_kafka_consumer_groups() -> None:
    desc = GroupDescription(
        "crm-events-ingest",
        "Stable",
        ("ingest-1@127.0.0.1",),
        (
            PartitionLag("aetherlink.events", 0, 100, 103),
            PartitionLag("aetherlink.events", 1, None, 7),
        ),
    )
    assert desc.total_lag == 10
    lines = format_group(desc).splitlines()
    assert lines[0] == "group crm-events-ingest: state Stable, 1 member(s): ingest-1@127.0.0.1"
    assert lines[1].split() == ["TOPIC", "PARTITION", "COMMITTED", "END", "LAG"]
    assert lines[2].split() == ["aetherlink.events", "0", "100", "103", "3"]
    assert lines[3].split() == ["aetherlink.events", "1", "-", "7", "7"]
    assert lines[4] == "total lag: 10"
