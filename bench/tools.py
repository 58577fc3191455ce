"""Small helpers of the benchmark harness: building the Go programs, process accounting from
/proc, CPU pinning, and the load generator's control API."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
BUILD_DIR = BENCH_DIR / ".build"
BIN_DIR = BUILD_DIR / "bin"
LOADGEN_SRC = BENCH_DIR / "loadgen"
CENTRIFUGO_VERSION = "v6.9.1"
CENTRIFUGO_MODULE = "github.com/centrifugal/centrifugo/v6"

SERVER_CORE = 0
OTHER_CORE = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


class BenchError(RuntimeError):
    pass


# -- building ---------------------------------------------------------------------------------


def go_binary() -> str | None:
    found = shutil.which("go")
    if found:
        return found
    for candidate in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go"):
        if Path(candidate).exists():
            return candidate
    return None


def build_loadgen() -> Path:
    """``go build`` the load generator into bench/.build/bin unless it is newer than its
    sources. No third-party modules: nothing is downloaded."""
    out = BIN_DIR / "loadgen"
    sources = [*LOADGEN_SRC.glob("*.go"), LOADGEN_SRC / "go.mod"]
    if out.exists() and out.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
        return out
    go = go_binary()
    if go is None:
        raise BenchError("Go is not installed: the load generator (bench/loadgen) needs it")
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    say("building the load generator (bench/loadgen)")
    subprocess.run(
        [go, "build", "-trimpath", "-o", str(out), "."],
        cwd=LOADGEN_SRC,
        check=True,
        env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"},
    )
    return out


def centrifugo_path() -> Path:
    return BIN_DIR / "centrifugo"


def build_centrifugo(allow_build: bool = True) -> Path | None:
    """``go install`` Centrifugo from the Go module proxy into bench/.build/bin (once; about
    two minutes on 2 cores). Returns None when it is absent and building is not allowed."""
    out = centrifugo_path()
    if out.exists():
        return out
    if not allow_build:
        return None
    go = go_binary()
    if go is None:
        raise BenchError("Go is not installed: building Centrifugo needs it")
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    say(f"building Centrifugo {CENTRIFUGO_VERSION} from the Go module proxy (first time only)")
    t0 = time.monotonic()
    subprocess.run(
        [go, "install", f"{CENTRIFUGO_MODULE}@{CENTRIFUGO_VERSION}"],
        check=True,
        env={
            **os.environ,
            "GOBIN": str(BIN_DIR),
            "GOTOOLCHAIN": "auto",
            "CGO_ENABLED": "0",
        },
    )
    say(f"Centrifugo built in {time.monotonic() - t0:.0f} s")
    return out


# -- processes --------------------------------------------------------------------------------


@functools.cache
def can_raise_nofile(want: int) -> bool:
    """Whether ``prlimit`` may raise RLIMIT_NOFILE to ``want`` (needs CAP_SYS_RESOURCE when
    above the hard limit: some sandboxes refuse it even to root)."""
    if not shutil.which("prlimit"):
        return False
    probe = subprocess.run(
        ["prlimit", f"--nofile={want}:{want}", "--", "true"], capture_output=True, check=False
    )
    return probe.returncode == 0


def nofile_limit(want: int) -> int:
    """The RLIMIT_NOFILE that servers and the load generator will run with."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= want or can_raise_nofile(want):
        return want
    return int(hard)


#: Niceness of every process the harness starts (root only): on a shared machine the
#: measured processes then win the CPU over unrelated work. The same for every server.
NICE = -10


def pinned(argv: Sequence[str], core: int, nofile: int | None = None) -> list[str]:
    """``argv`` pinned to one core, with RLIMIT_NOFILE raised to ``nofile`` where allowed
    (else to the hard limit), at a raised priority when running as root."""
    wrapped = ["taskset", "-c", str(core), *argv]
    if NICE and os.geteuid() == 0 and os.getpriority(os.PRIO_PROCESS, 0) > NICE:
        wrapped = ["nice", "-n", str(NICE), *wrapped]
    if nofile and shutil.which("prlimit"):
        limit = nofile_limit(nofile)
        wrapped = ["prlimit", f"--nofile={limit}:{limit}", "--", *wrapped]
    return wrapped


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    user, system = cpu_split(pid)
    return user + system


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads), from /proc: user code against the
    kernel's share (socket writes, and the loopback delivery that runs on the sender)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def core_times(core: int) -> tuple[float, float]:
    """(busy, total) seconds of one CPU since boot, from /proc/stat: with the server's own CPU
    time this shows how much of the server core other processes took during a step."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            ticks = [int(x) for x in line.split()[1:]]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
            total = sum(ticks[:8])
            return (total - idle) / CLK_TCK, total / CLK_TCK
    return 0.0, 0.0


def pin_self(core: int) -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {core})
    if NICE and os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, NICE)


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on a local TCP port (via ``ss``), or None."""
    if not shutil.which("ss"):
        return None
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout
    m = re.search(r"pid=(\d+)", out)
    return int(m.group(1)) if m else None


def _affinity(pid: int) -> str | None:
    out = subprocess.run(
        ["taskset", "-p", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    m = re.search(r"affinity mask:\s*([0-9a-fA-F]+)", out)
    return m.group(1) if m else None


@contextlib.contextmanager
def backends_pinned(ports: dict[str, int], core: int) -> Iterator[dict[str, str]]:
    """Pin the shared services (Kafka, Redis) to ``core`` for the run, every thread, and put
    their previous CPU masks back afterwards. Best effort: a service whose pid cannot be found
    (another user's process, no ``ss``) is left alone and reported as such."""
    saved: dict[int, str] = {}
    report: dict[str, str] = {}
    for name, port in ports.items():
        pid = listener_pid(port)
        mask = _affinity(pid) if pid else None
        if pid is None or mask is None:
            report[name] = "not pinned (pid not found)"
            continue
        rc = subprocess.run(
            ["taskset", "-a", "-p", "-c", str(core), str(pid)],
            capture_output=True,
            check=False,
        ).returncode
        if rc == 0:
            saved[pid] = mask
            report[name] = f"pid {pid} pinned to core {core} for the run (mask was {mask})"
            say(f"{name}: {report[name]}")
        else:
            report[name] = "not pinned (taskset failed)"
    try:
        yield report
    finally:
        for pid, mask in saved.items():
            subprocess.run(
                ["taskset", "-a", "-p", mask, str(pid)], capture_output=True, check=False
            )
        if saved:
            say("restored the CPU masks of " + ", ".join(str(p) for p in saved))


def sysctl(name: str) -> str:
    try:
        return Path("/proc/sys/" + name.replace(".", "/")).read_text().strip()
    except OSError:
        return "?"


# -- load generator ---------------------------------------------------------------------------


@dataclass
class Loadgen:
    """Client of a running load generator's control API (see bench/loadgen/main.go)."""

    control: str

    def _get(self, path: str, **params: object) -> dict[str, Any]:
        query = "&".join(
            f"{k}={urllib.parse.quote(str(v), safe='')}" for k, v in params.items() if v != ""
        )
        url = f"http://{self.control}{path}" + (f"?{query}" if query else "")
        req = urllib.request.Request(url)
        with urllib.request.urlopen(req, timeout=30) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def connect(self, n: int, **params: object) -> int:
        return int(self._get("/connect", n=n, **params)["batch"])

    def stats(self, reset: bool = False, **params: object) -> dict[str, Any]:
        return self._get("/stats", reset=1 if reset else "", **params)

    def close_all(self) -> None:
        self._get("/close")

    def quit(self) -> None:
        with contextlib.suppress(OSError):
            self._get("/quit")

    def wait_connected(self, n: int, timeout_s: float) -> float:
        """Seconds until ``n`` streams are open; raises when not reached in time."""
        t0 = time.monotonic()
        while True:
            s = self.stats()
            if s["connected"] >= n:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise BenchError(
                    f"only {s['connected']}/{n} streams open after {timeout_s:.0f} s "
                    f"(connect failures {s['connect_fail']}, last error {s['last_error']!r})"
                )
            time.sleep(0.2)

    def wait_closed(self, timeout_s: float = 30.0) -> None:
        t0 = time.monotonic()
        while self.stats()["connected"] > 0 and time.monotonic() - t0 < timeout_s:
            time.sleep(0.2)


def python() -> str:
    return sys.executable


SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
ACCEPT_QUEUE = 16384
"""The accept queue the servers ask for (the edge's listen backlog; Go uses somaxconn)."""


@contextlib.contextmanager
def accept_queue(wanted: int = ACCEPT_QUEUE) -> Iterator[dict[str, Any]]:
    """Raise ``net.core.somaxconn`` to ``wanted`` for the run, when allowed, and put it back.

    It caps every listen backlog: with the usual 4,096, the reconnect storm's connections
    beyond the accept queue wait for SYN-ACK retransmits (1 s, 3 s, ...), for every server
    alike. Production hosts that take reconnect storms are tuned the same way."""
    report: dict[str, Any] = {"wanted": wanted}
    try:
        before = int(SOMAXCONN.read_text())
    except (OSError, ValueError):
        report["note"] = "net.core.somaxconn is not readable here"
        yield report
        return
    report["before"] = before
    raised = False
    if before < wanted:
        try:
            SOMAXCONN.write_text(f"{wanted}\n")
            raised = True
        except OSError as exc:
            report["note"] = f"could not raise net.core.somaxconn: {exc}"
    report["during"] = int(SOMAXCONN.read_text())
    try:
        yield report
    finally:
        if raised:
            with contextlib.suppress(OSError):
                SOMAXCONN.write_text(f"{before}\n")
