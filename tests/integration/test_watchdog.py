"""The local stack's watchdog and a rolling restart of its edges, on one stack started
exactly as `make up` starts it: `crm-events-stack up` with a private run directory and private
ports (every part: its own Kafka broker, Redis, ingest, two edges, nginx, Prometheus,
Alertmanager, the sample producer at 200 events/s, and the watchdog), authentication on. One
stack for the module: `up` costs about as much as all the tests together.

* kill -9 of the edge that serves a client (`crm-events-stack kill`): the watchdog brings it
  back, ready, within 10 s with nothing re-run, counts and logs the restart, and the clients
  that were on it resume through nginx with every event exactly once (compared with what
  Kafka holds from each client's first cursor to the end of the topic);
* a part stopped on purpose (`stop`) stays stopped and a paused one (`pause`) stays paused,
  however often the watchdog looks;
* `crm-events-stack restart edge1 edge2` under load (20 clients through nginx, reconnecting as
  EventSource does, with Last-Event-ID, after 4 s): one edge at a time is stopped (SIGTERM: it
  ends every stream cleanly and exits), started and waited for until ready. Some edge answers
  every attempt, each client reconnects exactly once, every client gets every event exactly
  once, the watchdog restarts nothing, and the figures (each edge's drain and start-to-ready
  time, reconnects, the longest time a client went without an event, the resume times) are
  printed (-s). The clients wait 4 s rather than the edges' 2 s `retry:` because "exactly once"
  holds only for a client that comes back after its edge is listening again: one that comes
  back sooner lands on the edge that is restarted next and moves twice. The edges restart in
  1.3 s on an idle machine and in up to 2 s on a loaded one, so with 2 s the count would
  depend on the machine's load. This is the closest local thing to a Kubernetes rolling
  update of the edge Deployment; unlike one with maxSurge 1 and maxUnavailable 0, the local
  edges have fixed ports, so a new edge cannot start before the old one is gone (one edge of
  two is down at a time). Each client sees the same either way: its edge ends its stream, and
  it reconnects through the load balancer to a ready edge;
* `down` stops the watchdog first, then every part, and nothing comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import statistics
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from devtools import kafka_local, watchdog
from devtools.probes import HttpReady
from devtools.stack import StackSettings, _python_entry, dev_token
from devtools.supervisor import ProcState, Supervisor
from tests.sse_client import (
    Frame,
    assert_cursors_never_go_back,
    assert_per_partition_exactly_once,
    frames,
)
from tests.stack_ports import private_stack_ports
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

STACK = _python_entry("crm-events-stack", "devtools.stack")
#: What a browser's EventSource waits before it reconnects: the edges' `retry:` hint
#: (CRM_EVENTS_SSE_RETRY_MS, 2000 by default).
EVENTSOURCE_RETRY_S = 2.0
EDGES = 2


# -- the stack, as `make up` runs it -----------------------------------------------------------


@dataclass
class LocalStack:
    env: dict[str, str]
    watchdog_pid: int | None = None
    """The watchdog the module's `up` started."""

    @property
    def settings(self) -> StackSettings:
        return StackSettings.from_env(self.env)

    @property
    def run_dir(self) -> Path:
        return self.settings.run_dir

    @property
    def sup(self) -> Supervisor:
        return Supervisor(self.run_dir)

    def cli(self, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
        """``crm-events-stack ARGS`` as a user runs it (blocks: only while no client reads)."""
        return subprocess.run(
            [*STACK, *args], env=self.env, capture_output=True, text=True, timeout=timeout_s
        )

    async def acli(
        self, *args: str, timeout_s: float = 120, stderr: bool = True
    ) -> tuple[int, str]:
        """The same while clients keep reading: (exit status, stdout + stderr, or stdout
        alone when not ``stderr``: output that is parsed)."""
        proc = await asyncio.create_subprocess_exec(
            *STACK,
            *args,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if stderr else None,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    def watchdog_state(self) -> watchdog.WatchdogState:
        found = watchdog.read_state(self.run_dir)
        assert found is not None, f"no {watchdog.state_file(self.run_dir)}"
        return found

    async def watchdog_looks(self, times: int) -> None:
        """Until the watchdog has looked at every part ``times`` more times."""
        start = self.watchdog_state().ticks
        await eventually(
            lambda: self.watchdog_state().ticks >= start + times,
            10,
            f"the watchdog to look {times} more times",
        )

    def edge_ready(self, name: str) -> bool:
        port = self.settings.edge_ports[self.settings.edge_names.index(name)]
        return HttpReady(f"{self.settings.edge_url(port)}/readyz")()


@contextlib.contextmanager
def local_stack(base: Path, producer_rate: float) -> Iterator[LocalStack]:
    """`crm-events-stack up` on private ports and a private run directory, `down` after.

    The environment is the test's without any CRM_EVENTS_* variable (and without make's
    variables), as in a user's shell. Kafka's jars are the checkout's (a symlink, as the
    benchmarks do): `make install` fetched them into the default run directory."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CRM_EVENTS_") and k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}
    }
    env.update(private_stack_ports(EDGES)[0])
    env["CRM_EVENTS_RUN_DIR"] = str(base / "run")
    env["CRM_EVENTS_PRODUCER_RATE"] = str(producer_rate)
    stack = LocalStack(env)

    libs = kafka_local.KafkaLayout.under(StackSettings.from_env(os.environ).run_dir).libs
    assert any(libs.glob("kafka_2.13-*.jar")), f"no Kafka jars in {libs}: run make install"
    layout = kafka_local.KafkaLayout.under(stack.run_dir)
    layout.home.mkdir(parents=True)
    layout.libs.symlink_to(libs.resolve(), target_is_directory=True)
    try:
        t0 = time.monotonic()
        up = stack.cli("up")
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"\n`crm-events-stack up`: {time.monotonic() - t0:.1f} s")
        stack.watchdog_pid = stack.sup.pid(watchdog.NAME)
        yield stack
    finally:
        t0 = time.monotonic()
        down = stack.cli("down")
        print(f"`crm-events-stack down`: {time.monotonic() - t0:.1f} s")
        # Whatever a failed `down` left: nothing of this test keeps running.
        stack.sup.stop_all(order=[watchdog.NAME], timeouts=dict.fromkeys(stack.sup.known(), 10.0))
        assert down.returncode == 0, down.stdout + down.stderr


def auth(stack: LocalStack) -> dict[str, str]:
    """The header of `make token`'s token (the same function, in this process: a command
    costs a second of start-up)."""
    return {"Authorization": f"Bearer {dev_token(stack.settings)}"}


# -- a browser-like client ---------------------------------------------------------------------


@dataclass
class Client:
    """Reads the stream through the load balancer like EventSource: after an error or the
    end of a stream it waits ``retry_s`` and reconnects with the last id it saw as
    ``Last-Event-ID``. Keeps every event with its arrival time, and the edge of each
    connection (the edge names itself in a comment at the start)."""

    url: str
    name: str
    retry_s: float = EVENTSOURCE_RETRY_S
    frames: list[Frame] = field(default_factory=list)
    deliveries: list[tuple[int, int]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    positions: dict[int, int] = field(default_factory=dict)
    resets: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    """The edge of each connection, in order."""
    node: str | None = None
    """The edge of the current connection; None between connections."""
    attempts: int = 0
    connects: int = 0
    """Attempts that opened a stream (200)."""
    failures: list[str] = field(default_factory=list)
    """Errors and refusals, and how streams ended other than cleanly."""
    resume_times_s: list[float] = field(default_factory=list)
    """Per reconnect: from losing the stream to the new one being open."""
    last_id: str | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self, session: aiohttp.ClientSession) -> Client:
        self._task = asyncio.create_task(self._run(session))
        return self

    async def _run(self, session: aiohttp.ClientSession) -> None:
        lost_at: float | None = None
        while not self._stop.is_set():
            headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
            comments: list[str] = []
            self.attempts += 1
            try:
                async with session.get(
                    self.url, headers=headers, timeout=aiohttp.ClientTimeout(total=None, connect=5)
                ) as resp:
                    if resp.status != 200:
                        self.failures.append(f"{time.monotonic():.3f} status {resp.status}")
                    else:
                        self.connects += 1
                        if lost_at is not None:
                            self.resume_times_s.append(time.monotonic() - lost_at)
                            lost_at = None
                        async for frame in frames(resp, comments):
                            self._on_frame(frame, comments)
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                self.failures.append(f"{time.monotonic():.3f} {exc!r}")
            self.node = None
            if lost_at is None:
                lost_at = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.retry_s)

    def _on_frame(self, frame: Frame, comments: list[str]) -> None:
        if self.node is None:
            named = [c.removeprefix("node ") for c in comments if c.startswith("node ")]
            if named:
                self.node = named[0]
                self.nodes.append(self.node)
        if frame.id:
            self.last_id = frame.id
        if frame.event == "reset":
            self.resets.append(frame.data)
            return
        envelope = frame.json()
        partition, offset = envelope["partition"], envelope["offset"]
        self.frames.append(frame)
        self.deliveries.append((partition, offset))
        self.arrivals.append(time.monotonic())
        self.positions[partition] = offset + 1

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def part(self) -> str | None:
        """The stack's part name of the current edge (node id ``edge-1`` is part ``edge1``)."""
        return None if self.node is None else self.node.replace("-", "")

    def reached(self, ends: Mapping[int, int]) -> bool:
        return all(self.positions.get(p, 0) >= end for p, end in ends.items() if end)

    def start_positions(self, partitions: Sequence[int]) -> dict[int, int]:
        """Where this client's stream began in each partition: its first event's offset in
        that event's partition, the first event's cursor in the others (a live stream's
        first id carries the edge's position in every partition it has seen)."""
        first = self.frames[0]
        envelope = first.json()
        out = {}
        for p in partitions:
            position = first.cursor.position(p)
            if p == envelope["partition"]:
                out[p] = envelope["offset"]
            elif position is not None:
                out[p] = position
            else:
                out[p] = min((o for q, o in self.deliveries if q == p), default=0)
        return out

    def check_exact(self, kafka: Mapping[int, list[int]]) -> None:
        """Every event Kafka holds from this client's start exactly once, in order, no reset;
        each id a cursor that never goes back and stands right after its own event."""
        assert not self.resets, f"{self.name}: reset(s) {self.resets[:2]}"
        start = self.start_positions(sorted(kafka))
        expected = {p: [o for o in offsets if o >= start[p]] for p, offsets in kafka.items()}
        assert_per_partition_exactly_once(self.deliveries, expected, self.name)
        assert_cursors_never_go_back(self.frames)
        for frame, (partition, offset) in zip(self.frames, self.deliveries, strict=True):
            assert frame.cursor.position(partition) == offset + 1, (self.name, partition, offset)

    def max_gap_s(self, since: float, until: float) -> float:
        """The longest time without an event between ``since`` and ``until``."""
        times = [since, *(t for t in self.arrivals if since < t < until), until]
        return max(b - a for a, b in itertools.pairwise(times))


# -- Kafka's positions -------------------------------------------------------------------------


async def kafka_end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = sorted(p["partition"] for p in described["partitions"])
    assert partitions, f"topic {topic} has no partitions"
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: int(offset) for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def kafka_offsets(
    bootstrap: str, topic: str, start: Mapping[int, int], end: Mapping[int, int]
) -> dict[int, list[int]]:
    """Per partition, the offsets of the records from ``start`` up to ``end`` (excluded)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        tps = {p: TopicPartition(topic, p) for p in end}
        consumer.assign(list(tps.values()))
        for p, tp in tps.items():
            consumer.seek(tp, start.get(p, 0))
        out: dict[int, list[int]] = defaultdict(list)

        async def read_to_end() -> bool:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    if r.offset < end[r.partition]:
                        out[r.partition].append(r.offset)
            return all([await consumer.position(tp) >= end[p] for p, tp in tps.items()])

        await eventually(read_to_end, 30, "the topic's records up to its end")
        return {p: out.get(p, []) for p in end}
    finally:
        await consumer.stop()


async def stop_producer_and_check(
    stack: LocalStack, clients: Sequence[Client], wait_s: float = 30
) -> dict[int, int]:
    """Stop the producer (on purpose: the watchdog leaves it stopped), then check every
    client against Kafka. Returns the topic's end offsets."""
    code, out = await stack.acli("stop", "producer")
    assert code == 0, out
    s = stack.settings
    ends = await kafka_end_offsets(s.kafka_bootstrap, s.kafka_topic)
    await eventually(
        lambda: all(c.reached(ends) for c in clients),
        wait_s,
        f"every client at Kafka's end {ends}",
    )
    starts = [c.start_positions(sorted(ends)) for c in clients]
    first = {p: min(start[p] for start in starts) for p in ends}
    kafka = await kafka_offsets(s.kafka_bootstrap, s.kafka_topic, first, ends)
    for client in clients:
        client.check_exact(kafka)
    return ends


# -- the tests ---------------------------------------------------------------------------------

RATE = 200
#: The rolling restart's clients' retry: longer than an edge's restart (see the docstring).
ROLLING_RETRY_S = 4.0
"""Events per second of the stack's sample producer."""
ROLLING_CLIENTS = 20
RESTARTED = re.compile(
    r"^\[stack\] (?P<name>edge\d+)\s+restarted: pid (?P<old>\d+) stopped in (?P<stop>[\d.]+) s, "
    r"pid (?P<new>\d+) ready (?P<ready>[\d.]+) s later$",
    re.M,
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with local_stack(tmp_path_factory.mktemp("watchdog"), producer_rate=RATE) as running:
        yield running


async def running(stack: LocalStack, *parts: str) -> None:
    """``parts`` (default: every part) running: a test before may have stopped the producer
    (or run `down`), and `up` starts what is not running."""
    sup = stack.sup
    if not all(sup.state(n) is ProcState.RUNNING for n in parts or stack.settings.part_names):
        code, out = await stack.acli("up")
        assert code == 0, out


def restart_counts(stack: LocalStack) -> dict[str, int]:
    return {n: r.restarts for n, r in stack.watchdog_state().parts.items()}


def gone(pid: int) -> bool:
    """No such process, or only its zombie (an exited child nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


async def test_a_killed_edge_is_back_and_ready_within_10s_and_its_clients_resume_exactly_once(
    stack: LocalStack,
) -> None:
    await running(stack)
    sup = stack.sup
    assert sup.state(watchdog.NAME) is ProcState.RUNNING  # `up` started it, detached
    counts = restart_counts(stack)
    url = f"{stack.settings.lb_url}/crm-events"
    async with aiohttp.ClientSession(headers=auth(stack)) as session:
        clients = [Client(url, f"client{i}").start(session) for i in range(4)]
        await eventually(
            lambda: all(c.part and len(c.deliveries) >= 5 for c in clients), 30, "streams"
        )

        # kill -9 of the edge serving client0, as a chaos test or a user does it.
        victim = clients[0].part
        assert victim is not None
        on_victim = [c for c in clients if c.part == victim]
        old_pid = sup.pid(victim)
        t_kill = time.monotonic()
        code, out = await stack.acli("kill", victim)
        assert code == 0, out

        def back() -> bool:
            return sup.pid(victim) not in (None, old_pid) and stack.edge_ready(victim)

        await eventually(lambda: asyncio.to_thread(back), 10, f"{victim} back and ready")
        back_s = time.monotonic() - t_kill
        new_pid = sup.pid(victim)

        # Counted once, logged with the reason, shown by `status` (nothing was re-run).
        counts[victim] += 1
        assert restart_counts(stack) == counts
        log = sup.log_tail(watchdog.NAME, 50)
        n = counts[victim]
        assert (
            f"{victim} restarted (pid {new_pid}, restart {n}): killed by SIGKILL "
            "(crm-events-stack kill)"
        ) in log, log
        code, out = await stack.acli("status", victim, stderr=False)
        assert code == 0, out
        header, row = (line.split() for line in out.splitlines())
        assert header[-1] == "RESTARTS", out
        assert row[:4] == [victim, str(new_pid), "running", "yes"] and row[-1] == str(n), out

        # Its clients resumed through nginx: exactly once, checked against Kafka.
        await eventually(lambda: all(c.connects >= 2 and c.node for c in on_victim), 15, "resumed")
        await stop_producer_and_check(stack, clients)
        for client in clients:
            await client.stop()
    # Each of its clients reconnected once; the others never had to.
    assert [c.connects for c in on_victim] == [2] * len(on_victim), [c.failures for c in clients]
    others = [c for c in clients if c not in on_victim]
    assert [c.connects for c in others] == [1] * len(others), [c.failures for c in others]
    print(
        f"\n{victim} killed -9: back and ready {back_s:.1f} s after `crm-events-stack kill` "
        f"started; {len(on_victim)} of {len(clients)} clients were on it and resumed exactly "
        f"once after {[round(t, 2) for c in on_victim for t in c.resume_times_s]} s"
    )


async def test_stopped_and_paused_parts_stay_so_however_often_the_watchdog_looks(
    stack: LocalStack,
) -> None:
    await running(stack)
    sup = stack.sup
    counts = restart_counts(stack)
    code, out = await stack.acli("stop", "producer")
    assert code == 0, out
    # SIGSTOP is not death: a paused edge stays paused, same pid, until resumed.
    paused = sup.pid("edge2")
    code, out = await stack.acli("pause", "edge2")
    try:
        assert code == 0, out
        await stack.watchdog_looks(2)  # one whole look at least after both commands
        assert sup.state("producer") is ProcState.STOPPED
        assert sup.state("edge2") is ProcState.PAUSED and sup.pid("edge2") == paused
        assert restart_counts(stack) == counts
    finally:
        # Paused, it would fail every later test's `up` ("is paused; resume it first").
        sup.resume("edge2")


async def test_a_rolling_restart_of_the_edges_under_load_delivers_every_event_once(
    stack: LocalStack,
) -> None:
    await running(stack)
    edges = stack.settings.edge_names
    counts = restart_counts(stack)
    url = f"{stack.settings.lb_url}/crm-events"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=auth(stack), connector=connector) as session:
        clients = [
            Client(url, f"client{i}", retry_s=ROLLING_RETRY_S).start(session)
            for i in range(ROLLING_CLIENTS)
        ]
        await eventually(
            lambda: all(c.part and len(c.deliveries) >= 20 for c in clients), 30, "streams"
        )
        before = {e: sum(c.part == e for c in clients) for e in edges}

        # A second's worth of events to every client before, for the baseline gap.
        t_base = time.monotonic()
        seen = [len(c.deliveries) for c in clients]
        await eventually(
            lambda: all(len(c.deliveries) >= n + RATE for c, n in zip(clients, seen, strict=True)),
            30,
            "a baseline of a second of events",
        )

        t_roll = time.monotonic()
        code, out = await stack.acli("restart", *edges)
        t_done = time.monotonic()
        assert code == 0, out
        steps = {m["name"]: m for m in RESTARTED.finditer(out)}
        assert sorted(steps) == edges, out
        assert all(stack.sup.pid(e) == int(steps[e]["new"]) for e in edges)

        # Every client back on a stream and reading after the last edge was ready.
        await eventually(
            lambda: all(c.node and c.arrivals[-1] > t_done for c in clients),
            3 * ROLLING_RETRY_S + 10,
            "every client streaming again",
        )
        t_after = time.monotonic()
        ends = await stop_producer_and_check(stack, clients)
        assert restart_counts(stack) == counts, "the watchdog restarted a part stopped on purpose"
        for client in clients:
            await client.stop()

    reconnects = [c.connects - 1 for c in clients]
    gaps = [c.max_gap_s(t_roll, t_after) for c in clients]
    resumes = [t for c in clients for t in c.resume_times_s]
    figures = {
        "rate_ev_s": RATE,
        "clients": ROLLING_CLIENTS,
        "client_retry_s": ROLLING_RETRY_S,
        "events_checked_per_client_max": max(len(c.deliveries) for c in clients),
        "topic_end": ends,
        "clients_per_edge_before": before,
        "clients_per_edge_after": {e: sum(c.part == e for c in clients) for e in edges},
        "rollout_s": round(t_done - t_roll, 2),
        "per_edge": {
            e: {"drain_s": float(steps[e]["stop"]), "ready_s": float(steps[e]["ready"])}
            for e in edges
        },
        "reconnects_total": sum(reconnects),
        "reconnects_per_client_max": max(reconnects),
        "clients_that_reconnected": sum(r > 0 for r in reconnects),
        "failed_attempts": sum(c.attempts - c.connects for c in clients),
        "max_gap_s": round(max(gaps), 2),
        "median_client_max_gap_s": round(statistics.median(gaps), 2),
        "baseline_max_gap_s": round(max(c.max_gap_s(t_base, t_roll) for c in clients), 3),
        "resume_s_max": round(max(resumes, default=0.0), 2),
    }
    print(f"\nrolling restart figures: {figures}")

    # Rolling: some edge served every attempt, and each client moved exactly once (its
    # edge's restart sent it to one already restarted or not restarted later). Every edge
    # was back within 10 s; no client waited much longer than its retry delay plus an edge's
    # restart.
    assert figures["failed_attempts"] == 0, [c.failures for c in clients if c.failures]
    assert reconnects == [1] * ROLLING_CLIENTS, figures
    assert all(float(steps[e]["stop"]) + float(steps[e]["ready"]) < 10 for e in edges), out
    assert max(gaps) < ROLLING_RETRY_S + 5, figures


async def test_down_stops_the_watchdog_first_then_every_part(stack: LocalStack) -> None:
    await running(stack, watchdog.NAME, *stack.settings.edge_names)
    sup = stack.sup
    watchdog_pid = sup.pid(watchdog.NAME)
    # Every `up` since the first had the same settings: it kept the first watchdog.
    assert watchdog_pid is not None and watchdog_pid == stack.watchdog_pid
    code, out = await stack.acli("down")
    assert code == 0, out
    assert out.startswith("[stack] stopped: watchdog, "), out
    assert gone(watchdog_pid)
    assert all(sup.state(n) is ProcState.STOPPED for n in stack.settings.part_names)
    assert watchdog.read_state(stack.run_dir) is None
