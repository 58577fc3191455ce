"""Every CI values file renders manifests that kubeconform accepts in strict mode against
the offline schemas (Kubernetes' own kinds and the CRDs: ServiceMonitor, PrometheusRule,
Prometheus, ScaledObject, TriggerAuthentication), and kubeconform does refuse what is wrong,
so the check can fail."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from .support import (
    CHART,
    CI_VALUES,
    Doc,
    Tools,
    describe,
    one,
    parse,
    rendered,
    rendered_text,
    run,
)

pytestmark = pytest.mark.timeout(120)

SUMMARY = re.compile(
    r"Summary: (\d+) resources? found .* "
    r"Valid: (\d+), Invalid: (\d+), Errors: (\d+), Skipped: (\d+)"
)


def kubeconform(tools: Tools, manifests: str) -> tuple[int, str, tuple[int, ...]]:
    result = run([*tools.kubeconform_args(), "-"], stdin=manifests)
    output = result.stdout + result.stderr
    match = SUMMARY.search(output)
    assert match, describe(result)
    return result.returncode, output, tuple(int(n) for n in match.groups())


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_rendered_manifests_are_valid(tools: Tools, values: Path) -> None:
    text = rendered_text(tools.helm, values)
    code, output, (found, valid, invalid, errors, skipped) = kubeconform(tools, text)
    assert code == 0, output
    assert (invalid, errors, skipped) == (0, 0, 0), output
    assert found == valid == len(parse(text)), output


def test_the_ci_values_render_every_template_and_kind(tools: Tools) -> None:
    """Between them the CI values files exercise every template, so every kind the chart can
    render went through kubeconform above."""
    sources: set[str] = set()
    kinds: set[str] = set()
    for values in CI_VALUES:
        text = rendered_text(tools.helm, values)
        sources |= set(re.findall(r"^# Source: crm-events/(templates/\S+)$", text, re.M))
        kinds |= {doc["kind"] for doc in parse(text)}
    templates = {
        f"templates/{path.name}"
        for path in (CHART / "templates").glob("*.yaml")
        if path.name != "validate.yaml"  # only refuses; renders nothing
    }
    assert templates - sources == set()
    for kind in ("ServiceMonitor", "PrometheusRule", "Prometheus", "ScaledObject"):
        assert kind in kinds


def broken(docs: list[Doc]) -> str:
    """The default rendering with three faults: a misspelt Deployment field, a misspelt field
    in a CRD's object (ServiceMonitor), and a kind no schema knows."""
    deployment = copy.deepcopy(one(docs, "Deployment", "edge"))
    deployment["spec"]["replica"] = 3
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "typo"},
        "spec": {"jobLable": "crm-events/job", "selector": {}, "endpoints": [{"port": "http"}]},
    }
    unknown = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}}
    return yaml.safe_dump_all([deployment, monitor, unknown])


def test_kubeconform_rejects_a_broken_manifest(tools: Tools) -> None:
    docs = rendered(tools.helm, CHART / "ci" / "default-values.yaml")
    code, output, (found, valid, invalid, errors, _) = kubeconform(tools, broken(docs))
    assert code != 0, output
    assert (found, valid, invalid, errors) == (3, 0, 2, 1), output
    assert "replica" in output and "jobLable" in output, output
    assert "could not find schema for Gadget" in output, output
