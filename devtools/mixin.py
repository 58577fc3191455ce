"""Monitoring as a mixin: the rules and dashboards of ``monitoring/`` for any job selectors.

The source is ``monitoring/mixin/``: Prometheus rule files (``rules/*.yml``) and Grafana
dashboards (``dashboards/*.json``) whose series selectors are three placeholders instead of
hard-coded job labels:

=========================  ===============================  ==================================
placeholder                selects                          default
=========================  ===============================  ==================================
``@edge_selector@``        the edges' metrics               ``job="crm-events-edge"``
``@ingest_selector@``      the ingest workers' metrics      ``job="crm-events-ingest"``
``@pipeline_selector@``    both roles at once               ``job=~"crm-events-edge|``
                                                            ``crm-events-ingest"``
=========================  ===============================  ==================================

A selector is what goes between the braces of a PromQL selector: one or more label matchers,
comma-separated (``namespace="crm", service="crm-events-edge"``). The rules group and alert by
``job`` and ``instance``, so whatever selects the series, those two labels must tell the
processes apart (they do under Prometheus's defaults and the Prometheus Operator's).

Every deployment renders from this one source:

* the defaults are committed where compose and the promtool tests read them
  (``monitoring/prometheus/rules/``, ``monitoring/grafana/dashboards/``) and where the Helm chart
  packs them (``deploy/helm/crm-events/files/``); ``python -m devtools.mixin write`` regenerates
  them, and a test fails while any differs from the source;
* the local stack renders its rules on every start for the job names it scrapes under
  (``devtools/monitoring_stack.py``);
* anyone else: ``python -m devtools.mixin render --edge-selector '…' --ingest-selector '…'
  --pipeline-selector '…' --out DIR`` writes ``DIR/rules/*.yml`` and ``DIR/dashboards/*.json``.

Substitution is textual (the rule files keep their comments), and then checked: the rendered
text must parse to the same data as the template with the placeholders replaced inside its
strings, so a selector can never change the structure of a file it lands in.

A dashboard may also hold values generated from the alert rules, so that it cannot drift from
them. A JSON string that is exactly ``@generated:runbook_links@`` becomes Markdown linking every
alert's runbook; ``@generated:runbook_label(<expr>)@`` becomes ``<expr>`` with a ``runbook``
label added, the anchor of the alert's runbook_url (Grafana cannot lower-case a value, and the
anchors are the lower-cased alert names), for a data link to the runbook.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from devtools.atomic import write_text_atomically

__all__ = [
    "CHART_FILES",
    "DEFAULT_SELECTORS",
    "MIXIN_DIR",
    "MixinError",
    "Selectors",
    "alert_runbooks",
    "committed_outputs",
    "generated_values",
    "main",
    "render_dashboard",
    "render_rule_file",
    "render_to",
    "stale_outputs",
    "write_committed",
]

ROOT = Path(__file__).resolve().parent.parent
MIXIN_DIR = ROOT / "monitoring" / "mixin"
RULES_SOURCE = MIXIN_DIR / "rules"
DASHBOARDS_SOURCE = MIXIN_DIR / "dashboards"
#: Where the Helm chart packs the rendered files (a chart can read only files inside itself).
CHART_FILES = ROOT / "deploy" / "helm" / "crm-events" / "files"

PLACEHOLDERS = ("edge_selector", "ingest_selector", "pipeline_selector")
_TOKEN_RE = re.compile(r"@([a-z_]+)@")
_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
_STRING = r'"(?:[^"\\\n]|\\.)*"'
_MATCHER = rf"\s*{_NAME}\s*(?:=~|!~|!=|=)\s*{_STRING}\s*"
_SELECTOR_RE = re.compile(rf"{_MATCHER}(?:,{_MATCHER})*")
_JOB_RE = re.compile(r'job="([a-zA-Z0-9_.:/-]+)"')


class MixinError(ValueError):
    """A bad selector or template; the message is one line and names what is wrong."""


def _check_selector(option: str, value: str) -> str:
    value = value.strip()
    if not _SELECTOR_RE.fullmatch(value):
        raise MixinError(
            f'{option}: expected label matchers such as job="crm-events-edge" or '
            f'namespace="crm", service=~"edge.*" (no braces), got {value!r}'
        )
    return value


@dataclasses.dataclass(frozen=True)
class Selectors:
    """The series selectors the rendered rules and dashboards use (see the module docstring)."""

    edge: str = 'job="crm-events-edge"'
    ingest: str = 'job="crm-events-ingest"'
    pipeline: str = 'job=~"crm-events-edge|crm-events-ingest"'

    def __post_init__(self) -> None:
        for field, option in (
            ("edge", "--edge-selector"),
            ("ingest", "--ingest-selector"),
            ("pipeline", "--pipeline-selector"),
        ):
            object.__setattr__(self, field, _check_selector(option, getattr(self, field)))

    @classmethod
    def for_jobs(cls, edge_job: str, ingest_job: str) -> Selectors:
        """Selectors for Prometheus job names, as a plain ``scrape_configs`` names them."""
        for option, job in (("edge job", edge_job), ("ingest job", ingest_job)):
            if not re.fullmatch(r"[a-zA-Z0-9_-]+", job):
                # Kept to names that need no escaping in a PromQL string or an RE2 alternation.
                raise MixinError(f"{option}: expected letters, digits, '-' or '_', got {job!r}")
        return cls(
            edge=f'job="{edge_job}"',
            ingest=f'job="{ingest_job}"',
            pipeline=f'job=~"{edge_job}|{ingest_job}"',
        )

    @property
    def values(self) -> dict[str, str]:
        return {
            "edge_selector": self.edge,
            "ingest_selector": self.ingest,
            "pipeline_selector": self.pipeline,
        }


DEFAULT_SELECTORS = Selectors()


def _substitute(text: str, selectors: Selectors, where: str) -> str:
    values = selectors.values

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise MixinError(f"{where}: unknown placeholder @{name}@ (known: {', '.join(values)})")
        return values[name]

    return _TOKEN_RE.sub(one, text)


def _substitute_strings(data: Any, selectors: Selectors, where: str) -> Any:
    """``data`` with the placeholders replaced inside every string (the structural reference
    the textual rendering must match)."""
    if isinstance(data, str):
        return _substitute(data, selectors, where)
    if isinstance(data, list):
        return [_substitute_strings(v, selectors, where) for v in data]
    if isinstance(data, dict):
        return {k: _substitute_strings(v, selectors, where) for k, v in data.items()}
    return data


def _header(source: Path) -> str:
    rel = source.relative_to(ROOT)
    return (
        f"# Generated from {rel} by `python -m devtools.mixin`: edit that file, then run\n"
        "# `python -m devtools.mixin write` (a test fails while the two differ).\n"
    )


def render_rule_file(source: Path, selectors: Selectors = DEFAULT_SELECTORS) -> str:
    """One rule file of the mixin, rendered: the template's text with the selectors in place,
    under a header naming its source."""
    template = source.read_text()
    text = _substitute(template, selectors, source.name)
    try:
        rendered = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MixinError(f"{source.name}: the selectors make invalid YAML: {exc}") from None
    expected = _substitute_strings(yaml.safe_load(template), selectors, source.name)
    if rendered != expected:
        raise MixinError(
            f"{source.name}: a selector changes the file's structure (quote characters or ': ' "
            "in a plain YAML scalar?): use a simpler selector"
        )
    if not isinstance(rendered, dict) or not isinstance(rendered.get("groups"), list):
        raise MixinError(f"{source.name}: not a Prometheus rule file (no groups list)")
    return _header(source) + text


@dataclasses.dataclass(frozen=True)
class AlertRunbook:
    """One alert of the rules as the alert dashboard links it."""

    alert: str
    severity: str
    summary: str
    runbook_url: str

    @property
    def anchor(self) -> str:
        return self.runbook_url.partition("#")[2]


_SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


def alert_runbooks() -> list[AlertRunbook]:
    """Every alert of the mixin's rule templates, most severe first, then by name. The
    templates parse as YAML as they are (the placeholders sit inside strings)."""
    found: dict[str, AlertRunbook] = {}
    for source in sorted(RULES_SOURCE.glob("*.yml")):
        for group in yaml.safe_load(source.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" not in rule:
                    continue
                annotations = rule.get("annotations", {})
                url = annotations.get("runbook_url", "")
                if "#" not in url:
                    raise MixinError(f"{source.name}: {rule['alert']} has no runbook_url#anchor")
                found[rule["alert"]] = AlertRunbook(
                    rule["alert"],
                    rule.get("labels", {}).get("severity", ""),
                    " ".join(str(annotations.get("summary", "")).split()),
                    url,
                )
    return sorted(found.values(), key=lambda a: (_SEVERITY_ORDER.get(a.severity, 9), a.alert))


def _runbook_links_markdown(alerts: Sequence[AlertRunbook]) -> str:
    lines = [
        "Every alert of the crm-events rules, most severe first, with its runbook "
        "(generated from the rules by `python -m devtools.mixin write`).",
        "",
        "| alert | severity | summary |",
        "|---|---|---|",
    ]
    for a in alerts:
        # A '|' would end the cell early.
        summary = a.summary.replace("|", "\\|")
        lines.append(f"| [{a.alert}]({a.runbook_url}) | {a.severity} | {summary} |")
    return "\n".join(lines)


def _with_runbook_label(expr: str, alerts: Sequence[AlertRunbook]) -> str:
    """``expr`` (ALERTS or ALERTS_FOR_STATE) with ``runbook="<anchor>"`` on the series of every
    alert of the rules: one label_replace per alert, each matching its whole name."""
    for a in alerts:
        if not re.fullmatch(r"[A-Za-z0-9_]+", a.alert) or not re.fullmatch(r"[\w-]+", a.anchor):
            raise MixinError(f"{a.alert}: name or runbook anchor {a.anchor!r} not plain")
        expr = f'label_replace({expr}, "runbook", "{a.anchor}", "alertname", "{a.alert}")'
    return expr


def generated_values() -> dict[str, str]:
    """``@generated:<name>@`` without an argument: ``runbook_links``, Markdown with a table
    linking every alert's runbook."""
    return {"runbook_links": _runbook_links_markdown(alert_runbooks())}


_GENERATED_RE = re.compile(r"@generated:([a-z_]+)(?:\((.*)\))?@", re.DOTALL)


def _fill_generated(data: Any, where: str) -> Any:
    if isinstance(data, str):
        match = _GENERATED_RE.fullmatch(data)
        if match is None:
            if "@generated:" in data:
                raise MixinError(f"{where}: @generated:…@ must be a whole JSON string: {data!r}")
            return data
        name, arg = match.group(1), match.group(2)
        if name == "runbook_label" and arg:
            return _with_runbook_label(arg, alert_runbooks())
        values = generated_values()
        if name not in values or arg is not None:
            raise MixinError(
                f"{where}: unknown generated value {data!r} "
                f"(known: {', '.join(values)}, runbook_label(<expr>))"
            )
        return values[name]
    if isinstance(data, list):
        return [_fill_generated(v, where) for v in data]
    if isinstance(data, dict):
        return {k: _fill_generated(v, where) for k, v in data.items()}
    return data


def render_dashboard(source: Path, selectors: Selectors = DEFAULT_SELECTORS) -> str:
    """One dashboard of the mixin, rendered (JSON has no comments, so no header: the
    dashboard's description names the mixin instead): the selectors in place, then the values
    generated from the rules."""
    data = _substitute_strings(json.loads(source.read_text()), selectors, source.name)
    if "@generated:" in json.dumps(data):
        data = _fill_generated(data, source.name)
    return json.dumps(data, indent=2) + "\n"


def _sources() -> list[tuple[Path, str, Callable[[Path, Selectors], str]]]:
    """(source, output sub-folder, renderer) for every file of the mixin."""
    rules = sorted(RULES_SOURCE.glob("*.yml"))
    dashboards = sorted(DASHBOARDS_SOURCE.glob("*.json"))
    if not rules or not dashboards:
        raise MixinError(f"no templates under {MIXIN_DIR} (rules/*.yml, dashboards/*.json)")
    return [
        *((s, "rules", render_rule_file) for s in rules),
        *((s, "dashboards", render_dashboard) for s in dashboards),
    ]


def render_all(selectors: Selectors = DEFAULT_SELECTORS) -> dict[str, str]:
    """``{"rules/<name>.yml": text, "dashboards/<name>.json": text}`` for every template."""
    return {f"{sub}/{src.name}": render(src, selectors) for src, sub, render in _sources()}


def _rendered_by_us(path: Path) -> bool:
    """Whether a rule file starts with the header this module writes."""
    try:
        with path.open() as f:
            return f.readline().startswith("# Generated from monitoring/mixin/")
    except (OSError, UnicodeDecodeError):
        return False


def render_to(
    out: Path, selectors: Selectors = DEFAULT_SELECTORS, *, only: str = "", prune: bool = False
) -> list[Path]:
    """Write ``out/rules/*.yml`` and ``out/dashboards/*.json`` (``only="rules"``: the rules
    alone) and return them. Other files in those folders are left alone: ``--out`` may be a
    folder other rules live in too. ``prune``: also remove rule files an earlier render of
    this module wrote (its header says so) whose template is gone, for a folder the caller
    owns (the local stack's)."""
    written = []
    rendered = render_all(selectors)
    for sub in ("rules", "dashboards"):
        if only and sub != only:
            continue
        folder = out / sub
        keep = {name.split("/", 1)[1] for name in rendered if name.startswith(f"{sub}/")}
        if prune and sub == "rules" and folder.is_dir():
            for old in folder.glob("*.yml"):
                if old.name not in keep and _rendered_by_us(old):
                    old.unlink()
        for name in sorted(keep):
            write_text_atomically(folder / name, rendered[f"{sub}/{name}"])
            written.append(folder / name)
    return written


def committed_outputs() -> dict[Path, str]:
    """Every committed rendering of the defaults: path -> the text it must hold."""
    rendered = render_all(DEFAULT_SELECTORS)
    places = {
        "rules": [ROOT / "monitoring" / "prometheus" / "rules", CHART_FILES / "rules"],
        "dashboards": [ROOT / "monitoring" / "grafana" / "dashboards", CHART_FILES / "dashboards"],
    }
    out: dict[Path, str] = {}
    for name, text in rendered.items():
        sub, file = name.split("/", 1)
        for folder in places[sub]:
            out[folder / file] = text
    return out


def _committed_folders() -> set[Path]:
    return {path.parent for path in committed_outputs()}


def stale_outputs() -> list[str]:
    """What differs between the committed renderings and the source: files that differ or are
    missing, and files no template renders any more."""
    want = committed_outputs()
    problems = [
        f"{path.relative_to(ROOT)}: differs from its template"
        if path.exists()
        else f"{path.relative_to(ROOT)}: missing"
        for path, text in sorted(want.items())
        if not path.exists() or path.read_text() != text
    ]
    for folder in sorted(_committed_folders()):
        suffix = ".yml" if folder.name == "rules" else ".json"
        for extra in sorted(folder.glob(f"*{suffix}")):
            if extra not in want:
                problems.append(f"{extra.relative_to(ROOT)}: no template renders it")
    return problems


def write_committed() -> list[Path]:
    """Regenerate every committed rendering of the defaults; returns what changed."""
    changed = []
    want = committed_outputs()
    for path, text in sorted(want.items()):
        if not path.exists() or path.read_text() != text:
            write_text_atomically(path, text)
            changed.append(path)
    for folder in _committed_folders():
        suffix = ".yml" if folder.name == "rules" else ".json"
        for extra in folder.glob(f"*{suffix}"):
            if extra not in want:
                extra.unlink()
                changed.append(extra)
    return changed


def _selectors_from(args: argparse.Namespace) -> Selectors:
    given: Mapping[str, str | None] = {
        "edge": args.edge_selector,
        "ingest": args.ingest_selector,
        "pipeline": args.pipeline_selector,
    }
    if given["pipeline"] is None and (given["edge"] or given["ingest"]):
        edge = _JOB_RE.fullmatch((given["edge"] or DEFAULT_SELECTORS.edge).strip())
        ingest = _JOB_RE.fullmatch((given["ingest"] or DEFAULT_SELECTORS.ingest).strip())
        try:
            if edge is None or ingest is None:
                raise MixinError("not plain job names")
            return Selectors.for_jobs(edge.group(1), ingest.group(1))
        except MixinError:
            raise MixinError(
                "--pipeline-selector: required unless the edge and ingest selectors are both "
                "job=\"<name>\" with names of letters, digits, '-' and '_' (it must "
                "select both roles at once)"
            ) from None
    return Selectors(
        **{k: v if v is not None else getattr(DEFAULT_SELECTORS, k) for k, v in given.items()}
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.mixin",
        description="Render the crm-events rules and dashboards for your job selectors.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    render = sub.add_parser("render", help="write rules/ and dashboards/ for given selectors")
    render.add_argument("--out", type=Path, required=True, help="folder to write into")
    for role, what in (
        ("edge", "the edges"),
        ("ingest", "the ingest workers"),
        ("pipeline", 'both roles (derived when the others are job="…")'),
    ):
        render.add_argument(f"--{role}-selector", default=None, help=f"label matchers for {what}")
    sub.add_parser("write", help="regenerate the committed renderings of the defaults")
    sub.add_parser("check", help="exit 1 when a committed rendering differs from the source")
    args = parser.parse_args(argv)
    try:
        if args.command == "render":
            for path in render_to(args.out, _selectors_from(args)):
                print(path)
            return 0
        if args.command == "write":
            changed = write_committed()
            for path in changed:
                print(f"wrote {path.relative_to(ROOT)}")
            if not changed:
                print("every rendering is up to date")
            return 0
        problems = stale_outputs()
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("run: python -m devtools.mixin write", file=sys.stderr)
            return 1
        print("every rendering matches monitoring/mixin/")
        return 0
    except (MixinError, OSError) as exc:
        print(f"mixin: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
