"""In-process fan-out: one Redis subscription feeds every client of this edge.

Clients are grouped by what they may and want to see: their type filter and the field
values their token requires (e.g. one tenant). For each published batch the hub builds each
event's frame once, its ``id:`` being the hub's cursor right after that event (the highest
position dispatched in every partition, one ``CursorEncoder`` for the whole edge), then per
group one bytes object holding the frames that group wants, and appends that same object to
every client's bounded buffer: no per-client encoding, no per-client Redis call, one wake-up
per client per batch (frames of a burst coalesce into one socket write).

Per partition, entries at or below the hub's position are dropped, so a refill burst or a
repair that overlaps the live feed never reaches a client twice. A client whose cursor is
ahead of the hub in some partition (it came from a faster edge) skips that partition's
entries up to its position and gets ids ``max(its cursor, the hub's)`` until the hub has
passed it everywhere: the cursors a client receives never go backwards. Such clients cost
per batch, not per event: a batch wholly at or below a client's position is skipped at
once, and the merged ids are built once per batch for each distinct client cursor (a
reconnect storm from one faster edge brings thousands of equal cursors).

A client whose backlog (more than one pending batch) passes its limit is disconnected as
``slow``; it catches up from the stream when it reconnects. Appending never awaits, so one
slow client cannot delay another.
"""

from __future__ import annotations

import asyncio
import heapq
import time
import weakref
from collections.abc import Callable, Sequence

from shared.cursor import Cursor, CursorEncoder

from .bus import Entry
from .ring import ReplayRing

TypeKey = frozenset[bytes] | None
Match = frozenset[tuple[str, str]]
GroupKey = tuple[TypeKey, Match]

NO_EPOCH = 0
"""The epoch of cursors handed out before the meta hash was ever read (nothing to serve)."""


def http_chunk(data: bytes) -> bytes:
    """``data`` framed as one chunk of an HTTP/1.1 chunked body, for direct transport writes."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


_LIVE_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


def live_client_objects() -> int:
    """Client objects alive in this process (crm_events_client_objects): a weak set, so
    counting never keeps one alive."""
    return len(_LIVE_CLIENTS)


class Client:
    """One SSE client's bounded outbound buffer, filled by the hub, drained by its handler."""

    __slots__ = (
        "__weakref__",
        "_abort",
        "_bytes",
        "_chunks",
        "_wake",
        "ahead",
        "close_reason",
        "direct",
        "floor",
        "limit",
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
        self.ahead: dict[int, int] | None = None
        """While set: per partition, the position this client already has beyond the hub;
        live entries at or below it are skipped."""
        self.floor: Cursor | None = None
        """While ``ahead`` is set: the client's cursor, merged into the ids it receives."""
        self.oldest_ts_ms = 0
        """Kafka timestamp of the oldest live event waiting in the buffer (0: none)."""
        self.transport: asyncio.WriteTransport | None = None
        """Set when the response is HTTP/1.1 chunked, so that ``push`` may write directly."""
        self.direct = False
        """True while the handler idles with an empty buffer: the hub may write itself."""
        _LIVE_CLIENTS.add(self)

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
    def __init__(self, clock_ms: Callable[[], int] | None = None, ring_bytes: int = 0) -> None:
        self._groups: dict[GroupKey, set[Client]] = {}
        self._ahead: set[Client] = set()
        self._ahead_at: dict[int, dict[int, set[Client]]] = {}
        """Per partition, the clients ahead of the hub there, by their position."""
        self._ahead_heap: dict[int, list[int]] = {}
        """Per partition, the keys of ``_ahead_at[p]`` as a min-heap (stale keys skipped),
        so that the hub passing a position releases its clients without a scan."""
        self.epoch: int | None = None
        """The topic incarnation the positions belong to (None until the meta hash is read)."""
        self.positions: list[int | None] = []
        """Per partition, the highest position handed to clients (None: none yet, the
        partition is read from its oldest retained entry)."""
        self._encoder = CursorEncoder(NO_EPOCH, ())
        self.initialized = False
        self.on_direct_write: Callable[[int], None] | None = None
        """Called once per batch written directly to idle clients, with the oldest event's
        Kafka timestamp (the delivery-latency observation of that batch)."""
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.ring = ReplayRing(ring_bytes)
        """The newest dispatched entries per partition, for resumes and history."""

    # --- positions ----------------------------------------------------------------------------

    @property
    def partitions(self) -> int:
        return len(self.positions)

    def start(self, epoch: int, positions: Sequence[int | None]) -> None:
        """Serve ``epoch`` from ``positions``: the first subscription, or a new incarnation
        of the topic. Every ring restarts there (what they held may no longer be true)."""
        # A client's own cursor names positions of the incarnation it came from: never
        # merged into ids of another (each client is sent a topic_changed reset).
        for client in self._ahead:
            client.ahead = None
            client.floor = None
        self._ahead.clear()
        self._ahead_at.clear()
        self._ahead_heap.clear()
        self.epoch = epoch
        self.positions = list(positions)
        self._encoder = CursorEncoder(epoch, self.positions)
        self.ring.resize(len(self.positions))
        self.ring.reset_all(self.positions)
        self.initialized = True

    def grow(self, partitions: int) -> None:
        """More partitions (never fewer): new ones start with no position, so they are
        read from their oldest retained entry."""
        missing = partitions - len(self.positions)
        if missing <= 0:
            return
        self.positions.extend([None] * missing)
        self._encoder = CursorEncoder(self._encoder.epoch, self.positions)
        self.ring.resize(partitions)

    def move(self, partition: int, position: int | None) -> None:
        """Put a partition at ``position`` without dispatching: where it starts, or where it
        continues after a loss (a reset, so its ring restarts there too)."""
        self.positions[partition] = position
        if position is not None:
            self._encoder.set(partition, position)
            self._release(partition, position)
        self.ring.reset(partition, position)

    def cursor(self) -> Cursor:
        """Where the hub stands: every live entry after it reaches attached clients."""
        return self._encoder.cursor()

    # --- clients ------------------------------------------------------------------------------

    @property
    def client_count(self) -> int:
        return sum(len(group) for group in self._groups.values())

    def attach(self, client: Client, resume: Cursor | None = None) -> Cursor:
        """Register a client; it receives every entry after the returned cursor live.

        Where ``resume`` (the client's own cursor, of the hub's epoch) is ahead of the hub
        (the client saw events on a faster edge), live entries up to it are skipped for this
        client, and its ids merge its cursor, so nothing arrives twice or goes backwards."""
        self._groups.setdefault(client.group, set()).add(client)
        head = self.cursor()
        if resume is not None and resume.epoch == head.epoch:
            positions = self.positions
            ahead = {
                p: mine
                for p, mine in enumerate(resume.positions)
                if mine is not None
                and p < len(positions)
                and ((hub := positions[p]) is None or mine > hub)
            }
            if ahead:
                client.ahead = ahead
                client.floor = resume
                self._ahead.add(client)
                for p, mine in ahead.items():
                    at = self._ahead_at.setdefault(p, {})
                    waiting = at.get(mine)
                    if waiting is None:
                        at[mine] = waiting = set()
                        heapq.heappush(self._ahead_heap.setdefault(p, []), mine)
                    waiting.add(client)
        return head

    def detach(self, client: Client) -> None:
        group = self._groups.get(client.group)
        if group is not None:
            group.discard(client)
            if not group:
                del self._groups[client.group]
        if client in self._ahead:
            self._forget_ahead(client)

    # --- fan-out ------------------------------------------------------------------------------

    def dispatch(self, entries: list[Entry]) -> int:
        """Hand a batch of one partition's entries to every client; returns how many were new
        (entries at or below the hub's position in that partition are dropped)."""
        if not entries:
            return 0
        p = entries[0].partition
        pos = self.positions[p]
        if pos is not None and entries[0].position <= pos:
            entries = [e for e in entries if e.position > pos]
            if not entries:
                return 0
        elif pos is None:
            # The first entries of a partition read from its oldest: the ring holds the
            # partition from right before the first one on.
            self.ring.reset(p, entries[0].prev, from_oldest=True)
        encoder = self._encoder
        # The hub's cursor before this batch: the base of the merged ids of ahead clients.
        before = list(self.positions) if self._ahead else None
        frames = []
        for entry in entries:
            encoder.set(p, entry.position)
            frames.append(b"id: " + encoder.encode() + entry.frame)
        last = entries[-1].position
        self.positions[p] = last
        self.ring.extend(p, entries)
        merged: dict[Cursor, list[tuple[Entry, bytes]]] = {}
        direct = 0
        for (types, required), clients in self._groups.items():
            if types is None and not required:
                selected = frames
                wanted = entries
            else:
                picks = [
                    i
                    for i, e in enumerate(entries)
                    if (types is None or e.type in types) and required <= e.match
                ]
                if not picks:
                    continue
                selected = [frames[i] for i in picks]
                wanted = [entries[i] for i in picks]
            chunk = b"".join(selected)
            # The same bytes as one HTTP/1.1 chunk, built once for every idle client.
            framed = http_chunk(chunk)
            ts = wanted[0].ts_ms
            own_chunks: dict[Cursor, tuple[bytes, int] | None] = {}
            for client in clients:
                ahead = client.ahead
                if ahead is None:
                    if client.push(chunk, ts, framed):
                        direct += 1
                    continue
                mine = ahead.get(p)
                if mine is not None and last <= mine:
                    continue  # the client has all of it
                floor = client.floor
                if floor is None or before is None:  # pragma: no cover - set together
                    client.push(chunk, ts)
                    continue
                if floor in own_chunks:
                    own = own_chunks[floor]
                else:
                    along = merged.get(floor)
                    if along is None:
                        along = merged[floor] = self._merged_along(p, entries, before, floor)
                    picked = [f for e, f in along if client.wants(e)]
                    own = (
                        (b"".join(picked), next(e for e, _ in along if client.wants(e)).ts_ms)
                        if picked
                        else None
                    )
                    own_chunks[floor] = own
                if own is not None:
                    client.push(own[0], own[1])
        if direct and self.on_direct_write is not None:
            self.on_direct_write(entries[0].ts_ms)
        if self._ahead:
            self._release(p, last)
        return len(entries)

    def _merged_along(
        self, p: int, entries: list[Entry], before: list[int | None], floor: Cursor
    ) -> list[tuple[Entry, bytes]]:
        """The frames of ``entries`` after ``floor``'s position in ``p``, each id the
        componentwise maximum of ``floor`` and the hub's cursor after that entry. Once per
        batch per distinct client cursor."""
        mine = floor.position(p)
        mine = -1 if mine is None else mine
        theirs = floor.positions
        base: list[int | None] = list(before)
        for q, pos in enumerate(theirs):
            if q >= len(base):
                base.append(pos)
            elif pos is not None and ((hub := base[q]) is None or pos > hub):
                base[q] = pos
        encoder = CursorEncoder(floor.epoch, base)
        out: list[tuple[Entry, bytes]] = []
        for entry in entries:
            if entry.position <= mine:
                continue
            encoder.set(p, entry.position)
            out.append((entry, b"id: " + encoder.encode() + entry.frame))
        return out

    def _release(self, p: int, position: int) -> None:
        """The hub reached ``position`` in ``p``: clients ahead there up to it are not any
        more (in that partition; in every one, they get the shared frames again)."""
        heap = self._ahead_heap.get(p)
        if not heap:
            return
        at = self._ahead_at[p]
        while heap and heap[0] <= position:
            mine = heapq.heappop(heap)
            for client in at.pop(mine, ()):
                ahead = client.ahead
                if ahead is None:
                    continue
                ahead.pop(p, None)
                if not ahead:
                    client.ahead = None
                    client.floor = None
                    self._ahead.discard(client)
        if not heap:
            del self._ahead_heap[p]
            del self._ahead_at[p]

    def _forget_ahead(self, client: Client) -> None:
        self._ahead.discard(client)
        for p, mine in (client.ahead or {}).items():
            at = self._ahead_at.get(p)
            waiting = at.get(mine) if at is not None else None
            if at is None or waiting is None:
                continue
            waiting.discard(client)
            if not waiting:
                del at[mine]
                heap = self._ahead_heap[p]
                # Stale keys are skipped when popped; rebuilt once they dominate, so clients
                # that come and go in an idle partition do not grow it without bound.
                if len(heap) > 2 * len(at) + 16:
                    self._ahead_heap[p] = heap = sorted(at)
                if not at:
                    del self._ahead_at[p]
                    del self._ahead_heap[p]

    def broadcast(self, frame: bytes) -> None:
        """A control frame to every client, whatever its filter."""
        framed = http_chunk(frame)
        for clients in self._groups.values():
            for client in clients:
                client.push(frame, 0, framed)

    def broadcast_control(self, build: Callable[[Cursor], bytes]) -> None:
        """A control frame (``reset``) whose id is the hub's cursor: built once, and once
        more per client ahead of the hub, whose id must not go backwards."""
        cursor = self.cursor()
        frame = build(cursor)
        framed = http_chunk(frame)
        for clients in self._groups.values():
            for client in clients:
                floor = client.floor
                if client.ahead is not None and floor is not None:
                    client.push(build(cursor.merged(floor)), 0)
                else:
                    client.push(frame, 0, framed)

    def close_all(self, reason: str) -> None:
        for clients in self._groups.values():
            for client in clients:
                client.close(reason)
