"""monitoring/runbooks.md: every alert's runbook_url anchor exists (as GitHub renders heading
anchors), and every alert's section has Meaning, Impact, Diagnosis and Mitigation."""

from __future__ import annotations

import re
import urllib.parse

import pytest

from .support import RUNBOOK_BASE, RUNBOOKS, alert_names, alert_rules


def github_anchor(heading: str) -> str:
    """GitHub's heading slug: lower case, punctuation dropped, spaces to hyphens."""
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def sections() -> dict[str, str]:
    """Anchor -> body of every level-2 section."""
    out: dict[str, str] = {}
    current: str | None = None
    for line in RUNBOOKS.read_text().splitlines():
        match = re.match(r"^## (.+)$", line)
        if match:
            current = github_anchor(match.group(1))
            assert current not in out, f"duplicate section {match.group(1)!r}"
            out[current] = ""
        elif current is not None:
            out[current] += line + "\n"
    return out


def test_github_anchor() -> None:
    assert github_anchor("CrmEventsServiceDown") == "crmeventsservicedown"
    assert github_anchor("How to use these commands") == "how-to-use-these-commands"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_runbook_url_anchor_exists(rule: dict[str, object]) -> None:
    annotations = rule["annotations"]
    assert isinstance(annotations, dict)
    url = urllib.parse.urlsplit(annotations["runbook_url"])
    base = urllib.parse.urlunsplit((url.scheme, url.netloc, url.path, "", ""))
    assert base == RUNBOOK_BASE
    assert url.path.endswith("/monitoring/runbooks.md")
    assert url.fragment in sections(), f"no section #{url.fragment} in {RUNBOOKS.name}"


@pytest.mark.parametrize("alert", alert_names())
def test_runbook_section_has_meaning_impact_diagnosis_mitigation(alert: str) -> None:
    body = sections()[alert.lower()]
    for part in ("Meaning", "Impact", "Diagnosis", "Mitigation"):
        assert re.search(rf"^\*\*{part}\.\*\*", body, re.MULTILINE), f"{alert}: no {part}"
    assert "```sh" in body or "`" in body, f"{alert}: no command to run"


def test_every_runbook_section_belongs_to_an_alert() -> None:
    general = {"how-to-use-these-commands"}
    assert set(sections()) - general == {a.lower() for a in alert_names()}
