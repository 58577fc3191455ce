"""The servers under test, behind one interface: our edge (fed through the real path Kafka ->
ingest -> Redis -> edge), the naive baseline (same path, naive fan-out) and Centrifugo v6
(uni_sse, Redis engine, history on; fed through its HTTP publish API).

Each target starts its server pinned to the server core, everything it needs on the other
core, and publishes paced 256-byte events carrying their send time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaProducer

from devtools.probes import HttpReady
from devtools.supervisor import ProcessSpec, Supervisor
from shared.contract import RedisKeys, position_of
from tests.harness.backends import Backends
from tests.harness.cluster import Cluster, free_port

from .backends import PARTITIONS
from .tools import (
    OTHER_CORE,
    ROOT,
    SERVER_CORE,
    BenchError,
    centrifugo_path,
    cpu_seconds,
    cpu_split,
    pinned,
    python,
    rss_kb,
    say,
)

NOFILE = 65536
EVENT_TYPE = "ContactCreated"

# The edge's admission limits (connections per edge and per address, history requests per
# address) protect production; a capacity benchmark from 8 loopback addresses must not hit
# them. Centrifugo runs without such limits by default. Logs: warnings only.
BENCH_EDGE_ENV = {
    "CRM_EVENTS_LOG_LEVEL": "WARNING",
    "CRM_EVENTS_MAX_CONNECTIONS": "1000000",
    "CRM_EVENTS_MAX_CONNECTIONS_PER_IP": "1000000",
    "CRM_EVENTS_HISTORY_RATE_PER_S": "1000000",
    "CRM_EVENTS_HISTORY_BURST": "1000000",
}
CF_CHANNEL = "bench"


# Text that differs from event to event, like real CRM payloads (names, e-mails, ids),
# rather than one repeated character: Lua (ingest's Redis script) hashes long strings by
# sampling characters, so look-alike payloads would collide in its string table.
_RNG = random.Random(6)
_FILLER = bytes(_RNG.choice(b"abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(1 << 16))


def make_event(seq: int, size: int) -> bytes:
    """A producer event of exactly ``size`` bytes (when size allows) with its send time in
    microseconds. No ']' and no "offset" key: the load generator relies on both."""
    head = b'{"Type":"%s","Seq":%d,"bench_ts_us":%d,"pad":"' % (
        EVENT_TYPE.encode(),
        seq,
        time.time_ns() // 1000,
    )
    tail = b'"}'
    pad = max(0, size - len(head) - len(tail))
    start = (seq * 7919) % (len(_FILLER) - pad)
    return head + _FILLER[start : start + pad] + tail


TS_RE = re.compile(rb'"timestamp_ms":(\d+)')


def percentiles_ms(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = sorted(values)

    def pick(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))], 2)

    return {"count": len(v), "p50": pick(0.50), "p99": pick(0.99), "max": round(v[-1], 2)}


@dataclasses.dataclass
class Published:
    count: int
    seconds: float


class Target:
    """Common shape. ``name`` is edge, naive or centrifugo; ``mode`` the load generator's."""

    name: str = ""
    mode: str = "crm"
    path: str = "/crm-events"
    port: int = 0
    pid: int = 0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    async def open(self) -> None:
        """Start the asynchronous publishing side."""

    async def close(self) -> None:
        pass

    async def send(self, seq: int, size: int) -> Any:
        raise NotImplementedError

    async def publish(self, rate: float, duration_s: float, size: int, seq0: int = 0) -> Published:
        """Send ``rate * duration_s`` events, paced evenly; returns when all are acknowledged."""
        n = max(1, round(rate * duration_s))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        pending: list[Any] = []
        for i in range(n):
            delay = t0 + i / rate - loop.time()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            pending.append(await self.send(seq0 + i, size))
        await asyncio.gather(*pending)
        # The schedule spans n intervals of 1/rate (the last one is the quiet after the last
        # send); a late publisher shows up as a longer elapsed time.
        return Published(n, max(loop.time() - t0, n / rate))

    async def publish_burst(self, n: int, size: int, seq0: int = 0) -> None:
        pending = [await self.send(seq0 + i, size) for i in range(n)]
        await asyncio.gather(*pending)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def cpu_split(self) -> tuple[float, float]:
        return cpu_split(self.pid)

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def history_url(self) -> str:
        raise NotImplementedError


class CrmTarget(Target):
    """Our edge (``naive=False``) or the naive baseline, behind a private ingest."""

    def __init__(
        self,
        run_dir: Path,
        backends: Backends,
        naive: bool = False,
        server_pythonpath: str | None = None,
    ) -> None:
        self.server_pythonpath = server_pythonpath
        self.name = "naive" if naive else "edge"
        self.naive = naive
        self.run_dir = run_dir
        self.backends = backends
        self.cluster = Cluster(
            run_dir,
            backends,
            edges=1,
            with_nginx=False,
            env=BENCH_EDGE_ENV,
        )
        self.port = self.cluster.edge_ports[0]
        self._producer: AIOKafkaProducer | None = None
        self._server_name = "naive" if naive else "edge1"
        self._probe: asyncio.Task[None] | None = None
        self.pipeline_ms: list[float] = []
        """Kafka record timestamp -> Redis publish, per event, as seen by a subscriber on
        the live channel: the part of the end-to-end latency before any edge."""

    @property
    def sup(self) -> Supervisor:
        return self.cluster.sup

    def start(self) -> None:
        ingest = self.cluster.spec("ingest1")
        self.sup.start(
            dataclasses.replace(
                ingest,
                argv=pinned(ingest.argv, OTHER_CORE),
                env=self._env(ingest.env),
                cwd=self._cwd(),
            )
        )
        edge = self.cluster.spec("edge1")
        if self.naive:
            spec = ProcessSpec(
                name="naive",
                argv=pinned([python(), "-m", "bench.naive_edge"], SERVER_CORE, NOFILE),
                env=edge.env,
                cwd=ROOT,
                ready=HttpReady(f"http://127.0.0.1:{self.port}/healthz"),
                ready_timeout_s=30,
                port=self.port,
            )
        else:
            spec = dataclasses.replace(
                edge,
                argv=pinned(edge.argv, SERVER_CORE, NOFILE),
                cwd=self._cwd(),
                env=self._env(edge.env),
            )
        self.sup.start(spec)
        pid = self.sup.pid(self._server_name)
        if pid is None:
            raise BenchError(f"{self._server_name} did not start")
        self.pid = pid

    def _cwd(self) -> Path:
        # ``python -m`` puts the working directory first on sys.path: to let PYTHONPATH
        # override the checkout's packages, run from the (empty) run directory instead.
        if self.server_pythonpath:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            return self.run_dir
        return ROOT

    def _env(self, env: Mapping[str, str]) -> dict[str, str]:
        out = dict(env)
        if self.server_pythonpath:
            # A candidate optimisation, measured without touching the checkout.
            out["PYTHONPATH"] = self.server_pythonpath
        return out

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.sup.stop(self._server_name, timeout_s=15)
        self.cluster.stop()

    async def open(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.backends.kafka_bootstrap, acks=1, linger_ms=0
        )
        await self._producer.start()
        ready = asyncio.Event()
        self._probe = asyncio.create_task(self._pipeline_probe(ready))
        await asyncio.wait_for(ready.wait(), 10)

    @property
    def keys(self) -> RedisKeys:
        return RedisKeys(self.cluster.prefix)

    async def _pipeline_probe(self, ready: asyncio.Event) -> None:
        redis = self.cluster.redis()
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(*(self.keys.live(p) for p in range(PARTITIONS)))
            ready.set()
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is None:
                    continue
                now_ms = time.time() * 1000
                for m in TS_RE.finditer(msg["data"]):
                    self.pipeline_ms.append(now_ms - int(m.group(1)))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await redis.aclose()

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._probe
            self._probe = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def send(self, seq: int, size: int) -> Any:
        assert self._producer is not None
        return await self._producer.send(self.cluster.topic, make_event(seq, size))

    async def stored(self) -> tuple[int, list[int | None]]:
        """Events added to the partitions' streams so far, and per partition the offset of
        the newest one (None: none yet)."""
        redis = self.cluster.redis()
        added = 0
        newest: list[int | None] = []
        try:
            for partition in range(PARTITIONS):
                key = self.keys.stream(partition)
                try:
                    info = await redis.xinfo_stream(key)
                except Exception:  # noqa: BLE001 - no stream yet
                    newest.append(None)
                    continue
                added += int(info.get("entries-added", info.get("length", 0)))
                last = info.get("last-generated-id")
                if isinstance(last, str):
                    last = last.encode()
                # An entry's id is <offset+1>-0: its "ms" part is the position after it.
                newest.append(position_of(last) - 1 if last else None)
            return added, newest
        finally:
            await redis.aclose()

    async def wait_stored(self, count: int, timeout_s: float) -> list[int | None]:
        """Per partition, the newest offset, once ``count`` events are stored."""
        deadline = time.monotonic() + timeout_s
        while True:
            added, newest = await self.stored()
            if added >= count:
                return newest
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: only {added}/{count} events reached Redis")
            await asyncio.sleep(0.1)

    async def cursor_after(self, newest: list[int | None], timeout_s: float) -> str:
        """The edge's cursor after everything in ``newest`` (per partition, the newest
        offset), as a client gets it: a history page's ``next_after``, kept opaque. Waits
        until the edge's newest page ends with the newest stored event."""
        want = {(p, off) for p, off in enumerate(newest) if off is not None}
        url = f"http://127.0.0.1:{self.port}/crm-events/history?n=1"
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(url) as resp:
                    body = await resp.json() if resp.status == 200 else {}
                items = body.get("items") or []
                last = items[-1] if items else None
                if last is not None and (last["partition"], last["offset"]) in want:
                    cursor: str = body["next_after"]
                    return cursor
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name}: the edge's history does not show {want}")
                await asyncio.sleep(0.1)

    def history_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/crm-events/history?n=100"


def centrifugo_config(port: int, redis_url: str, prefix: str) -> dict[str, Any]:
    """The anchors' minimal v6 config, plus: log level warn, the health endpoint, and a
    recovery limit above the 1,000 events of scenario C (the default, 300, would refuse)."""
    return {
        "http_server": {"address": "127.0.0.1", "port": port},
        "log": {"level": "warn"},
        "usage_stats": {"disabled": True},
        "health": {"enabled": True},
        "engine": {"type": "redis", "redis": {"address": [redis_url], "prefix": prefix}},
        "client": {"insecure": True, "recovery_max_publication_limit": 10000},
        "http_api": {"insecure": True},
        "uni_sse": {"enabled": True},
        "channel": {
            "without_namespace": {
                "history_size": 10000,
                "history_ttl": "300s",
                "force_recovery": True,
            }
        },
    }


class CentrifugoTarget(Target):
    name = "centrifugo"
    mode = "cf"
    path = "/connection/uni_sse"

    def __init__(self, run_dir: Path, backends: Backends) -> None:
        binary = centrifugo_path()
        if not binary.exists():
            raise BenchError("Centrifugo is not built (bench/.build/bin/centrifugo)")
        self.binary = binary
        self.run_dir = run_dir
        self.backends = backends
        self.port = free_port()
        self.prefix = f"cfbench-{uuid.uuid4().hex[:10]}"
        self.sup = Supervisor(run_dir)
        self._session: aiohttp.ClientSession | None = None
        self._sem = asyncio.Semaphore(64)

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = self.run_dir / "centrifugo.json"
        config.write_text(
            json.dumps(centrifugo_config(self.port, self.backends.redis_url, self.prefix), indent=1)
        )
        spec = ProcessSpec(
            name="centrifugo",
            argv=pinned([str(self.binary), "--config", str(config)], SERVER_CORE, NOFILE),
            ready=HttpReady(f"http://127.0.0.1:{self.port}/health"),
            ready_timeout_s=30,
            port=self.port,
        )
        self.sup.start(spec)
        pid = self.sup.pid("centrifugo")
        if pid is None:
            raise BenchError("centrifugo did not start")
        self.pid = pid

    def stop(self) -> None:
        self.sup.stop("centrifugo", timeout_s=15)

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64), raise_for_status=True
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def api(self, method: str, payload: dict[str, Any]) -> dict[str, Any]:
        assert self._session is not None
        async with self._session.post(
            f"http://127.0.0.1:{self.port}/api/{method}", json=payload
        ) as resp:
            body: dict[str, Any] = await resp.json()
        if "error" in body:
            raise BenchError(f"centrifugo {method}: {body['error']}")
        return body

    async def _publish_one(self, seq: int, size: int) -> None:
        async with self._sem:
            assert self._session is not None
            # The timestamp is taken when the request is sent, not when it was queued.
            data = make_event(seq, size)
            body = b'{"channel":"%s","data":%s}' % (CF_CHANNEL.encode(), data)
            async with self._session.post(
                f"http://127.0.0.1:{self.port}/api/publish",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as resp:
                await resp.read()

    async def send(self, seq: int, size: int) -> Any:
        return asyncio.ensure_future(self._publish_one(seq, size))

    async def position(self) -> tuple[int, str]:
        body = await self.api("history", {"channel": CF_CHANNEL, "limit": 0})
        result = body.get("result", {})
        return int(result.get("offset", 0)), str(result.get("epoch", ""))

    async def wait_stored(self, count: int, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            offset, epoch = await self.position()
            if offset >= count:
                return epoch
            if time.monotonic() > deadline:
                raise BenchError(f"centrifugo: history offset {offset} < {count}")
            await asyncio.sleep(0.1)

    def history_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/history"


def make_target(
    kind: str, run_dir: Path, backends: Backends, server_pythonpath: str | None = None
) -> Target:
    say(f"starting {kind}")
    # A fresh directory per instance: a pidfile left by an earlier instance must never be
    # mistaken for this one's process.
    where = run_dir / f"{kind}-{uuid.uuid4().hex[:6]}"
    if kind == "centrifugo":
        return CentrifugoTarget(where, backends)
    if kind in ("edge", "naive"):
        return CrmTarget(
            where, backends, naive=kind == "naive", server_pythonpath=server_pythonpath
        )
    raise BenchError(f"unknown server {kind!r}")
