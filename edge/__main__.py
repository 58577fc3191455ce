"""``crm-events-edge``: one stateless SSE node."""

from __future__ import annotations

import os
import sys

from aiohttp import web
from prometheus_client import disable_created_metrics

from shared import cli, logs
from shared.errors import SettingsError
from shared.loop import new_event_loop
from shared.runtime import tune_gc
from shared.settings import EdgeSettings

from .app import create_app

LISTEN_BACKLOG = 16384
PROG = "crm-events-edge"


def main(argv: list[str] | None = None) -> None:
    settings, check_only = cli.load(
        PROG,
        sys.argv[1:] if argv is None else argv,
        os.environ,
        EdgeSettings.from_env,
        description="One stateless edge node: serves GET /crm-events (Server-Sent Events, "
        "resumable with Last-Event-ID) and GET /crm-events/history from Redis, plus the "
        "Command Center page, /healthz, /readyz and /metrics.",
    )
    try:
        # Reads the files the settings only name (the client certificate grants): a bad
        # one stops the edge here, as a malformed variable does, --check-config included.
        app = create_app(settings)
    except SettingsError as exc:
        cli.fail(PROG, f"bad setting {exc}")
    if check_only:
        print(repr(settings))
        return
    # The *_created series double the exposition size and no rule here uses them (read at
    # each scrape: the app's metrics made above are covered).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    logs.configure("edge", settings.node_id, settings.log_level)
    tune_gc()
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        # HTTPS (mutual TLS with a client CA) when configured: the context was built, and
        # its files checked, when the settings were read.
        ssl_context=settings.tls.context,
        print=None,
        access_log=None,
        handler_cancellation=True,
        # A reconnect storm (thousands of EventSources at once) overflows the default 128;
        # connections beyond the accept queue wait for SYN-ACK retransmits (1 s, 3 s, ...).
        # The kernel caps this at net.core.somaxconn (ARCHITECTURE.md, decisions).
        backlog=LISTEN_BACKLOG,
        shutdown_timeout=settings.shutdown_grace_s,
        loop=new_event_loop(settings.event_loop),
    )


if __name__ == "__main__":
    main()
