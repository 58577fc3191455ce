"""helm lint --strict with every CI values file, and without the values a user must set; what
helm package puts in the chart."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from .support import CHART, CI_VALUES, KUBE_VERSION, Tools, describe, helm_template, run

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_helm_lint_strict(tools: Tools, values: Path) -> None:
    result = run(
        [
            str(tools.helm),
            "lint",
            "--strict",
            "--kube-version",
            KUBE_VERSION,
            "--values",
            str(values),
            str(CHART),
        ]
    )
    assert result.returncode == 0, describe(result)
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, describe(result)


def test_without_the_required_values_rendering_names_them(tools: Tools) -> None:
    """helm lint reports a template's fail as information; an install refuses it. Each value a
    user must set is named, one at a time."""
    result = helm_template(tools.helm)
    assert result.returncode != 0, describe(result)
    assert "kafka.bootstrap is required" in result.stderr, describe(result)
    result = helm_template(tools.helm, sets=["kafka.bootstrap=kafka:9092"])
    assert "redis.url is required" in result.stderr, describe(result)
    result = helm_template(
        tools.helm, sets=["kafka.bootstrap=kafka:9092", "redis.url=redis://redis:6379/0"]
    )
    assert "the edges need a key" in result.stderr, describe(result)
    result = helm_template(
        tools.helm,
        sets=[
            "kafka.bootstrap=kafka:9092",
            "redis.url=redis://redis:6379/0",
            "auth.jwt.key=" + "k" * 32,
        ],
    )
    assert result.returncode == 0, describe(result)


def test_the_package_leaves_out_the_ci_values(tools: Tools, tmp_path: Path) -> None:
    """.helmignore keeps ci/ (chart-testing's values, read from the source tree) out of the
    packaged chart, and everything the templates read in."""
    result = run([str(tools.helm), "package", str(CHART), "--destination", str(tmp_path)])
    assert result.returncode == 0, describe(result)
    (package,) = tmp_path.glob("crm-events-*.tgz")
    with tarfile.open(package) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames()}
    assert not any(name.startswith("ci/") for name in names), sorted(names)
    for needed in ("Chart.yaml", "values.yaml", "values.schema.json", "templates/NOTES.txt"):
        assert needed in names
    shipped = {p.relative_to(CHART).as_posix() for p in (CHART / "files").rglob("*") if p.is_file()}
    assert shipped <= names
