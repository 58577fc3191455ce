"""Which build this process is: the version from one place, the source revision from the
environment.

The version is pyproject.toml's ``version``, read back from the installed distribution's
metadata, so a release changes one line. The revision (a git commit) is handed in through
``CRM_EVENTS_REVISION`` by whoever builds or starts the process (the Docker image bakes it in
at build time, ``make up`` takes it from the checkout): production hosts have no git
repository to ask, and a process must not shell out to find out what it is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import metadata

DISTRIBUTION = "crm-events"
UNKNOWN = "unknown"
REVISION_VAR = "CRM_EVENTS_REVISION"
#: Longer values are cut: the revision is a label on every process's build_info series.
REVISION_MAX_CHARS = 64


def version() -> str:
    """The installed crm-events version, or ``unknown`` when run from an uninstalled copy."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def revision(environ: Mapping[str, str] | None = None) -> str:
    """``CRM_EVENTS_REVISION`` (whitespace stripped, at most 64 characters), else ``unknown``."""
    env = os.environ if environ is None else environ
    value = env.get(REVISION_VAR, "").strip()[:REVISION_MAX_CHARS]
    return value or UNKNOWN


def describe(prog: str, environ: Mapping[str, str] | None = None) -> str:
    """What ``--version`` prints: ``<prog> <version>``, and the revision when it is known."""
    rev = revision(environ)
    tail = "" if rev == UNKNOWN else f" (revision {rev})"
    return f"{prog} {version()}{tail}"
