"""In-process fan-out: one Redis subscription feeds every client of this edge.

Clients are grouped by what they may and want to see: their type filter and the field
values their token requires (e.g. one tenant). For each published batch the hub builds, per
group, one bytes object holding the frames that group wants, and appends that same object
to every client's bounded buffer: no per-client encoding, no per-client Redis call, one
wake-up per client per batch (frames of a burst coalesce into one socket write).

A client whose backlog (more than one pending batch) passes its limit is disconnected as
``slow``; it catches up from the stream when it reconnects. Appending never awaits, so one
slow client cannot delay another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from shared.ids import ZERO, StreamId

from .bus import Entry
from .ring import ReplayRing

TypeKey = frozenset[bytes] | None
Match = frozenset[tuple[str, str]]
GroupKey = tuple[TypeKey, Match]


def http_chunk(data: bytes) -> bytes:
    """``data`` framed as one chunk of an HTTP/1.1 chunked body, for direct transport writes."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


class Client:
    """One SSE client's bounded outbound buffer, filled by the hub, drained by its handler."""

    __slots__ = (
        "_abort",
        "_bytes",
        "_chunks",
        "_wake",
        "close_reason",
        "direct",
        "limit",
        "min_id",
        "oldest_ts_ms",
        "required",
        "transport",
        "types",
    )

    def __init__(
        self,
        types: TypeKey,
        limit_bytes: int,
        abort: Callable[[], None],
        required: Match = frozenset(),
    ) -> None:
        self.types = types
        self.required = required
        self.limit = limit_bytes
        self._abort = abort
        self._chunks: list[bytes] = []
        self._bytes = 0
        self._wake = asyncio.Event()
        self.close_reason: str | None = None
        self.min_id: StreamId | None = None
        """While set, live entries at or below it are skipped (already sent from history)."""
        self.oldest_ts_ms = 0
        """Kafka timestamp of the oldest live event waiting in the buffer (0: none)."""
        self.transport: asyncio.WriteTransport | None = None
        """Set when the response is HTTP/1.1 chunked, so that ``push`` may write directly."""
        self.direct = False
        """True while the handler idles with an empty buffer: the hub may write itself."""

    @property
    def group(self) -> GroupKey:
        return (self.types, self.required)

    def wants(self, entry: Entry) -> bool:
        return (self.types is None or entry.type in self.types) and self.required <= entry.match

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def push(self, chunk: bytes, ts_ms: int, framed: bytes | None = None) -> bool:
        """Queue ``chunk``, or write ``framed`` (the same bytes as one HTTP chunk) straight to
        the socket when the client is idle and its transport has nothing waiting: no task
        wake-up per client per batch. Returns True when it was written directly."""
        if self.close_reason is not None:
            return False
        transport = self.transport
        if (
            framed is not None
            and self.direct
            # Anything queued (a reset, a replayed tail) must reach the socket first.
            and not self._chunks
            and transport is not None
            and not transport.get_write_buffer_size()
            and not transport.is_closing()
        ):
            transport.write(framed)
            return True
        self._chunks.append(chunk)
        self._bytes += len(chunk)
        if ts_ms and not self.oldest_ts_ms:
            self.oldest_ts_ms = ts_ms
        # One oversized batch to a client that has kept up is fine (the bytes object is shared
        # with every client of its group); a backlog past the limit means the peer is not
        # reading fast enough.
        if self._bytes > self.limit and len(self._chunks) > 1:
            self.close("slow")
            # The handler may be blocked writing to a peer that stopped reading; aborting
            # the transport frees it and the buffered bytes at once.
            self._abort()
            return False
        self._wake.set()
        return False

    def take(self) -> tuple[bytes, int]:
        """Everything buffered as one write, and the oldest event's Kafka timestamp."""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        ts = self.oldest_ts_ms
        self._chunks.clear()
        self._bytes = 0
        self.oldest_ts_ms = 0
        return data, ts

    async def wait(self) -> None:
        await self._wake.wait()
        self._wake.clear()

    def close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self._wake.set()


class Hub:
    def __init__(self, clock_ms: Callable[[], int] | None = None, ring_capacity: int = 0) -> None:
        self._groups: dict[GroupKey, set[Client]] = {}
        self._behind: set[Client] = set()
        self.last_id: StreamId = ZERO
        """Newest id handed to clients; entries at or below it are dropped as repeats."""
        self.initialized = False
        self.on_direct_write: Callable[[int], None] | None = None
        """Called once per batch written directly to idle clients, with the oldest event's
        Kafka timestamp (the delivery-latency observation of that batch)."""
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.ring = ReplayRing(ring_capacity)
        """The newest dispatched entries, for resumes and history without Redis."""

    def start_at(self, last_id: StreamId) -> None:
        """Continue after ``last_id``: the first subscription, or a reset after the stream
        was lost. The ring restarts there too (what it held may no longer be true)."""
        self.last_id = last_id
        self.initialized = True
        self.ring.reset(last_id)

    @property
    def client_count(self) -> int:
        return sum(len(group) for group in self._groups.values())

    def attach(self, client: Client, resume_after: StreamId | None = None) -> StreamId:
        """Register a client; it receives every entry after the returned id live.

        With ``resume_after`` newer than the hub (the client saw events on a faster edge),
        live entries up to it are skipped for this client so nothing arrives twice."""
        self._groups.setdefault(client.group, set()).add(client)
        if resume_after is not None and resume_after > self.last_id:
            client.min_id = resume_after
            self._behind.add(client)
        return self.last_id

    def detach(self, client: Client) -> None:
        group = self._groups.get(client.group)
        if group is not None:
            group.discard(client)
            if not group:
                del self._groups[client.group]
        self._behind.discard(client)

    def dispatch(self, entries: list[Entry]) -> int:
        """Hand a batch to every client; returns how many entries were new."""
        last = self.last_id
        if not entries:
            return 0
        if entries[0].id <= last:
            entries = [e for e in entries if e.id > last]
            if not entries:
                return 0
        self.last_id = entries[-1].id
        self.ring.extend(entries)
        direct = 0
        for (types, required), clients in self._groups.items():
            if types is None and not required:
                selected = entries
            else:
                selected = [
                    e for e in entries if (types is None or e.type in types) and required <= e.match
                ]
            if not selected:
                continue
            chunk = b"".join([e.frame for e in selected])
            # The same bytes as one HTTP/1.1 chunk, built once for every idle client.
            framed = http_chunk(chunk)
            ts = selected[0].ts_ms
            for client in clients:
                if client.min_id is None:
                    if client.push(chunk, ts, framed):
                        direct += 1
                else:
                    floor = client.min_id
                    part = [e for e in selected if e.id > floor]
                    if part:
                        client.push(b"".join([e.frame for e in part]), part[0].ts_ms)
        if direct and self.on_direct_write is not None:
            self.on_direct_write(entries[0].ts_ms)
        if self._behind:
            caught_up = [
                c for c in self._behind if c.min_id is not None and c.min_id <= self.last_id
            ]
            for client in caught_up:
                client.min_id = None
                self._behind.discard(client)
        return len(entries)

    def broadcast(self, frame: bytes) -> None:
        """A control frame (e.g. ``reset``) to every client, whatever its filter."""
        framed = http_chunk(frame)
        for clients in self._groups.values():
            for client in clients:
                client.push(frame, 0, framed)

    def close_all(self, reason: str) -> None:
        for clients in self._groups.values():
            for client in clients:
                client.close(reason)
