"""``crm-events-token``: print an HS256 token signed with a secret file, for development and
for operators of a deployment that uses a shared secret (e.g. docker-compose)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

from shared import cli

from .auth import issue_token

DESCRIPTION = (
    "Print an HS256 JWT signed with the shared secret in --secret-file (the edge's "
    "CRM_EVENTS_JWT_SECRET_FILE), granting the given event types."
)


def main(argv: Sequence[str] | None = None) -> int:
    # The token is made from its arguments alone; no CRM_EVENTS_* setting applies.
    parser = cli.parser("crm-events-token", DESCRIPTION, env_settings=False)
    # Required, but checked after parsing so that an unknown argument is the one named.
    parser.add_argument("--secret-file", type=Path, help="file holding the HS256 secret (required)")
    parser.add_argument("--types", default="*", help="comma-separated event types (default: all)")
    parser.add_argument("--tenant", default=None, help="only events with this TenantId")
    parser.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    parser.add_argument("--subject", default="operator", help="the sub claim (default: operator)")
    parser.add_argument(
        "--audience",
        default=None,
        help="the aud claim: required when the edges set CRM_EVENTS_JWT_AUDIENCE",
    )
    parser.add_argument(
        "--issuer",
        default=None,
        help="the iss claim: required when the edges set CRM_EVENTS_JWT_ISSUER",
    )
    args = parser.parse(argv)
    if args.secret_file is None:
        parser.error("the following arguments are required: --secret-file")
    # Each refusal below would otherwise issue a token broader or other than asked for: an
    # empty tenant is no tenant filter at all (every tenant's events), an empty type grants
    # nothing anyone meant, and a NaN, infinite or non-positive lifetime is no lifetime.
    if args.tenant is not None and not args.tenant.strip():
        parser.error("argument --tenant: must not be empty (omit it for every tenant)")
    for option, value in (("--audience", args.audience), ("--issuer", args.issuer)):
        # An empty claim matches no edge's setting: a token no edge would take.
        if value is not None and not value.strip():
            parser.error(f"argument {option}: must not be empty (omit it)")
    types = [t.strip() for t in args.types.split(",")]
    if not all(types):
        parser.error(f"argument --types: empty event type in {args.types!r}")
    if not (math.isfinite(args.ttl) and args.ttl > 0):
        parser.error(f"argument --ttl: must be a finite number of seconds > 0, not {args.ttl}")
    try:
        secret = args.secret_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        print(
            f"crm-events-token: error: cannot read {args.secret_file}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    match = {"TenantId": args.tenant} if args.tenant is not None else None
    print(
        issue_token(
            secret,
            types=types,
            match=match,
            ttl_s=args.ttl,
            subject=args.subject,
            audience=args.audience,
            issuer=args.issuer,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
