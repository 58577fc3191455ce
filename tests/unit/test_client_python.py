"""The Python client library (clients/python): its pure parts, and its HTTP behaviour
against a small aiohttp server in this process that speaks the crm-events protocol."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from crm_events_client import (
    ApiError,
    BadRequest,
    CallbackCursorStore,
    CrmEventsClient,
    Event,
    FileCursorStore,
    Forbidden,
    InvalidCursor,
    MemoryCursorStore,
    ProtocolError,
    Reset,
    ResetError,
    Token,
    Unauthorized,
    Unavailable,
    is_cursor,
    jwt_expiry,
)
from crm_events_client.auth import TokenSource, refresh_at
from crm_events_client.backoff import Backoff
from crm_events_client.errors import MAX_RETRY_AFTER_S, error_from, retry_after_s
from crm_events_client.sse import SseMessage, SseParser

pytestmark = pytest.mark.timeout(20)


# -- the SSE parser ------------------------------------------------------------------------


def parse(*chunks: bytes) -> tuple[list[SseMessage], SseParser]:
    parser = SseParser()
    out: list[SseMessage] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out, parser


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(eol: bytes) -> None:
    body = eol.join([b"id: c1", b"data: {}", b"", b"data: x", b"", b""])
    messages, _ = parse(body)
    assert messages == [SseMessage("message", "{}", "c1"), SseMessage("message", "x", "c1")]


def test_a_crlf_split_across_chunks_is_one_line_end() -> None:
    messages, _ = parse(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")
    assert messages == [SseMessage("message", "a\nb", None)]


def test_byte_at_a_time_with_a_bom_and_multibyte_text() -> None:
    body = "\ufeffid: 1.AB\nevent: reset\ndata: ünï ✓\ndata: line2\n\n".encode()
    messages, _ = parse(*(body[i : i + 1] for i in range(len(body))))
    assert messages == [SseMessage("reset", "ünï ✓\nline2", "1.AB")]


def test_only_the_first_bom_is_skipped() -> None:
    messages, _ = parse(b"\xef\xbb\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\n")
    assert [m.data for m in messages] == ["a"]  # "\ufeffdata" is an unknown field


def test_comments_retry_and_field_forms() -> None:
    messages, parser = parse(
        b"retry: 1500\n: node edge-1\n:keepalive\n\n"
        b"data\ndata:no-space\ndata:  two\nretry: 12x\nfoo: bar\n\n"
    )
    assert parser.retry_ms == 1500
    assert parser.comments == ["node edge-1", "keepalive"]
    assert messages == [SseMessage("message", "\nno-space\n two", None)]


def test_id_persists_and_an_id_alone_is_reported() -> None:
    messages, parser = parse(b"id: a\ndata: 1\n\ndata: 2\n\nid: b\n\nid: x\0y\ndata: 3\n\n")
    assert messages == [
        SseMessage("message", "1", "a"),
        SseMessage("message", "2", "a"),
        SseMessage("", "", "b", has_data=False),
        SseMessage("message", "3", "b"),  # an id with NUL is ignored
    ]
    assert parser.last_event_id == "b"


def test_an_unfinished_block_dispatches_nothing() -> None:
    messages, _ = parse(b"data: a\n")
    assert messages == []


# -- backoff, tokens, stores, errors -------------------------------------------------------


def test_backoff_is_full_jitter_capped_and_floored() -> None:
    top = Backoff(2.0, 10.0, rand=lambda: 0.999999)
    assert [round(top.next_delay_s(), 3) for _ in range(5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    bottom = Backoff(2.0, 10.0, rand=lambda: 0.0)
    assert bottom.next_delay_s() == 0.0
    assert bottom.next_delay_s(floor_s=5) == 5  # Retry-After is a floor
    bottom.succeeded()
    assert bottom.failures == 0 and bottom.window_s() == 2.0
    many = Backoff(1.0, 30.0)
    delays = [many.next_delay_s() for _ in range(200)]
    assert all(0 <= d <= 30 for d in delays) and max(delays) > 10


def jwt(claims: dict[str, Any]) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{b64(b'{}')}.{b64(json.dumps(claims).encode())}.sig"


def test_jwt_expiry_is_read_without_verifying() -> None:
    assert jwt_expiry(jwt({"exp": 1_900_000_000, "sub": "x"})) == 1_900_000_000
    assert jwt_expiry(jwt({"sub": "x"})) is None
    assert jwt_expiry(jwt({"exp": "soon"})) is None
    assert jwt_expiry("opaque-token") is None
    assert jwt_expiry("a.!!!.c") is None


def test_refresh_time_is_the_later_of_30s_and_a_tenth_of_the_lifetime() -> None:
    hour = Token("t", expires_at=10_000.0, issued_at=6_400.0)
    assert refresh_at(hour, 6_400.0) == 10_000.0 - 30
    short = Token("t", expires_at=104.0, issued_at=100.0)
    assert refresh_at(short, 100.0) == pytest.approx(103.6)
    assert refresh_at(Token("t"), 0.0) is None


async def test_token_source_takes_sync_and_async_providers_and_jwt_claims() -> None:
    calls: list[str] = []

    def sync() -> str:
        calls.append("sync")
        return jwt({"exp": 2_000, "iat": 1_000})

    source = TokenSource(sync, clock=lambda: 1_000.0)
    assert (await source.headers())["Authorization"].startswith("Bearer ")
    assert source.refresh_due() == 2_000 - 30
    await source.refresh()
    assert calls == ["sync", "sync"] and source.calls == 2

    async def lying() -> Token:
        return Token("opaque", expires_at=None)

    assert TokenSource(lying).refresh_due() is None
    static = TokenSource(" abc ")
    assert await static.headers() == {"Authorization": "Bearer abc"}
    assert not static.can_refresh and static.refresh_due() is None
    assert await TokenSource(None).headers() == {}
    assert "opaque" not in repr(Token("opaque"))


def test_a_token_already_due_is_not_renewed_in_a_loop() -> None:
    now = 5_000.0
    source = TokenSource(lambda: Token("t", expires_at=now - 1), clock=lambda: now)
    asyncio.run(source.refresh())
    assert source.refresh_due() is None  # the server's auth_expired / 401 decide instead
    fresh = TokenSource(lambda: Token("t", expires_at=now + 4), clock=lambda: now)
    asyncio.run(fresh.refresh())
    assert fresh.refresh_due() == pytest.approx(now + 3.6)


async def test_file_store_replaces_atomically(tmp_path: Path) -> None:
    store = FileCursorStore(tmp_path / "cursor")
    assert await store.load() is None
    await store.save("1.AAA")
    await store.save("1.BBB")
    assert await store.load() == "1.BBB"
    assert os.listdir(tmp_path) == ["cursor"]  # no temporary file left behind
    synced = FileCursorStore(tmp_path / "synced", fsync=True)
    await synced.save("1.CCC")
    assert synced.read() == "1.CCC"


async def test_callback_store_with_sync_and_async_functions() -> None:
    saved: list[str] = []

    async def load() -> str:
        return "1.X"

    store = CallbackCursorStore(saved.append, load)
    await store.save("1.A")
    assert saved == ["1.A"] and await store.load() == "1.X"
    assert await CallbackCursorStore(saved.append).load() is None


def test_error_answers_map_to_typed_errors() -> None:
    bad = error_from(400, b'{"error":"invalid_cursor","message":"nope"}', {})
    assert isinstance(bad, BadRequest) and (bad.error, bad.message) == ("invalid_cursor", "nope")
    assert isinstance(error_from(401, b'{"error":"unauthorized"}', {}), Unauthorized)
    assert isinstance(error_from(403, b'{"error":"forbidden"}', {}), Forbidden)
    busy = error_from(503, b'{"error":"edge_full","message":"m"}', {"Retry-After": "5"})
    assert busy.retriable and busy.retry_after_s == 5.0 and type(busy) is ApiError
    html = error_from(502, b"<html>Bad Gateway</html>", {})
    assert html.error == "http_502" and html.retriable and html.retry_after_s is None
    assert not error_from(404, b"{}", {}).retriable


# -- HTTP: a protocol-speaking server in this process --------------------------------------


def envelope(partition: int, offset: int) -> str:
    return json.dumps(
        {
            "type": "ContactCreated",
            "key": f"k{offset}",
            "partition": partition,
            "offset": offset,
            "timestamp_ms": 1_764_410_400_000 + offset,
            "event": {"Seq": offset},
        }
    )


Handler = Callable[[web.Request], Any]


async def serve(handler: Handler, path: str = "/crm-events") -> TestServer:
    app = web.Application()
    app.router.add_get(path, handler)
    app.router.add_get(path + "/history", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def sse(request: web.Request, frames: list[str], hold: bool = False) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b"retry: 10\n: node test\n\n")
    for frame in frames:
        await resp.write(frame.encode())
    if hold:
        await asyncio.sleep(30)
    return resp


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., CrmEventsClient]]:
    made: list[CrmEventsClient] = []
    servers: list[TestServer] = []

    def make(server: TestServer, **options: Any) -> CrmEventsClient:
        servers.append(server)
        client = CrmEventsClient(str(server.make_url("/crm-events")), **options)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()
    for server in servers:
        await server.close()


async def take(stream: AsyncIterator[Any], n: int) -> list[Any]:
    out = []
    async with asyncio.timeout(5):
        async for item in stream:
            out.append(item)
            if len(out) == n:
                break
    return out


async def test_resumes_with_the_last_cursor_and_drops_duplicates(
    client_for: Callable[..., CrmEventsClient],
) -> None:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Last-Event-ID"))
        if len(seen) == 1:  # two events, then the connection ends
            return await sse(request, [f"id: c{o}\ndata: {envelope(0, o)}\n\n" for o in (1, 2)])
        # The next connection repeats offset 2 (the guard drops it), then goes on.
        frames = [f"id: c{o}\ndata: {envelope(0, o)}\n\n" for o in (2, 3)]
        return await sse(request, frames, hold=True)

    server = await serve(handler)
    store = MemoryCursorStore()
    events = client_for(server).stream(store=store)
    items = await take(events, 3)
    assert [(i.partition, i.offset, i.cursor) for i in items] == [
        (0, 1, "c1"),
        (0, 2, "c2"),
        (0, 3, "c3"),
    ]
    assert seen == [None, "c2"]
    assert events.guard.dropped == 1 and events.node == "test"
    assert store.cursor == "c2"  # c3 is saved when the consumer asks for the next item
    await events.commit()
    assert store.cursor == "c3"
    assert isinstance(items[0], Event) and items[0].timestamp.year == 2025
    await events.aclose()


async def test_reset_is_yielded_or_raised(client_for: Callable[..., CrmEventsClient]) -> None:
    reset = {
        "reason": "trimmed",
        "partitions": [
            {"partition": 1, "requested": 3, "oldest_available": 9, "reason": "trimmed"}
        ],
        "message": "gone",
    }

    async def handler(request: web.Request) -> web.StreamResponse:
        frames = [
            f"id: r1\nevent: reset\ndata: {json.dumps(reset)}\n\n",
            "event: other\ndata: {}\n\n",
        ]
        frames.append(f"id: c9\ndata: {envelope(1, 9)}\n\n")
        return await sse(request, frames, hold=True)

    server = await serve(handler)
    client = client_for(server)
    first, event = await take(client.stream(), 2)
    assert isinstance(first, Reset) and first.cursor == "r1" and not first.whole_topic
    assert first.partitions[0].oldest_available == 9 and isinstance(event, Event)
    with pytest.raises(ResetError) as caught:
        await take(client.stream(on_reset="raise"), 1)
    assert caught.value.reset.reason == "trimmed"


async def test_auth_expired_and_401_call_the_provider_and_a_second_401_raises(
    client_for: Callable[..., CrmEventsClient],
) -> None:
    tokens = iter(["t1", "t2", "t3", "t4"])
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        seen.append(auth)
        if auth == "Bearer t1":
            frames = [f"id: c1\ndata: {envelope(0, 1)}\n\n", "event: auth_expired\ndata: {}\n\n"]
            return await sse(request, frames)
        if auth == "Bearer t2" and seen.count(auth) == 1:
            frames = [f"id: c2\ndata: {envelope(0, 2)}\n\n"]
            return await sse(request, frames)  # ends: reconnect with t2, refused below
        body = {"error": "unauthorized", "message": "bad token"}
        return web.json_response(body, status=401)

    server = await serve(handler)
    client = client_for(server, token=lambda: next(tokens))
    got: list[Any] = []
    with pytest.raises(Unauthorized) as caught:
        async with asyncio.timeout(5):
            async for item in client.stream():
                got.append(item)
    assert [i.offset for i in got] == [1, 2]
    assert seen == ["Bearer t1", "Bearer t2", "Bearer t2", "Bearer t3"]
    assert caught.value.error == "unauthorized" and client.tokens.calls == 3


async def test_errors_that_are_not_retried(client_for: Callable[..., CrmEventsClient]) -> None:
    calls: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request.query.get("types", ""))
        if request.query.get("types") == "Secret":
            return web.json_response({"error": "forbidden", "message": "no"}, status=403)
        if request.headers.get("Authorization") is None:
            return web.json_response({"error": "unauthorized", "message": "no"}, status=401)
        return web.json_response({"error": "invalid_cursor", "message": "bad"}, status=400)

    server = await serve(handler)
    with pytest.raises(Forbidden):
        await take(client_for(server, token="t").stream(types=["Secret"]), 1)
    with pytest.raises(Unauthorized):
        await take(client_for(server).stream(), 1)
    with pytest.raises(BadRequest) as caught:
        await take(client_for(server, token="t").stream(cursor="junk"), 1)
    assert caught.value.error == "invalid_cursor"
    assert len(calls) == 3  # one request each: nothing retried


async def test_retry_after_is_honoured_on_503(client_for: Callable[..., CrmEventsClient]) -> None:
    times: list[float] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        times.append(asyncio.get_running_loop().time())
        if len(times) == 1:
            return web.json_response(
                {"error": "not_ready", "message": "m"}, status=503, headers={"Retry-After": "1"}
            )
        return await sse(request, [f"id: c1\ndata: {envelope(0, 1)}\n\n"], hold=True)

    server = await serve(handler)
    # A small cap keeps the jitter (added above the Retry-After floor) from slowing the test.
    (item,) = await take(client_for(server, backoff_cap_s=0.1).stream(), 1)
    assert item.offset == 1 and times[1] - times[0] >= 0.95


async def test_proactive_refresh_reconnects_before_expiry(
    client_for: Callable[..., CrmEventsClient],
) -> None:
    loop = asyncio.get_running_loop()
    issued: list[float] = []

    def provider() -> Token:
        issued.append(loop.time())
        return Token(f"t{len(issued)}", expires_at=time.time() + 1.0)

    seen: list[tuple[str, str | None]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append((request.headers["Authorization"], request.headers.get("Last-Event-ID")))
        n = len(seen)
        return await sse(request, [f"id: c{n}\ndata: {envelope(0, n)}\n\n"], hold=True)

    server = await serve(handler)
    items = await take(client_for(server, token=provider).stream(), 3)
    assert [i.offset for i in items] == [1, 2, 3]
    assert seen == [("Bearer t1", None), ("Bearer t2", "c1"), ("Bearer t3", "c2")]
    assert issued[1] - issued[0] == pytest.approx(0.9, abs=0.15)  # 10% of 1 s early


async def test_history_pages_to_the_end(client_for: Callable[..., CrmEventsClient]) -> None:
    stored = [(p, o) for o in range(5) for p in range(2)]  # 10 events
    asked: list[tuple[str | None, str]] = []

    async def handler(request: web.Request) -> web.Response:
        after, n = request.query.get("after"), int(request.query["n"])
        asked.append((after, request.query["n"]))
        start = int(after) if after else 0
        chunk = stored[start : start + n]
        items = [
            {"cursor": str(start + i + 1), **json.loads(envelope(*pv))}
            for i, pv in enumerate(chunk)
        ]
        reset = None
        if after == "3":
            reset = {"reason": "trimmed", "partitions": [], "message": "m"}
        body = {
            "items": items,
            "count": len(items),
            "next_after": str(start + len(items)),
            "reset": reset,
        }
        return web.json_response(body)

    server = await serve(handler)
    client = client_for(server)
    got = [i async for i in client.history(after="0", page=3)]
    events = [i for i in got if isinstance(i, Event)]
    assert [(e.partition, e.offset) for e in events] == stored
    assert [e.cursor for e in events] == [str(i) for i in range(1, 11)]
    assert all(e.source == "history" for e in events)
    (reset,) = [i for i in got if isinstance(i, Reset)]
    assert reset.cursor is None and reset.source == "history" and got[3] is reset
    # 3+3+3+1, then one empty page whose next_after equals after: the end.
    assert [a for a, _ in asked] == ["0", "3", "6", "9", "10"]


async def test_a_wrong_content_type_is_a_protocol_error(
    client_for: Callable[..., CrmEventsClient],
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    server = await serve(handler)
    with pytest.raises(ProtocolError):
        await take(client_for(server).stream(), 1)


# -- after the hostile review: bounds, storms, failing providers -----------------------------


def test_sse_lines_and_events_are_bounded() -> None:
    parser = SseParser(max_size=1000)
    parser.feed(b"data: " + b"x" * 900)
    with pytest.raises(ProtocolError, match="line longer"):
        parser.feed(b"x" * 200)  # still no line end: the unfinished line is over the bound
    lines = SseParser(max_size=1000)
    with pytest.raises(ProtocolError, match="event with more"):
        for _ in range(20):  # data lines and never a blank line
            lines.feed(b"data: " + b"y" * 99 + b"\n")
    ok, _ = parse(b"data: " + b"z" * 900 + b"\n\n", b"data: " + b"z" * 900 + b"\n\n")
    assert len(ok) == 2  # the data count starts over with each event


def test_a_long_line_in_small_chunks_is_parsed_in_linear_time() -> None:
    parser = SseParser()
    started = time.perf_counter()
    chunk = b"x" * 1024
    assert parser.feed(b"data: ") == []
    for _ in range(3 * 1024):  # a 3 MiB line, 1 KiB at a time: quadratic took seconds
        assert parser.feed(chunk) == []
    (message,) = parser.feed(b"\n\n")
    assert time.perf_counter() - started < 1.0
    assert message.data == "x" * 3 * 1024 * 1024


def test_retry_after_dates_caps_and_jitter_above_the_floor() -> None:
    assert retry_after_s({"Retry-After": "9" * 400}) == MAX_RETRY_AFTER_S
    assert retry_after_s({"Retry-After": "86400000"}) == MAX_RETRY_AFTER_S
    assert retry_after_s({"Retry-After": "7"}) == 7.0
    now = 4_000_000_000.0  # 2096-10-02 07:06:40 UTC
    date = {"Retry-After": "Tue, 02 Oct 2096 07:06:50 GMT"}
    assert retry_after_s(date, now=now) == pytest.approx(10.0)
    assert retry_after_s(date, now=now + 60) == 0.0  # a date in the past: now
    assert retry_after_s({"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"}) == MAX_RETRY_AFTER_S
    assert retry_after_s({"Retry-After": "soon"}) is None
    assert error_from(503, b"", {"Retry-After": "9" * 400}).retry_after_s == MAX_RETRY_AFTER_S
    half = Backoff(2.0, 10.0, rand=lambda: 0.5)
    assert half.next_delay_s(floor_s=5) == 5 + 1.0  # jitter added above the floor
    assert Backoff(0.0).base_s == 0.1  # retry: 0 cannot make a hot loop
    zero = Backoff(1.0)
    zero.base_s = 0
    assert zero.window_s() == 0.1


def test_every_5xx_408_and_429_are_retried() -> None:
    for status in (408, 429, 500, 501, 502, 503, 504, 505, 507, 520, 524):
        assert error_from(status, b"", {}).retriable, status
    for status in (400, 401, 403, 404, 409):
        assert not error_from(status, b"", {}).retriable, status
    bad = error_from(400, b'{"error":"invalid_cursor","message":"m"}', {})
    assert isinstance(bad, InvalidCursor) and isinstance(bad, BadRequest)


def test_cursor_syntax() -> None:
    assert is_cursor("1.AAAA") and is_cursor("!" * 16_384)
    for bad in ("", "a b", "a\nb", "\ufffdx", "!" * 16_385, None, 5):
        assert not is_cursor(bad), bad


async def test_file_store_reads_damaged_files_and_fsyncs_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c"
    path.write_bytes(b"\xff\xfe garbage")
    damaged = FileCursorStore(path).read()
    assert damaged is not None and not is_cursor(damaged)  # no UnicodeDecodeError
    path.write_text("abc\ndef\n")
    assert not is_cursor(FileCursorStore(path).read())
    synced: list[bool] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await FileCursorStore(path, fsync=True).save("1.A")
    assert synced == [False, True]  # the file, then the folder holding the new name


async def test_an_invalid_cursor_raises_or_restarts_from_now(
    client_for: Callable[..., CrmEventsClient], tmp_path: Path
) -> None:
    sent: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        cursor = request.headers.get("Last-Event-ID")
        sent.append(cursor)
        if cursor == "unknown.cursor":
            body = {"error": "invalid_cursor", "message": "cannot read it"}
            return web.json_response(body, status=400)
        return await sse(request, [f"id: c1\ndata: {envelope(0, 1)}\n\n"], hold=True)

    server = await serve(handler)
    damaged = tmp_path / "cursor"
    damaged.write_bytes(b"\xff\xfe")
    client = client_for(server)
    with pytest.raises(InvalidCursor):
        await take(client.stream(store=FileCursorStore(damaged)), 1)
    assert sent == []  # never sent
    with pytest.raises(InvalidCursor) as refused:
        await take(client.stream(cursor="unknown.cursor"), 1)
    assert refused.value.message == "cannot read it"
    store = FileCursorStore(damaged)
    (item,) = await take(client.stream(store=store, on_invalid_cursor="restart"), 1)
    (again,) = await take(client.stream(cursor="unknown.cursor", on_invalid_cursor="restart"), 1)
    assert item.offset == again.offset == 1
    assert sent == ["unknown.cursor", None, "unknown.cursor", None]


async def test_history_stops_when_next_after_does_not_move(
    client_for: Callable[..., CrmEventsClient],
) -> None:
    asked: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        after = request.query.get("after")
        asked.append(after)
        if after == "5":  # the same non-empty page for ever
            item = {"cursor": "5", **json.loads(envelope(0, 5))}
            return web.json_response({"items": [item], "count": 1, "next_after": "5"})
        # count says 3, items are none, next_after does not move
        return web.json_response({"items": [], "count": 3, "next_after": after})

    server = await serve(handler)
    client = client_for(server)
    async with asyncio.timeout(2):
        same = [i async for i in client.history(after="5")]
        empty = [i async for i in client.history(after="7")]
    assert [i.offset for i in same if isinstance(i, Event)] == [5] and empty == []
    assert asked == ["5", "7"]


def auth_expired_server(hold_s: float) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"retry: 10\n\n")
        await asyncio.sleep(hold_s)
        await resp.write(b'event: auth_expired\ndata: {"error":"token_expired"}\n\n')
        return resp

    return handler


@pytest.mark.parametrize(
    ("hold_s", "expires_in_s"),
    [(0.0, 600.0), (0.15, -1.0)],
    ids=["at-once", "token-already-expired"],
)
async def test_premature_auth_expired_backs_off_then_raises(
    client_for: Callable[..., CrmEventsClient], hold_s: float, expires_in_s: float
) -> None:
    server = await serve(auth_expired_server(hold_s))
    client = client_for(
        server,
        token=lambda: Token("t", expires_at=time.time() + expires_in_s),
        stable_after_s=0.1,
        backoff_cap_s=0.05,
    )
    events = client.stream()
    with pytest.raises(Unauthorized) as caught:
        await take(events, 1)
    assert caught.value.error == "auth_expired"
    assert events.connections == 3  # not thousands: backed off, then gave up
    assert client.tokens.calls == 4  # the first token and one per auth_expired


async def test_auth_expired_after_a_stable_connection_reconnects_for_ever(
    client_for: Callable[..., CrmEventsClient],
) -> None:
    server = await serve(auth_expired_server(0.12))
    client = client_for(
        server, token=lambda: Token("t", expires_at=time.time() + 600), stable_after_s=0.1
    )
    events = client.stream()
    task = asyncio.create_task(take(events, 1))
    async with asyncio.timeout(3):
        while events.connections < 5:
            await asyncio.sleep(0.02)
    assert not task.done()  # four in a row, none premature: no Unauthorized
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events.reconnects["the token expired"] >= 4


async def test_a_stream_the_server_ends_at_once_backs_off_despite_retry_0(
    client_for: Callable[..., CrmEventsClient],
) -> None:
    count = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal count
        count += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"retry: 0\n\n")
        return resp

    server = await serve(handler)
    events = client_for(server).stream()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.6):
            await take(events, 1)
    await events.aclose()
    # Windows 0.1, 0.2, 0.4 s...: a handful; without the floor and the stable rule, hundreds.
    assert 2 <= count <= 10, count


async def test_a_failing_provider_does_not_end_the_stream(
    client_for: Callable[..., CrmEventsClient],
) -> None:
    calls: list[float] = []
    offsets = iter(range(1, 10_000))  # one sequence across connections: nothing is a duplicate

    def provider() -> Token:
        calls.append(time.time())
        if len(calls) in (2, 4):
            raise RuntimeError("identity provider blip")
        # Renewed 0.1 s early (a tenth of a second-long life), after 0.2 s of use.
        return Token(f"t{len(calls)}", expires_at=time.time() + 0.3, issued_at=time.time() - 0.7)

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"retry: 10\n\n")
        if request.headers["Authorization"] == "Bearer t3":
            await resp.write(b"event: auth_expired\ndata: {}\n\n")  # provider fails next
            return resp
        for offset in offsets:
            await resp.write(f"id: c{offset}\ndata: {envelope(0, offset)}\n\n".encode())
            await asyncio.sleep(0.02)
        return resp

    server = await serve(handler)
    client = client_for(server, token=provider, backoff_cap_s=0.05)
    client.tokens.renew_retry_s = 0.1
    events = client.stream()
    got: list[Any] = []
    async with asyncio.timeout(5):
        async for item in events:
            got.append(item)
            if len(calls) >= 5:
                break
    # 2: the proactive renewal failed, the stream went on with t1; 3: renewed; 4: failed
    # after auth_expired, retried after the backoff; 5: the stream goes on.
    assert len(got) > 5
    assert events.reconnects["the token is about to expire"] >= 1
    assert events.reconnects["the token expired"] == 1


async def test_no_answer_and_a_stalled_error_body_time_out(
    client_for: Callable[..., CrmEventsClient],
) -> None:
    requests = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal requests
        requests += 1
        if requests <= 2:
            await asyncio.sleep(30)  # accepted, never answered
        resp = web.StreamResponse(status=503, headers={"Content-Length": "100"})
        await resp.prepare(request)
        await resp.write(b'{"error":')  # ... and the rest never comes
        await asyncio.sleep(30)
        return resp

    server = await serve(handler)
    client = client_for(
        server, idle_timeout_s=0.2, request_timeout_s=0.2, backoff_cap_s=0.05, max_attempts=4
    )
    started = time.perf_counter()
    with pytest.raises(Unavailable) as caught:
        await take(client.stream(), 1)
    assert requests == 4 and time.perf_counter() - started < 2.5
    assert isinstance(caught.value.last, ApiError) and caught.value.last.status == 503


async def test_refetch_falls_back_to_the_stream_when_history_is_down(
    client_for: Callable[..., CrmEventsClient],
) -> None:
    reset = {"reason": "trimmed", "partitions": [], "message": "gone"}
    resumed: list[str | None] = []
    history_calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal history_calls
        if request.path.endswith("/history"):
            history_calls += 1
            body = {"error": "redis_unavailable", "message": "down"}
            return web.json_response(body, status=503, headers={"Retry-After": "0"})
        resumed.append(request.headers.get("Last-Event-ID"))
        if len(resumed) == 1:
            return await sse(request, [f"id: r1\nevent: reset\ndata: {json.dumps(reset)}\n\n"])
        return await sse(request, [f"id: c1\ndata: {envelope(0, 1)}\n\n"], hold=True)

    server = await serve(handler)
    client = client_for(server, backoff_cap_s=0.01)
    first, event = await take(client.stream(on_reset="refetch"), 2)
    assert isinstance(first, Reset) and isinstance(event, Event) and event.offset == 1
    assert history_calls == 6 and resumed == [None, "r1"]
