"""monitoring/ as a mixin (devtools/mixin.py): one source, rendered for any job selectors.

* Every committed rendering (monitoring/prometheus/rules, monitoring/grafana/dashboards, the
  Helm chart's files/) is exactly the source rendered with the default selectors.
* No rule expression and no dashboard query of the source hard-codes a job: every series
  selector goes through a placeholder.
* Rendered for other selectors (several matchers, another namespace), every expression carries
  them, promtool accepts the rules, and nothing of the defaults is left.
* Bad selectors fail naming the option; a selector that would change a file's YAML structure
  is refused rather than written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools import mixin
from devtools.mixin import (
    DEFAULT_SELECTORS,
    MIXIN_DIR,
    MixinError,
    Selectors,
    committed_outputs,
    render_rule_file,
    render_to,
    stale_outputs,
)

from .support import describe, panel_queries, run

JOB_MATCHER = re.compile(r"\bjob\s*(=~|!~|!=|=)")
CUSTOM = Selectors(
    edge='namespace="crm", service="crm-events-edge-svc"',
    ingest='namespace="crm", service="crm-events-ingest-svc"',
    pipeline='namespace="crm", service=~"crm-events-(edge|ingest)-svc"',
)


def _exprs(rule_file: Path) -> list[str]:
    return [r["expr"] for g in yaml.safe_load(rule_file.read_text())["groups"] for r in g["rules"]]


def _dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [q.expr for q in panel_queries(dashboard)]
    queries += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries


def test_committed_renderings_are_the_source_with_the_default_selectors() -> None:
    assert stale_outputs() == [], "run: .venv/bin/python -m devtools.mixin write"
    outputs = committed_outputs()
    # the three places: compose/promtool rules, the dashboards, and the chart's copies
    folders = {p.parent.relative_to(mixin.ROOT).as_posix() for p in outputs}
    assert folders == {
        "monitoring/prometheus/rules",
        "monitoring/grafana/dashboards",
        "deploy/helm/crm-events/files/rules",
        "deploy/helm/crm-events/files/dashboards",
    }
    assert mixin.main(["check"]) == 0


def test_no_expression_of_the_source_hard_codes_a_job() -> None:
    templates = sorted((MIXIN_DIR / "rules").glob("*.yml"))
    assert templates
    placeholders = 0
    for template in templates:
        for expr in _exprs(template):
            assert not JOB_MATCHER.search(expr), f"{template.name}: a job matcher in {expr!r}"
            placeholders += expr.count("_selector@")
    for source in sorted((MIXIN_DIR / "dashboards").glob("*.json")):
        for expr in _dashboard_queries(json.loads(source.read_text())):
            assert not JOB_MATCHER.search(expr), f"{source.name}: a job matcher in {expr!r}"
            placeholders += expr.count("_selector@")
    # the issue counted 42 rule expressions and 30 dashboard queries with a hard-coded job
    assert placeholders >= 72


def test_other_selectors_reach_every_expression(promtool: str, tmp_path: Path) -> None:
    written = render_to(tmp_path, CUSTOM)
    rules = sorted((tmp_path / "rules").glob("*.yml"))
    assert [p.name for p in rules] == sorted(p.name for p in (MIXIN_DIR / "rules").glob("*.yml"))
    assert set(written) >= set(rules)
    texts = [p.read_text() for p in written]
    for text in texts:
        assert "@" + "edge_selector@" not in text and "_selector@" not in text
        assert 'job="crm-events-edge"' not in text and 'job="crm-events-ingest"' not in text
        assert "crm-events-edge|crm-events-ingest" not in text
    seen = 0
    for path in rules:
        for expr in _exprs(path):
            seen += sum(expr.count(s) for s in (CUSTOM.edge, CUSTOM.ingest, CUSTOM.pipeline))
    dashboard = json.loads((tmp_path / "dashboards" / "crm_events_pipeline.json").read_text())
    for expr in _dashboard_queries(dashboard):
        seen += sum(expr.count(s) for s in (CUSTOM.edge, CUSTOM.ingest, CUSTOM.pipeline))
    assert seen >= 72
    result = run([promtool, "check", "rules", "--lint=all", "--lint-fatal", *map(str, rules)])
    assert result.returncode == 0, describe(result)


def test_the_cli_renders_for_job_names_and_derives_the_pipeline(tmp_path: Path) -> None:
    argv = ["render", "--out", str(tmp_path), "--edge-selector", 'job="e"']
    assert mixin.main([*argv, "--ingest-selector", 'job="i"']) == 0
    text = (tmp_path / "rules" / "crm_events_recording.yml").read_text()
    assert 'job=~"e|i"' in text and 'job="e"' in text
    # a selector that is more than a job needs the pipeline one too
    assert mixin.main(["render", "--out", str(tmp_path), "--edge-selector", 'app="e"']) == 2


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"edge": "{job='x'}"}, "--edge-selector"),
        ({"ingest": ""}, "--ingest-selector"),
        ({"pipeline": 'job="a" or vector(1)'}, "--pipeline-selector"),
        ({"edge": 'job="a"}) or up{x="'}, "--edge-selector"),
    ],
)
def test_bad_selectors_name_the_option(kwargs: dict[str, str], option: str) -> None:
    with pytest.raises(MixinError, match=option):
        Selectors(**kwargs)


def test_a_selector_that_would_change_the_yaml_structure_is_refused(tmp_path: Path) -> None:
    # ': ' inside a plain YAML scalar: the line would not parse as the same rule any more
    template = tmp_path / "x.yml"
    template.write_text(
        "groups:\n  - name: g\n    rules:\n"
        "      - record: a:b:c\n        expr: up{@edge_selector@}\n"
    )
    with pytest.raises(MixinError, match=r"x\.yml"):
        render_rule_file(template, Selectors(edge='job="a: b"'))
    # and an unknown placeholder is an error, not left in place
    template.write_text(template.read_text().replace("@edge_selector@", "@edges@"))
    with pytest.raises(MixinError, match="unknown placeholder @edges@"):
        render_rule_file(template, DEFAULT_SELECTORS)


def test_write_repairs_a_stale_rendering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`write` regenerates what differs and removes what no template renders, here on a copy of
    the committed places (the checkout itself is left alone)."""
    root = tmp_path / "repo"
    for rel in ("monitoring", "deploy/helm/crm-events/files"):
        shutil.copytree(mixin.ROOT / rel, root / rel)
    monkeypatch.setattr(mixin, "ROOT", root)
    monkeypatch.setattr(mixin, "MIXIN_DIR", root / "monitoring" / "mixin")
    monkeypatch.setattr(mixin, "RULES_SOURCE", root / "monitoring" / "mixin" / "rules")
    monkeypatch.setattr(mixin, "DASHBOARDS_SOURCE", root / "monitoring" / "mixin" / "dashboards")
    monkeypatch.setattr(mixin, "CHART_FILES", root / "deploy" / "helm" / "crm-events" / "files")
    rules = root / "monitoring" / "prometheus" / "rules"
    victim = next(iter(sorted(rules.glob("*.yml"))))
    victim.write_text(victim.read_text() + "# edited by hand\n")
    (rules / "orphan.yml").write_text("groups: []\n")
    problems = stale_outputs()
    assert any(victim.name in p and "differs" in p for p in problems), problems
    assert any("orphan.yml" in p and "no template" in p for p in problems), problems
    assert mixin.main(["check"]) == 1
    changed = {p.name for p in mixin.write_committed()}
    assert changed == {victim.name, "orphan.yml"}
    assert stale_outputs() == []
    assert not (rules / "orphan.yml").exists()


def test_render_leaves_other_files_alone_and_prunes_only_its_own(tmp_path: Path) -> None:
    """--out may be a folder other teams' rules live in: nothing of theirs is removed. The
    local stack's own folder (prune) loses only renderings whose template is gone."""
    rules = tmp_path / "rules"
    rules.mkdir()
    foreign = {
        rules / "node_exporter.yml": "groups: []\n",
        rules / "README": "ours\n",
        tmp_path / "dashboards" / "other.json": "{}\n",
    }
    for path, text in foreign.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    stale = rules / "crm_events_gone.yml"
    stale.write_text(render_rule_file(sorted((MIXIN_DIR / "rules").glob("*.yml"))[0]))
    render_to(tmp_path, DEFAULT_SELECTORS)
    assert all(path.read_text() == text for path, text in foreign.items())
    assert stale.exists(), "without prune nothing is removed"
    render_to(tmp_path, DEFAULT_SELECTORS, prune=True)
    assert not stale.exists()
    assert all(path.read_text() == text for path, text in foreign.items())
    assert not list(tmp_path.rglob("*.tmp")), "no temporary file is left behind"


def test_job_names_the_pipeline_cannot_be_derived_from_name_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["render", "--out", str(tmp_path), "--edge-selector", 'job="monitoring/edge"']
    assert mixin.main([*argv, "--ingest-selector", 'job="i"']) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixin: error: --pipeline-selector: required"), err
    pipeline = 'job=~"monitoring/edge|i"'
    assert mixin.main([*argv, "--ingest-selector", 'job="i"', "--pipeline-selector", pipeline]) == 0
    assert not list(tmp_path.rglob("*.tmp"))
