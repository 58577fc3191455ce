"""A model check of the edge against the in-memory bus (which models Kafka and ingest too).

Random interleavings of produce (with and without its live message), offsets that are no
events, trims, a wipe (with or without an immediate refill from Kafka), a rollback to an
older copy then a refill with the same ids, Kafka retention, dropped subscriptions, and
clients that connect, disconnect mid-replay and resume with their last id, with and without
a type filter. For every client, at the end:

* in every partition, the events delivered are in order and each at most once;
* every event of the model (the Kafka log) its filter wants, after where it started and up
  to where the hub ends, was delivered, unless a ``reset`` naming that partition covers it;
* the cursors it received never went backwards in any partition (across the switch from
  replay to live, and across reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import edge.subscription as subscription_module
from edge.bus import Entry
from edge.bus_memory import MemoryBus
from edge.hub import Client, Hub
from edge.lru import ByteLru
from edge.metrics import EdgeMetrics
from edge.replay import Plan, Resumer
from edge.ring import entry_bytes
from edge.subscription import Subscription
from shared.breaker import BreakerMetrics, CircuitBreaker
from shared.cursor import Cursor, decode_cursor
from tests.sse_client import Frame, _parse_block, assert_cursors_never_go_back

PARTITIONS = 2
EPOCH = 7
PAGE = 3
FILTERS: tuple[frozenset[bytes] | None, ...] = (None, frozenset({b"A"}), frozenset({b"B"}))
SETTLE_S = 3.0

partition = st.integers(0, PARTITIONS - 1)
client_index = st.integers(0, len(FILTERS) - 1)
Op = tuple[Any, ...]
OPS = st.one_of(
    st.tuples(st.just("produce"), partition, st.integers(1, 5), st.sampled_from([b"A", b"B"])),
    st.tuples(st.just("produce_silent"), partition, st.integers(1, 3)),
    st.tuples(st.just("skip"), partition, st.integers(1, 3)),
    st.tuples(st.just("trim"), partition, st.integers(1, 8)),
    st.tuples(st.just("wipe")),
    st.tuples(st.just("wipe_refill")),
    st.tuples(st.just("rollback"), partition, st.integers(1, 6)),
    st.tuples(st.just("retain"), partition, st.integers(1, 6)),
    st.tuples(st.just("drop")),
    st.tuples(st.just("connect"), client_index),
    st.tuples(st.just("disconnect"), client_index),
    st.tuples(st.just("run"), st.integers(1, 20)),
)


@dataclass
class Session:
    """One client across its connections (it resumes with its last id, as a browser does)."""

    types: frozenset[bytes] | None
    start: Cursor | None = None
    last_id: str | None = None
    log: bytearray = field(default_factory=bytearray)
    client: Client | None = None
    task: asyncio.Task[None] | None = None

    def frames(self) -> list[Frame]:
        return [
            f
            for block in bytes(self.log).split(b"\n\n")
            if block and (f := _parse_block(block.decode(), None)) is not None
        ]


class Writer:
    def __init__(self, session: Session) -> None:
        self.session = session

    async def write(self, data: bytes) -> None:
        self.session.log += data
        await asyncio.sleep(0)  # a socket write yields: let the world move between pages

    def write_shared(self, framed: bytes) -> bool:
        return False


class World:
    def __init__(self) -> None:
        self.bus = MemoryBus(maxlen=12, partitions=PARTITIONS, epoch=EPOCH, tick_s=0.01)
        self.seq = 0
        self.records: dict[int, tuple[int, int, bytes]] = {}
        """seq -> (partition, offset, type): the model, which is the Kafka log."""
        size = entry_bytes(Entry.build(0, 0, 0, b"A", 0, b'{"seq":1000}'))
        self.hub = Hub(ring_bytes=PARTITIONS * 5 * size)
        registry = CollectorRegistry()
        self.metrics = EdgeMetrics(registry, "model")
        breaker = CircuitBreaker("redis", BreakerMetrics(registry), failures=1_000_000)
        self.subscription = Subscription(self.bus, self.hub, self.metrics, PAGE, breaker)
        self.resumer = Resumer(
            self.bus, self.hub, self.metrics, PAGE, ByteLru(1 << 20), refill_wait_s=0.05
        )
        self.sessions = [Session(types) for types in FILTERS]

    def events(self, count: int, type_: bytes) -> list[tuple[bytes, int, bytes]]:
        out = []
        for _ in range(count):
            self.seq += 1
            out.append((type_, self.seq, b'{"seq":%d}' % self.seq))
        return out

    def produce(self, p: int, count: int, type_: bytes, live: bool = True) -> None:
        events = self.events(count, type_)
        for record in self.bus.produce(events, partition=p):
            assert record.event is not None
            seq = json.loads(record.event[2])["seq"]
            self.records[seq] = (p, record.offset, type_)
        self.bus.ingest(p, live)

    async def connect(self, i: int) -> None:
        session = self.sessions[i]
        if session.task is not None:
            return
        session.task = asyncio.create_task(self._serve(session))
        await asyncio.sleep(0)

    async def _serve(self, session: Session) -> None:
        requested = decode_cursor(session.last_id) if session.last_id else None
        plan: Plan | None = await self.resumer.plan(requested) if requested else None
        client = Client(session.types, 1 << 30, lambda: None)
        session.client = client
        head = self.hub.attach(client, plan.cursor if plan is not None else None)
        if requested is None:
            # No id yet (never connected, or nothing received before it left): a browser
            # then starts from "now" again, and so does what it is owed.
            session.start = head
        writer = Writer(session)
        if plan is not None:
            reset = plan.reset_frame()
            if reset is not None:
                await writer.write(reset)
            await self.resumer.replay(plan, client, head, writer)
        while True:
            data, _ = client.take()
            if data:
                session.log += data
            await client.wait()

    async def disconnect(self, i: int) -> None:
        session = self.sessions[i]
        if session.task is None:
            return
        session.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await session.task
        if session.client is not None:
            self.hub.detach(session.client)
            data, _ = session.client.take()
            # What the socket never delivered is lost with the connection: not appended.
            del data
        session.task = None
        session.client = None
        ids = [f.id for f in session.frames() if f.id is not None]
        session.last_id = ids[-1] if ids else session.last_id

    async def apply(self, op: Op) -> None:
        bus = self.bus
        kind, *args = op
        if kind == "produce":
            p, count, type_ = args
            self.produce(int(p), int(count), bytes(type_))
        elif kind == "produce_silent":
            p, count = (int(a) for a in args)
            self.produce(p, count, b"A", live=False)
        elif kind == "skip":
            p, count = (int(a) for a in args)
            bus.skip_offsets(count, p)
            bus.ingest(p)
        elif kind == "trim":
            p, keep = (int(a) for a in args)
            bus.trim(p, keep)
        elif kind == "wipe":
            bus.wipe()
        elif kind == "wipe_refill":
            bus.wipe()
            for p in range(PARTITIONS):
                bus.ingest(p)
        elif kind == "rollback":
            p, back = (int(a) for a in args)
            state = bus._states[p]
            if state is not None:
                bus.rollback(p, max(state.base - 1, state.applied - back))
                bus.ingest(p)
        elif kind == "retain":
            p, count = (int(a) for a in args)
            end = bus.kafka_start[p] + len(bus.kafka[p])
            bus.retain_kafka(p, min(end, bus.kafka_start[p] + count))
        elif kind == "drop":
            bus.drop_subscriptions()
        elif kind == "connect":
            await self.connect(int(args[0]))
        elif kind == "disconnect":
            await self.disconnect(int(args[0]))
        elif kind == "run":
            for _ in range(int(args[0])):
                await asyncio.sleep(0)

    async def settle(self) -> None:
        """Everything applied, every client connected and caught up with the hub, which is
        caught up with Redis."""
        for p in range(PARTITIONS):
            self.bus.ingest(p)
        for i in range(len(self.sessions)):
            await self.connect(i)

        def done() -> bool:
            for p in range(PARTITIONS):
                entries = self.bus.entries(p)
                position = self.hub.positions[p]
                # The hub may stand past Redis (a rollback whose records Kafka no longer has),
                # or before a position that has no entry (an event lost with its live
                # message, then dropped by Kafka's retention): what counts is the entries.
                if position is None or (entries and position < entries[-1].position):
                    return False
            for session in self.sessions:
                client = session.client
                if client is None or client.buffered_bytes:
                    return False
            return True

        try:
            async with asyncio.timeout(SETTLE_S):
                while not done():
                    await asyncio.sleep(0.005)
        except TimeoutError:
            clients = [(s.client is not None, s.task) for s in self.sessions]
            raise AssertionError(
                f"not settled: hub {self.hub.positions}, redis {self.bus._states}, "
                f"ready {self.subscription.ready.is_set()}, clients {clients}"
            ) from None
        async with asyncio.timeout(SETTLE_S):
            # Each client's own task drains its buffer; let it finish its replay first.
            for _ in range(200):
                await asyncio.sleep(0)


def check(world: World, session: Session) -> None:
    frames = session.frames()
    assert_cursors_never_go_back(frames)
    assert session.start is not None
    delivered: dict[int, list[int]] = {p: [] for p in range(PARTITIONS)}
    excused: dict[int, list[tuple[int, int]]] = {p: [] for p in range(PARTITIONS)}
    for frame in frames:
        if frame.event == "reset":
            for item in frame.json()["partitions"]:
                low = item["requested"] if item["requested"] is not None else -1
                high = item["oldest_available"]
                excused[item["partition"]].append((low, high if high is not None else 1 << 62))
            continue
        seq = frame.json()["seq"]
        p, offset, type_ = world.records[seq]
        assert session.types is None or type_ in session.types, f"seq {seq}: not wanted"
        assert frame.cursor.position(p) == offset + 1, f"seq {seq}: id is not after it"
        delivered[p].append(offset)
    for p in range(PARTITIONS):
        got = delivered[p]
        assert got == sorted(set(got)), f"partition {p}: out of order or twice: {got}"
        start = session.start.position(p)
        end = world.hub.positions[p]
        assert start is not None and end is not None
        for seq, (rp, offset, type_) in world.records.items():
            if rp != p or not start < offset + 1 <= end:
                continue
            if session.types is not None and type_ not in session.types:
                continue
            if offset in got:
                continue
            assert any(low <= offset < high for low, high in excused[p]), (
                f"filter {session.types}: partition {p} offset {offset} (seq {seq}) silently "
                f"missing; delivered {got}, resets {excused[p]}"
            )


async def scenario(ops: list[Op]) -> None:
    world = World()
    for p in range(PARTITIONS):
        world.produce(p, 2, b"A")
    task = asyncio.create_task(world.subscription.run())
    try:
        async with asyncio.timeout(SETTLE_S):
            await world.subscription.ready.wait()
        for op in ops:
            await world.apply(op)
        try:
            await world.settle()
            for session in world.sessions:
                check(world, session)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nops: {ops!r}") from None
    finally:
        for i in range(len(world.sessions)):
            await world.disconnect(i)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture(autouse=True)
def fast_resubscribe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subscription_module, "CLOSED_RETRY_S", 0.001)
    # The periodic check of each partition's state finds a lost last live message.
    monkeypatch.setattr(subscription_module, "META_POLL_S", 0.02)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(OPS, max_size=40))
# Found by this test: a rollback after Kafka's retention had dropped the rolled-back copy's
# last event; the model then wrote the refill linked to the wrong predecessor (a copy that
# Redis could never hold). Pinned so that every run checks it.
@example(ops=[("produce_silent", 0, 2), ("retain", 0, 3), ("rollback", 0, 1)])
def test_every_client_gets_the_model_exactly_once_or_a_reset(ops: list[Op]) -> None:
    asyncio.run(scenario(ops))


def test_the_model_check_catches_a_silent_gap() -> None:
    """The check above can fail: a client whose frames skip an event without a reset."""
    world = World()
    world.produce(0, 3, b"A")
    session = Session(None, start=Cursor(EPOCH, (0, 0)))
    world.hub.start(EPOCH, [3, 0])
    for seq, (_, offset, _) in world.records.items():
        if seq != 2:
            session.log += b"id: " + Cursor(EPOCH, (offset + 1, 0)).encode()
            session.log += b'\ndata: {"seq":%d}\n\n' % seq
    with pytest.raises(AssertionError, match="silently missing"):
        check(world, session)
