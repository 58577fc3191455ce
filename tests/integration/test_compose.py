"""docker-compose.yml stays the same topology as the local stack (devtools/stack.py).

Static checks only: no Docker engine is needed. The nginx service must mount the very
crm-events.conf that devtools/nginx_conf.render includes, so both stacks proxy alike.
"""

from __future__ import annotations

import ipaddress
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


def listens(text: str) -> list[tuple[int, set[str]]]:
    """(port, parameters) of each ``listen`` directive of an nginx include."""
    found = re.findall(r"^\s*listen\s+(?:\S+:)?(\d+)((?:\s+[\w=]+)*)\s*;", text, re.M)
    return [(int(port), set(params.split())) for port, params in found]


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
    [port] = [p for p, params in listens(listen) if "ssl" not in params]
    assert published(services["nginx"])[port] == stack.DEFAULT_LB_PORT


def test_nginx_serves_https_with_http2_from_the_tls_volume(
    services: dict[str, dict[str, Any]],
) -> None:
    nginx = services["nginx"]
    listen = mounts(nginx)[f"/etc/nginx/{nginx_conf.LISTEN_INC}"].read_text()
    [(port, params)] = [(p, params) for p, params in listens(listen) if "ssl" in params]
    assert published(nginx)[port] == stack.DEFAULT_LB_TLS_PORT
    # nginx 1.26 (the image) enables HTTP/2 with the directive; older ones on the listener.
    assert "http2" in params or re.search(r"^\s*http2\s+on\s*;", listen, re.M)
    cert_paths = re.findall(r"^\s*ssl_certificate(?:_key)?\s+(\S+);", listen, re.M)
    assert sorted(Path(p).name for p in cert_paths) == [nginx_conf.TLS_CERT, nginx_conf.TLS_KEY]
    assert {str(Path(p).parent) for p in cert_paths} == {"/etc/nginx/tls"}
    assert "nginx-tls:/etc/nginx/tls:ro" in nginx["volumes"]

    init = services["nginx-tls-init"]
    assert nginx["depends_on"]["nginx-tls-init"]["condition"] == "service_completed_successfully"
    assert "nginx-tls:/tls" in init["volumes"]
    script = " ".join(init["command"])
    for name in (nginx_conf.TLS_CERT, nginx_conf.TLS_KEY):
        assert f"/tls/{name}" in script


def test_local_render_with_tls_matches_the_compose_listener(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    cert, key = nginx_conf.ensure_self_signed_cert(tmp_path / "tls")
    nginx_conf.render(tmp_path, 19010, [19011, 19012], tls_port=19443, tls_cert=cert, tls_key=key)
    local = (tmp_path / nginx_conf.LISTEN_INC).read_text()
    assert sorted((p, "ssl" in params, "http2" in params) for p, params in listens(local)) == [
        (19010, False, False),
        (19443, True, True),
    ]
    compose = mounts(services["nginx"])[f"/etc/nginx/{nginx_conf.LISTEN_INC}"].read_text()
    for directive in ("ssl_protocols", "ssl_session_timeout"):
        [a] = re.findall(rf"^{directive}\s+([^;]+);", local, re.M)
        [b] = re.findall(rf"^{directive}\s+([^;]+);", compose, re.M)
        assert a == b, directive
    # Without TLS arguments the include is exactly the plain listener, as before.
    nginx_conf.render(tmp_path, 19010, [19011, 19012])
    assert listens((tmp_path / nginx_conf.LISTEN_INC).read_text()) == [(19010, set())]


def test_one_server_block_so_both_listeners_proxy_sse_alike() -> None:
    conf = nginx_conf.shared_conf_path().read_text()
    assert len(re.findall(r"^server\s*\{", conf, re.M)) == 1
    location = conf[conf.index("location /crm-events") :]
    location = location[: location.index("}")]
    assert "proxy_buffering off;" in location
    read_timeout = re.search(r"proxy_read_timeout\s+(\d+)s;", location)
    assert read_timeout is not None and int(read_timeout.group(1)) > 15  # keepalive: 15 s


def test_app_image_builds_from_the_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    for name in ["ingest", *EDGES]:
        build = services[name]["build"]
        dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile.is_file()
        assert dockerfile.read_text().startswith("# syntax=docker/dockerfile:1\n")


def test_edges_authenticate_with_a_secret_made_once(services: dict[str, dict[str, Any]]) -> None:
    init = services["auth-init"]
    assert init["restart"] == "no"
    assert any(str(v).startswith("auth:") for v in init["volumes"])
    for name in EDGES:
        env = services[name]["environment"]
        assert env["CRM_EVENTS_AUTH_MODE"] == "jwt"
        secret_dir = env["CRM_EVENTS_JWT_SECRET_FILE"].rsplit("/", 1)[0]
        assert f"auth:{secret_dir}:ro" in services[name]["volumes"]
        assert services[name]["depends_on"]["auth-init"]["condition"] == (
            "service_completed_successfully"
        )


def test_compose_runs_the_monitoring_of_monitoring_dir(services: dict[str, dict[str, Any]]) -> None:
    for name in ("prometheus", "alertmanager", "grafana"):
        assert name in services, name
        assert services[name].get("healthcheck"), name
    mounts = " ".join(services["prometheus"]["volumes"])
    assert "./monitoring/prometheus:/etc/prometheus" in mounts


def test_edges_trust_nginx_on_the_network_compose_defines(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    # nginx is another container: unless the edges trust its address, every browser counts
    # as nginx for the per-address limits (the 201st stream on an edge would get 429).
    nginx_nets = services["nginx"].get("networks")
    assert isinstance(nginx_nets, dict), "nginx needs a fixed address on a network compose defines"
    [(net_name, attachment)] = nginx_nets.items()
    nginx_ip = ipaddress.ip_address(attachment["ipv4_address"])
    subnets = [
        ipaddress.ip_network(cfg["subnet"])
        for cfg in compose["networks"][net_name]["ipam"]["config"]
    ]
    assert any(nginx_ip in net for net in subnets), (nginx_ip, subnets)
    for name in EDGES:
        assert net_name in services[name].get("networks", [net_name]), name
        trusted = [
            ipaddress.ip_network(p.strip(), strict=False)
            for p in env_of(services[name])["CRM_EVENTS_TRUSTED_PROXIES"].split(",")
        ]
        assert any(nginx_ip in net for net in trusted), (name, nginx_ip, trusted)
        # Nothing else on the network: connections published from the host may come from the
        # network's gateway, and a trusted gateway would let their X-Forwarded-For choose the
        # client's address.
        for subnet in subnets:
            gateway = next(subnet.hosts())
            assert not any(gateway in net for net in trusted), (name, gateway)
            assert not any(subnet.subnet_of(net) for net in trusted if net.version == 4), name
