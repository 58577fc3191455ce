"""Access control and limits on the real pipeline, through the load balancer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from edge.auth import issue_token
from tests.harness.backends import Backends
from tests.harness.cluster import Cluster, crm_event
from tests.integration.checks import assert_exactly_once_in_order
from tests.sse_client import (
    Collector,
    Frame,
    assert_cursors_never_go_back,
    assert_per_partition_exactly_once,
)

pytestmark = pytest.mark.timeout(240)
SECRET = "integration-secret-" + "x" * 32


@pytest.fixture(scope="module")
def secured(
    redis_backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    run = Path(tmp_path_factory.mktemp("secured"))
    (run / "jwt-secret").write_text(SECRET)
    c = Cluster(
        run,
        redis_backends,
        edges=2,
        env={
            "CRM_EVENTS_AUTH_MODE": "jwt",
            "CRM_EVENTS_JWT_SECRET_FILE": str(run / "jwt-secret"),
            "CRM_EVENTS_JWT_LEEWAY_S": "0",
            "CRM_EVENTS_EVENT_MATCH_FIELDS": "TenantId",
            "CRM_EVENTS_MAX_CONNECTIONS": "6",
            "CRM_EVENTS_MAX_CONNECTIONS_PER_IP": "2",
            "CRM_EVENTS_HISTORY_RATE_PER_S": "0.5",
            "CRM_EVENTS_HISTORY_BURST": "3",
            "CRM_EVENTS_MAX_TYPES": "4",
            "CRM_EVENTS_MAX_REQUEST_LINE_BYTES": "512",
            "CRM_EVENTS_MAX_HEADER_BYTES": "4096",
        },
    )
    with c.running():
        yield c


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def token(types: list[str], tenant: str | None = None, ttl: float = 600) -> dict[str, str]:
    match = {"TenantId": tenant} if tenant else None
    return {"Authorization": "Bearer " + issue_token(SECRET, types=types, match=match, ttl_s=ttl)}


def tenant_event(seq: int, type_: str, tenant: str) -> tuple[bytes, bytes]:
    body = json.loads(crm_event(seq, type_))
    body["TenantId"] = tenant
    return f"{tenant}-{seq % 5}".encode(), json.dumps(body).encode()


async def test_claims_give_disjoint_views_live_resume_and_history(
    secured: Cluster, session: aiohttp.ClientSession
) -> None:
    c = secured
    t1 = Collector(
        c.lb_url("/crm-events"), headers={**token(["*"], "t-1"), "X-Forwarded-For": "10.1.0.1"}
    ).start(session)
    t2 = Collector(
        c.lb_url("/crm-events"), headers={**token(["*"], "t-2"), "X-Forwarded-For": "10.1.0.2"}
    ).start(session)
    deals = Collector(
        c.lb_url("/crm-events"), headers={**token(["DealWon"]), "X-Forwarded-For": "10.1.0.3"}
    ).start(session)
    for col in (t1, t2, deals):
        await col.wait_for(lambda x: x.node is not None, 10, "stream open")
    records = [
        tenant_event(i, ["DealWon", "TicketOpened"][i % 2], ["t-1", "t-2"][i // 2 % 2])
        for i in range(40)
    ]
    await c.produce(records)
    expected = {"t1": set(), "t2": set(), "deals": set()}
    for i in range(40):
        tenant = ["t-1", "t-2"][i // 2 % 2]
        expected["t1" if tenant == "t-1" else "t2"].add(i)
        if i % 2 == 0:
            expected["deals"].add(i)
    await t1.wait_for(lambda x: len(x.data_frames) >= 20, 30, "tenant 1")
    await t2.wait_for(lambda x: len(x.data_frames) >= 20, 30, "tenant 2")
    await deals.wait_for(lambda x: len(x.data_frames) >= 20, 30, "deals")

    def seqs(col: Collector) -> set[int]:
        return {f.json()["event"]["Seq"] for f in col.data_frames}

    assert seqs(t1) == expected["t1"] and seqs(t2) == expected["t2"]
    assert seqs(t1).isdisjoint(seqs(t2))
    assert seqs(deals) == expected["deals"]
    assert {f.json()["type"] for f in deals.data_frames} == {"DealWon"}

    # Resume from tenant 1's first event with the DealWon-only token: exactly the DealWon
    # events after that cursor come back (per partition, those past its position there; a
    # partition it has no position in is read from its oldest entry), each once, in order.
    first = t1.data_frames[0].cursor

    def after(frame: Frame) -> bool:
        envelope = frame.json()
        seen = first.position(envelope["partition"])
        return seen is None or envelope["offset"] >= seen

    after_first = [f for f in deals.data_frames if after(f)]
    assert after_first, "tenant 1's first event is not the last DealWon"
    resumed = Collector(
        c.lb_url("/crm-events"),
        headers={
            **token(["DealWon"]),
            "Last-Event-ID": t1.data_frames[0].id or "",
            "X-Forwarded-For": "10.1.0.4",
        },
    ).start(session)
    await resumed.wait_for(lambda x: len(x.data_frames) >= len(after_first), 30, "resumed deals")
    assert not resumed.resets, "an exact position is not reset"
    assert_exactly_once_in_order(
        resumed.data_frames, {f.json()["event"]["Seq"] for f in after_first}
    )
    assert_per_partition_exactly_once(
        [(f.json()["partition"], f.json()["offset"]) for f in resumed.data_frames],
        _offsets_by_partition(after_first),
    )
    # The resumed cursors start from the one sent and never go back.
    assert_cursors_never_go_back([t1.data_frames[0], *resumed.data_frames])
    async with session.get(
        c.lb_url("/crm-events/history?n=100"),
        headers={**token(["DealWon"]), "X-Forwarded-For": "10.1.0.5"},
    ) as r:
        history = (await r.json())["items"]
    assert {i["type"] for i in history} == {"DealWon"}
    assert {i["event"]["Seq"] for i in history} <= expected["deals"]
    assert {f.json()["type"] for f in resumed.data_frames} == {"DealWon"}
    for col in (t1, t2, deals, resumed):
        await col.stop()


def _offsets_by_partition(frames: list[Frame]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for f in frames:
        out.setdefault(f.json()["partition"], []).append(f.json()["offset"])
    return out


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        (
            {"Authorization": "Bearer " + issue_token(SECRET, types=["A"], ttl_s=-10)},
            401,
            "unauthorized",
        ),
        ({"Authorization": "Bearer " + issue_token("f" * 48, types=["*"])}, 401, "unauthorized"),
        (token(["DealWon"]), 403, "forbidden"),
    ],
    ids=["missing", "expired", "forged", "type-not-granted"],
)
async def test_refusals_through_the_lb(
    secured: Cluster,
    session: aiohttp.ClientSession,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    for path in ("/crm-events?types=TicketOpened", "/crm-events/history?types=TicketOpened"):
        async with session.get(
            secured.lb_url(path), headers={**headers, "X-Forwarded-For": "10.2.0.1"}
        ) as resp:
            assert resp.status == status
            assert (await resp.json())["error"] == code
            if status == 401:
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_each_limit_answers(secured: Cluster, session: aiohttp.ClientSession) -> None:
    c = secured
    edge = c.edge_url(1, "/crm-events")  # direct: the counts are per edge
    auth = token(["*"])
    open_streams: list[Collector] = []
    try:
        for ip in ("10.3.0.1", "10.3.0.1"):
            col = Collector(edge, headers={**auth, "X-Forwarded-For": ip}).start(session)
            await col.wait_for(lambda x: x.node is not None, 10, "stream open")
            open_streams.append(col)
        async with session.get(edge, headers={**auth, "X-Forwarded-For": "10.3.0.1"}) as r:
            assert r.status == 429 and (await r.json())["error"] == "too_many_connections"
            assert r.headers["Retry-After"]
        for i in range(4):
            col = Collector(edge, headers={**auth, "X-Forwarded-For": f"10.3.1.{i}"}).start(session)
            await col.wait_for(lambda x: x.node is not None, 10, "stream open")
            open_streams.append(col)
        async with session.get(edge, headers={**auth, "X-Forwarded-For": "10.3.2.1"}) as r:
            assert r.status == 503 and (await r.json())["error"] == "edge_full"
            assert r.headers["Retry-After"]
    finally:
        for col in open_streams:
            await col.stop()

    history = c.edge_url(1, "/crm-events/history?n=1")
    statuses = []
    for _ in range(5):
        async with session.get(history, headers={**auth, "X-Forwarded-For": "10.4.0.1"}) as r:
            statuses.append(r.status)
            if r.status == 429:
                assert (await r.json())["error"] == "rate_limited" and r.headers["Retry-After"]
    assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]

    async with session.get(c.edge_url(1, "/crm-events/history?types=A,B,C,D,E"), headers=auth) as r:
        assert r.status == 400 and (await r.json())["error"] == "invalid_types"
    async with session.get(
        c.edge_url(1, "/crm-events/history?pad=" + "x" * 600), headers=auth
    ) as r:
        assert r.status == 414 and (await r.json())["error"] == "request_line_too_long"
    async with session.get(
        c.edge_url(1, "/crm-events/history"), headers={**auth, "X-Padding": "y" * 5000}
    ) as r:
        assert r.status == 431 and (await r.json())["error"] == "headers_too_large"

    async with session.get(c.edge_url(1, "/metrics")) as r:
        text = await r.text()

    for limit in (
        "connections",
        "connections_per_ip",
        "history_rate",
        "request_line",
        "headers",
        "types",
    ):
        assert f'crm_events_limit_rejections_total{{limit="{limit}"}} 0.0' not in text, limit
        assert f'crm_events_limit_rejections_total{{limit="{limit}"}}' in text, limit


async def test_stream_closes_at_token_expiry(
    secured: Cluster, session: aiohttp.ClientSession
) -> None:
    client = Collector(
        secured.lb_url("/crm-events"),
        headers={**token(["*"], ttl=2), "X-Forwarded-For": "10.5.0.1"},
    ).start(session)
    await asyncio.wait_for(client.ended.wait(), 15)
    assert client.received and client.received[-1].event == "auth_expired"
