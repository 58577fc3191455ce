"""The README's configuration table names every CRM_EVENTS_* variable the code reads."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [
    "shared",
    "ingest",
    "edge",
    "devtools",
    "scripts",
    "tests/harness",
    "tests/integration",
    "tests/browser",
    "tests/fuzz",
    "tests/monitoring",
]
ENV_CALL = re.compile(
    r"(?:env\.(?:string|integer|number|choice|names|raw)|_read_secret\(env,|_existing_file\(env,"
    r'|_flag\(env,)\(?\s*"([A-Z0-9_]+)"'
)
LITERAL = re.compile(r"CRM_EVENTS_[A-Z0-9_]*[A-Z0-9]")


def variables_in_code() -> set[str]:
    found: set[str] = set()
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".sh") or not path.is_file():
                continue
            text = path.read_text(encoding="utf-8")
            found |= set(LITERAL.findall(text))
            found |= {"CRM_EVENTS_" + name for name in ENV_CALL.findall(text)}
    return found


def variables_in_readme_table() -> set[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(LITERAL.findall(table))


def test_every_variable_is_documented() -> None:
    missing = variables_in_code() - variables_in_readme_table()
    assert not missing, f"not in the README's configuration table: {sorted(missing)}"


def test_the_table_names_no_variable_the_code_does_not_read() -> None:
    stale = variables_in_readme_table() - variables_in_code()
    assert not stale, f"documented but never read: {sorted(stale)}"
