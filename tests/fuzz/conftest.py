"""One real edge (plus the ingest that feeds it), shared by the fuzz run and the raw
requests outside the schema.

Kafka and Redis come from ``CRM_EVENTS_TEST_KAFKA`` / ``CRM_EVENTS_TEST_REDIS_URL`` as in
the integration tests (tests/harness/backends.py). The edge runs with authentication on
(HS256, a secret made here) and with the query token enabled, so the fuzzer goes through
the production path; the history rate limit is raised so the fuzzer reaches the handler.
Before the run, events of several types are produced through Kafka, including records with
no key and with a key that is not UTF-8 (``key_b64``), so history and resume have data.
The cursors the edge handed out for them (history items' ``cursor``, ``next_after``) are
kept for the fuzzers: valid request data for ``after`` and ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.backends import Backends, provide
from tests.harness.cluster import Cluster, crm_event

EVENT_TYPES = ("ContactCreated", "DealWon", "DealLost", "TicketOpened", "crm.contact:merged-v2")
EVENTS = 240
READY_TIMEOUT_S = 30.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/fuzz" in str(item.path):
            item.add_marker(pytest.mark.integration)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def hs256_token(secret: str, claims: dict[str, object]) -> str:
    """A compact HS256 JWT (RFC 7519), without a JWT library."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


@dataclass(frozen=True)
class FuzzEdge:
    cluster: Cluster
    base_url: str
    token: str
    """Grants every type, valid for an hour."""
    events: int
    cursors: tuple[str, ...]
    """Cursors this edge handed out: every history item's and the page's ``next_after``."""


def _history(url: str, token: str) -> dict[str, Any] | None:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            body: dict[str, Any] = json.load(resp)
            return body
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _history_count(url: str, token: str) -> int:
    body = _history(url, token)
    return int(body.get("count", -1)) if body else -1


def _records() -> list[tuple[bytes | None, bytes | None]]:
    records: list[tuple[bytes | None, bytes | None]] = []
    for seq in range(EVENTS):
        type_ = EVENT_TYPES[seq % len(EVENT_TYPES)]
        key: bytes | None = f"agg-{seq % 17}".encode()
        if seq % 11 == 0:
            key = None
        elif seq % 13 == 0:
            key = b"\xff\xfe-" + bytes([seq % 256])  # not UTF-8: history shows key_b64
        records.append((key, crm_event(seq, type_)))
    records.append((b"dead", b"not json"))  # a dead letter: never in history
    return records


@pytest.fixture(autouse=True)
def _schemathesis_node_id_shim(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's pytest integration reads ``node._nodeid``, which pytest 9.2
    replaced (``node.nodeid`` is backed by ``_id`` now); give it the attribute it reads."""
    node = request.node
    if not hasattr(node, "_nodeid"):
        node._nodeid = node.nodeid


@pytest.fixture(scope="session")
def backends() -> Iterator[Backends]:
    with provide() as found:
        yield found


@pytest.fixture(scope="package")
def fuzz_edge(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzEdge]:
    run_dir = Path(tmp_path_factory.mktemp("fuzz"))
    secret = secrets.token_hex(32)
    secret_file = run_dir / "jwt-secret"
    secret_file.write_text(secret, encoding="utf-8")
    cluster = Cluster(
        run_dir,
        backends,
        edges=1,
        with_nginx=False,
        env={
            "CRM_EVENTS_AUTH_MODE": "jwt",
            "CRM_EVENTS_JWT_SECRET_FILE": str(secret_file),
            "CRM_EVENTS_AUTH_QUERY_TOKEN": "true",
            "CRM_EVENTS_HISTORY_RATE_PER_S": "100000",
            "CRM_EVENTS_HISTORY_BURST": "100000",
        },
    )
    try:
        cluster.start()
        asyncio.run(cluster.produce(_records()))
        now = int(time.time())
        token = hs256_token(
            secret, {"sub": "fuzz", "iat": now, "exp": now + 3600, "crm_types": ["*"]}
        )
        history = cluster.edge_url(1, "/crm-events/history?n=1000")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while _history_count(history, token) < EVENTS:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the edge's history did not reach {EVENTS} events within {READY_TIMEOUT_S}s"
                    f"\n{cluster.log('edge1')}"
                )
            time.sleep(0.1)
        page = _history(history, token) or {}
        cursors = [item["cursor"] for item in page.get("items", [])]
        cursors.append(page["next_after"])
        yield FuzzEdge(cluster, cluster.edge_url(1, ""), token, EVENTS, tuple(cursors))
    finally:
        cluster.stop()
