"""Command-line conventions shared by every console script (argparse underneath).

Configuration is by environment variables; the command line takes only what a command does
(``--check-config``, a stack subcommand, a token's claims), plus ``--help`` and
``--version``. ``--help`` says where the settings are documented. Any unknown argument, or a
malformed variable, ends the process with one stderr line naming the culprit and exit
status 2, before anything starts (a mistyped flag must never start a producer or a server).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

from . import version
from .errors import SettingsError

S = TypeVar("S")

SETTINGS_EPILOG = (
    "Settings are CRM_EVENTS_* environment variables, read once at start, never command-line "
    "options; the configuration table in the README lists each one with its default. A "
    "malformed value stops the process with one line naming it and exit status 2."
)


def fail(prog: str, message: str) -> NoReturn:
    # One line, whatever the message quotes: log collectors split records on newlines.
    one_line = message.replace("\r", "\\r").replace("\n", "\\n")
    print(f"{prog}: error: {one_line}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and exit status 2, and which takes no
    abbreviated options (``--check`` is not ``--check-config``). Subcommand parsers made with
    ``add_subparsers`` are of this class too."""

    #: Whether the command reads CRM_EVENTS_* settings (said in the unknown-argument error).
    env_settings = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see --help)")

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Parse ``argv`` (``sys.argv[1:]`` when None); the first unknown argument is named."""
        args, unknown = self.parse_known_args(argv)
        if unknown:
            hint = "settings are CRM_EVENTS_* environment variables; " if self.env_settings else ""
            fail(self.prog, f"unknown argument {unknown[0]!r} ({hint}see --help)")
        return args


def parser(prog: str, description: str, *, env_settings: bool = True) -> Parser:
    """A parser with ``--version``; ``env_settings``: the help ends with where the
    CRM_EVENTS_* settings are documented."""
    p = Parser(prog=prog, description=description, epilog=SETTINGS_EPILOG if env_settings else None)
    p.env_settings = env_settings
    p.add_argument(
        "--version",
        action="version",
        version=version.describe(prog),
        help="print the version (and the revision, when known) and exit",
    )
    return p


def load(
    prog: str,
    argv: Sequence[str],
    environ: Mapping[str, str],
    from_env: Callable[[Mapping[str, str]], S],
    description: str = "",
) -> tuple[S, bool]:
    """Parse the command line and the settings; returns ``(settings, check_only)``.

    ``--help`` and ``--version`` answer even when a setting is malformed: they exit before
    the settings are read."""
    p = parser(prog, description)
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the settings, print them (secrets masked) and exit",
    )
    args = p.parse(argv)
    try:
        settings = from_env(environ)
    except SettingsError as exc:
        fail(prog, f"bad setting {exc}")
    return settings, bool(args.check_config)
