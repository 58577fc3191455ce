"""What the rendered manifests promise, read as data: the edge's shutdown budget and rollout,
probes on routes the apps really serve, ingest capped at the partition count, secrets only as
files from the Secret and key their values name, no root, one autoscaler at a time that keeps
the replica count, the schema's refusals."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from edge.app import create_app as create_edge_app
from edge.bus_memory import MemoryBus
from edge.metrics import EdgeMetrics
from ingest.app import create_app as create_ingest_app
from shared.settings import EdgeSettings, IngestSettings

from .podfiles import pod_env, projected
from .support import (
    CHART,
    CI_VALUES,
    FULLNAME,
    NAMESPACE,
    RELEASE,
    REPO,
    Doc,
    Tools,
    container,
    describe,
    env_of,
    helm_template,
    of_kind,
    one,
    parse,
    pod_specs,
    rendered,
    values_of,
)

pytestmark = pytest.mark.timeout(120)

DEFAULT = CHART / "ci" / "default-values.yaml"
ci_files = pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)


def refused(tools: Tools, *sets: str, values: Path = DEFAULT) -> str:
    """helm template's error for a rendering that must fail."""
    result = helm_template(tools.helm, [values], sets)
    assert result.returncode != 0, describe(result)
    return result.stderr


# -- shutdown --------------------------------------------------------------------------------


@ci_files
def test_edge_grace_period_exceeds_the_prestop_and_the_drain(tools: Tools, values: Path) -> None:
    edge = one(rendered(tools.helm, values), "Deployment", "edge")
    pod = edge["spec"]["template"]["spec"]
    command = container(edge)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(env_of(edge)["CRM_EVENTS_SHUTDOWN_GRACE_S"])
    assert pre_stop > 0 and drain > 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


@ci_files
def test_the_edges_roll_one_new_pod_at_a_time(tools: Tools, values: Path) -> None:
    """maxSurge 1, not a percentage: at 20 edges 25 % would start 5 and drain 5 at once."""
    edge = one(rendered(tools.helm, values), "Deployment", "edge")
    assert edge["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_a_grace_period_shorter_than_prestop_and_drain_is_refused(tools: Tools) -> None:
    error = refused(
        tools,
        "edge.terminationGracePeriodSeconds=20",
        "edge.preStopSleepSeconds=10",
        "edge.shutdownGraceSeconds=10",
    )
    assert "edge.terminationGracePeriodSeconds (20) must exceed" in error


# -- probes ----------------------------------------------------------------------------------


def get_routes(app: Any) -> set[str]:
    return {
        route.resource.canonical
        for route in app.router.routes()
        if route.method == "GET" and route.resource is not None
    }


def probe_paths(deployment: Doc) -> set[str]:
    c = container(deployment)
    paths = set()
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert get["port"] in ports
        paths.add(get["path"])
    return paths


def test_probes_are_routes_the_apps_serve(tools: Tools, tmp_path: Path) -> None:
    """The apps built from the chart's own environment (the edge over the in-memory bus; no
    connection is made before start-up) serve the paths the probes ask, on the probed port."""
    docs = rendered(tools.helm, DEFAULT)
    values = values_of(DEFAULT)
    edge, ingest = one(docs, "Deployment", "edge"), one(docs, "Deployment", "ingest")

    edge_settings = EdgeSettings.from_env(pod_env(docs, edge, values, tmp_path / "edge"))
    edge_app = create_edge_app(edge_settings, registry=CollectorRegistry(), bus=MemoryBus())
    ingest_settings = IngestSettings.from_env(pod_env(docs, ingest, values, tmp_path / "ingest"))
    ingest_app = create_ingest_app(ingest_settings, registry=CollectorRegistry())

    for deployment, app, port in (
        (edge, edge_app, edge_settings.port),
        (ingest, ingest_app, ingest_settings.port),
    ):
        assert container(deployment)["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container(deployment)["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert probe_paths(deployment) <= get_routes(app)
        assert [p["containerPort"] for p in container(deployment)["ports"]] == [port]


# -- ingest and the partitions ---------------------------------------------------------------


@ci_files
def test_ingest_never_runs_more_workers_than_partitions(tools: Tools, values: Path) -> None:
    docs = rendered(tools.helm, values)
    ingest = one(docs, "Deployment", "ingest")
    partitions = int(env_of(ingest)["CRM_EVENTS_KAFKA_PARTITIONS"])
    scalers = [
        s
        for s in of_kind(docs, "ScaledObject")
        if s["spec"]["scaleTargetRef"]["name"] == ingest["metadata"]["name"]
    ]
    if scalers:
        # helm template finds no live Deployment: the scaler's minimum (_helpers.tpl).
        assert ingest["spec"]["replicas"] == scalers[0]["spec"]["minReplicaCount"]
        assert scalers[0]["spec"]["maxReplicaCount"] == partitions
        assert scalers[0]["spec"]["triggers"][0]["type"] == "kafka"
    else:
        assert 1 <= ingest["spec"]["replicas"] <= partitions
    assert ingest["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_more_ingest_replicas_than_partitions_are_refused(tools: Tools) -> None:
    error = refused(tools, "ingest.replicas=4", "kafka.partitions=3")
    assert "ingest.replicas (4) is above kafka.partitions (3)" in error
    ok = helm_template(tools.helm, [DEFAULT], ["ingest.replicas=3", "kafka.partitions=3"])
    assert ok.returncode == 0, describe(ok)


# -- security --------------------------------------------------------------------------------


def image_uid() -> int:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text(encoding="utf-8")
    match = re.search(r"useradd .*--uid (\d+)", dockerfile)
    assert match
    return int(match.group(1))


@ci_files
def test_no_container_runs_as_root(tools: Tools, values: Path) -> None:
    docs = rendered(tools.helm, values)
    uid = image_uid()
    specs = list(pod_specs(docs))
    assert len(specs) == 2
    for name, pod in specs:
        pod_sc = pod["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["runAsUser"] == uid, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
    for prometheus in of_kind(docs, "Prometheus"):
        assert prometheus["spec"]["securityContext"]["runAsNonRoot"] is True


def secret_mounts(pod: Doc, c: Doc) -> dict[str, set[str]]:
    """mountPath -> the file paths that the secret-backed volume mounted there holds."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts: dict[str, set[str]] = {}
    for mount in c.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "secret" in volume:
            sources = [{"secret": volume["secret"]}]
        elif "projected" in volume:
            sources = volume["projected"]["sources"]
            assert all(set(s) == {"secret"} for s in sources), "only Secrets are projected"
        else:
            continue
        items = {item["path"] for s in sources for item in s["secret"]["items"]}
        mounts[mount["mountPath"]] = items
    return mounts


SECRET_VALUES = (
    "sentinel-password-for-ci-only",
    "kafka-password-for-ci-only",
    "redis-password-for-ci-only",
    "a-shared-secret-of-at-least-32-bytes-for-ci",
)


@ci_files
def test_every_secret_is_a_mounted_file(tools: Tools, values: Path) -> None:
    docs = rendered(tools.helm, values)
    for name, pod in pod_specs(docs):
        for c in pod["containers"]:
            assert "envFrom" not in c, name
            mounts = secret_mounts(pod, c)
            files = 0
            for item in c["env"]:
                assert "valueFrom" not in item, f"{name}: {item['name']} is not a plain value"
                assert not any(s in item["value"] for s in SECRET_VALUES), item["name"]
                if item["name"].endswith("_FILE"):
                    files += 1
                    path = item["value"]
                    homes = [m for m in mounts if path.startswith(m.rstrip("/") + "/")]
                    assert len(homes) == 1, (
                        f"{name}: {item['name']}={path} is not in a secret mount"
                    )
                    assert path[len(homes[0]) + 1 :] in mounts[homes[0]], path
            mounted = sum(len(items) for items in mounts.values())
            assert files == mounted, f"{name}: a mounted secret file that no setting names"
    secret_text = "".join(str(doc) for doc in docs if doc["kind"] != "Secret")
    assert not any(s in secret_text for s in SECRET_VALUES)


def _from(owner: Doc, inline_key: str) -> tuple[str, str]:
    """The Secret and key one secret value comes from: the user's Secret when named, else the
    chart's own under its fixed key."""
    if owner.get("existingSecret"):
        return owner["existingSecret"], owner["existingSecretKey"]
    return FULLNAME, inline_key


def _tls(files: dict[str, tuple[str, str]], tls: Doc, prefix: str) -> None:
    if tls.get("existingSecret"):
        for field, suffix in (
            ("caKey", "CA_FILE"),
            ("certKey", "CERT_FILE"),
            ("keyKey", "KEY_FILE"),
        ):
            if tls.get(field):
                files[prefix + suffix] = (tls["existingSecret"], tls[field])


def expected_secret_files(values: Doc, component: str) -> dict[str, tuple[str, str]]:
    """*_FILE setting -> (Secret, key) it must be read from, worked out from the values
    alone, independently of _helpers.tpl."""
    files: dict[str, tuple[str, str]] = {}
    jwt_values = values["auth"]["jwt"]
    remote = jwt_values.get("oidcIssuer") or jwt_values.get("jwksUrl")
    if component == "edge" and values["auth"]["mode"] == "jwt" and not remote:
        setting = {
            "hs256": "CRM_EVENTS_JWT_SECRET_FILE",
            "publicKey": "CRM_EVENTS_JWT_PUBLIC_KEY_FILE",
            "jwks": "CRM_EVENTS_JWT_JWKS_FILE",
        }[jwt_values["keyType"]]
        files[setting] = _from(jwt_values, "jwt-key")
    redis = values["redis"]
    if redis.get("password") or redis.get("existingSecret"):
        files["CRM_EVENTS_REDIS_PASSWORD_FILE"] = _from(redis, "redis-password")
    sentinel = redis["sentinel"]
    if sentinel.get("password") or sentinel.get("existingSecret"):
        files["CRM_EVENTS_REDIS_SENTINEL_PASSWORD_FILE"] = _from(
            sentinel, "redis-sentinel-password"
        )
    _tls(files, redis["tls"], "CRM_EVENTS_REDIS_TLS_")
    if component == "ingest":
        sasl = values["kafka"]["sasl"]
        if sasl.get("password") or sasl.get("existingSecret"):
            files["CRM_EVENTS_KAFKA_SASL_PASSWORD_FILE"] = _from(sasl, "kafka-sasl-password")
        _tls(files, values["kafka"]["tls"], "CRM_EVENTS_KAFKA_SSL_")
    return files


@ci_files
def test_each_secret_file_comes_from_the_secret_and_key_its_values_name(
    tools: Tools, values: Path
) -> None:
    docs = rendered(tools.helm, values)
    merged = values_of(values)
    for component in ("edge", "ingest"):
        deployment = one(docs, "Deployment", component)
        mounted = projected(deployment)
        actual = {
            name: mounted[path][:2]
            for name, path in env_of(deployment).items()
            if name.endswith("_FILE")
        }
        assert actual == expected_secret_files(merged, component), component
    # The chart's own Secret holds each inline value under the key the files are read from.
    inline = {
        "jwt-key": merged["auth"]["jwt"].get("key"),
        "redis-password": merged["redis"].get("password"),
        "redis-sentinel-password": merged["redis"]["sentinel"].get("password"),
        "kafka-sasl-password": merged["kafka"]["sasl"].get("password"),
    }
    own = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == FULLNAME]
    data = {k: base64.b64decode(v).decode() for s in own for k, v in s["data"].items()}
    assert data == {k: v for k, v in inline.items() if v}


@ci_files
def test_the_secret_checksum_is_salted_per_release(tools: Tools, values: Path) -> None:
    """The pod template, readable by more people than the Secret, carries no plain hash of
    the inline secrets: the checksum hashes them with the namespace and release."""
    docs = rendered(tools.helm, values)
    own = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == FULLNAME]
    data = {k: base64.b64decode(v).decode() for s in own for k, v in s["data"].items()}
    inline = json.dumps(data, separators=(",", ":"), sort_keys=True)
    salted = f"crm-events/checksum/{NAMESPACE}/{RELEASE}/{inline}"
    plain = [hashlib.sha256(inline.encode()).hexdigest()]
    plain += [hashlib.sha256(v.encode()).hexdigest() for v in data.values()]
    for deployment in of_kind(docs, "Deployment"):
        checksum = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
        assert checksum == hashlib.sha256(salted.encode()).hexdigest()
    text = str(docs)
    assert not any(h in text for h in plain)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@redis:6379/0",
        "redis://redis:6379/0?password=hunter2",
        "redis+sentinel://s1:26379/mymaster/0?db=0&sentinel_password=hunter2",
    ],
)
def test_a_password_in_the_redis_url_is_refused(tools: Tools, url: str) -> None:
    error = refused(tools, f"redis.url={url}")
    assert "redis.url must not carry a password" in error
    assert "hunter2" not in error.split("redis.url must not carry")[1]


def test_a_unix_socket_redis_url_is_refused(tools: Tools) -> None:
    error = refused(tools, "redis.url=unix:///run/redis/redis.sock")
    assert "/redis/url" in error and "does not match pattern" in error, error


# -- autoscaling ------------------------------------------------------------------------------


@ci_files
def test_hpa_and_keda_are_never_both_rendered_for_the_edges(tools: Tools, values: Path) -> None:
    docs = rendered(tools.helm, values)
    edge = one(docs, "Deployment", "edge")
    name = edge["metadata"]["name"]
    hpas = [
        h
        for h in of_kind(docs, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == name
    ]
    scaled = [
        s for s in of_kind(docs, "ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == name
    ]
    assert len(hpas) + len(scaled) <= 1
    if hpas or scaled:
        # Never left out: Helm's three-way merge would set 1 on the upgrade that enables the
        # autoscaler. helm template finds no live Deployment: the autoscaler's minimum.
        minimum = hpas[0]["spec"]["minReplicas"] if hpas else scaled[0]["spec"]["minReplicaCount"]
        assert edge["spec"]["replicas"] == minimum
    else:
        assert edge["spec"]["replicas"] == values_of(values)["edge"]["replicas"]


def test_enabling_both_autoscalers_is_refused(tools: Tools) -> None:
    error = refused(
        tools,
        "edge.autoscaling.enabled=true",
        "edge.keda.enabled=true",
        "edge.keda.prometheusServerAddress=http://prometheus:9090",
    )
    assert "edge.autoscaling.enabled and edge.keda.enabled are alternatives" in error


def edge_metric_names() -> set[str]:
    registry = CollectorRegistry()
    EdgeMetrics(registry, "chart-test")
    return {metric.name for metric in registry.collect()}


def test_the_hpa_scales_on_the_edges_client_gauge_and_cpu(tools: Tools) -> None:
    docs = rendered(tools.helm, CHART / "ci" / "tls-ingress-hpa-values.yaml")
    hpa = one(docs, "HorizontalPodAutoscaler", "edge")
    assert hpa["apiVersion"] == "autoscaling/v2"
    pods, cpu = hpa["spec"]["metrics"]
    assert pods["type"] == "Pods" and pods["pods"]["target"]["type"] == "AverageValue"
    assert pods["pods"]["metric"]["name"] in edge_metric_names()
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    assert "cpu" in container(one(docs, "Deployment", "edge"))["resources"]["requests"]


def test_keda_asks_prometheus_for_the_same_gauge(tools: Tools) -> None:
    docs = rendered(tools.helm, CHART / "ci" / "cluster-keda-values.yaml")
    scaled = one(docs, "ScaledObject", "edge")
    prometheus, cpu = scaled["spec"]["triggers"]
    metric = re.match(r"sum\((\w+)\{", prometheus["metadata"]["query"])
    assert metric and metric.group(1) in edge_metric_names()
    assert 'job="crm-events-edge"' in prometheus["metadata"]["query"]
    assert cpu["type"] == "cpu"
    auth = one(docs, "TriggerAuthentication", "ingest")
    assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} >= {"sasl", "password"}


# -- ingress -----------------------------------------------------------------------------------


def test_the_ingress_does_not_buffer_and_outwaits_the_keepalive(tools: Tools) -> None:
    docs = rendered(tools.helm, CHART / "ci" / "tls-ingress-hpa-values.yaml")
    annotations = one(docs, "Ingress", "edge")["metadata"]["annotations"]
    ping = float(env_of(one(docs, "Deployment", "edge"))["CRM_EVENTS_SSE_PING_INTERVAL_S"])
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert float(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > ping
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"


# -- values.schema.json ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typo", "key"),
    [
        ("ingres.enabled=true", "ingres"),
        ("edge.replica=3", "replica"),
        ("metrics.serviceMonitor.enable=true", "enable"),
    ],
)
def test_the_schema_rejects_a_misspelt_key(tools: Tools, typo: str, key: str) -> None:
    error = refused(tools, typo)
    assert f"additional properties '{key}' not allowed" in error, error


# -- an identity provider's keys ------------------------------------------------------------

OIDC = CHART / "ci" / "oidc-values.yaml"
ISSUER = "https://keycloak.example.com/realms/crm"
JWKS_URL = "https://idp.example.com/keys"
#: The OIDC CI values with a JWKS URL instead of the issuer (which then names the iss).
AS_JWKS_URL = ("auth.jwt.oidcIssuer=", f"auth.jwt.jwksUrl={JWKS_URL}", f"auth.jwt.issuer={ISSUER}")


def test_an_identity_provider_needs_no_key(tools: Tools) -> None:
    """With an issuer or a JWKS URL the edges get that setting and no key file: nothing is
    mounted, and the chart's Secret holds no JWT key."""
    assert values_of(OIDC)["auth"]["jwt"]["oidcIssuer"] == ISSUER
    by_issuer = rendered(tools.helm, OIDC)
    result = helm_template(tools.helm, [OIDC], AS_JWKS_URL)
    assert result.returncode == 0, describe(result)
    by_url = parse(result.stdout)
    for docs, setting, url in (
        (by_issuer, "CRM_EVENTS_AUTH_OIDC_ISSUER", ISSUER),
        (by_url, "CRM_EVENTS_AUTH_JWKS_URL", JWKS_URL),
    ):
        edge = one(docs, "Deployment", "edge")
        env = env_of(edge)
        assert env[setting] == url
        assert env["CRM_EVENTS_AUTH_MODE"] == "jwt"
        others = {"CRM_EVENTS_AUTH_OIDC_ISSUER", "CRM_EVENTS_AUTH_JWKS_URL"} - {setting}
        assert not others & set(env), setting
        assert not [n for n in env if n.startswith("CRM_EVENTS_JWT_") and n.endswith("_FILE")]
        assert projected(edge) == {}, setting
        own = [d for d in of_kind(docs, "Secret") if d["metadata"]["name"] == FULLNAME]
        assert all("jwt-key" not in d.get("data", {}) for d in own)
    # auth.mode off: no provider either
    result = helm_template(tools.helm, [OIDC], ["auth.mode=off"])
    assert result.returncode == 0, describe(result)
    env = env_of(one(parse(result.stdout), "Deployment", "edge"))
    assert env["CRM_EVENTS_AUTH_MODE"] == "off" and "CRM_EVENTS_AUTH_OIDC_ISSUER" not in env


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            [f"auth.jwt.jwksUrl={JWKS_URL}"],
            "auth.jwt.oidcIssuer and auth.jwt.jwksUrl are alternatives",
        ),
        (
            ["auth.jwt.key=a-shared-secret-of-at-least-32-bytes-for-ci"],
            "auth.jwt.oidcIssuer fetches the identity provider's keys, so the edges take no key",
        ),
        (
            [*AS_JWKS_URL, "auth.jwt.existingSecret=crm-events-jwt"],
            "auth.jwt.jwksUrl fetches the identity provider's keys, so the edges take no key",
        ),
        (
            ["auth.jwt.issuer=https://keycloak.example.com/realms/other"],
            "auth.jwt.issuer differs from auth.jwt.oidcIssuer",
        ),
        (
            ["auth.jwt.oidcIssuer=keycloak.example.com/realms/crm"],
            "at '/auth/jwt/oidcIssuer': 'keycloak.example.com/realms/crm' does not match",
        ),
        (
            ["auth.jwt.oidcIssuer=", "auth.jwt.jwksUrl=https://idp.example.com/keys#x"],
            "at '/auth/jwt/jwksUrl'",
        ),
        (["auth.jwt.audience="], "auth.jwt.oidcIssuer needs auth.jwt.audience"),
        ([*AS_JWKS_URL, "auth.jwt.audience="], "auth.jwt.jwksUrl needs auth.jwt.audience"),
        ([*AS_JWKS_URL[:2]], "auth.jwt.jwksUrl needs auth.jwt.issuer"),
    ],
    ids=[
        "both-urls",
        "url-and-key",
        "url-and-secret",
        "other-issuer",
        "no-scheme",
        "fragment",
        "issuer-without-audience",
        "url-without-audience",
        "url-without-issuer",
    ],
)
def test_an_identity_provider_with_another_key_source_is_refused(
    tools: Tools, sets: list[str], message: str
) -> None:
    error = refused(tools, *sets, values=OIDC)
    assert message in error, error


def test_an_identity_provider_issuer_may_be_repeated(tools: Tools) -> None:
    result = helm_template(tools.helm, [OIDC], [f"auth.jwt.issuer={ISSUER}"])
    assert result.returncode == 0, describe(result)
    assert (
        env_of(one(parse(result.stdout), "Deployment", "edge"))["CRM_EVENTS_JWT_ISSUER"] == ISSUER
    )


def test_the_schema_rejects_a_secret_file_setting_as_plain_env(tools: Tools) -> None:
    error = refused(tools, "edge.env.CRM_EVENTS_JWT_SECRET_FILE=/var/run/key")
    assert "CRM_EVENTS_JWT_SECRET_FILE" in error, error


def chart_set_env(tools: Tools, component: str) -> set[str]:
    """Every setting the chart itself sets for a component, read off the renderings of all
    CI values files (which between them take every branch of the templates), less what those
    files add through <component>.env and the *_FILE settings of the secrets."""
    names: set[str] = set()
    for values in CI_VALUES:
        deployment = one(rendered(tools.helm, values), "Deployment", component)
        own = set(values_of(values)[component]["env"])
        names |= {n for n in env_of(deployment) if n not in own and not n.endswith("_FILE")}
    # The one branch no CI file takes: a JWKS URL instead of the OIDC file's issuer.
    result = helm_template(tools.helm, [OIDC], AS_JWKS_URL)
    assert result.returncode == 0, describe(result)
    own = set(values_of(OIDC)[component]["env"])
    env = env_of(one(parse(result.stdout), "Deployment", component))
    names |= {n for n in env if n not in own and not n.endswith("_FILE")}
    return names


def schema_refused_env(component: str) -> set[str]:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    env = schema["properties"][component]["properties"]["env"]
    assert env["propertyNames"]["not"] == {"pattern": "_FILE$"}
    refused_names = set()
    for name, rule in env["properties"].items():
        assert rule["not"] == {}, name  # refuses every value, the const's hint included
        refused_names.add(name)
    return refused_names


@pytest.mark.parametrize("component", ["edge", "ingest"])
def test_the_schema_refuses_every_setting_the_chart_sets(tools: Tools, component: str) -> None:
    """A second entry of a setting the chart sets would win over the validated value
    (edge.env.CRM_EVENTS_AUTH_MODE=off after auth.mode: jwt): the schema refuses exactly the
    settings the renderings show the chart setting."""
    assert schema_refused_env(component) == chart_set_env(tools, component)
    for values in CI_VALUES:
        deployment = one(rendered(tools.helm, values), "Deployment", component)
        names = [item["name"] for item in container(deployment)["env"]]
        assert len(names) == len(set(names)), f"{values.stem}: a setting given twice"


def test_a_setting_the_chart_sets_is_refused_in_env(tools: Tools) -> None:
    error = refused(
        tools,
        "edge.env.CRM_EVENTS_AUTH_MODE=off",
        "ingest.env.CRM_EVENTS_REDIS_URL=redis://:pw@redis:6379/0",
    )
    for where, source in (
        ("/edge/env/CRM_EVENTS_AUTH_MODE", "auth.mode"),
        ("/ingest/env/CRM_EVENTS_REDIS_URL", "redis.url"),
    ):
        assert f"{where}': value must be '(none: the chart sets it from {source})'" in error, error
