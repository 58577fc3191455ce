"""HAProxy as the load balancer: what its configuration promises, checked on real processes.

Delivery, resume, history and errors through HAProxy are in test_pipeline.py (parametrised
over both load balancers), and kill -9 of an edge behind it in test_faults.py. Here: the
stream timeouts and keepalives, the client address the edges see, leastconn, and the
latency of a lone event, measured (and reported, not asserted: timings belong to benchmarks).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from devtools import haproxy_conf, nginx_conf
from devtools.probes import HttpReady
from devtools.supervisor import ProcessSpec
from tests.harness.backends import Backends
from tests.harness.cluster import LOAD_BALANCERS, Cluster, LoadBalancer, crm_event, free_port
from tests.sse_client import Collector, frames
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _cluster(
    tmp_path_factory: pytest.TempPathFactory, backends: Backends, name: str, **kwargs: object
) -> Cluster:
    return Cluster(Path(tmp_path_factory.mktemp(name)), backends, **kwargs)  # type: ignore[arg-type]


async def _edge_clients(cluster: Cluster, session: aiohttp.ClientSession, i: int) -> int:
    async with session.get(cluster.edge_url(i, "/readyz")) as resp:
        return int((await resp.json())["clients"])


async def _node_of_new_stream(cluster: Cluster, session: aiohttp.ClientSession) -> Collector:
    """Open a stream through the load balancer; return it once it has named its edge."""
    stream = Collector(cluster.lb_url("/crm-events")).start(session)
    await stream.wait_for(lambda c: c.node is not None, 10, "the stream to name its edge")
    return stream


# -- timeouts and keepalives ---------------------------------------------------------------


class ShortTimeoutCluster(Cluster):
    """HAProxy giving up an idle stream after 2 s, in front of edges that ping every 0.5 s."""

    STREAM_TIMEOUT_S = 2

    def _haproxy_config(self, out: Path) -> Path:
        return haproxy_conf.render(
            out, self.lb_port, self.edge_ports, stream_timeout_s=self.STREAM_TIMEOUT_S
        )


@pytest.fixture(scope="module")
def short_timeout_cluster(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    c = ShortTimeoutCluster(
        Path(tmp_path_factory.mktemp("haproxy-timeouts")),
        backends,
        edges=1,
        lb="haproxy",
        env={"CRM_EVENTS_SSE_PING_INTERVAL_S": "0.5"},
    )
    with c.running():
        yield c


async def test_keepalives_hold_an_idle_stream_past_the_timeout_and_a_hung_edge_is_cut(
    short_timeout_cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    c = short_timeout_cluster
    stream = Collector(c.lb_url("/crm-events")).start(session)
    await stream.wait_for(lambda s: s.node is not None, 10, "the stream to open")
    # Ten keepalives are 5 s without an event: more than twice HAProxy's 2 s idle limit, so
    # the stream is alive only because each keepalive resets HAProxy's client and server timers.
    await stream.wait_for(
        lambda s: s.comments.count("ping") >= 10 or s.ended.is_set(), 30, "ten keepalives"
    )
    assert not stream.ended.is_set(), "HAProxy cut an idle stream that had keepalives"
    assert stream.comments.count("ping") >= 10
    # A hung edge (SIGSTOP: its socket stays open, nothing comes) is given up by the server
    # timeout, so the browser reconnects elsewhere instead of waiting forever.
    c.pause("edge1")
    try:
        await eventually(stream.ended.is_set, 30, "HAProxy to give up the hung edge")
    finally:
        c.resume("edge1")
    # The edge is fine after SIGCONT: a new stream through HAProxy still gets events.
    again = Collector(c.lb_url("/crm-events")).start(session)
    await again.wait_for(lambda s: s.node is not None, 10, "a new stream")
    await c.produce([(b"k", crm_event(1))])
    await again.wait_for(lambda s: len(s.data_frames) >= 1, 30, "an event on the new stream")
    await again.stop()
    await stream.stop()


# -- the client's address -------------------------------------------------------------------


@pytest.fixture(scope="module", params=LOAD_BALANCERS)
def limited_cluster(
    request: pytest.FixtureRequest, backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """One edge allowing one stream per client address, with keepalives so rare (300 s)
    that only a proxy passing the client's close on can free a stream in time."""
    lb: LoadBalancer = request.param
    c = _cluster(
        tmp_path_factory,
        backends,
        f"limited-{lb}",
        edges=1,
        lb=lb,
        env={
            "CRM_EVENTS_MAX_CONNECTIONS_PER_IP": "1",
            "CRM_EVENTS_SSE_PING_INTERVAL_S": "300",
        },
    )
    with c.running():
        yield c


@pytest.fixture
async def from_127_0_0_2() -> AsyncIterator[aiohttp.ClientSession]:
    """A client at 127.0.0.2 (all of 127.0.0.0/8 is loopback): not a trusted proxy, as a
    browser's address would not be."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    ) as s:
        yield s


async def test_edges_limit_per_client_address_behind_the_load_balancer(
    limited_cluster: Cluster, from_127_0_0_2: aiohttp.ClientSession
) -> None:
    """The edges trust 127.0.0.1 as their proxy, so their per-address limit must key on the
    address the load balancer saw, not on the balancer's own."""
    c = limited_cluster
    held = Collector(c.lb_url("/crm-events")).start(from_127_0_0_2)
    await held.wait_for(lambda s: s.node is not None, 10, "the first stream")
    try:
        # Same address again, claiming another one in X-Forwarded-For: still the same
        # client. (A proxy that added a second X-Forwarded-For line after the client's
        # would let this one through.)
        async with from_127_0_0_2.get(
            c.lb_url("/crm-events"), headers={"X-Forwarded-For": "127.0.0.9"}
        ) as resp:
            assert resp.status == 429, f"{resp.status}: the edge believed the client's header"
            assert (await resp.json())["error"] == "too_many_connections"
        # Another address has its own allowance.
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(local_addr=("127.0.0.3", 0))
            ) as other_ip,
            other_ip.get(c.lb_url("/crm-events")) as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
    finally:
        await held.stop()


async def test_a_closed_stream_is_freed_on_the_edge_at_once(
    limited_cluster: Cluster, from_127_0_0_2: aiohttp.ClientSession
) -> None:
    """A browser that closes its tab (or reloads) must not leave its stream open on the edge
    until the next keepalive (here 300 s away): it would hold the client's only slot, and
    the reload would get a 429. HAProxy passes the close on only with abortonclose."""
    c = limited_cluster

    async def opens() -> Collector | None:
        stream = Collector(c.lb_url("/crm-events")).start(from_127_0_0_2)
        await stream.wait_for(lambda s: s.node is not None or s.ended.is_set(), 10, "an answer")
        if stream.status == 200 and not stream.ended.is_set():
            return stream
        await stream.stop()  # 429: the previous stream still holds the slot
        return None

    for attempt in range(3):
        # Each attempt needs the slot the one before released; noticing takes a moment,
        # never the 300 s until the edge's next write would find the connection gone.
        stream: Collector | None = await eventually(
            opens, 10, f"stream {attempt} (the previous one's slot)"
        )
        assert stream is not None
        await stream.stop()


# -- leastconn ------------------------------------------------------------------------------


async def test_leastconn_sends_new_streams_to_a_restarted_edge(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory, session: aiohttp.ClientSession
) -> None:
    """Streams last for hours: an edge that comes back empty must take the new streams until
    it has caught up. Round robin would alternate, and the imbalance would stay."""
    c = _cluster(tmp_path_factory, backends, "leastconn", edges=2, lb="haproxy")
    with c.running():
        c.stop("edge1")
        old = [await _node_of_new_stream(c, session) for _ in range(4)]
        assert {s.node for s in old} == {"edge-2"}
        await asyncio.to_thread(c.start, "edge1")

        # Until HAProxy's health check has seen edge1 come back, streams still go to edge2.
        async def lands_on_edge1() -> bool:
            probe = await _node_of_new_stream(c, session)
            await probe.stop()
            return probe.node == "edge-1"

        await eventually(lands_on_edge1, 20, "HAProxy to send a stream to the restarted edge")
        for edge, streams in ((1, 0), (2, 4)):
            await eventually(
                lambda edge=edge, streams=streams: _equals(
                    _edge_clients(c, session, edge), streams
                ),
                10,
                f"edge{edge} back to {streams} streams once the probes closed",
            )
        new = [await _node_of_new_stream(c, session) for _ in range(3)]
        assert [s.node for s in new] == ["edge-1"] * 3, "leastconn fills the emptier edge first"
        for s in old + new:
            await s.stop()


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


# -- lone-event latency ----------------------------------------------------------------------


async def _arrivals(
    session: aiohttp.ClientSession, url: str, seen: dict[int, float], opened: asyncio.Event
) -> None:
    """Read one stream and note when each event (by Seq) arrived."""
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=None)) as resp:
        assert resp.status == 200, f"{url}: {resp.status}"
        opened.set()
        async for frame in frames(resp):
            if frame.event == "message":
                seq = frame.json()["event"]["Seq"]
                assert seq not in seen, f"{url}: event {seq} twice"
                seen[seq] = time.perf_counter()


async def test_lone_event_latency_through_each_load_balancer(
    backends: Backends,
    tmp_path_factory: pytest.TempPathFactory,
    session: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
    record_property: Callable[[str, object], None],
) -> None:
    """One event at a time, to a client on the edge itself and one through each balancer:
    every event reaches every client once, and the delay each path adds is reported.
    HAProxy without ``option http-no-delay`` is measured too, to show what the option saves."""
    c = _cluster(tmp_path_factory, backends, "latency", edges=1, lb="haproxy")
    extra: list[ProcessSpec] = []
    nginx_port, delayed_port = free_port(), free_port()
    nginx_main = nginx_conf.render(c.run_dir / "nginx", nginx_port, c.edge_ports)
    extra.append(
        ProcessSpec(
            name="nginx",
            argv=nginx_conf.nginx_argv(nginx_main),
            ready=HttpReady(f"http://127.0.0.1:{nginx_port}/nginx-health"),
            ready_timeout_s=20,
            port=nginx_port,
        )
    )
    delayed = haproxy_conf.render(
        c.run_dir / "haproxy-delayed", delayed_port, c.edge_ports, http_no_delay=False
    )
    extra.append(
        ProcessSpec(
            name="haproxy-delayed",
            argv=haproxy_conf.haproxy_argv(delayed),
            ready=HttpReady(f"http://127.0.0.1:{delayed_port}{haproxy_conf.HEALTH_PATH}"),
            ready_timeout_s=20,
            port=delayed_port,
        )
    )
    paths = {
        "edge (direct)": c.edge_url(1, "/crm-events"),
        "nginx": f"http://127.0.0.1:{nginx_port}/crm-events",
        "haproxy": c.lb_url("/crm-events"),
        "haproxy, no http-no-delay": f"http://127.0.0.1:{delayed_port}/crm-events",
    }
    with c.running():
        producer = AIOKafkaProducer(
            bootstrap_servers=backends.kafka_bootstrap, acks="all", linger_ms=0
        )
        readers: list[asyncio.Task[None]] = []
        try:
            for spec in extra:
                await asyncio.to_thread(c.sup.start, spec)
            await producer.start()
            seen: dict[str, dict[int, float]] = {name: {} for name in paths}
            for name, url in paths.items():
                opened = asyncio.Event()
                readers.append(asyncio.create_task(_arrivals(session, url, seen[name], opened)))
                await eventually(opened.is_set, 10, f"{name}: stream open")

            async def everyone_has(seq: int) -> bool:
                for task in readers:
                    if task.done():
                        task.result()  # a reader that failed fails the test with its reason
                        raise AssertionError("a stream ended")
                return all(seq in s for s in seen.values())

            # A first event proves each stream is attached before anything is timed.
            await producer.send_and_wait(c.topic, crm_event(0), key=b"lone")
            await eventually(lambda: everyone_has(0), 30, "the warm-up event on every stream")
            sent: dict[int, float] = {}
            events = 20
            for seq in range(1, events + 1):
                sent[seq] = time.perf_counter()
                await producer.send_and_wait(c.topic, crm_event(seq), key=b"lone")
                # Lone: the next event leaves only when this one reached every client.
                await eventually(lambda seq=seq: everyone_has(seq), 30, f"event {seq} everywhere")
            for name in paths:
                assert sorted(seen[name]) == list(range(events + 1)), name
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await producer.stop()
            for spec in reversed(extra):
                c.sup.stop(spec.name)

    lines = ["lone-event latency, Kafka send -> SSE frame (ms), 20 events:"]
    direct = statistics.median(seen["edge (direct)"][s] - sent[s] for s in sent) * 1000
    for name in paths:
        ms = sorted((seen[name][s] - sent[s]) * 1000 for s in sent)
        median = statistics.median(ms)
        p90 = ms[int(0.9 * (len(ms) - 1))]
        lines.append(
            f"  {name:<27} median {median:7.1f}  p90 {p90:7.1f}  max {ms[-1]:7.1f}"
            f"  ({median - direct:+.1f} over direct)"
        )
        record_property(f"lone_event_median_ms[{name}]", round(median, 1))
    with capsys.disabled():
        print("\n" + "\n".join(lines))
