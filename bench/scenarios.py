"""Scenarios A-E. Each function starts what it needs, measures, stops it, and returns a
JSON-ready dict. Servers run pinned to the server core; the load generator, the publisher
(this process), ingest (except in D), Kafka and Redis share the other core."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from devtools.probes import HttpReady
from devtools.supervisor import ProcessSpec, Supervisor
from shared.contract import RedisKeys
from tests.harness.backends import Backends
from tests.harness.cluster import Cluster, free_port

from .backends import PARTITIONS
from .profiles import Profile
from .servers import (
    BENCH_EDGE_ENV,
    CentrifugoTarget,
    CrmTarget,
    Target,
    make_event,
    make_target,
    percentiles_ms,
)
from .tools import (
    OTHER_CORE,
    SERVER_CORE,
    BenchError,
    Loadgen,
    build_loadgen,
    core_times,
    cpu_seconds,
    listener_pid,
    nofile_limit,
    pinned,
    say,
)

T = TypeVar("T")
LOADGEN_NOFILE = 65536
DRAIN_STALL_S = 1.5
NOISY_PCT = 15.0


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking helper (load generator control, supervisor) off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


class Bench:
    """Shared state of one run: where processes live, the backends, the profile."""

    def __init__(self, run_dir: Path, backends: Backends, profile: Profile) -> None:
        self.run_dir = run_dir
        self.backends = backends
        self.profile = profile
        self.sup = Supervisor(run_dir / "tools")
        self.loadgen_bin = build_loadgen()
        self.pyspy_dir: Path | None = None
        self.server_pythonpath: str | None = None
        self._n = 0
        self.max_clients = nofile_limit(LOADGEN_NOFILE) - 200

    def clients(self, n: int) -> int:
        """Client count clamped to what one process's RLIMIT_NOFILE allows."""
        return min(n, self.max_clients)

    @contextlib.asynccontextmanager
    async def loadgen(self, target: Target) -> AsyncIterator[Loadgen]:
        self._n += 1
        name = f"loadgen{self._n}"
        port = free_port()
        spec = ProcessSpec(
            name=name,
            argv=pinned(
                [
                    str(self.loadgen_bin),
                    "-control",
                    f"127.0.0.1:{port}",
                    "-target",
                    target.target,
                    "-path",
                    target.path,
                    "-mode",
                    target.mode,
                    "-procs",
                    "1",
                    "-nofile",
                    str(LOADGEN_NOFILE),
                ],
                OTHER_CORE,
                LOADGEN_NOFILE,
            ),
            ready=HttpReady(f"http://127.0.0.1:{port}/healthz"),
            ready_timeout_s=15,
            port=port,
        )
        await call(self.sup.start, spec)
        lg = Loadgen(f"127.0.0.1:{port}")
        try:
            yield lg
        finally:
            await call(lg.quit)
            await call(self.sup.stop, name, 5.0)

    @contextlib.asynccontextmanager
    async def target(self, kind: str) -> AsyncIterator[Target]:
        target = make_target(kind, self.run_dir, self.backends, self.server_pythonpath)
        try:
            await call(target.start)
            await target.open()
            yield target
        finally:
            await target.close()
            await call(target.stop)

    @contextlib.asynccontextmanager
    async def pyspy(self, pid: int, label: str) -> AsyncIterator[None]:
        """py-spy record of ``pid`` while the block runs, when --pyspy DIR was given."""
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if self.pyspy_dir is None or not shutil.which(exe):
            yield
            return
        procs, outs = await call(_start_pyspy, exe, pid, self.pyspy_dir, label)
        try:
            yield
        finally:
            await call(_stop_pyspy, procs)
            say(f"py-spy profile: {', '.join(str(o) for o in outs)}")


def _start_pyspy(
    exe: str, pid: int, out_dir: Path, label: str
) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    """A flame graph (SVG) and collapsed stacks (text) of ``pid``, sampled at 200 Hz."""
    out_dir.mkdir(parents=True, exist_ok=True)
    procs, outs = [], []
    for fmt, ext in (("flamegraph", "svg"), ("raw", "txt")):
        out = out_dir / f"{label}.{ext}"
        outs.append(out)
        argv = [exe, "record", "--nonblocking", "-p", str(pid), "-r", "200", "-f", fmt, "-o"]
        argv.append(str(out))
        procs.append(
            subprocess.Popen(
                pinned(argv, OTHER_CORE), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
    return procs, outs


def _stop_pyspy(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def _cpu_or_zero(pid: int | None) -> float:
    try:
        return cpu_seconds(pid) if pid else 0.0
    except OSError:
        return 0.0


def _lat_ms(stats: dict[str, Any]) -> dict[str, float]:
    lat = stats["latency_us"]
    return {k: round(lat[k] / 1000.0, 2) for k in ("p50", "p90", "p95", "p99", "p999", "max")}


async def _drain(lg: Loadgen, expected: int, timeout_s: float) -> dict[str, Any]:
    """Wait until ``expected`` events arrived in this window, or nothing arrives for a while,
    or the timeout; returns the window's stats (and starts a new window)."""
    deadline = time.monotonic() + timeout_s
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        s = await call(lg.stats)
        if s["events"] >= expected:
            break
        if s["events"] != last:
            last, last_change = s["events"], time.monotonic()
        elif time.monotonic() - last_change > DRAIN_STALL_S:
            break
        await asyncio.sleep(0.05)
    return await call(lg.stats, True)


async def _quiesce(lg: Loadgen, n: int, timeout_s: float = 30.0) -> int:
    """Back to ``n`` open streams (after slow disconnects) and no events in flight."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = await call(lg.stats, True)
        await asyncio.sleep(0.5)
        s = await call(lg.stats)
        if s["connected"] >= n and s["events"] == 0:
            return int(s["connected"])
    return int((await call(lg.stats))["connected"])


# -- A: broadcast fan-out -----------------------------------------------------------------------


async def a_step(
    bench: Bench, target: Target, lg: Loadgen, n: int, rate: float, seq0: int
) -> dict[str, Any]:
    prof = bench.profile
    connected = await _quiesce(lg, n)
    await call(lg.stats, True)
    if isinstance(target, CrmTarget):
        target.pipeline_ms.clear()
    cpu0 = target.cpu()
    busy0, total0 = core_times(SERVER_CORE)
    pub = await target.publish(rate, prof.a_step_s, prof.event_size, seq0)
    expected = pub.count * connected
    s = await _drain(lg, expected, timeout_s=max(3.0, prof.a_step_s))
    server_cpu = target.cpu() - cpu0
    busy1, total1 = core_times(SERVER_CORE)
    foreign = max(0.0, (busy1 - busy0) - server_cpu) / max(total1 - total0, 1e-9)
    delivered = int(s["events"])
    lat = _lat_ms(s)
    loss = max(0, expected - delivered)
    reasons = []
    if loss:
        reasons.append(f"lost {loss}")
    if s["gaps"]:
        reasons.append(f"gaps {s['gaps']}")
    if s["dups"]:
        reasons.append(f"dups {s['dups']}")
    if s["disconnects"] or s["ended"]:
        reasons.append(f"{s['disconnects'] + s['ended']} disconnects")
    if connected < n:
        reasons.append(f"only {connected}/{n} connected")
    if lat["p99"] > prof.capacity_p99_ms:
        reasons.append(f"p99 {lat['p99']} ms > {prof.capacity_p99_ms:g} (not keeping up)")
    sustained = not reasons
    if lat["p99"] > prof.p99_limit_ms:
        reasons.append(f"p99 {lat['p99']} ms > {prof.p99_limit_ms:g}")
    seconds = max(pub.seconds, 1e-9)
    return {
        "event_rate": round(pub.count / seconds, 1),
        "target_rate": round(rate, 2),
        "published": pub.count,
        "publish_s": round(pub.seconds, 3),
        "clients": connected,
        "expected": expected,
        "delivered": delivered,
        "deliveries_per_s": round(delivered / (seconds if not loss else s["window_s"])),
        "loss": loss,
        "gaps": s["gaps"],
        "dups": s["dups"],
        "disconnects": s["disconnects"],
        "latency_ms": lat,
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_pct": round(100 * server_cpu / max(s["window_s"], 1e-9), 1),
        "loadgen_cpu_s": round(s["window_cpu_s"], 3),
        "loadgen_cpu_pct": round(100 * s["window_cpu_s"] / max(s["window_s"], 1e-9), 1),
        "other_cpu_on_server_core_pct": round(100 * foreign, 1),
        "window_s": round(s["window_s"], 3),
        "bytes": s["bytes"],
        "pipeline_ms": (
            percentiles_ms(target.pipeline_ms) if isinstance(target, CrmTarget) else None
        ),
        "sustained": sustained,
        "passed": not reasons,
        "why": "; ".join(reasons),
    }


def _noisy(step: dict[str, Any]) -> bool:
    """Other processes took a real share of the server core while it was busy (they may
    use what the server leaves idle: that costs it nothing)."""
    others = step["other_cpu_on_server_core_pct"]
    return bool(others > NOISY_PCT and others + step["server_cpu_pct"] > 90.0)


def _next_rate(steps: list[dict[str, Any]], prof: Profile, start: float) -> float | None:
    """Double the event rate while the server keeps up (no loss, p99 under the capacity
    bound), then bisect (geometrically) between the best sustained and the lowest failing
    rate ``a_refine`` times. The p99 ≤ 100 ms criterion is read off the same steps."""
    if not steps:
        return start
    passed = [s["target_rate"] for s in steps if s["sustained"]]
    failed = [s["target_rate"] for s in steps if not s["sustained"]]
    if not failed:
        return float(max(passed)) * 2
    if not passed:
        return min(failed) / 2 if len(failed) < 3 else None
    lo = max(passed)
    above = [f for f in failed if f > lo]
    if not above:
        return float(lo) * 2
    hi = min(above)
    first_fail = next(i for i, s in enumerate(steps) if not s["sustained"])
    if len(steps) - 1 - first_fail >= prof.a_refine or hi / lo < 1.12:
        return None
    return math.sqrt(lo * hi)


async def scenario_a_series(bench: Bench, kind: str, n: int) -> dict[str, Any]:
    prof = bench.profile
    n = bench.clients(n)
    async with bench.target(kind) as target, bench.loadgen(target) as lg:
        t0 = time.monotonic()
        await call(lg.connect, n, rate=int(prof.connect_rate), reconnect="fresh")
        connect_s = await call(lg.wait_connected, n, 120.0)
        say(f"A {kind} {n} clients: connected in {connect_s:.1f} s")
        # Warm-up: the first events open Kafka/HTTP connections on every hop.
        await target.publish(min(20.0, max(2.0, 2000.0 / n)), 1.0, prof.event_size, 0)
        await _drain(lg, 0, 1.0)
        steps: list[dict[str, Any]] = []
        seq = 1_000_000
        label = f"A-{kind}-{n}"
        async with bench.pyspy(target.pid, label) if kind != "centrifugo" else _null():
            while len(steps) < prof.a_max_steps:
                if prof.a_fixed_rate is not None:
                    rate: float | None = prof.a_fixed_rate if not steps else None
                else:
                    rate = _next_rate(steps, prof, prof.a_start_deliveries / n)
                if rate is None:
                    break
                step = await a_step(bench, target, lg, n, rate, seq)
                seq += step["published"]
                retries = 0
                # Other processes on the server core (a shared machine) distort a step:
                # measure it again, up to twice.
                while _noisy(step) and retries < 2:
                    retries += 1
                    say(
                        f"A {kind} {n}: {step['other_cpu_on_server_core_pct']}% of the busy "
                        "server core went to other processes; repeating the step"
                    )
                    step = await a_step(bench, target, lg, n, rate, seq)
                    seq += step["published"]
                step["noisy_retries"] = retries
                steps.append(step)
                say(
                    f"A {kind} {n}: {step['event_rate']:g} ev/s -> "
                    f"{step['deliveries_per_s']:,} deliveries/s, "
                    f"p99 {step['latency_ms']['p99']} ms, "
                    + (
                        f"(Kafka->Redis p99 {step['pipeline_ms']['p99']} ms), "
                        if step.get("pipeline_ms")
                        else ""
                    )
                    + f"server cpu {step['server_cpu_pct']}%, "
                    f"loadgen cpu {step['loadgen_cpu_pct']}%, "
                    f"others on server core {step['other_cpu_on_server_core_pct']}%"
                    + ("" if step["passed"] else f"  FAIL: {step['why']}")
                )
        passed = [s for s in steps if s["passed"]]
        best = max(passed, key=lambda s: s["deliveries_per_s"], default=None)
        best50 = max(
            (s for s in passed if s["latency_ms"]["p99"] <= prof.target_p99_ms),
            key=lambda s: s["deliveries_per_s"],
            default=None,
        )
        capacity = max(
            (s for s in steps if s["sustained"]), key=lambda s: s["deliveries_per_s"], default=None
        )
        return {
            "server": kind,
            "clients": n,
            "connect_s": round(connect_s, 2),
            "steps": steps,
            "best": best,
            "best_p99_50": best50,
            "capacity": capacity,
            # False: every step was sustained, so the capacity is only a lower bound.
            "saturated": any(not s["sustained"] for s in steps),
            "seconds": round(time.monotonic() - t0, 1),
        }


@contextlib.asynccontextmanager
async def _null() -> AsyncIterator[None]:
    yield


async def scenario_a(bench: Bench, servers: list[str]) -> list[dict[str, Any]]:
    prof = bench.profile
    out = []
    for n in prof.a_clients:
        for kind in servers:
            out.append(await guard(f"A {kind} {n}", scenario_a_series(bench, kind, n)))
    for n in prof.naive_clients:
        out.append(await guard(f"A naive {n}", scenario_a_series(bench, "naive", n)))
    return out


async def guard(label: str, coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """A failing case is reported in the results, and the run goes on."""
    try:
        return await coro
    except Exception as exc:  # noqa: BLE001 - reported in the results
        say(f"{label}: FAILED: {type(exc).__name__}: {exc}")
        return {"case": label, "error": str(exc)[:2000]}


# -- B: idle capacity ---------------------------------------------------------------------------


async def scenario_b_one(bench: Bench, kind: str) -> dict[str, Any]:
    prof = bench.profile
    n = bench.clients(prof.b_clients)
    async with bench.target(kind) as target, bench.loadgen(target) as lg:
        await asyncio.sleep(1.0)
        rss0 = target.rss_kb()
        await call(lg.connect, n, rate=int(prof.connect_rate), reconnect="")
        connect_s = await call(lg.wait_connected, n, 180.0)
        await asyncio.sleep(1.0)
        await call(lg.stats, True)
        cpu0 = target.cpu()
        pub = await target.publish(1.0, prof.b_window_s, prof.event_size, 0)
        s = await _drain(lg, pub.count * n, 5.0)
        cpu = target.cpu() - cpu0
        rss1 = target.rss_kb()
        result = {
            "server": kind,
            "clients": n,
            "connect_s": round(connect_s, 2),
            "rss_before_kb": rss0,
            "rss_after_kb": rss1,
            "rss_per_conn_kb": round((rss1 - rss0) / n, 2),
            "window_s": round(s["window_s"], 2),
            "cpu_s": round(cpu, 3),
            "cpu_pct": round(100 * cpu / s["window_s"], 2),
            "events": pub.count,
            "expected": pub.count * n,
            "delivered": s["events"],
            "gaps": s["gaps"],
            "dups": s["dups"],
            "disconnects": s["disconnects"],
            "latency_ms": _lat_ms(s),
            "loadgen_rss_kb": s["rss_kb"],
        }
        say(
            f"B {kind}: {n} clients, RSS {rss0} -> {rss1} KB = {result['rss_per_conn_kb']} KB/conn,"
            f" cpu {result['cpu_pct']}%, delivered {s['events']}/{pub.count * n}"
        )
        return result


async def scenario_b(bench: Bench, servers: list[str]) -> list[dict[str, Any]]:
    return [await guard(f"B {k}", scenario_b_one(bench, k)) for k in servers]


# -- C: reconnect storm (+ E on the same server: its stream holds the events) ------------------


def _offsets(newest: list[int | None]) -> str:
    """The load generator's per-partition offset list: ``17,-,4``."""
    return ",".join("-" if off is None else str(off) for off in newest)


async def _backlog(
    target: Target, behind: int, size: int, result: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """One event marks the position the clients saw last; then ``behind`` more. Returns the
    load generator's resume parameters and (our edge) the newest offset per partition, as
    the load generator's ``expect_last``."""
    await target.publish_burst(1, size, 0)
    if isinstance(target, CrmTarget):
        seen = await target.wait_stored(1, 60.0)
        # The clients' position: the cursor a client holding the marker has (opaque, from
        # the edge), and what it covers per partition, so the first event after it is
        # checked too.
        cursor = await target.cursor_after(seen, 60.0)
        await target.publish_burst(behind, size, 1)
        head = _offsets(await target.wait_stored(1 + behind, 60.0))
        result.update({"last_event_id": cursor, "covered": _offsets(seen), "head": head})
        return {"lei": cursor, "lei_parts": _offsets(seen)}, head
    if isinstance(target, CentrifugoTarget):
        await target.wait_stored(1, 60.0)
        offset0, _ = await target.position()
        await target.publish_burst(behind, size, 1)
        await target.wait_stored(offset0 + behind, 60.0)
        head_off, epoch = await target.position()
        result.update({"recover_offset": offset0, "head_offset": head_off, "epoch": epoch})
        return {"cf_recover": 1, "cf_offset": offset0, "cf_epoch": epoch}, ""
    raise BenchError(f"C and E do not apply to {target.name}")


async def scenario_c_one(bench: Bench, kind: str) -> dict[str, Any]:
    prof = bench.profile
    n = bench.clients(prof.c_clients)
    behind = prof.c_behind
    result: dict[str, Any] = {"server": kind, "clients": n, "behind": behind}
    async with bench.target(kind) as target:
        params, head = await _backlog(target, behind, prof.event_size, result)
        async with bench.loadgen(target) as lg:
            cpu0 = target.cpu()
            split0 = target.cpu_split()
            t0 = time.monotonic()
            spy = bench.pyspy(target.pid, f"C-{kind}-{n}") if kind != "centrifugo" else _null()
            async with spy:
                # Clients retry like EventSource would (failed connects, streams the server
                # ended), resuming from what they received.
                batch = await call(
                    lg.connect,
                    n,
                    rate=0,
                    inflight=0,
                    expect=behind,
                    latency=0,
                    reconnect="resume",
                    **params,
                )
                deadline = t0 + prof.c_timeout_s
                while True:
                    s = await call(lg.stats, False, batch=batch, expect_last=head)
                    b = s["batch"]
                    if b["caught"] >= n or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
            wall = time.monotonic() - t0
            await asyncio.sleep(0.5)  # anything extra (duplicates) would show up now
            s = await call(lg.stats, False, batch=batch, expect_last=head)
            b = s["batch"]
            cpu = target.cpu() - cpu0
            split = target.cpu_split()
            caught_all = b["caught"] >= n
            correct = (
                caught_all
                and b["at_expect"] == n
                and s["gaps"] == 0
                and s["dups"] == 0
                and s["resets"] == 0
                and (kind == "centrifugo" or b["expect_last_seen"] == n)
            )
            result.update(
                {
                    "all_caught_up_s": (
                        round(b["caught_us"]["max"] / 1e6, 3) if caught_all else None
                    ),
                    "caught_up_p50_s": round(b["caught_us"]["p50"] / 1e6, 3),
                    "caught_up_p99_s": round(b["caught_us"]["p99"] / 1e6, 3),
                    "connected_all_s": round(b["connect_us"]["max"] / 1e6, 3),
                    "connect_p50_s": round(b["connect_us"]["p50"] / 1e6, 3),
                    "caught": b["caught"],
                    "at_expect": b["at_expect"],
                    "events_min": b["events_min"],
                    "events_max": b["events_max"],
                    "last_offsets_ok": b["expect_last_seen"] if kind != "centrifugo" else None,
                    "gaps": s["gaps"],
                    "dups": s["dups"],
                    "resets": s["resets"],
                    "connect_fail": s["connect_fail"],
                    "disconnects": s["disconnects"],
                    "ended_by_server": s["ended"],
                    "recover_failed": s["recover_failed"],
                    "parse_errors": s["parse_errors"],
                    "last_error": s["last_error"],
                    "http_errors": s.get("http_errors", {}),
                    "server_cpu_s": round(cpu, 2),
                    "server_user_s": round(split[0] - split0[0], 2),
                    "server_sys_s": round(split[1] - split0[1], 2),
                    "loadgen_cpu_s": round(s["cpu_user_s"] + s["cpu_sys_s"], 2),
                    "loadgen_sys_s": round(s["cpu_sys_s"], 2),
                    "wall_s": round(wall, 2),
                    "correct": correct,
                    "connect": "all at once (no ramp, no in-flight limit); a failed connect or "
                    "a stream the server ends is retried after 0.1-2 s with the last position",
                }
            )
            say(
                f"C {kind}: {n} clients x {behind} behind: all caught up in "
                f"{result['all_caught_up_s']} s (all connected {result['connected_all_s']} s), "
                f"correct={correct}, gaps={s['gaps']} dups={s['dups']}, server cpu {cpu:.1f} s"
            )
    return result


async def scenario_c(bench: Bench, servers: list[str]) -> list[dict[str, Any]]:
    return [await guard(f"C {k}", scenario_c_one(bench, k)) for k in servers]


async def scenario_e(bench: Bench, servers: list[str]) -> list[dict[str, Any]]:
    """History on fresh servers holding ``1 + c_behind`` events each, every server up at
    once and measured in turns, ``e_rounds`` times: this machine's speed drifts by ±20 %
    within minutes (the same edge, back to back: 8,200 to 12,300 requests/s at 100 % of its
    core), so a ratio from one run of each, minutes apart, says more about the drift than
    about the servers. Each server's figure is the median of its rounds."""
    prof = bench.profile
    async with contextlib.AsyncExitStack() as stack:
        targets: dict[str, Target] = {}
        failed: dict[str, dict[str, Any]] = {}

        async def start(kind: str) -> dict[str, Any]:
            target = await stack.enter_async_context(bench.target(kind))
            await _backlog(target, prof.c_behind, prof.event_size, {})
            targets[kind] = target
            return {}

        for kind in servers:
            started = await guard(f"E {kind}", start(kind))
            if "error" in started:
                failed[kind] = started
        await asyncio.sleep(1.0)
        if bench.pyspy_dir is not None:
            # The profile is taken in a round of its own, left out of the figures: py-spy's
            # sampling costs the profiled server, and only ours is profiled.
            for kind, target in targets.items():
                await guard(f"E {kind} profiled round", scenario_e_on(bench, target, 0))
        rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
        for i in range(1, prof.e_rounds + 1):
            for kind, target in list(targets.items()):
                one = await guard(f"E {kind} round {i}", scenario_e_on(bench, target, i))
                if "error" in one:
                    # The rounds measured so far stand; a failed server is not asked again.
                    failed[kind] = one
                    del targets[kind]
                else:
                    rounds[kind].append(one)
    results = []
    for kind in servers:
        if rounds.get(kind):
            results.append(median_round(rounds[kind]))
        elif kind in failed:
            results.append(failed[kind])
    return results


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median requests/s (the lower middle one of an even count), with
    every round's requests/s beside it."""
    ordered = sorted(rounds, key=lambda r: float(r["requests_per_s"]))
    mid = dict(ordered[(len(ordered) - 1) // 2])
    mid["rounds_requests_per_s"] = [r["requests_per_s"] for r in rounds]
    return mid


# -- E: history -------------------------------------------------------------------------------

_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise BenchError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _WRK_UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not rps:
        raise BenchError(f"unexpected wrk output:\n{out}")
    pct = {m.group(1): _wrk_ms(m.group(2)) for m in re.finditer(r"^\s+(\d+)%\s+(\S+)", out, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    return {
        "requests_per_s": round(float(rps.group(1)), 1),
        "requests": int(total.group(1)) if total else None,
        "p50_ms": pct.get("50"),
        "p90_ms": pct.get("90"),
        "p99_ms": pct.get("99"),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
    }


def _check_history(target: Target) -> int:
    if isinstance(target, CentrifugoTarget):
        req = urllib.request.Request(
            target.history_url(),
            data=b'{"channel":"bench","limit":100}',
            headers={"Content-Type": "application/json"},
        )
    else:
        req = urllib.request.Request(target.history_url())
    with urllib.request.urlopen(req, timeout=10) as resp:
        body: bytes = resp.read()
    if isinstance(target, CentrifugoTarget):
        return body.count(b'"offset":') - 1  # publications, plus the top offset
    return body.count(b'"cursor":"')


async def scenario_e_on(bench: Bench, target: Target, round_no: int = 0) -> dict[str, Any]:
    prof = bench.profile
    wrk = shutil.which("wrk")
    if wrk is None:
        return {"server": target.name, "skipped": "wrk is not installed (apt-get install wrk)"}
    items = await call(_check_history, target)
    argv = [wrk, "-t1", f"-c{prof.e_connections}", f"-d{prof.e_duration_s:g}s", "--latency"]
    if isinstance(target, CentrifugoTarget):
        script = target.run_dir / "history.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            'wrk.body = \'{"channel":"bench","limit":100}\'\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        argv += ["-s", str(script)]
    argv.append(target.history_url())
    cpu0 = target.cpu()
    # Round 0 is the profiled one (with --pyspy), never counted.
    spy = (
        bench.pyspy(target.pid, f"E-{target.name}")
        if target.name != "centrifugo" and round_no == 0
        else _null()
    )
    async with spy:
        proc = await asyncio.create_subprocess_exec(
            *pinned(argv, OTHER_CORE),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
    cpu = target.cpu() - cpu0
    parsed = parse_wrk(out.decode())
    result = {
        "server": target.name,
        "items_per_response": items,
        "connections": prof.e_connections,
        "duration_s": prof.e_duration_s,
        "server_cpu_pct": round(100 * cpu / prof.e_duration_s, 1),
        **parsed,
    }
    say(
        f"E {target.name}: {parsed['requests_per_s']:,} req/s, p99 {parsed['p99_ms']} ms "
        f"({items} items per response, non-2xx {parsed['non_2xx']})"
    )
    return result


# -- D: ingest ----------------------------------------------------------------------------------


async def preload(bootstrap: str, topic: str, count: int, size: int) -> float:
    """Write ``count`` events to the topic as large batches, round robin over partitions;
    returns events/s of the preload."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks=1, linger_ms=5, max_batch_size=512 * 1024
    )
    await producer.start()
    t0 = time.monotonic()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        sent = 0
        inflight: list[asyncio.Future[Any]] = []
        p = 0
        while sent < count:
            batch = producer.create_batch()
            while sent < count:
                if batch.append(key=None, value=make_event(sent, size), timestamp=None) is None:
                    break
                sent += 1
            batch.close()
            inflight.append(await producer.send_batch(batch, topic, partition=partitions[p]))
            p = (p + 1) % len(partitions)
            if len(inflight) >= 8:
                await inflight.pop(0)
        await asyncio.gather(*inflight)
    finally:
        await producer.stop()
    return count / (time.monotonic() - t0)


def placed(
    bench: Bench, cluster: Cluster, name: str, core: int, nofile: int | None = None
) -> ProcessSpec:
    """One of ``cluster``'s processes pinned to ``core``, with --server-pythonpath applied."""
    spec = cluster.spec(name)
    env = dict(spec.env)
    cwd = spec.cwd
    if bench.server_pythonpath:
        env["PYTHONPATH"] = bench.server_pythonpath
        # ``python -m`` puts the working directory first on sys.path (see CrmTarget._cwd).
        cluster.run_dir.mkdir(parents=True, exist_ok=True)
        cwd = cluster.run_dir
    return dataclasses.replace(spec, argv=pinned(spec.argv, core, nofile), env=env, cwd=cwd)


async def scenario_d(bench: Bench) -> dict[str, Any]:
    prof = bench.profile
    backlog = prof.d_backlog
    cluster = Cluster(
        bench.run_dir / f"ingest-{uuid.uuid4().hex[:6]}",
        bench.backends,
        edges=0,
        with_nginx=False,
        env=BENCH_EDGE_ENV,
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=bench.backends.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(cluster.topic, num_partitions=PARTITIONS, replication_factor=1)]
        )
    finally:
        await admin.close()
    say(f"D: preloading {backlog:,} events into {cluster.topic}")
    preload_rate = await preload(
        bench.backends.kafka_bootstrap, cluster.topic, backlog, prof.event_size
    )
    say(f"D: preloaded at {preload_rate:,.0f} events/s; starting one ingest on the server core")
    spec = placed(bench, cluster, "ingest1", SERVER_CORE)
    redis = cluster.redis()
    keys = RedisKeys(cluster.prefix)
    samples: list[tuple[float, int]] = []
    # CPU of the Redis and Kafka processes too: tells whether ingest waited on them.
    helpers = {
        "redis": listener_pid(bench.backends.redis_port),
        "kafka": listener_pid(int(bench.backends.kafka_bootstrap.rsplit(":", 1)[1])),
    }
    helper_cpu0 = {k: _cpu_or_zero(p) for k, p in helpers.items()}
    try:
        t_spawn = time.monotonic()
        await call(cluster.sup.start, spec, wait=False)
        pid = cluster.sup.pid("ingest1")
        deadline = t_spawn + max(120.0, backlog / 2000)
        async with bench.pyspy(pid or 0, "D-ingest") if pid else _null():
            while time.monotonic() < deadline:
                added = 0
                for partition in range(PARTITIONS):
                    try:
                        info = await redis.xinfo_stream(keys.stream(partition))
                        added += int(info.get("entries-added", 0))
                    except Exception:  # noqa: BLE001 - the stream does not exist yet
                        pass
                samples.append((time.monotonic(), added))
                if added >= backlog:
                    break
                await asyncio.sleep(0.1)
        cpu = cpu_seconds(pid) if pid else 0.0
        helper_cpu = {k: _cpu_or_zero(p) - helper_cpu0[k] for k, p in helpers.items()}
    finally:
        await redis.aclose()
        await call(cluster.stop)
    done = samples[-1][1] if samples else 0
    result: dict[str, Any] = {
        "backlog": backlog,
        "written": done,
        "preload_events_per_s": round(preload_rate),
        "ingest_cpu_s": round(cpu, 2),
        "redis_cpu_s": round(helper_cpu["redis"], 2),
        "kafka_cpu_s": round(helper_cpu["kafka"], 2),
    }
    if done < backlog:
        result["error"] = f"only {done}/{backlog} events reached Redis in time"
        return result

    def crossing(frac: float) -> float:
        goal = frac * backlog
        return next(t for t, a in samples if a >= goal)

    t_first = next(t for t, a in samples if a > 0)
    t10, t90, t_end = crossing(0.10), crossing(0.90), samples[-1][0]
    result.update(
        {
            "events_per_s": round(0.8 * backlog / max(t90 - t10, 1e-9)),
            "events_per_s_first_to_last": round(backlog / max(t_end - t_first, 1e-9)),
            "seconds_first_to_last": round(t_end - t_first, 2),
            "startup_s": round(t_first - t_spawn, 2),
        }
    )
    say(
        f"D: {result['events_per_s']:,} events/s (10%-90% of the backlog), "
        f"{result['events_per_s_first_to_last']:,} first-to-last, ingest cpu {cpu:.1f} s, "
        f"redis cpu {result['redis_cpu_s']} s, kafka cpu {result['kafka_cpu_s']} s "
        f"over {result['seconds_first_to_last']} s"
    )
    return result
