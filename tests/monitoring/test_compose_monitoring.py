"""monitoring/docker-compose.monitoring.yml agrees with the files it mounts: the paths
exist, the containers find the config where the configs say, and the Prometheus targets are
the compose services of docker-compose.yml (no Docker needed)."""

from __future__ import annotations

from typing import Any

import pytest

from .support import MONITORING, PROMETHEUS_DIR, PROVISIONING, REPO, load_yaml

SNIPPET = MONITORING / "docker-compose.monitoring.yml"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(SNIPPET)["services"]
    return data


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (relative to the checkout) of every bind mount."""
    out = {}
    for volume in service["volumes"]:
        host, container, *_ = volume.split(":")
        if host.startswith("./"):
            out[container] = host
    return out


def test_bind_mounts_exist(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for host in mounts(service).values():
            assert (REPO / host).exists(), f"{name}: {host} does not exist"


def test_prometheus_reads_this_folder(services: dict[str, Any]) -> None:
    prom = services["prometheus"]
    assert mounts(prom)["/etc/prometheus"] == "./monitoring/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "alertmanager:9093"
    ]


def test_prometheus_targets_are_the_compose_services() -> None:
    compose = load_yaml(REPO / "docker-compose.yml")["services"]
    for job in ("crm-events-edge", "crm-events-ingest"):
        for group in load_yaml(PROMETHEUS_DIR / "targets" / f"{job}.yml"):
            for target in group["targets"]:
                host, port = target.split(":")
                assert host in compose, f"{job}: no compose service {host}"
                env = compose[host].get("environment", {})
                ports = {env.get("CRM_EVENTS_EDGE_PORT"), env.get("CRM_EVENTS_INGEST_PORT")}
                assert port in ports, f"{job}: {host} does not listen on {port}"


def test_alertmanager_secrets_mount_matches_the_config(services: dict[str, Any]) -> None:
    am = services["alertmanager"]
    m = mounts(am)
    assert m["/etc/alertmanager/alertmanager.yml"] == "./monitoring/alertmanager/alertmanager.yml"
    assert m["/etc/alertmanager/secrets"] == "./monitoring/alertmanager/secrets"
    text = (MONITORING / "alertmanager" / "alertmanager.yml").read_text()
    assert "/etc/alertmanager/secrets/" in text
    assert "--cluster.listen-address=" in am["command"]


def test_grafana_provisioning_paths_match(services: dict[str, Any]) -> None:
    m = mounts(services["grafana"])
    assert m["/etc/grafana/provisioning"] == "./monitoring/grafana/provisioning"
    dashboards_in_container = next(
        c for c, h in m.items() if h == "./monitoring/grafana/dashboards"
    )
    (provider,) = load_yaml(PROVISIONING / "dashboards" / "crm-events.yaml")["providers"]
    assert provider["options"]["path"] == dashboards_in_container
    (ds,) = load_yaml(PROVISIONING / "datasources" / "prometheus.yaml")["datasources"]
    assert ds["url"] == "http://prometheus:9090"
