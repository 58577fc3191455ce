"""Alertmanager: the config is valid, routing by severity is what the runbooks promise
(`amtool config routes test --verify.receivers`), secrets come from files, and the inhibition
rules hold in a running Alertmanager."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.monitoring_stack import (
    SECRET_FILES,
    MonitoringSettings,
    alertmanager_spec,
    render_alertmanager,
)
from devtools.supervisor import Supervisor
from tests.harness.cluster import free_port

from .support import ALERTMANAGER_YML, alert_rules, describe, load_yaml, run

PAGER = "pagerduty-crm-events"
SLACK = "slack-crm-events"
EMAIL = "email-crm-events"
EXPECTED_BY_SEVERITY = {
    "critical": [PAGER, SLACK],
    "warning": [SLACK],
    "info": [EMAIL],
}


def routes_test(amtool: str, config: Path, receivers: list[str], *labels: str) -> Any:
    return run(
        [
            amtool,
            "config",
            "routes",
            "test",
            f"--config.file={config}",
            f"--verify.receivers={','.join(receivers)}",
            *labels,
        ]
    )


def test_amtool_check_config(amtool: str) -> None:
    result = run([amtool, "check-config", str(ALERTMANAGER_YML)])
    assert result.returncode == 0, describe(result)
    assert "3 receivers" in result.stdout
    assert "4 inhibit rules" in result.stdout


def test_amtool_check_config_of_the_local_render(amtool: str, tmp_path: Path) -> None:
    mon = MonitoringSettings(tmp_path, edge_targets=(), ingest_targets=())
    path = render_alertmanager(mon)
    result = run([amtool, "check-config", str(path)])
    assert result.returncode == 0, describe(result)
    text = path.read_text()
    assert "/etc/alertmanager/secrets" not in text
    for name in SECRET_FILES:
        assert f"{mon.secrets_dir}/{name}" in text
        placeholder = (mon.secrets_dir / name).read_text()
        assert "placeholder" in placeholder, "local secrets are placeholders, never real ones"


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        (["severity=critical", "alertname=CrmEventsServiceDown"], [PAGER, SLACK]),
        (["severity=warning", "alertname=CrmEventsEdgeNotReady"], [SLACK]),
        (["severity=info", "alertname=CrmEventsNoClients"], [EMAIL]),
        # no severity, or one the tree does not know: the default receiver (Slack)
        (["alertname=Watchdog"], [SLACK]),
        (["severity=page", "alertname=Other"], [SLACK]),
    ],
    ids=["critical-pages", "warning-slack", "info-email", "no-severity", "unknown-severity"],
)
def test_amtool_routes_by_severity(amtool: str, labels: list[str], receivers: list[str]) -> None:
    result = routes_test(amtool, ALERTMANAGER_YML, receivers, *labels)
    assert result.returncode == 0, describe(result)


def test_amtool_routes_test_fails_on_a_wrong_receiver(amtool: str) -> None:
    """--verify.receivers really verifies: a critical alert does not go to Slack alone."""
    result = routes_test(amtool, ALERTMANAGER_YML, [SLACK], "severity=critical")
    assert result.returncode != 0, describe(result)


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_reaches_the_receivers_of_its_severity(amtool: str, rule: Any) -> None:
    labels = {"alertname": rule["alert"], **rule["labels"]}
    receivers = EXPECTED_BY_SEVERITY[labels["severity"]]
    result = routes_test(
        amtool, ALERTMANAGER_YML, receivers, *(f"{k}={v}" for k, v in labels.items())
    )
    assert result.returncode == 0, describe(result)


def test_secrets_are_read_from_files() -> None:
    config = load_yaml(ALERTMANAGER_YML)
    glob = config["global"]
    assert "slack_api_url" not in glob and glob["slack_api_url_file"].startswith("/etc/")
    assert "smtp_auth_password" not in glob and glob["smtp_auth_password_file"].startswith("/etc/")
    receivers = {r["name"]: r for r in config["receivers"]}
    assert set(receivers) == {PAGER, SLACK, EMAIL}
    for pd in receivers[PAGER]["pagerduty_configs"]:
        assert "routing_key" not in pd and "service_key" not in pd
        assert pd["routing_key_file"].startswith("/etc/alertmanager/secrets/")
    for slack in receivers[SLACK]["slack_configs"]:
        assert "api_url" not in slack  # the global slack_api_url_file applies
    for email in receivers[EMAIL]["email_configs"]:
        assert "auth_password" not in email


# -- inhibition, in a running Alertmanager ------------------------------------------------------


@pytest.fixture(scope="module")
def alertmanager(
    alertmanager_bin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MonitoringSettings]:
    run_dir = tmp_path_factory.mktemp("am")
    port = free_port()
    mon = MonitoringSettings(
        run_dir,
        edge_targets=(),
        ingest_targets=(),
        prometheus_port=free_port(),
        alertmanager_port=port,
    )
    sup = Supervisor(run_dir)
    sup.start(alertmanager_spec(mon))
    try:
        yield mon
    finally:
        sup.stop("alertmanager")


def _post_alerts(url: str, alerts: list[dict[str, Any]]) -> None:
    body = json.dumps(alerts).encode()
    req = urllib.request.Request(
        f"{url}/api/v2/alerts", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def _alerts(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as resp:
        data: list[dict[str, Any]] = json.load(resp)
    return data


def _alert(
    name: str, severity: str, job: str = "crm-events-edge", instance: str = "edge1:9011"
) -> dict[str, Any]:
    return {
        "labels": {
            "alertname": name,
            "severity": severity,
            "service": "crm-events",
            "job": job,
            "instance": instance,
        },
        "annotations": {"summary": "test"},
    }


def _job_alert(name: str, severity: str, job: str) -> dict[str, Any]:
    """An alert of a whole job (no instance label), as the burn-rate and lag alerts are."""
    alert = _alert(name, severity, job=job, instance="")
    del alert["labels"]["instance"]
    return alert


def _wait_states(url: str, expected: dict[tuple[str, str], str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    seen: dict[tuple[str, str], str] = {}
    while time.monotonic() < deadline:
        seen = {
            (a["labels"]["alertname"], a["labels"].get("instance", "")): a["status"]["state"]
            for a in _alerts(url)
        }
        if all(seen.get(k) == v for k, v in expected.items()):
            return
        time.sleep(0.1)
    raise AssertionError(f"alert states {seen}, expected {expected}")


def test_service_down_inhibits_the_warnings_of_its_own_instance_only(
    alertmanager: MonitoringSettings,
) -> None:
    url = alertmanager.alertmanager_url
    _post_alerts(
        url,
        [
            _alert("CrmEventsServiceDown", "critical", instance="edge1:9011"),
            _alert("CrmEventsHighErrorRate", "warning", instance="edge1:9011"),
            _alert("CrmEventsFrequentRestarts", "warning", instance="edge1:9011"),
            _alert("CrmEventsHighErrorRate", "warning", instance="edge2:9012"),
        ],
    )
    _wait_states(
        url,
        {
            ("CrmEventsServiceDown", "edge1:9011"): "active",
            ("CrmEventsHighErrorRate", "edge1:9011"): "suppressed",
            ("CrmEventsFrequentRestarts", "edge1:9011"): "suppressed",
            ("CrmEventsHighErrorRate", "edge2:9012"): "active",
        },
    )
    inhibited = next(
        a
        for a in _alerts(url)
        if a["labels"]["alertname"] == "CrmEventsHighErrorRate"
        and a["labels"]["instance"] == "edge1:9011"
    )
    assert inhibited["status"]["inhibitedBy"], inhibited


def test_fast_burn_inhibits_slow_burn_and_stuck_consumer_inhibits_lag(
    alertmanager: MonitoringSettings,
) -> None:
    url = alertmanager.alertmanager_url

    _post_alerts(
        url,
        [
            _job_alert("CrmEventsLatencySLOFastBurn", "critical", "crm-events-edge"),
            _job_alert("CrmEventsLatencySLOSlowBurn", "warning", "crm-events-edge"),
            _job_alert("CrmEventsConsumerStuck", "critical", "crm-events-ingest"),
            _job_alert("CrmEventsConsumerLagGrowing", "warning", "crm-events-ingest"),
        ],
    )
    _wait_states(
        url,
        {
            ("CrmEventsLatencySLOFastBurn", ""): "active",
            ("CrmEventsLatencySLOSlowBurn", ""): "suppressed",
            ("CrmEventsConsumerStuck", ""): "active",
            ("CrmEventsConsumerLagGrowing", ""): "suppressed",
        },
    )


def test_no_messages_inhibits_the_traffic_anomaly_only(alertmanager: MonitoringSettings) -> None:
    """No events at all is already alerted: the traffic anomaly it implies is held back, while an
    anomaly of the connected clients still notifies."""
    url = alertmanager.alertmanager_url

    _post_alerts(
        url,
        [
            _job_alert("CrmEventsNoMessages", "warning", "crm-events-ingest"),
            _job_alert("CrmEventsTrafficAnomaly", "warning", "crm-events-ingest"),
            _job_alert("CrmEventsClientsAnomaly", "warning", "crm-events-edge"),
        ],
    )
    _wait_states(
        url,
        {
            ("CrmEventsNoMessages", ""): "active",
            ("CrmEventsTrafficAnomaly", ""): "suppressed",
            ("CrmEventsClientsAnomaly", ""): "active",
        },
    )
