"""Command-line entry helpers shared by the console scripts.

Configuration is by environment variables only; the command line takes just
``--check-config`` (validate and print the settings, then exit) and ``--help``. Any other
argument, or a malformed variable, ends the process with one line naming the culprit and
exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn, TypeVar

from .errors import SettingsError

S = TypeVar("S")

USAGE = """usage: {prog} [--check-config]

Configured by CRM_EVENTS_* environment variables (see the README's configuration table).
  --check-config   validate the settings, print them (secrets masked) and exit
"""


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load(
    prog: str,
    argv: Sequence[str],
    environ: Mapping[str, str],
    from_env: Callable[[Mapping[str, str]], S],
) -> tuple[S, bool]:
    """Parse the command line and the settings; returns ``(settings, check_only)``."""
    check_only = False
    for arg in argv:
        if arg in ("-h", "--help"):
            print(USAGE.format(prog=prog), end="")
            raise SystemExit(0)
        if arg == "--check-config":
            check_only = True
            continue
        fail(prog, f"unknown argument {arg!r} (settings are CRM_EVENTS_* environment variables)")
    try:
        settings = from_env(environ)
    except SettingsError as exc:
        fail(prog, f"bad setting {exc}")
    return settings, check_only
