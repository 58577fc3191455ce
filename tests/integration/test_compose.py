"""docker-compose.yml stays the same topology as the local stack (devtools/stack.py).

Static checks only: no Docker engine is needed. The nginx service must mount the very
crm-events.conf that devtools/nginx_conf.render includes, so both stacks proxy alike.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools import nginx_conf, stack

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"

EDGES = [f"edge{i}" for i in range(1, len(stack.DEFAULT_EDGE_PORTS) + 1)]
#: Service -> the host port the local stack uses for it.
HOST_PORTS = {
    "kafka": stack.DEFAULT_KAFKA_PORT,
    "redis": stack.DEFAULT_REDIS_PORT,
    "ingest": stack.DEFAULT_INGEST_PORT,
    **dict(zip(EDGES, stack.DEFAULT_EDGE_PORTS, strict=True)),
    "nginx": stack.DEFAULT_LB_PORT,
}
#: Long-running services without an endpoint to probe.
NO_ENDPOINT = {"producer"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose["services"]
    assert isinstance(svcs, dict)
    return svcs


def published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for spec in service.get("ports", []):
        parts = str(spec).split(":")
        out[int(parts[-1])] = int(parts[-2])
    return out


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> resolved host path, for bind mounts."""
    out = {}
    for vol in service.get("volumes", []):
        src, dst, *_ = str(vol).split(":")
        if src.startswith((".", "/")):
            out[dst] = (COMPOSE.parent / src).resolve()
    return out


def test_services_of_the_local_stack_exist(services: dict[str, dict[str, Any]]) -> None:
    for name in ["kafka", "kafka-init", "redis", "ingest", *EDGES, "nginx"]:
        assert name in services, name


@pytest.mark.parametrize("name", sorted(HOST_PORTS))
def test_host_ports_match_local_defaults(services: dict[str, dict[str, Any]], name: str) -> None:
    assert HOST_PORTS[name] in published(services[name]).values()


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if svc.get("restart") == "no" or name in NO_ENDPOINT:
            continue
        check = svc.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"


def test_app_services_use_crm_events_env_matching_local_defaults(
    services: dict[str, dict[str, Any]],
) -> None:
    ingest = env_of(services["ingest"])
    assert ingest["CRM_EVENTS_INGEST_PORT"] == str(stack.DEFAULT_INGEST_PORT)
    assert ingest["CRM_EVENTS_KAFKA_TOPIC"] == stack.DEFAULT_KAFKA_TOPIC
    assert ingest["CRM_EVENTS_NODE_ID"] == "ingest-1"
    assert ingest["CRM_EVENTS_KAFKA_BOOTSTRAP"].split(":")[0] == "kafka"
    for i, (name, port) in enumerate(zip(EDGES, stack.DEFAULT_EDGE_PORTS, strict=True), 1):
        env = env_of(services[name])
        assert env["CRM_EVENTS_EDGE_PORT"] == str(port)
        assert env["CRM_EVENTS_NODE_ID"] == f"edge-{i}"
        assert env["CRM_EVENTS_REDIS_URL"].startswith("redis://redis:")
        assert env["CRM_EVENTS_EDGE_HOST"] == "0.0.0.0"
    for name in ["ingest", *EDGES, "producer"]:
        env = env_of(services[name])
        assert env, name
        assert all(key.startswith("CRM_EVENTS_") for key in env), name


def test_app_healthchecks_probe_readyz_on_the_configured_port(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, var in [("ingest", "CRM_EVENTS_INGEST_PORT")] + [
        (e, "CRM_EVENTS_EDGE_PORT") for e in EDGES
    ]:
        port = env_of(services[name])[var]
        test = " ".join(services[name]["healthcheck"]["test"])
        assert f":{port}/readyz" in test, name


def test_topic_is_created_with_three_partitions(services: dict[str, dict[str, Any]]) -> None:
    cmd = " ".join(services["kafka-init"]["command"])
    assert f"--topic {stack.DEFAULT_KAFKA_TOPIC}" in cmd
    assert f"--partitions {stack.DEFAULT_KAFKA_PARTITIONS}" in cmd
    dep = services["ingest"]["depends_on"]["kafka-init"]
    assert dep["condition"] == "service_completed_successfully"


def test_nginx_mounts_the_config_the_local_stack_includes(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    mounted = mounts(services["nginx"])
    shared = mounted["/etc/nginx/conf.d/default.conf"]
    assert shared == nginx_conf.shared_conf_path()

    main = nginx_conf.render(tmp_path, 19010, [19011, 19012]).read_text()
    includes = [Path(p) for p in re.findall(r'^\s*include\s+"?([^";]+)"?;', main, re.M)]
    assert shared in [p.resolve() for p in includes]


def test_nginx_include_files_exist_and_name_the_edges(
    services: dict[str, dict[str, Any]],
) -> None:
    mounted = mounts(services["nginx"])
    wanted = re.findall(r"^\s*include\s+([^;]+);", nginx_conf.shared_conf_path().read_text(), re.M)
    assert sorted(wanted) == sorted([nginx_conf.UPSTREAM_INC, nginx_conf.LISTEN_INC])
    for name in wanted:
        # Relative includes resolve against the main config's directory, /etc/nginx.
        host = mounted[f"/etc/nginx/{name}"]
        assert host.is_file(), host

    upstream = mounted[f"/etc/nginx/{nginx_conf.UPSTREAM_INC}"].read_text()
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstream, re.M)
    assert sorted(servers) == sorted(
        (e, env_of(services[e])["CRM_EVENTS_EDGE_PORT"]) for e in EDGES
    )

    listen = mounted[f"/etc/nginx/{nginx_conf.LISTEN_INC}"].read_text()
    [port] = re.findall(r"^\s*listen\s+(?:[\d.]+:)?(\d+)", listen, re.M)
    assert published(services["nginx"])[int(port)] == stack.DEFAULT_LB_PORT


def test_app_image_builds_from_the_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    for name in ["ingest", *EDGES]:
        build = services[name]["build"]
        dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile.is_file()
        assert dockerfile.read_text().startswith("# syntax=docker/dockerfile:1\n")
