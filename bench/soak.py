"""``make soak``: the stack under a user's traffic for hours, memory sampled every minute.

Traffic (through the load balancer of the running stack, ``make up``):

* N SSE clients from the Go load generator (``bench/loadgen``), each closing its stream
  after a lifetime drawn from ``--life`` (a tab closed, a phone changing networks) and
  resuming 50-100 ms later with ``Last-Event-ID``, so the edges see thousands of
  reconnects an hour;
* events of ``--size`` bytes at ``--rate`` per second into the stack's topic, from this
  process (the stack's sample producer is stopped for the run and started again after).

The edges are restarted first (fresh processes running this checkout, with
``CRM_EVENTS_MEMORY_DIAGNOSTICS`` set to ``--diagnostics``) unless ``--keep-edges``.

Every ``--sample`` seconds one line goes to ``samples.jsonl``: each stack process's RSS;
per edge its pid, its caches' and ring's bytes, live client objects and connected clients
(``/metrics``) and, unless ``--diagnostics off``, the Python heap (allocated blocks, gc
objects by type, the small-object allocator's arenas, tracemalloc's sites) and glibc's
malloc figures (``/debug/memory``); the load generator's counters.

At the end the producer stops and every client must reach the last offset of every
partition (0 lost) with no gap, duplicate, reset or unparsable event on the way. The report
is written next to the samples: ``report.md`` (the verdict per edge, plateau or growth per
hour with the types or allocation sites that grew; a table), ``memory.svg`` (RSS and the
caches over time) and ``summary.json``. ``python -m bench.soak --report-only DIR`` rebuilds
them from a run's samples.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from bench.soak_report import write_report
from bench.tools import BenchError, Loadgen, build_loadgen, rss_kb, say
from devtools.producer import EventFactory, encode
from devtools.stack import Stack, StackSettings, dev_token

EDGE_GAUGES = {
    "crm_events_cache_bytes": "cache_bytes",
    "crm_events_replay_ring_bytes": "ring_bytes",
    "crm_events_client_objects": "client_objects",
    "crm_events_sse_clients": "sse_clients",
    "process_resident_memory_bytes": "rss_bytes",
}
FILLER_WORDS = (
    "renewal",
    "quarterly",
    "pipeline",
    "forecast",
    "onboarding",
    "escalation",
    "contract",
    "invoice",
    "discount",
    "territory",
    "champion",
    "procurement",
    "security",
    "review",
    "pilot",
    "rollout",
    "expansion",
    "churn",
    "risk",
    "stakeholder",
    "budget",
    "approval",
    "legal",
    "redline",
    "kickoff",
    "milestone",
    "handover",
)


@dataclass(frozen=True)
class SoakSettings:
    clients: int = 300
    rate: float = 100.0
    size: int = 256
    duration_s: float = 7200.0
    life_min_s: float = 60.0
    life_max_s: float = 240.0
    sample_s: float = 60.0
    diagnostics: str = "gc"
    sources: int = 8
    drain_timeout_s: float = 180.0
    keep_edges: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.clients >= 1, "--clients must be >= 1"),
            (self.rate > 0, "--rate must be > 0"),
            (64 <= self.size <= 65536, "--size must be in 64..65536"),
            (self.duration_s > 0, "--minutes must be > 0"),
            (0 < self.life_min_s <= self.life_max_s, "--life must be MIN-MAX with 0 < MIN <= MAX"),
            (self.sample_s >= 1, "--sample must be >= 1 second"),
            (self.diagnostics in ("off", "gc", "tracemalloc"), "--diagnostics: off|gc|tracemalloc"),
            (1 <= self.sources <= 250, "--sources must be in 1..250"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def padded_event(factory: EventFactory, rng: random.Random, size: int) -> tuple[bytes, bytes]:
    """An event of exactly ``size`` bytes of JSON: a realistic envelope (type, time, ids,
    tenant, aggregate) whose ``Data`` is a note of varied words, not one repeated character
    (look-alike strings behave differently in Redis's Lua string table). An envelope alone
    longer than ``size`` is sent as it is."""
    event = factory()
    event["Data"] = {"Note": ""}
    key, value = encode(event)
    room = size - len(value)
    if room > 0:
        words: list[str] = []
        length = 0
        while length <= room:  # the joined words (length - 1) cover the room
            word = rng.choice(FILLER_WORDS)
            words.append(word)
            length += len(word) + 1
        event["Data"] = {"Note": " ".join(words)[:room]}
        key, value = encode(event)
    return key, value


class Producer:
    """Events at a steady rate; remembers the newest offset written to each partition."""

    def __init__(self, bootstrap: str, topic: str, settings: SoakSettings) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.settings = settings
        self.sent = 0
        self.failed = 0
        self.last: dict[int, int] = {}

    def _done(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.failed += 1
            return
        meta = fut.result()
        if meta.offset > self.last.get(meta.partition, -1):
            self.last[meta.partition] = meta.offset

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(18)
        factory = EventFactory(rng)
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        try:
            await producer.start()
            t0 = time.monotonic()
            while not stop.is_set():
                due = t0 + self.sent / self.settings.rate
                delay = due - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    continue
                key, value = padded_event(factory, rng, self.settings.size)
                fut = await producer.send(self.topic, value, key=key)
                fut.add_done_callback(self._done)
                self.sent += 1
            await producer.flush()
        finally:
            await producer.stop()

    def expect_last(self, partitions: int) -> str:
        """The loadgen's ``expect_last``: per partition the newest offset, "-" for none."""
        return ",".join(str(self.last[p]) if p in self.last else "-" for p in range(partitions))


def _get(url: str, timeout: float = 10.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body: bytes = resp.read()
            return body
    except (OSError, http.client.HTTPException):  # URLError is an OSError
        return None


def rss_of(pid: int) -> int | None:
    """``rss_kb`` in bytes, None for a process that is gone or shows no resident set."""
    try:
        kb = rss_kb(pid)
    except (OSError, ValueError, IndexError):
        return None
    return kb * 1024 if kb else None


def edge_gauges(base_url: str) -> dict[str, Any]:
    body = _get(f"{base_url}/metrics")
    if body is None:
        return {}
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            name = EDGE_GAUGES.get(sample.name)
            if name is None:
                continue
            if "cache" in sample.labels:
                out.setdefault(name, {})[sample.labels["cache"]] = int(sample.value)
            else:
                out[name] = int(sample.value)
    return out


def edge_memory(base_url: str) -> dict[str, Any] | None:
    body = _get(f"{base_url}/debug/memory", timeout=30.0)
    if body is None:
        return None
    try:
        report: dict[str, Any] = json.loads(body)
    except ValueError:
        return None
    return report


class Soak:
    def __init__(self, settings: SoakSettings, out_dir: Path) -> None:
        self.settings = settings
        self.out_dir = out_dir
        self.stack_settings = StackSettings.from_env(os.environ)
        self.stack = Stack(self.stack_settings)
        self.edges = {
            name: self.stack_settings.edge_url(port)
            for name, port in zip(
                self.stack_settings.edge_names, self.stack_settings.edge_ports, strict=True
            )
        }

    def _running(self) -> dict[str, int]:
        return {s.name: s.pid for s in self.stack.status() if s.pid is not None}

    def _check_stack(self) -> None:
        running = self._running()
        missing = [n for n in ("kafka", "ingest", "nginx", *self.edges) if n not in running]
        if missing:
            raise BenchError(f"the stack is not up ({', '.join(missing)} not running): make up")

    def _restart_edges(self) -> None:
        """Fresh edges with the run's diagnostics: every soak starts from the same state
        (and runs the checkout's code), unless --keep-edges measures the running ones."""
        mode = self.settings.diagnostics
        if self.settings.keep_edges:
            have = [edge_memory(url) for url in self.edges.values()]
            if mode == "off" or all(r is not None and r.get("mode") == mode for r in have):
                return
            raise BenchError(
                f"--keep-edges: the edges do not run with CRM_EVENTS_MEMORY_DIAGNOSTICS={mode}"
            )
        say(f"restarting the edges (CRM_EVENTS_MEMORY_DIAGNOSTICS={mode})")
        os.environ["CRM_EVENTS_MEMORY_DIAGNOSTICS"] = mode
        # Specs read the environment when they start a process: build them again.
        Stack(self.stack_settings).restart(list(self.edges))

    def sample(self, t0: float, loadgen: Loadgen, producer: Producer) -> dict[str, Any]:
        running = self._running()
        line: dict[str, Any] = {
            "t_s": round(time.monotonic() - t0, 1),
            "unix": time.time(),
            "rss_bytes": {name: rss_of(pid) for name, pid in running.items()},
            "produced": producer.sent,
            "produce_failed": producer.failed,
        }
        edges: dict[str, Any] = {}
        for name, url in self.edges.items():
            edge: dict[str, Any] = {"pid": running.get(name), **edge_gauges(url)}
            if self.settings.diagnostics != "off":
                memory = edge_memory(url)
                if memory is not None:
                    edge["python"] = memory.get("python")
                    edge["malloc"] = memory.get("malloc")
                    if "tracemalloc" in memory:
                        edge["tracemalloc"] = memory["tracemalloc"]
            edges[name] = edge
        line["edges"] = edges
        try:
            stats = loadgen.stats()
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # Recorded; the end's check tells what it meant for delivery.
            line["loadgen"] = {"error": str(exc)}
            return line
        line["loadgen"] = {
            k: stats.get(k)
            for k in (
                "connected",
                "events",
                "gaps",
                "dups",
                "resets",
                "drops",
                "disconnects",
                "ended",
                "connect_fail",
                "parse_errors",
                "http_errors",
                "last_error",
                "rss_kb",
            )
        }
        return line

    async def run(self) -> dict[str, Any]:
        s = self.settings
        # Ctrl-C or SIGTERM ends the sampling early but still drains, checks and reports.
        self.interrupted = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, self.interrupted.set)
        self._check_stack()
        self._restart_edges()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "settings.json").write_text(json.dumps(asdict(s), indent=2) + "\n")
        binary = build_loadgen()
        control = f"127.0.0.1:{_free_port()}"
        loadgen = Loadgen(control)
        stop = asyncio.Event()
        producer = Producer(self.stack_settings.kafka_bootstrap, self.stack_settings.kafka_topic, s)
        producer_was_running = "producer" in self._running()
        proc: subprocess.Popen[bytes] | None = None
        try:
            if producer_was_running:
                say("stopping the stack's sample producer for the run")
                self.stack.stop(["producer"])
            proc = self._start_loadgen(binary, control)
            await _wait_http(f"http://{control}/healthz", 15.0)
            produce = asyncio.create_task(producer.run(stop))
            batch = loadgen.connect(
                s.clients,
                rate=max(1, int(s.clients / 10)),
                reconnect="resume",
                life_min_ms=int(s.life_min_s * 1000),
                life_max_ms=int(s.life_max_s * 1000),
            )
            await asyncio.to_thread(loadgen.wait_connected, s.clients, 120.0)
            say(
                f"soak: {s.clients} clients, {s.rate:g} events/s of {s.size} B, streams live "
                f"{s.life_min_s:g}-{s.life_max_s:g} s, {s.duration_s / 60:g} min; "
                f"samples to {self.out_dir / 'samples.jsonl'}"
            )
            t0 = time.monotonic()
            with (self.out_dir / "samples.jsonl").open("w") as samples:
                n = 0
                while True:
                    line = await asyncio.to_thread(self.sample, t0, loadgen, producer)
                    samples.write(json.dumps(line) + "\n")
                    samples.flush()
                    _progress(line)
                    if produce.done():
                        produce.result()  # a producer that failed fails the run
                    n += 1
                    due = t0 + n * s.sample_s
                    if due > t0 + s.duration_s + 0.5 or self.interrupted.is_set():
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self.interrupted.wait(), max(0.0, due - time.monotonic())
                        )
            stop.set()
            await produce
            final = await self._drain(loadgen, producer, batch)
        finally:
            stop.set()
            if proc is not None:
                loadgen.quit()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if producer_was_running:
                with contextlib.suppress(Exception):
                    self.stack.start(["producer"])
        final["produced"] = producer.sent
        final["produce_failed"] = producer.failed
        (self.out_dir / "final.json").write_text(json.dumps(final, indent=2) + "\n")
        return write_report(self.out_dir)

    def _start_loadgen(self, binary: Path, control: str) -> subprocess.Popen[bytes]:
        s = self.settings
        lb = self.stack_settings.lb_url.removeprefix("http://").rstrip("/")
        token = dev_token(self.stack_settings, 2 * s.duration_s + 3600)
        with (self.out_dir / "loadgen.log").open("wb") as log:
            return subprocess.Popen(
                [str(binary), "-control", control, "-target", lb, "-sources", str(s.sources)],
                env={**os.environ, "LOADGEN_BEARER": token},
                stdout=subprocess.DEVNULL,
                stderr=log,
                # Its own session: a Ctrl-C at the terminal is the harness's to handle (it
                # drains and reports), not a signal that kills the load generator mid-run.
                start_new_session=True,
            )

    async def _drain(self, loadgen: Loadgen, producer: Producer, batch: int) -> dict[str, Any]:
        """Every client must reach the newest offset of every partition (none lost)."""
        partitions = max(producer.last, default=-1) + 1
        expect = producer.expect_last(partitions)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        stats: dict[str, Any] = {}
        at = 0
        while True:
            try:
                stats = await asyncio.to_thread(loadgen.stats, batch=batch, expect_last=expect)
                at = int(stats["batch"]["expect_last_seen"])
            except (OSError, ValueError, KeyError, http.client.HTTPException) as exc:
                say(f"asking the load generator failed ({exc}); asking again")
            if at >= self.settings.clients or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        if not stats:
            raise BenchError("the load generator never answered at the end: no verdict")
        return {
            "expect_last": expect,
            "clients": self.settings.clients,
            "clients_caught_up": at,
            "gaps": stats["gaps"],
            "dups": stats["dups"],
            "resets": stats["resets"],
            "parse_errors": stats["parse_errors"],
            "ended": stats["ended"],
            "connect_fail": stats["connect_fail"],
            "drops": stats["drops"],
            "events": stats["events"],
            "http_errors": stats["http_errors"],
        }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while await asyncio.to_thread(_get, url, 2.0) is None:
        if time.monotonic() > deadline:
            raise BenchError(f"{url} did not answer in {timeout_s:.0f} s")
        await asyncio.sleep(0.2)


def _progress(line: dict[str, Any]) -> None:
    rss = ", ".join(
        f"{name} {(line['rss_bytes'].get(name) or 0) / 1e6:.1f} MB" for name in line["edges"]
    )
    lg = line["loadgen"]
    if "error" in lg:
        say(f"t={line['t_s'] / 60:5.1f} min  {rss}  load generator: {lg['error']}")
        return
    say(
        f"t={line['t_s'] / 60:5.1f} min  {rss}  clients {lg['connected']}  "
        f"events {lg['events']}  gaps {lg['gaps']} dups {lg['dups']} drops {lg['drops']}"
    )


def _life(text: str) -> tuple[float, float]:
    low, sep, high = text.partition("-")
    try:
        return float(low), float(high if sep else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX seconds, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--clients", type=int, default=SoakSettings.clients)
    parser.add_argument("--rate", type=float, default=SoakSettings.rate, help="events per second")
    parser.add_argument("--size", type=int, default=SoakSettings.size, help="bytes per event")
    parser.add_argument("--minutes", type=float, default=SoakSettings.duration_s / 60)
    parser.add_argument(
        "--life", type=_life, default=(60.0, 240.0), help="stream lifetime, MIN-MAX seconds"
    )
    parser.add_argument("--sample", type=float, default=SoakSettings.sample_s, help="seconds")
    parser.add_argument(
        "--diagnostics",
        default="gc",
        choices=("off", "gc", "tracemalloc"),
        help="the edges' CRM_EVENTS_MEMORY_DIAGNOSTICS for the run (gc: cheap; tracemalloc: "
        "allocation sites, slower and inflates RSS)",
    )
    parser.add_argument("--sources", type=int, default=SoakSettings.sources)
    parser.add_argument(
        "--keep-edges",
        action="store_true",
        help="measure the running edges as they are (default: restart them first)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default run/soak/<time>)")
    parser.add_argument("--report-only", type=Path, metavar="DIR", help="rebuild DIR's report")
    args = parser.parse_args(argv)
    if args.report_only is not None:
        summary = write_report(args.report_only)
        print(json.dumps(summary["verdicts"], indent=2))
        return 0
    try:
        settings = SoakSettings(
            clients=args.clients,
            rate=args.rate,
            size=args.size,
            duration_s=args.minutes * 60,
            life_min_s=args.life[0],
            life_max_s=args.life[1],
            sample_s=args.sample,
            diagnostics=args.diagnostics,
            sources=args.sources,
            keep_edges=args.keep_edges,
        )
    except ValueError as exc:
        parser.error(str(exc))
    out = args.out or Path("run/soak") / time.strftime("%Y%m%d-%H%M%S")
    try:
        summary = asyncio.run(Soak(settings, out).run())
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
