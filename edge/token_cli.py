"""``crm-events-token``: print an HS256 token signed with a secret file, for development and
for operators of a deployment that uses a shared secret (e.g. docker-compose)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .auth import issue_token


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crm-events-token", description=__doc__)
    parser.add_argument("--secret-file", required=True, type=Path)
    parser.add_argument("--types", default="*", help="comma-separated event types (default: all)")
    parser.add_argument("--tenant", default=None, help="only events with this TenantId")
    parser.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    parser.add_argument("--subject", default="operator")
    args = parser.parse_args(argv)
    try:
        secret = args.secret_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        print(
            f"crm-events-token: error: cannot read {args.secret_file}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    match = {"TenantId": args.tenant} if args.tenant else None
    print(
        issue_token(
            secret, types=args.types.split(","), match=match, ttl_s=args.ttl, subject=args.subject
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
