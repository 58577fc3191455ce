"""The Command Center's copy of the JavaScript client, kept equal to its one source.

``clients/js/crm-events-client.js`` is the client's home (the package front-end teams vendor or
install). The edge serves the Command Center from its own package, whose wheel carries
``edge/static/`` only, so the page imports a committed copy, ``edge/static/crm-events-client.js``:
byte for byte the source, so that what the page runs is what the client's tests test.

``python -m devtools.vendor_js write`` copies the source over the copy (only when they differ);
``python -m devtools.vendor_js check`` exits 1 when they differ, and a unit test does the same.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from devtools.atomic import write_text_atomically

__all__ = ["COPY", "SOURCE", "is_current", "main", "write"]

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "clients" / "js" / "crm-events-client.js"
COPY = ROOT / "edge" / "static" / "crm-events-client.js"


def is_current(source: Path = SOURCE, copy: Path = COPY) -> bool:
    """Whether ``copy`` holds exactly the text of ``source``."""
    return copy.is_file() and copy.read_bytes() == source.read_bytes()


def write(source: Path = SOURCE, copy: Path = COPY) -> bool:
    """Copy ``source`` over ``copy`` when they differ; True when it wrote."""
    if is_current(source, copy):
        return False
    write_text_atomically(copy, source.read_text(encoding="utf-8"))
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.vendor_js",
        description="Keep edge/static/crm-events-client.js equal to clients/js/.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("write", help="copy clients/js/crm-events-client.js into edge/static/")
    sub.add_parser("check", help="exit 1 when the copy differs from the source")
    args = parser.parse_args(argv)
    copy, source = COPY.relative_to(ROOT), SOURCE.relative_to(ROOT)
    try:
        if args.command == "write":
            print(f"wrote {copy}" if write() else f"{copy} is up to date")
            return 0
        if not is_current():
            print(f"{copy}: differs from {source}", file=sys.stderr)
            print("run: python -m devtools.vendor_js write", file=sys.stderr)
            return 1
        print(f"{copy} matches {source}")
        return 0
    except OSError as exc:
        print(f"vendor_js: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
