"""``crm-events-edge``: one stateless SSE node."""

from __future__ import annotations

import os
import sys

from aiohttp import web
from prometheus_client import disable_created_metrics

from shared import cli, logs
from shared.loop import new_event_loop
from shared.runtime import tune_gc
from shared.settings import EdgeSettings

from .app import create_app

LISTEN_BACKLOG = 16384


def main(argv: list[str] | None = None) -> None:
    settings, check_only = cli.load(
        "crm-events-edge",
        sys.argv[1:] if argv is None else argv,
        os.environ,
        EdgeSettings.from_env,
        description="One stateless edge node: serves GET /crm-events (Server-Sent Events, "
        "resumable with Last-Event-ID) and GET /crm-events/history from Redis, plus the "
        "Command Center page, /healthz, /readyz and /metrics.",
    )
    if check_only:
        print(repr(settings))
        return
    # The *_created series double the exposition size and no rule here uses them.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    logs.configure("edge", settings.node_id, settings.log_level)
    app = create_app(settings)
    tune_gc()
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
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
