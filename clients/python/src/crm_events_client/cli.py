"""``crm-events-tail`` (``python -m crm_events_client``): follow the stream from a shell.

stdout: one JSON line per event, the envelope with its ``cursor`` in front (a history
item's shape). stderr: resets and errors. Exit 0 after ``--limit`` events (or Ctrl-C), 1
on an error the client does not retry (401, 403, 400, ...), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence

from .api import stream
from .cursor_store import FileCursorStore
from .errors import CrmEventsError, Unauthorized
from .models import Reset

DEFAULT_URL = "http://127.0.0.1:9010/crm-events"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="crm-events-tail", description="Follow the crm-events stream; one JSON line per event."
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("CRM_EVENTS_URL", DEFAULT_URL),
        help=f"the stream's URL (default: $CRM_EVENTS_URL or {DEFAULT_URL})",
    )
    parser.add_argument("--types", help="only these event types, comma-separated")
    parser.add_argument(
        "--token-env",
        default="CRM_EVENTS_TOKEN",
        help="the environment variable holding the bearer token (default: CRM_EVENTS_TOKEN)",
    )
    parser.add_argument(
        "--state-file", help="keep the cursor in this file: a restart continues after it"
    )
    parser.add_argument("--last-event-id", help="start after this cursor")
    parser.add_argument("--limit", type=int, help="exit after this many events")
    parser.add_argument(
        "--on-reset",
        choices=("yield", "refetch"),
        default="yield",
        help="after a reset, go on streaming (yield) or back-fill from history first",
    )
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    return args


def _reset_line(reset: Reset) -> str:
    parts = "; ".join(
        f"p{p.partition}: asked {p.requested}, from {p.oldest_available} ({p.reason})"
        for p in reset.partitions
    )
    return f"RESET ({reset.reason}): {reset.message} [{parts}]"


async def tail(args: argparse.Namespace) -> int:
    token = os.environ.get(args.token_env, "").strip() or None
    store = FileCursorStore(args.state_file) if args.state_file else None
    received = 0
    async with stream(
        args.url,
        token=token,
        types=args.types,
        cursor=args.last_event_id,
        store=store,
        on_reset=args.on_reset,
    ) as events:
        async for item in events:
            if isinstance(item, Reset):
                print(_reset_line(item), file=sys.stderr, flush=True)
                continue
            print(json.dumps(item.envelope(), ensure_ascii=False), flush=True)
            received += 1
            if args.limit is not None and received >= args.limit:
                await events.commit()  # printed: this one is handled
                break
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(tail(args))
    except KeyboardInterrupt:
        return 0
    except CrmEventsError as exc:
        print(f"crm-events-tail: {exc}", file=sys.stderr)
        if isinstance(exc, Unauthorized) and not os.environ.get(args.token_env):
            print(f"no token: set {args.token_env} (e.g. $(make token))", file=sys.stderr)
        return 1
