"""The processes accept what the chart gives them, started the way a pod starts them: the
rendered environment, and the secret files written from the Secrets the rendering projects
(tests/chart/podfiles.py). For each CI values file the edge and ingest apps are built, the
edge's own authenticator verifies a token signed with the key its values describe, and the
TLS files load as a CA, a certificate and its key. Numbers given in edge.env and ingest.env
reach the processes exactly, and the per-address limits follow edge.trustedProxies."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry

from edge.app import create_app as create_edge_app
from edge.auth import Authenticator
from edge.bus_memory import MemoryBus
from edge.limits import TrustedProxies, client_ip
from ingest.app import create_app as create_ingest_app
from ingest.kafka_config import client_options
from shared.httpkit import ApiError
from shared.security_settings import (
    DEFAULT_HISTORY_BURST,
    DEFAULT_TRUSTED_PROXIES,
)
from shared.settings import EdgeSettings, IngestSettings

from .podfiles import JWKS_KID, keys, pod_env
from .support import (
    CHART,
    CI_VALUES,
    Doc,
    Tools,
    describe,
    env_of,
    helm_template,
    one,
    parse,
    rendered,
    values_of,
)

pytestmark = pytest.mark.timeout(120)

DEFAULT = CHART / "ci" / "default-values.yaml"
TLS = CHART / "ci" / "tls-ingress-hpa-values.yaml"


def settings_of(docs: list[Doc], values: Doc, root: Path) -> tuple[EdgeSettings, IngestSettings]:
    edge = pod_env(docs, one(docs, "Deployment", "edge"), values, root / "edge")
    ingest = pod_env(docs, one(docs, "Deployment", "ingest"), values, root / "ingest")
    return EdgeSettings.from_env(edge), IngestSettings.from_env(ingest)


def a_token(values: Doc) -> str:
    """A token as the clients of these values would bring it: signed with the key the
    values' Secret holds (the inline key, or the one tests/chart/podfiles.py made for the
    named Secret), with the audience and issuer the values require."""
    jwt_values = values["auth"]["jwt"]
    claims: dict[str, object] = {"crm_types": ["*"], "exp": int(time.time()) + 300}
    if jwt_values["audience"]:
        claims["aud"] = jwt_values["audience"]
    if jwt_values["issuer"]:
        claims["iss"] = jwt_values["issuer"]
    k = keys()
    if jwt_values["oidcIssuer"] or jwt_values["jwksUrl"]:
        # as a provider signs: an asymmetric key named by its kid
        claims["iss"] = jwt_values["oidcIssuer"] or claims.get("iss")
        return jwt.encode(claims, k.signing_key, algorithm="ES256", headers={"kid": JWKS_KID})
    if jwt_values["keyType"] == "hs256":
        secret = jwt_values["key"] if not jwt_values["existingSecret"] else k.hs256_secret
        return jwt.encode(claims, secret, algorithm="HS256")
    headers = {"kid": JWKS_KID} if jwt_values["keyType"] == "jwks" else None
    return jwt.encode(claims, k.signing_key, algorithm="ES256", headers=headers)


def load_tls(ca_file: str | None, cert_file: str | None, key_file: str | None) -> None:
    """What the Redis client does with its TLS files on connecting."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_the_apps_start_with_the_files_the_pods_see(
    tools: Tools, values: Path, tmp_path: Path
) -> None:
    docs = rendered(tools.helm, values)
    merged = values_of(values)
    edge, ingest = settings_of(docs, merged, tmp_path)

    create_edge_app(edge, registry=CollectorRegistry(), bus=MemoryBus())
    create_ingest_app(ingest, registry=CollectorRegistry())
    assert edge.host == ingest.host == "0.0.0.0"
    assert edge.redis.url == ingest.redis.url == merged["redis"]["url"]

    assert edge.auth.enabled
    jwt_values = merged["auth"]["jwt"]
    if jwt_values["oidcIssuer"] or jwt_values["jwksUrl"]:
        # The keys come over HTTP once the edge runs (tests/integration/test_jwks.py): here,
        # the edge knows where from, the issuer and audience are required of tokens, and
        # before it has fetched the keys a token cannot be checked (503, not 401).
        assert (edge.auth.oidc_issuer, edge.auth.jwks_url) == (
            jwt_values["oidcIssuer"] or None,
            jwt_values["jwksUrl"] or None,
        )
        assert edge.auth.issuer == (jwt_values["oidcIssuer"] or jwt_values["issuer"] or None)
        assert edge.auth.audience == jwt_values["audience"]
        authenticator = Authenticator(edge.auth)
        assert authenticator.remote is not None
        with pytest.raises(ApiError) as caught:
            authenticator.verify(a_token(merged))
        assert (caught.value.status, caught.value.code) == (503, "keys_unavailable")
    else:
        grant = Authenticator(edge.auth).verify(a_token(merged))
        assert grant.types is None  # crm_types ["*"]

    for redis in (edge.redis, ingest.redis):
        tls = redis.tls
        if merged["redis"]["tls"]["existingSecret"]:
            assert tls.ca_file and tls.cert_file and tls.key_file
            load_tls(tls.ca_file, tls.cert_file, tls.key_file)
        if merged["redis"]["sentinel"]["password"]:
            assert tls.sentinel_password == merged["redis"]["sentinel"]["password"]
    if ingest.kafka_security.protocol in ("SSL", "SASL_SSL"):
        assert client_options(ingest.kafka_security)["ssl_context"] is not None
    if merged["kafka"]["sasl"]["password"]:
        assert ingest.kafka_security.sasl_password == merged["kafka"]["sasl"]["password"]


# -- numbers in edge.env and ingest.env ----------------------------------------------------------

NUMBERS = """
edge:
  env:
    CRM_EVENTS_REPLAY_RING_BYTES: 67108864
    CRM_EVENTS_HISTORY_CACHE_BYTES: 1000000
    CRM_EVENTS_BACKOFF_MAX_S: 2.5
    CRM_EVENTS_AUTH_QUERY_TOKEN: true
ingest:
  env:
    CRM_EVENTS_STREAM_MAXLEN: 1000000
    CRM_EVENTS_DEAD_MAXLEN: 25000000
"""


def test_numbers_in_env_reach_the_processes_exactly(tools: Tools, tmp_path: Path) -> None:
    """Helm reads a values file's numbers as floats; printed as such, 67108864 would become
    6.7108864e+07, which the processes refuse as an integer."""
    extra = tmp_path / "numbers.yaml"
    extra.write_text(NUMBERS, encoding="utf-8")
    result = helm_template(tools.helm, [DEFAULT, extra])
    assert result.returncode == 0, describe(result)
    docs = parse(result.stdout)
    edge_env = env_of(one(docs, "Deployment", "edge"))
    ingest_env = env_of(one(docs, "Deployment", "ingest"))
    assert edge_env["CRM_EVENTS_REPLAY_RING_BYTES"] == "67108864"
    assert edge_env["CRM_EVENTS_BACKOFF_MAX_S"] == "2.5"
    assert ingest_env["CRM_EVENTS_STREAM_MAXLEN"] == "1000000"

    edge, ingest = settings_of(docs, values_of(DEFAULT, extra), tmp_path)
    assert edge.replay_ring_bytes == 67108864
    assert edge.history_cache_bytes == 1000000
    assert edge.backoff_max_s == 2.5
    assert edge.auth.query_token is True
    assert ingest.stream_maxlen == 1000000
    assert ingest.dead_maxlen == 25000000


# -- client addresses and the per-address limits -------------------------------------------------


def behind(peer: str, forwarded: str) -> web.Request:
    request = make_mocked_request("GET", "/crm-events", headers={"X-Forwarded-For": forwarded})
    request._transport_peername = (peer, 40000)  # type: ignore[attr-defined]
    return request


def test_without_trusted_proxies_the_per_address_limits_are_off(
    tools: Tools, tmp_path: Path
) -> None:
    """The default: every browser arrives from the ingress controller's address, so a limit
    per address would cap all of them together."""
    docs = rendered(tools.helm, DEFAULT)
    edge, _ = settings_of(docs, values_of(DEFAULT), tmp_path)
    limits = edge.limits
    assert limits.trusted_proxies == frozenset(DEFAULT_TRUSTED_PROXIES)  # loopback only
    assert limits.max_connections_per_ip == limits.max_connections
    assert limits.history_rate_per_s == 1_000_000
    assert limits.history_burst == 1_000_000
    controller = "10.244.1.17"
    trusted = TrustedProxies(limits.trusted_proxies)
    assert client_ip(behind(controller, "203.0.113.9"), trusted) == controller


def test_with_trusted_proxies_each_browser_is_its_own_address(tools: Tools, tmp_path: Path) -> None:
    docs = rendered(tools.helm, TLS)
    values = values_of(TLS)
    edge, _ = settings_of(docs, values, tmp_path)
    limits = edge.limits
    assert limits.trusted_proxies == frozenset(values["edge"]["trustedProxies"])
    assert limits.max_connections_per_ip == values["edge"]["maxConnectionsPerIp"]
    assert limits.history_rate_per_s == values["edge"]["historyRatePerSecond"]
    assert values["edge"]["historyBurst"] is None
    assert limits.history_burst == DEFAULT_HISTORY_BURST  # null: the product's default
    trusted = TrustedProxies(limits.trusted_proxies)
    for browser in ("203.0.113.9", "192.168.1.7"):
        request = behind("10.244.1.17", f"6.6.6.6, {browser}")
        assert client_ip(request, trusted) == browser


@pytest.mark.parametrize(
    "setting", ["maxConnectionsPerIp=50", "historyRatePerSecond=5", "historyBurst=10"]
)
def test_a_per_address_limit_without_trusted_proxies_is_refused(tools: Tools, setting: str) -> None:
    result = helm_template(tools.helm, [DEFAULT], [f"edge.{setting}"])
    assert result.returncode != 0, describe(result)
    name = setting.split("=", maxsplit=1)[0]
    assert f"edge.{name} needs edge.trustedProxies" in result.stderr, describe(result)
