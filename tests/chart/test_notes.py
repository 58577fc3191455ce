"""NOTES.txt: it renders for every CI values file; the token command it prints for an HS256
key, run as printed against the secret file the edge pods mount, makes a token that an edge
configured from the same rendering accepts; and it warns about what the values leave
unprotected.

helm template leaves NOTES.txt out and an install needs a cluster, so the tests render it
through a copy of the chart in which a ConfigMap template carries the notes as data."""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import re
import shlex
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from edge.auth import Authenticator
from shared.settings import EdgeSettings

from .podfiles import pod_env
from .support import (
    CHART,
    CI_VALUES,
    NAMESPACE,
    REPO,
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

WRAPPER = """apiVersion: v1
kind: ConfigMap
metadata:
  name: notes
data:
  notes: {{ tpl (.Files.Get "files/notes.txt") . | quote }}
"""


def _remote_keys(jwt_values: dict[str, str]) -> bool:
    return bool(jwt_values["oidcIssuer"] or jwt_values["jwksUrl"])


#: The CI values whose edges verify with a shared secret (not an identity provider's keys).
HS256_VALUES = [
    p
    for p in CI_VALUES
    if values_of(p)["auth"]["jwt"]["keyType"] == "hs256"
    and not _remote_keys(values_of(p)["auth"]["jwt"])
]
REMOTE_VALUES = [p for p in CI_VALUES if _remote_keys(values_of(p)["auth"]["jwt"])]


@pytest.fixture(scope="module")
def notes_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chart = tmp_path_factory.mktemp("chart") / "crm-events"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "files" / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(WRAPPER, encoding="utf-8")
    return chart


@functools.cache
def notes(helm: Path, chart: Path, *values: Path) -> str:
    result = helm_template(helm, values, chart=chart)
    assert result.returncode == 0, describe(result)
    (configmap,) = [d for d in parse(result.stdout) if d["metadata"]["name"] == "notes"]
    text: str = configmap["data"]["notes"]
    return text


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_the_notes_show_how_to_reach_the_stream(
    tools: Tools, notes_chart: Path, values: Path
) -> None:
    text = notes(tools.helm, notes_chart, values)
    assert 'curl -N -H "Authorization: Bearer $TOKEN" "$URL/crm-events"' in text
    edge = one(rendered(tools.helm, values), "Deployment", "edge")["metadata"]["name"]
    assert f"deployment/{edge}" in text
    # The CI values are sound setups: nothing to warn about.
    assert "WARNING" not in text, text


def token_command(text: str) -> tuple[list[str], list[str]]:
    """The kubectl part and the command run in the pod of the notes' TOKEN=$(...) line."""
    match = re.search(r"TOKEN=\$\((kubectl .*?)\)\n", text, re.S)
    assert match, text
    words = shlex.split(match.group(1).replace("\\\n", " "))
    split = words.index("--")
    return words[:split], words[split + 1 :]


def console_script(name: str) -> Callable[[list[str]], int]:
    """The function a console script of pyproject.toml runs."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    module, _, function = scripts[name].partition(":")
    found: Callable[[list[str]], int] = getattr(importlib.import_module(module), function)
    return found


@pytest.mark.parametrize("values", HS256_VALUES, ids=lambda p: p.stem)
def test_the_token_command_makes_a_token_the_edges_accept(
    tools: Tools, notes_chart: Path, values: Path, tmp_path: Path
) -> None:
    """The command of the notes, run as printed (through the console script the image has)
    on the secret file the edge pods mount, signs a token that the edge's own authenticator,
    built from the same rendering's environment, accepts: with the audience and the issuer
    the values require, when they do."""
    docs = rendered(tools.helm, values)
    edge = one(docs, "Deployment", "edge")
    kubectl, command = token_command(notes(tools.helm, notes_chart, values))
    assert kubectl == [
        "kubectl",
        "-n",
        NAMESPACE,
        "exec",
        f"deployment/{edge['metadata']['name']}",
        "-c",
        "edge",
    ]
    env = pod_env(docs, edge, values_of(values), tmp_path)
    # The pod's path of the secret, as the command names it, is the one the edge reads.
    secret_option = command.index("--secret-file") + 1
    assert command[secret_option] == env_of(edge)["CRM_EVENTS_JWT_SECRET_FILE"]
    command[secret_option] = env["CRM_EVENTS_JWT_SECRET_FILE"]

    main = console_script(command[0])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(command[1:]) == 0
    token = out.getvalue().strip()

    settings = EdgeSettings.from_env(env)
    jwt_values = values_of(values)["auth"]["jwt"]
    assert settings.auth.audience == (jwt_values["audience"] or None)
    assert settings.auth.issuer == (jwt_values["issuer"] or None)
    grant = Authenticator(settings.auth).verify(token)
    assert grant.types is None  # --types '*'


@pytest.mark.parametrize("values", REMOTE_VALUES, ids=lambda p: p.stem)
def test_the_notes_send_for_a_token_to_the_identity_provider(
    tools: Tools, notes_chart: Path, values: Path
) -> None:
    """No token command (the chart holds no key to sign with): the notes name where the
    edges fetch the keys, and what the tokens must carry."""
    text = notes(tools.helm, notes_chart, values)
    jwt_values = values_of(values)["auth"]["jwt"]
    assert "crm-events-token" not in text and "--secret-file" not in text
    assert f"    {jwt_values['oidcIssuer'] or jwt_values['jwksUrl']}" in text
    assert "egress to the provider" in text and "TOKEN=<the access token>" in text
    if jwt_values["audience"]:
        assert f"aud {jwt_values['audience']}" in text


def test_the_token_command_is_tested_with_an_audience_and_an_issuer() -> None:
    """Otherwise the test above could not catch a command without --audience or --issuer."""
    jwt_values = [values_of(p)["auth"]["jwt"] for p in HS256_VALUES]
    assert any(j["audience"] and j["issuer"] for j in jwt_values)


RISKY = """
edge:
  replicas: 1
ingress:
  enabled: true
  hosts:
    - host: events.example.com
      paths:
        - path: /
          pathType: Prefix
metrics:
  serviceMonitor:
    enabled: true
  prometheusRule:
    enabled: true
prometheus:
  enabled: true
  ephemeralStorage: true
"""


def test_the_notes_warn_about_what_the_values_leave_unprotected(
    tools: Tools, notes_chart: Path, tmp_path: Path
) -> None:
    risky = tmp_path / "risky.yaml"
    risky.write_text(RISKY, encoding="utf-8")
    text = notes(tools.helm, notes_chart, CHART / "ci" / "default-values.yaml", risky)
    flat = " ".join(text.split())
    assert "WARNING: edge.replicas is 1 and no autoscaler is enabled" in flat
    assert (
        "the Ingress path / on events.example.com publishes the edges' /metrics, /readyz, /healthz"
        in flat
    )
    assert "WARNING: prometheus.alerting.alertmanagers is empty" in flat
    assert "prometheus.ephemeralStorage is true" in flat
    assert "The per-address limits are off: edge.trustedProxies is empty" in flat
    assert "externalTrafficPolicy: Local" in flat


def test_the_notes_say_nothing_of_per_address_limits_behind_trusted_proxies(
    tools: Tools, notes_chart: Path
) -> None:
    text = notes(tools.helm, notes_chart, CHART / "ci" / "tls-ingress-hpa-values.yaml")
    assert "per-address limits are off" not in text
