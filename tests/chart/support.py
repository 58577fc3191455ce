"""What the chart tests share: where the chart, its CI values and the tools are; rendering
with helm (cached per values file) and validating with kubeconform."""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "crm-events"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
MONITORING_RULES = REPO / "monitoring" / "prometheus" / "rules"
MONITORING_DASHBOARDS = REPO / "monitoring" / "grafana" / "dashboards"
CHART_RULES = CHART / "files" / "rules"
CHART_DASHBOARDS = CHART / "files" / "dashboards"
RUN_DIR = Path(os.environ.get("CRM_EVENTS_RUN_DIR", REPO / "run"))
TOOLS = RUN_DIR / "chart-tools"
# The Kubernetes version the schemas were made for (scripts/install.sh, section 4); helm
# renders for the same one.
KUBE_VERSION = "1.34.3"
RELEASE = "crm"
NAMESPACE = "events"
# The chart's full name for RELEASE (_helpers.tpl): also the name of the chart's own Secret.
FULLNAME = f"{RELEASE}-crm-events"

Doc = dict[str, Any]


@dataclass(frozen=True)
class Tools:
    helm: Path
    kubeconform: Path
    schemas: Path

    @classmethod
    def find(cls) -> Tools | None:
        tools = cls(TOOLS / "bin" / "helm", TOOLS / "bin" / "kubeconform", TOOLS / "schemas")
        if tools.helm.is_file() and tools.kubeconform.is_file() and tools.schemas.is_dir():
            return tools
        return None

    def kubeconform_args(self) -> list[str]:
        """kubeconform, strict, reading only the local schemas: the Kubernetes kinds in its
        default layout, the CRDs as <group>/<kind>_<version>.json."""
        return [
            str(self.kubeconform),
            "-strict",
            "-summary",
            "-kubernetes-version",
            KUBE_VERSION,
            "-schema-location",
            str(self.schemas)
            + "/{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}"
            + "/{{ .ResourceKind }}{{ .KindSuffix }}.json",
            "-schema-location",
            str(self.schemas)
            + "/crds/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json",
        ]


def run(args: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr}"


def helm_template(
    helm: Path,
    values: Sequence[Path] = (),
    sets: Sequence[str] = (),
    chart: Path = CHART,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> subprocess.CompletedProcess[str]:
    args = [
        str(helm),
        "template",
        release,
        str(chart),
        "--namespace",
        namespace,
        "--kube-version",
        KUBE_VERSION,
    ]
    for path in values:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    return run(args)


@functools.cache
def rendered_text(helm: Path, values: Path) -> str:
    result = helm_template(helm, [values])
    assert result.returncode == 0, describe(result)
    return result.stdout


# libyaml's loader, when PyYAML has it: a rendering with the dashboards is some 4,000 lines,
# which the pure-Python loader takes half a second for, every time a test reads one.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse(text: str) -> list[Doc]:
    return [doc for doc in yaml.load_all(text, Loader=_LOADER) if doc]


@functools.cache
def _rendered(helm: Path, values: Path) -> tuple[Doc, ...]:
    return tuple(parse(rendered_text(helm, values)))


def rendered(helm: Path, values: Path) -> list[Doc]:
    """The parsed rendering of one values file, parsed once: read it, never change it (copy
    what a test means to alter)."""
    return list(_rendered(helm, values))


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[Doc], kind: str, component: str | None = None) -> Doc:
    found = [
        doc
        for doc in of_kind(docs, kind)
        if component is None
        or doc["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects for {component}"
    return found[0]


def container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Doc = containers[0]
    return result


def env_of(deployment: Doc) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(deployment).get("env", [])}


def pod_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def rule_groups(directory: Path) -> list[Doc]:
    """The groups of every rule file of a directory, in file-name order."""
    groups: list[Doc] = []
    for path in sorted(directory.glob("*.yml")):
        groups += yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)["groups"]
    return groups


def merge(base: Doc, override: Doc) -> Doc:
    """Helm's coalescing of a values file over the chart's: maps merge key by key, anything
    else replaces, and null removes the key."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@functools.cache
def _values_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def values_of(*files: Path) -> Doc:
    """The values a rendering with these files sees: values.yaml, then each file over it."""
    values: Doc = yaml.load(_values_text(CHART / "values.yaml"), Loader=_LOADER)
    for path in files:
        values = merge(values, yaml.load(_values_text(path), Loader=_LOADER) or {})
    return values
