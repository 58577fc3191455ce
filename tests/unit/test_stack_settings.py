"""devtools.stack's Redis modes without servers: the cluster mode's settings, parts, URL and
partitions, one clear error per bad value, the remembered mode, and how ``status`` shows a
cluster. Starting the nodes for real: tests/integration/test_cluster_backend.py. Also the
client-certificate settings, the local CA ``make up`` makes, and the curl line it prints
(the listener for real: tests/integration/test_mtls.py)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devtools import redis_cluster, redis_ha
from devtools.pki import CRL_DAYS, LocalCA
from devtools.stack import (
    DEFAULT_CLUSTER_KAFKA_PARTITIONS,
    DEFAULT_EDGE_AUTH_MODE,
    DEFAULT_EDGE_AUTH_MODE_WITHOUT_MTLS,
    DEFAULT_KAFKA_PARTITIONS,
    DEFAULT_LB_MTLS_PORT,
    REDIS_MODES,
    ClusterTopology,
    SettingsError,
    Stack,
    StackSettings,
    build_specs,
    ensure_local_pki,
)
from devtools.supervisor import ProcessSpec
from shared.contract import partition_slot

NODES = [f"redis-node{i}" for i in range(1, 7)]


def settings(tmp_path: Path, **env: str) -> StackSettings:
    return StackSettings.from_env({"CRM_EVENTS_RUN_DIR": str(tmp_path / "run"), **env})


def test_cluster_mode_has_six_nodes_and_hands_out_the_masters_as_seeds(tmp_path: Path) -> None:
    s = settings(tmp_path, CRM_EVENTS_REDIS_MODE="cluster")
    assert "cluster" in REDIS_MODES and s.cluster and not s.sentinel
    assert s.redis_nodes == list(zip(NODES, range(7000, 7006), strict=True))
    assert s.part_names[:8] == ["kafka", *NODES, "ingest"]
    assert s.redis_url == "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"
    assert s.cluster_masters == [("127.0.0.1", p) for p in (7000, 7001, 7002)]
    assert s.cluster_replicas == [("127.0.0.1", p) for p in (7003, 7004, 7005)]
    assert s.cluster_bus_ports == tuple(range(17000, 17006))
    specs = {spec.name: spec for spec in build_specs(s, {})}
    assert "redis" not in specs and "redis-replica" not in specs
    assert [specs[n].port for n in NODES] == list(range(7000, 7006))
    assert specs["ingest"].env["CRM_EVENTS_REDIS_URL"] == s.redis_url
    assert specs["ingest"].env["CRM_EVENTS_REDIS_WAIT_REPLICAS"] == "1"
    assert specs["edge2"].env["CRM_EVENTS_REDIS_URL"] == s.redis_url


def test_cluster_mode_defaults_to_twelve_partitions_unless_told(tmp_path: Path) -> None:
    assert settings(tmp_path).kafka_partitions == DEFAULT_KAFKA_PARTITIONS == 3
    cluster = settings(tmp_path, CRM_EVENTS_REDIS_MODE="cluster")
    assert cluster.kafka_partitions == DEFAULT_CLUSTER_KAFKA_PARTITIONS == 12
    told = settings(tmp_path, CRM_EVENTS_REDIS_MODE="cluster", CRM_EVENTS_KAFKA_PARTITIONS="6")
    assert told.kafka_partitions == 6


def test_other_modes_have_no_cluster_nodes_and_ignore_their_ports(tmp_path: Path) -> None:
    for mode in ("single", "sentinel"):
        s = settings(tmp_path, CRM_EVENTS_REDIS_MODE=mode, CRM_EVENTS_REDIS_CLUSTER_PORTS="9011")
        assert not s.cluster and not any(n.startswith("redis-node") for n in s.part_names)
        assert not s.redis_url.startswith("redis+cluster")
        assert s.cluster_bus_ports == ()


def test_cluster_ports_are_read_in_order(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        CRM_EVENTS_REDIS_MODE="cluster",
        CRM_EVENTS_REDIS_CLUSTER_PORTS="8100,8101,8102,8103",
    )
    assert s.redis_nodes == [(f"redis-node{i}", 8099 + i) for i in range(1, 5)]
    assert s.redis_url == "redis+cluster://127.0.0.1:8100,127.0.0.1:8101"
    # CRM_EVENTS_REDIS_PORT is unused in cluster mode: not checked against the nodes' ports.
    same = settings(tmp_path, CRM_EVENTS_REDIS_MODE="cluster", CRM_EVENTS_REDIS_PORT="7000")
    assert same.redis_nodes[0] == ("redis-node1", 7000)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CRM_EVENTS_REDIS_MODE": "sharded"}, "expected single, sentinel or cluster"),
        (
            {"CRM_EVENTS_REDIS_CLUSTER_PORTS": "7000,7001,7002"},
            "CRM_EVENTS_REDIS_CLUSTER_PORTS: expected an even number of ports",
        ),
        (
            {"CRM_EVENTS_REDIS_CLUSTER_PORTS": "7000,x"},
            "CRM_EVENTS_REDIS_CLUSTER_PORTS: expected comma-separated ports",
        ),
        (
            {"CRM_EVENTS_REDIS_CLUSTER_PORTS": "7000,7000"},
            "CRM_EVENTS_REDIS_CLUSTER_PORTS: port 7000 is also used by "
            "CRM_EVENTS_REDIS_CLUSTER_PORTS",
        ),
        (
            {"CRM_EVENTS_REDIS_CLUSTER_PORTS": "7000,60000"},
            "CRM_EVENTS_REDIS_CLUSTER_PORTS (cluster bus: port + 10000): expected a TCP port "
            "1-65535, got 70000",
        ),
        (
            # edge1 on 17000 would take redis-node1's cluster bus.
            {"CRM_EVENTS_EDGE_PORTS": "17000"},
            "CRM_EVENTS_EDGE_PORTS: port 17000 is also used by "
            "CRM_EVENTS_REDIS_CLUSTER_PORTS (cluster bus: port + 10000)",
        ),
    ],
)
def test_bad_cluster_settings_are_one_clear_error(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        settings(tmp_path, **{"CRM_EVENTS_REDIS_MODE": "cluster", **env})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_later_command_follows_the_recorded_cluster_mode(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "redis-mode").write_text("cluster\n")
    s = settings(tmp_path)
    assert s.cluster and s.kafka_partitions == DEFAULT_CLUSTER_KAFKA_PARTITIONS
    assert settings(tmp_path, CRM_EVENTS_REDIS_MODE="single").redis_mode == "single"


A, B, C, D, E, F = (ch * 40 for ch in "abcdef")
HEALTHY = f"""\
{A} 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
{B} 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922
{C} 127.0.0.1:7002@17002 master - 0 0 3 connected 10923-16383
{D} 127.0.0.1:7003@17003 slave {B} 0 0 2 connected
{E} 127.0.0.1:7004@17004 slave {C} 0 0 3 connected
{F} 127.0.0.1:7005@17005 slave {A} 0 0 1 connected
"""


def replica_of(port: int) -> redis_ha.Role:
    return redis_ha.Role("replica", primary=("127.0.0.1", port), link="connected", offset=9)


def master() -> redis_ha.Role:
    return redis_ha.Role("master", offset=9)


def test_status_shows_each_nodes_role_and_slots() -> None:
    view = redis_cluster.ClusterView(("127.0.0.1", 7000), tuple(redis_cluster.parse_nodes(HEALTHY)))
    roles = [master(), master(), master(), replica_of(7001), replica_of(7002), replica_of(7000)]
    topology = ClusterTopology(
        nodes=[(n, 7000 + i, r) for i, (n, r) in enumerate(zip(NODES, roles, strict=True))],
        view=view,
        info={"cluster_state": "ok", "cluster_slots_ok": "16384"},
    )
    assert topology.lines() == [
        "redis cluster: state ok, 16384/16384 slots served by 3 masters, "
        "per 127.0.0.1:7000 (redis-node1)",
        "  redis-node1    127.0.0.1:7000   master, slots 0-5460 (5461), replicas: redis-node6",
        "  redis-node2    127.0.0.1:7001   master, slots 5461-10922 (5462), replicas: redis-node4",
        "  redis-node3    127.0.0.1:7002   master, slots 10923-16383 (5461), replicas: redis-node5",
        "  redis-node4    127.0.0.1:7003   replica of 127.0.0.1:7001 (redis-node2), link connected",
        "  redis-node5    127.0.0.1:7004   replica of 127.0.0.1:7002 (redis-node3), link connected",
        "  redis-node6    127.0.0.1:7005   replica of 127.0.0.1:7000 (redis-node1), link connected",
    ]


def test_status_after_a_master_died_and_before_the_cluster_exists() -> None:
    # redis-node1 killed; redis-node6 (its replica) took over its slots.
    after = (
        HEALTHY.replace(
            "myself,master - 0 0 1 connected 0-5460", "master,fail - 0 0 1 disconnected"
        )
        .replace(f"{B} 127.0.0.1:7001@17001 master", f"{B} 127.0.0.1:7001@17001 myself,master")
        .replace(f"slave {A} 0 0 1 connected", "master - 0 0 7 connected 0-5460")
    )
    view = redis_cluster.ClusterView(("127.0.0.1", 7001), tuple(redis_cluster.parse_nodes(after)))
    roles = [None, master(), master(), replica_of(7001), replica_of(7002), master()]
    lines = ClusterTopology(
        nodes=[(n, 7000 + i, r) for i, (n, r) in enumerate(zip(NODES, roles, strict=True))],
        view=view,
        info={"cluster_state": "ok", "cluster_slots_ok": "16384"},
    ).lines()
    assert lines[0].endswith("per 127.0.0.1:7001 (redis-node2)")
    assert lines[1].endswith("127.0.0.1:7000   no answer (the cluster marks it failed)")
    assert lines[6].endswith("master, slots 0-5460 (5461), replicas: none")

    fresh = redis_cluster.ClusterView(
        ("127.0.0.1", 7000),
        tuple(redis_cluster.parse_nodes(f"{A} :7000@17000 myself,master - 0 0 0 connected\n")),
    )
    lines = ClusterTopology(
        nodes=[(n, 7000 + i, master()) for i, n in enumerate(NODES)], view=fresh, info={}
    ).lines()
    assert lines[0] == "redis cluster: not created yet (the nodes know no cluster)"
    nobody = ClusterTopology(
        nodes=[(n, 7000 + i, None) for i, n in enumerate(NODES)], view=None, info=None
    )
    assert nobody.lines()[0] == "redis cluster: no node answers"
    assert nobody.lines()[1].endswith("no answer")


def test_status_places_the_partitions_on_the_masters_by_their_slot() -> None:
    view = redis_cluster.ClusterView(("127.0.0.1", 7000), tuple(redis_cluster.parse_nodes(HEALTHY)))
    roles = [master(), master(), master(), replica_of(7001), replica_of(7002), replica_of(7000)]
    lines = ClusterTopology(
        nodes=[(n, 7000 + i, r) for i, (n, r) in enumerate(zip(NODES, roles, strict=True))],
        view=view,
        info={"cluster_state": "ok", "cluster_slots_ok": "16384"},
        partitions=12,
    ).lines()
    placed: list[int] = []
    for line, master_node in zip(lines[1:4], view.masters(), strict=True):
        found = re.search(r", partitions ([0-9,]+), replicas: ", line)
        assert found is not None, line
        mine = [int(p) for p in found.group(1).split(",")]
        for p in mine:
            assert any(s <= partition_slot(p) <= e for s, e in master_node.slots)
        placed += mine
    assert sorted(placed) == list(range(12))
    assert "partitions" not in "".join(lines[4:])


# -- client certificates (mutual TLS) ------------------------------------------------------------


def test_mutual_tls_defaults_port_and_edge_mode(tmp_path: Path) -> None:
    s = settings(tmp_path)
    assert s.lb_mtls_port == DEFAULT_LB_MTLS_PORT == 9444
    assert s.edge_auth_mode == DEFAULT_EDGE_AUTH_MODE == "jwt-or-cert"
    assert s.grants_file == s.run_dir / "pki" / "client-cert-grants.json"
    assert settings(tmp_path, CRM_EVENTS_LB_MTLS_PORT="0").lb_mtls_port is None
    assert settings(tmp_path, CRM_EVENTS_LB_MTLS_PORT="off").lb_mtls_port is None
    assert settings(tmp_path, CRM_EVENTS_LB_MTLS_PORT="19444").lb_mtls_port == 19444
    # The port is one of the stack's: no other default takes it.
    ports = [port for _, port in s._ports()]
    assert ports.count(DEFAULT_LB_MTLS_PORT) == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CRM_EVENTS_LB_MTLS_PORT": "x"}, "CRM_EVENTS_LB_MTLS_PORT: expected a TCP port"),
        ({"CRM_EVENTS_LB_MTLS_PORT": "70000"}, "CRM_EVENTS_LB_MTLS_PORT: expected a TCP port"),
        (
            {"CRM_EVENTS_LB_MTLS_PORT": "9443"},
            "CRM_EVENTS_LB_MTLS_PORT: port 9443 is also used by CRM_EVENTS_LB_TLS_PORT",
        ),
        ({"CRM_EVENTS_AUTH_MODE": "certs"}, "CRM_EVENTS_AUTH_MODE: expected one of"),
        (
            {"CRM_EVENTS_CLIENT_CERT_GRANTS_FILE": "/nonexistent/grants.json"},
            "CRM_EVENTS_CLIENT_CERT_GRANTS_FILE: no such file",
        ),
    ],
)
def test_bad_mutual_tls_settings_are_one_clear_error(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        settings(tmp_path, **env)
    assert str(caught.value).startswith(message), caught.value
    assert "\n" not in str(caught.value)


def _env_of(specs: list[ProcessSpec], name: str) -> dict[str, str]:
    [spec] = [s for s in specs if s.name == name]
    return dict(spec.env)


def test_edges_take_certificates_with_the_local_grants_unless_told(tmp_path: Path) -> None:
    s = settings(tmp_path)
    env = _env_of(build_specs(s, {}), "edge1")
    assert env["CRM_EVENTS_AUTH_MODE"] == "jwt-or-cert"
    assert env["CRM_EVENTS_CLIENT_CERT_GRANTS_FILE"] == str(s.grants_file)
    off = _env_of(build_specs(settings(tmp_path, CRM_EVENTS_AUTH_MODE="off"), {}), "edge1")
    assert off["CRM_EVENTS_AUTH_MODE"] == "off"
    assert "CRM_EVENTS_CLIENT_CERT_GRANTS_FILE" not in off
    own = tmp_path / "grants.json"
    own.write_text('{"rules": []}')
    mine = settings(tmp_path, CRM_EVENTS_CLIENT_CERT_GRANTS_FILE=str(own))
    assert _env_of(build_specs(mine, {}), "edge2")["CRM_EVENTS_CLIENT_CERT_GRANTS_FILE"] == str(own)


def test_the_local_ca_has_the_listener_the_client_the_revoked_one_and_the_grants(
    tmp_path: Path,
) -> None:
    s = settings(tmp_path)
    ca = ensure_local_pki(s)
    assert ca.directory == s.pki_dir
    client = ca.files("crm-sync").certificate()
    assert client.subject.rfc4514_string() == "CN=crm-sync,O=crm-events local"
    assert not ca.is_revoked(client)
    revoked = ca.files("crm-sync-revoked").certificate()
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(revoked.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(client.serial_number) is None
    grants = json.loads(s.grants_file.read_text())
    assert grants == {"rules": [{"subject": "CN=crm-sync,O=crm-events local", "types": ["*"]}]}
    assert ca.files("nginx-mtls").cert.is_file()
    # A second start reuses everything: the same client certificate, still one revocation.
    again = ensure_local_pki(s)
    assert again.files("crm-sync").certificate() == client
    assert len(x509.load_pem_x509_crl(again.crl_path.read_bytes())) == 1


def test_up_prints_the_curl_with_a_client_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    stack = Stack(settings(tmp_path))
    rows = dict(stack.urls())
    assert rows["client cert"] == (
        "curl -N --cacert run/pki/ca.crt --cert run/pki/crm-sync.crt "
        "--key run/pki/crm-sync.key https://127.0.0.1:9444/crm-events"
    )
    off = Stack(settings(tmp_path, CRM_EVENTS_LB_MTLS_PORT="0"))
    assert "client cert" not in dict(off.urls())


def test_edges_honour_certificates_only_when_the_mutual_tls_listener_is_on(tmp_path: Path) -> None:
    """Without nginx's mutual-TLS port nothing can relay a certificate: the edges default to
    jwt and get no grants file. A mode the operator sets is passed as it is."""
    for off in ("0", "off", "OFF"):
        s = settings(tmp_path, CRM_EVENTS_LB_MTLS_PORT=off)
        assert s.edge_auth_mode == DEFAULT_EDGE_AUTH_MODE_WITHOUT_MTLS == "jwt"
        env = _env_of(build_specs(s, {}), "edge1")
        assert env["CRM_EVENTS_AUTH_MODE"] == "jwt"
        assert "CRM_EVENTS_CLIENT_CERT_GRANTS_FILE" not in env
    on = settings(tmp_path, CRM_EVENTS_LB_MTLS_PORT="19444")
    assert _env_of(build_specs(on, {}), "edge2")["CRM_EVENTS_AUTH_MODE"] == "jwt-or-cert"
    for mode in ("jwt-or-cert", "cert", "jwt-and-cert", "off", "jwt"):
        told = settings(tmp_path, CRM_EVENTS_LB_MTLS_PORT="off", CRM_EVENTS_AUTH_MODE=mode)
        assert _env_of(build_specs(told, {}), "edge1")["CRM_EVENTS_AUTH_MODE"] == mode
    # Library use (the harness, benchmarks) follows the same rule.
    assert StackSettings(run_dir=tmp_path, lb_mtls_port=None).edge_auth_mode == "jwt"
    assert StackSettings(run_dir=tmp_path).edge_auth_mode == "jwt-or-cert"


def _prepare(s: StackSettings, part: str) -> None:
    [spec] = [spec for spec in build_specs(s, {}) if spec.name == part]
    assert spec.prepare is not None
    spec.prepare()


def test_an_operators_grants_survive_every_start(tmp_path: Path) -> None:
    s = settings(tmp_path)
    _prepare(s, "edge1")
    assert json.loads(s.grants_file.read_text())["rules"][0]["types"] == ["*"]
    edited = '{"rules": [{"subject": "CN=crm-sync,O=crm-events local", "types": ["DealWon"]}]}\n'
    s.grants_file.write_text(edited)
    _prepare(s, "edge1")
    _prepare(s, "edge2")
    assert s.grants_file.read_text() == edited
    # Deleted: the default again.
    s.grants_file.unlink()
    _prepare(s, "edge1")
    assert json.loads(s.grants_file.read_text())["rules"][0]["types"] == ["*"]


def _sign_crl(ca: LocalCA, next_update: dt.datetime) -> None:
    """Replace the CA's CRL with one (same revocations) that ends at ``next_update``."""
    key = serialization.load_pem_private_key((ca.directory / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    old = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.ca_cert.subject)
        .last_update(next_update - dt.timedelta(days=CRL_DAYS))
        .next_update(next_update)
    )
    for revoked in old:
        builder = builder.add_revoked_certificate(revoked)
    ca.crl_path.write_bytes(
        builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )


@pytest.mark.parametrize("days_left", [-1, 1, 200], ids=["expired", "near", "not-near"])
def test_every_nginx_start_renews_the_crl_for_a_year(tmp_path: Path, days_left: int) -> None:
    """nginx reads the CRL at start; one that expires while it runs refuses every client
    certificate. So nginx's prepare step re-signs it, however much it had left."""
    s = settings(tmp_path, CRM_EVENTS_LB_TLS_PORT="off")
    ca = ensure_local_pki(s)
    revoked = ca.files("crm-sync-revoked").certificate()
    now = dt.datetime.now(dt.UTC)
    _sign_crl(ca, now + dt.timedelta(days=days_left))
    _prepare(s, "nginx")
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - now > dt.timedelta(days=364), crl.next_update_utc
    assert crl.is_signature_valid(ca.ca_cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(revoked.serial_number) is not None
    assert f'ssl_crl "{ca.crl_path}";' in (s.run_dir / "nginx" / "crm-events-mtls.conf").read_text()
