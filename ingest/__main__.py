"""``crm-events-ingest``: Kafka -> Redis worker."""

from __future__ import annotations

import os
import sys

from aiohttp import web
from prometheus_client import disable_created_metrics

from shared import cli, logs
from shared.loop import new_event_loop
from shared.runtime import tune_gc
from shared.settings import IngestSettings

from .app import create_app


def main(argv: list[str] | None = None) -> None:
    settings, check_only = cli.load(
        "crm-events-ingest",
        sys.argv[1:] if argv is None else argv,
        os.environ,
        IngestSettings.from_env,
        description="The Kafka -> Redis worker: consumes the CRM events topic and writes each "
        "batch to Redis in one atomic step (replay stream, live channel, applied offsets). "
        "Serves /healthz, /readyz and /metrics.",
    )
    if check_only:
        print(repr(settings))
        return
    # The *_created series double the exposition size and no rule here uses them.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    logs.configure("ingest", settings.node_id, settings.log_level)
    app = create_app(settings)
    tune_gc()
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        shutdown_timeout=5.0,
        loop=new_event_loop(settings.event_loop),
    )


if __name__ == "__main__":
    main()
