"""What other controllers read from the chart's objects and no schema checks: KEDA's trigger
metadata and TriggerAuthentication parameters, and ingress-nginx's annotations, are free-form
string maps to kubeconform, so a misspelt name (lagTreshold, proxy-bufering) would validate
and be ignored at run time. Each name the chart writes must be one the controller documents,
and the sets are exactly the ones the chart means to write. And the Ingress routes the edges'
public routes only."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from edge.app import create_app as create_edge_app
from edge.bus_memory import MemoryBus
from shared.settings import EdgeSettings

from .podfiles import pod_env
from .support import (
    CHART,
    Doc,
    Tools,
    describe,
    helm_template,
    of_kind,
    one,
    parse,
    rendered,
    values_of,
)

pytestmark = pytest.mark.timeout(120)

DEFAULT = CHART / "ci" / "default-values.yaml"
KEDA = CHART / "ci" / "cluster-keda-values.yaml"
INGRESS = CHART / "ci" / "tls-ingress-hpa-values.yaml"

# The parameters KEDA 2.21 documents (keda.sh/docs/2.21/scalers/apache-kafka/, "Parameter
# list" and "Authentication Parameters"; .../scalers/prometheus/, "Parameter list" and
# "Authentication Parameters"; .../scalers/cpu/, "Parameter list"). Copied by hand: update
# them with the KEDA version the chart's schemas come from (scripts/install.sh, section 4).
KAFKA_METADATA = {
    "bootstrapServers",
    "consumerGroup",
    "topic",
    "lagThreshold",
    "activationLagThreshold",
    "offsetResetPolicy",
    "allowIdleConsumers",
    "scaleToZeroOnInvalidOffset",
    "excludePersistentLag",
    "limitToPartitionsWithLag",
    "ensureEvenDistributionOfPartitions",
    "version",
    "fullMetadata",
    "partitionLimitation",
    "sasl",
    "saslTokenProvider",
    "tls",
    "unsafeSsl",
    "awsRegion",
}
KAFKA_AUTHENTICATION = {
    "sasl",
    "saslTokenProvider",
    "username",
    "password",
    "keytab",
    "realm",
    "kerberosConfig",
    "kerberosServiceName",
    "kerberosDisableFAST",
    "oauthTokenEndpointUri",
    "scopes",
    "oauthExtensions",
    "tls",
    "ca",
    "cert",
    "key",
    "keyPassword",
    "awsRoleArn",
    "awsAccessKeyID",
    "awsSecretAccessKey",
}
PROMETHEUS_METADATA = {
    "serverAddress",
    "query",
    "threshold",
    "activationThreshold",
    "namespace",
    "customHeaders",
    "ignoreNullValues",
    "queryParameters",
    "unsafeSsl",
    "timeout",
    "authModes",
}
CPU_METADATA = {"type", "value", "containerName"}
DOCUMENTED = {"kafka": KAFKA_METADATA, "prometheus": PROMETHEUS_METADATA, "cpu": CPU_METADATA}

# The proxy, TLS-redirect, rate-limit, CORS and balancing rows of the annotation table of
# kubernetes.github.io/ingress-nginx/user-guide/nginx-configuration/annotations/ (prefix
# "nginx.ingress.kubernetes.io/"), copied by hand: the chart's own annotations must be there.
NGINX = "nginx.ingress.kubernetes.io/"
NGINX_DOCUMENTED = {
    NGINX + name
    for name in (
        "proxy-buffering",
        "proxy-buffers-number",
        "proxy-buffer-size",
        "proxy-connect-timeout",
        "proxy-send-timeout",
        "proxy-read-timeout",
        "proxy-next-upstream",
        "proxy-next-upstream-timeout",
        "proxy-next-upstream-tries",
        "proxy-request-buffering",
        "proxy-http-version",
        "proxy-body-size",
        "ssl-redirect",
        "force-ssl-redirect",
        "limit-connections",
        "limit-rps",
        "whitelist-source-range",
        "enable-cors",
        "cors-allow-origin",
        "upstream-hash-by",
        "load-balance",
        "affinity",
    )
}


def triggers(docs: list[Doc], component: str) -> dict[str, Doc]:
    (scaled,) = [
        s
        for s in of_kind(docs, "ScaledObject")
        if s["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return {t["type"]: t for t in scaled["spec"]["triggers"]}


def test_the_keda_triggers_use_documented_parameters(tools: Tools) -> None:
    docs = rendered(tools.helm, KEDA)
    written = {
        ("edge", kind): set(trigger["metadata"]) for kind, trigger in triggers(docs, "edge").items()
    } | {
        ("ingest", kind): set(trigger["metadata"])
        for kind, trigger in triggers(docs, "ingest").items()
    }
    assert written == {
        ("edge", "prometheus"): {"serverAddress", "query", "threshold"},
        ("edge", "cpu"): {"value"},
        ("ingest", "kafka"): {
            "bootstrapServers",
            "consumerGroup",
            "topic",
            "lagThreshold",
            "allowIdleConsumers",
        },
    }
    for (_, kind), names in written.items():
        assert names <= DOCUMENTED[kind], names - DOCUMENTED[kind]
    # metricType is the trigger's own field for the cpu scaler (its "type" metadata is
    # deprecated): Utilization, as the HPA's CPU target.
    assert triggers(docs, "edge")["cpu"]["metricType"] == "Utilization"


def test_the_trigger_authentication_uses_documented_parameters(tools: Tools) -> None:
    docs = rendered(tools.helm, KEDA)
    auth = one(docs, "TriggerAuthentication", "ingest")
    parameters = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
    assert parameters == {"sasl", "username", "password", "tls"}  # SASL_PLAINTEXT
    assert parameters <= KAFKA_AUTHENTICATION


def test_the_ingress_annotations_are_documented(tools: Tools) -> None:
    docs = rendered(tools.helm, INGRESS)
    annotations = set(one(docs, "Ingress", "edge")["metadata"]["annotations"])
    own = annotations - set(values_of(INGRESS)["ingress"]["annotations"])
    assert own == {
        NGINX + "proxy-buffering",
        NGINX + "proxy-read-timeout",
        NGINX + "proxy-http-version",
        NGINX + "proxy-connect-timeout",
        NGINX + "proxy-next-upstream",
        NGINX + "proxy-next-upstream-tries",
        NGINX + "proxy-next-upstream-timeout",
    }
    assert own <= NGINX_DOCUMENTED, own - NGINX_DOCUMENTED


# -- the Ingress's routes --------------------------------------------------------------------

INTERNAL = {"/metrics", "/readyz", "/healthz"}


def routed(path: str, ingress: Doc) -> bool:
    """Whether a request path reaches the edges through the Ingress (Kubernetes' Prefix:
    whole path elements; Exact: the whole path)."""
    for rule in ingress["spec"]["rules"]:
        for entry in rule["http"]["paths"]:
            prefix = entry["path"].rstrip("/")
            if entry["pathType"] == "Exact" and path == entry["path"]:
                return True
            if entry["pathType"] == "Prefix" and (path == prefix or path.startswith(prefix + "/")):
                return True
    return False


def edge_routes(tools: Tools, tmp_path: Path) -> set[str]:
    """Every GET route of the edge app, a concrete path for each ({name} -> x)."""
    docs = rendered(tools.helm, DEFAULT)
    env = pod_env(docs, one(docs, "Deployment", "edge"), values_of(DEFAULT), tmp_path)
    app = create_edge_app(EdgeSettings.from_env(env), registry=CollectorRegistry(), bus=MemoryBus())
    return {
        r.resource.canonical.replace("{name}", "x")
        for r in app.router.routes()
        if r.method == "GET" and r.resource is not None
    }


def test_the_ingress_routes_the_public_routes_only(tools: Tools, tmp_path: Path) -> None:
    routes = edge_routes(tools, tmp_path)
    assert routes >= INTERNAL
    public = routes - INTERNAL
    assert {"/crm-events", "/crm-events/history", "/openapi.yaml", "/ops/crm-events"} <= public
    default = helm_template(tools.helm, [DEFAULT], ["ingress.enabled=true"])
    assert default.returncode == 0, describe(default)
    for name, docs in (
        ("values.yaml", parse(default.stdout)),
        (INGRESS.stem, rendered(tools.helm, INGRESS)),
    ):
        ingress = one(docs, "Ingress", "edge")
        assert {r for r in public if not routed(r, ingress)} == set(), name
        assert {r for r in INTERNAL if routed(r, ingress)} == set(), name
