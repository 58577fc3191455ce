"""The local stack's watchdog: brings back a part that died, counts and logs each restart.

``crm-events-stack up`` (``make up``) starts it last, as the part ``watchdog``: detached, with
a pidfile and a log like every other part; ``down`` stops it first. Every
:attr:`Policy.poll_s` it looks at each part of the stack:

* **dead** (its pidfile is there, its process is gone: a crash, an out-of-memory kill,
  ``crm-events-stack kill``) → started again at once with the settings of the command that
  started the watchdog, then waited for until ready (``after_ready`` included, e.g. Kafka's
  topic);
* **stopped** (no pidfile: ``stop``, ``down``), **being stopped** (a stop marked its pidfile
  and ended the process, or was interrupted after that: :attr:`ProcState.STOPPING`),
  **paused** (``pause``, SIGSTOP: not dead, ``resume`` continues it) or **running** → left
  alone, and a stopped part's crash history is forgotten. Only death counts: a part that is
  alive but not ready is not restarted (there is no liveness probe as in Kubernetes).

A restart fails when it cannot start the part (its port is held, ``prepare`` fails) or when
the process it started dies less than :attr:`Policy.stable_s` later. After a failed restart
the next one waits 1, 2, 4, 8 s; after :attr:`Policy.max_failed_restarts` failed restarts in
a row the watchdog gives up on the part (logged as an error, shown by
``crm-events-stack status``) until someone starts or stops it. A death of a process that the
watchdog did not start (``up``, ``start``) is never a failed restart: the part is restarted
at once.

The watchdog never restarts itself: if it dies, ``status`` shows it dead and ``up`` starts it
again. One watchdog per run directory: a second one finds ``watchdog/lock`` taken and exits.
It records a :func:`fingerprint` of what it restarts parts with (the parts' commands, the
CRM_EVENTS_* settings, the working directory); ``up`` replaces a running watchdog whose
fingerprint is not its own, so that the watchdog always watches the parts of the last ``up``
with its settings.

``<run dir>/watchdog/state.json`` holds, per part, the restarts since the watchdog started
(carried over when a watchdog of the same run directory starts again; ``down`` removes the
file), the last restart's time and reason, the failed restarts in a row and whether the
watchdog gave up; plus a heartbeat (``updated``, ``ticks``) and the fingerprint.
``crm-events-stack status`` shows the counts; each restart is a line in ``logs/watchdog.log``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from devtools.supervisor import ProcessSpec, ProcState, StartError

__all__ = [
    "NAME",
    "PartReport",
    "Parts",
    "Policy",
    "Watchdog",
    "WatchdogReady",
    "WatchdogState",
    "configure_logging",
    "fingerprint",
    "read_state",
    "read_state_file",
    "run",
    "state_file",
]

log = logging.getLogger("crm_events.watchdog")

#: The watchdog's own part name.
NAME = "watchdog"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
#: The heartbeat is stale (``status`` shows the watchdog not ready) after this many polls.
STALE_POLLS = 10
MIN_STALE_S = 5.0
LOG_LINE_CHARS = 200
#: How long a stopping watchdog waits for restarts that are spawning (port check, ``prepare``,
#: spawn, pidfile) to finish, so that it never leaves a process without its pidfile. The
#: ``watchdog`` part's stop timeout is longer (devtools/stack.py), so that ``down`` never
#: SIGKILLs it in the middle of one.
SPAWN_WAIT_S = 20.0
#: The environment variables a part's settings come from (see :func:`fingerprint`).
SETTINGS_PREFIX = "CRM_EVENTS_"


def state_dir(run_dir: Path) -> Path:
    return Path(run_dir) / NAME


def state_file(run_dir: Path) -> Path:
    return state_dir(run_dir) / STATE_FILE


@dataclasses.dataclass(frozen=True)
class Policy:
    poll_s: float = 0.5
    """How often every part is looked at: a death is noticed within this."""
    stable_s: float = 30.0
    """A restarted process that dies sooner than this after its spawn was a failed restart."""
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    max_failed_restarts: int = 5
    """Failed restarts in a row (could not start, or died within ``stable_s``) before the
    watchdog gives up on a part."""

    def __post_init__(self) -> None:
        if self.poll_s <= 0 or self.stable_s <= 0 or self.backoff_initial_s < 0:
            raise ValueError(f"bad watchdog policy {self}")
        if self.max_failed_restarts < 1:
            raise ValueError("max_failed_restarts must be at least 1")

    def delay(self, failed: int) -> float | None:
        """Seconds before the next restart of a part after ``failed`` failed restarts in a
        row; None: give up. The first restart is immediate, then 1, 2, 4 … s."""
        if failed >= self.max_failed_restarts:
            return None
        if failed == 0:
            return 0.0
        return min(self.backoff_initial_s * 2.0 ** (failed - 1), self.backoff_max_s)


class Parts(Protocol):
    """What the watchdog needs of :class:`~devtools.supervisor.Supervisor` (a fake in the
    unit tests)."""

    def state(self, name: str) -> ProcState: ...

    def pid(self, name: str) -> int | None: ...

    def recorded_pid(self, name: str) -> int | None: ...

    def reap_children(self) -> None: ...

    def revive(self, spec: ProcessSpec) -> int | None: ...

    def finish_start(self, spec: ProcessSpec, deadline: float | None = None) -> float: ...

    def exit_status(self, name: str) -> int | None: ...

    def fault(self, name: str) -> str | None: ...

    def log_tail(self, name: str, lines: int = ...) -> str: ...


@dataclasses.dataclass
class _Part:
    """What the watchdog knows of one part; touched by the main loop, and by a restart's
    thread only while ``busy`` (the loop skips busy parts)."""

    restarts: int = 0
    last_restart: str | None = None
    last_reason: str | None = None
    gave_up: bool = False
    #: Failed restarts in a row: could not start, or died within ``stable_s``.
    failed: int = 0
    busy: bool = False
    #: Monotonic time a pending restart is due; None: no death pending.
    due: float | None = None
    #: Why the part is dead (or why its last restart failed), for the log and the state.
    reason: str = ""
    #: The pid of the watchdog's last restart, and when it happened (monotonic).
    pid: int | None = None
    restarted_at: float | None = None

    def fresh(self) -> None:
        """Someone else started or stopped the part: its crash history no longer applies."""
        self.gave_up = False
        self.failed = 0
        self.due = None
        self.reason = ""
        self.pid = None
        self.restarted_at = None

    @property
    def condition(self) -> str:
        if self.gave_up:
            return "gave up"
        if self.busy:
            return "restarting"
        if self.due is not None:
            return "waiting to restart"
        return "watching"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Watchdog:
    """Looks at ``specs`` through ``parts`` on each :meth:`tick` and restarts the dead ones.

    ``background`` runs a restart (spawn, then wait until ready) off the loop's thread, so
    that one slow part never delays noticing another; the unit tests run it inline.
    """

    def __init__(
        self,
        parts: Parts,
        specs: Sequence[ProcessSpec],
        state_path: Path,
        *,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        background: Callable[[Callable[[], None]], None] | None = None,
        fingerprint: str | None = None,
    ) -> None:
        self._parts = parts
        self._fingerprint = fingerprint
        self._specs = list(specs)
        self._state_path = state_path
        self.policy = policy or Policy()
        self._clock = clock
        self._wall = wall
        self._background = background or _in_thread
        self._records = {spec.name: _Part() for spec in self._specs}
        self._lock = threading.Lock()
        # Restarts that are spawning: stop() waits until none is, so that no part is left
        # spawned without its pidfile when the watchdog exits.
        self._spawns = 0
        self._spawns_changed = threading.Condition()
        self._stopping = False
        self._started = _iso(wall())
        self.ticks = 0
        self._carry_over()

    # -- the loop ------------------------------------------------------------------------------

    def tick(self) -> None:
        now = self._clock()
        self._parts.reap_children()
        for spec in self._specs:
            rec = self._records[spec.name]
            if rec.busy:
                continue
            state = self._parts.state(spec.name)
            if state is ProcState.DEAD:
                self._dead(spec, rec, now)
            elif state in (ProcState.STOPPED, ProcState.STOPPING):
                # Stopped on purpose (or its stop is ending it): whoever starts it next starts
                # afresh, and nothing of this counts as a death.
                rec.fresh()
            else:
                self._alive(spec.name, rec, now)
        self.ticks += 1
        self.save()

    def run(self, stop: threading.Event) -> None:
        log.info(
            "watching %s (pid %d); a dead part is restarted at once, again after a failed "
            "restart with backoff, and given up after %d failed restarts in a row",
            ", ".join(spec.name for spec in self._specs),
            os.getpid(),
            self.policy.max_failed_restarts,
        )
        last_error = ""
        while not stop.is_set():
            try:
                self.tick()
                last_error = ""
            except Exception as exc:
                # A full disk or a bug in one look must not end the watchdog; the same error
                # on every look is logged in full once.
                if repr(exc) != last_error:
                    log.exception("watchdog: looking at the parts failed")
                last_error = repr(exc)
            stop.wait(self.policy.poll_s)
        self.stop()

    def stop(self, timeout_s: float = SPAWN_WAIT_S) -> None:
        """No restart starts after this; those spawning finish their spawn first (within
        ``timeout_s``). Restarts waiting for their part to become ready are not waited for."""
        with self._spawns_changed:
            self._stopping = True
            self._spawns_changed.wait_for(lambda: self._spawns == 0, timeout_s)
        log.info("watchdog stopping (pid %d)", os.getpid())

    def _dead(self, spec: ProcessSpec, rec: _Part, now: float) -> None:
        if rec.gave_up:
            return
        if rec.due is None:
            # A death not seen before. A failed restart only if it is the process the
            # watchdog started, and soon after: one that `up` or `start` started is not.
            mine = rec.pid is not None and self._parts.recorded_pid(spec.name) == rec.pid
            lived = None if rec.restarted_at is None else now - rec.restarted_at
            rec.reason = self._death_note(spec.name)
            if mine and lived is not None and lived < self.policy.stable_s:
                rec.failed += 1
                self._schedule(spec.name, rec, now, f"dead again {lived:.1f} s after its restart")
            else:
                rec.failed = 0
                rec.due = now
            rec.pid = None
        if rec.due is not None and now >= rec.due:
            rec.busy = True
            self._background(lambda: self._restart(spec, rec))

    def _schedule(self, name: str, rec: _Part, now: float, what: str) -> None:
        """After a failed restart: the next one after the backoff, or give up."""
        delay = self.policy.delay(rec.failed)
        if delay is None:
            rec.gave_up = True
            rec.due = None
            log.error(
                "%s: gave up after %d failed restarts in a row (each could not start, or died "
                "within %.0f s); last: %s; it stays dead until 'crm-events-stack start %s' or "
                "'make up'",
                name,
                rec.failed,
                self.policy.stable_s,
                rec.reason,
                name,
            )
            return
        rec.due = now + delay
        log.warning("%s: %s (%s); next restart in %.0f s", name, what, rec.reason, delay)

    def _alive(self, name: str, rec: _Part, now: float) -> None:
        pid = self._parts.pid(name)
        if pid is not None and pid != rec.pid:
            if rec.gave_up or rec.failed:
                log.info("%s was started again (pid %d): watching it afresh", name, pid)
            rec.fresh()
        elif rec.restarted_at is not None and now - rec.restarted_at >= self.policy.stable_s:
            rec.failed = 0
        rec.due = None

    def _restart(self, spec: ProcessSpec, rec: _Part) -> None:
        try:
            with self._spawns_changed:
                if self._stopping:
                    return
                self._spawns += 1
            try:
                pid = self._parts.revive(spec)
            except Exception as exc:
                # Nothing runs (the supervisor kills a process whose pidfile it could not
                # write) and the pidfile stays: the part is still dead. Any error, not only
                # StartError (a full disk, a bug in a prepare step), is a failed restart:
                # backoff, then give up, never a retry on every look.
                with self._lock:
                    rec.failed += 1
                    rec.reason = f"could not start: {_first_line(exc)}"
                    self._schedule(spec.name, rec, self._clock(), "restart failed")
                if not isinstance(exc, StartError):
                    log.error("%s: the restart's error in full", spec.name, exc_info=exc)
                return
            finally:
                with self._spawns_changed:
                    self._spawns -= 1
                    self._spawns_changed.notify_all()
            if pid is None:
                # Stopped on purpose, or started by someone else, since the loop looked.
                rec.due = None
                return
            with self._lock:
                rec.restarts += 1
                rec.last_restart = _iso(self._wall())
                rec.last_reason = rec.reason
                rec.pid = pid
                rec.restarted_at = self._clock()
                rec.due = None
            log.warning(
                "%s restarted (pid %d, restart %d): %s",
                spec.name,
                pid,
                rec.restarts,
                rec.reason,
            )
            self.save()
            try:
                ready_after = self._parts.finish_start(spec)
            except Exception as exc:
                if self._parts.state(spec.name) in (ProcState.STOPPED, ProcState.STOPPING):
                    log.info("%s was stopped before it was ready after its restart", spec.name)
                else:
                    # Died (the next look counts a failed restart), or alive but not ready:
                    # only death is restarted.
                    log.error(
                        "%s: not ready after its restart: %s",
                        spec.name,
                        _first_line(exc),
                        exc_info=None if isinstance(exc, StartError) else exc,
                    )
                return
            log.info("%s ready %.1f s after its restart", spec.name, ready_after)
        finally:
            rec.busy = False
            self.save()

    def _death_note(self, name: str) -> str:
        """Why the part is dead, as far as this process can tell."""
        fault = self._parts.fault(name)
        if fault is not None:
            return f"killed by {fault} (crm-events-stack kill)"
        code = self._parts.exit_status(name)
        if code is not None and code < 0:
            what = f"killed by {_signal_name(-code)}"
        elif code is not None:
            what = f"exited with status {code}"
        else:
            # Parts that `up` started are children of init once `up` has exited.
            what = "its process is gone (exit status unknown: the watchdog did not start it)"
        tail = self._parts.log_tail(name, 1).strip()
        return f"{what}; last log line: {tail[:LOG_LINE_CHARS]}" if tail else what

    # -- state file ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            parts = {
                name: {
                    "restarts": rec.restarts,
                    "last_restart": rec.last_restart,
                    "last_reason": rec.last_reason,
                    "condition": rec.condition,
                    "failed_restarts": rec.failed,
                    "last_failure": rec.reason if rec.failed or rec.gave_up else None,
                }
                for name, rec in self._records.items()
            }
        return {
            "pid": os.getpid(),
            "started": self._started,
            "updated": self._wall(),
            "ticks": self.ticks,
            "poll_s": self.policy.poll_s,
            "fingerprint": self._fingerprint,
            "parts": parts,
        }

    def save(self) -> None:
        data = json.dumps(self.snapshot(), indent=1) + "\n"
        with self._lock:
            self._state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._state_path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_text(data)
            tmp.replace(self._state_path)

    def _carry_over(self) -> None:
        """Counts of an earlier watchdog of this run directory (killed, then ``up`` again)."""
        # A watchdog killed while saving leaves its temporary file.
        for stale in self._state_path.parent.glob(f"{self._state_path.stem}.tmp*"):
            stale.unlink(missing_ok=True)
        previous = read_state_file(self._state_path)
        if previous is None:
            return
        for name, report in previous.parts.items():
            rec = self._records.get(name)
            if rec is not None:
                rec.restarts = report.restarts
                rec.last_restart = report.last_restart
                rec.last_reason = report.last_reason


def _in_thread(fn: Callable[[], None]) -> None:
    # Daemon: a thread still waiting for a part to become ready must not hold up an exit.
    threading.Thread(target=fn, name="restart", daemon=True).start()


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# -- reading the state (status, readiness) ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PartReport:
    restarts: int
    last_restart: str | None
    last_reason: str | None
    condition: str
    failed_restarts: int = 0
    """Failed restarts in a row (could not start, or died soon after)."""
    last_failure: str | None = None
    """Why the last of those failed; None when there are none."""


@dataclasses.dataclass(frozen=True)
class WatchdogState:
    pid: int
    updated: float
    ticks: int
    poll_s: float
    parts: Mapping[str, PartReport]
    fingerprint: str | None = None

    @property
    def total(self) -> int:
        return sum(r.restarts for r in self.parts.values())

    def fresh(self, now: float | None = None) -> bool:
        """The heartbeat is recent: the watchdog is looking (not paused or hung)."""
        limit = max(MIN_STALE_S, STALE_POLLS * self.poll_s)
        return (time.time() if now is None else now) - self.updated <= limit

    def summary(self) -> str:
        """One line for ``crm-events-stack status``."""
        counted = [(n, r) for n, r in self.parts.items() if r.restarts]
        if counted:
            each = ", ".join(f"{n} {r.restarts}" for n, r in counted)
            text = f"watchdog: {self.total} restart(s) ({each})"
            name, last = max(counted, key=lambda item: item[1].last_restart or "")
            text += f"; last: {name} at {last.last_restart}, {last.last_reason}"
        else:
            text = "watchdog: no restarts"
        gave_up = [(n, r) for n, r in self.parts.items() if r.condition == "gave up"]
        for name, r in gave_up:
            text += f"; gave up on {name} after {r.failed_restarts} failed restarts"
            if r.last_failure:
                text += f" (last: {r.last_failure})"
        if gave_up:
            names = " ".join(n for n, _ in gave_up)
            text += f": fix it, then 'crm-events-stack start {names}'"
        return text


def read_state(run_dir: Path) -> WatchdogState | None:
    """The state file of the run directory's watchdog, or None (none yet, or unreadable)."""
    return read_state_file(state_file(run_dir))


def read_state_file(path: Path) -> WatchdogState | None:
    try:
        data = json.loads(path.read_text())
        parts = {
            str(name): PartReport(
                restarts=int(p.get("restarts", 0)),
                last_restart=p.get("last_restart"),
                last_reason=p.get("last_reason"),
                condition=str(p.get("condition", "watching")),
                failed_restarts=int(p.get("failed_restarts", 0)),
                last_failure=p.get("last_failure"),
            )
            for name, p in data.get("parts", {}).items()
        }
        found = data.get("fingerprint")
        return WatchdogState(
            pid=int(data["pid"]),
            updated=float(data["updated"]),
            ticks=int(data.get("ticks", 0)),
            poll_s=float(data.get("poll_s", Policy.poll_s)),
            parts=parts,
            fingerprint=None if found is None else str(found),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclasses.dataclass(frozen=True)
class WatchdogReady:
    """Readiness of the ``watchdog`` part: its state file names ``pid()`` (the part's live
    pid) and its heartbeat is recent."""

    run_dir: Path
    pid: Callable[[], int | None]

    def __call__(self) -> bool:
        pid = self.pid()
        found = read_state(self.run_dir)
        return pid is not None and found is not None and found.pid == pid and found.fresh()

    def __str__(self) -> str:
        return str(state_file(self.run_dir))


# -- the process ---------------------------------------------------------------------------------


def fingerprint(specs: Sequence[ProcessSpec], environ: Mapping[str, str], cwd: Path) -> str:
    """What a watchdog restarts parts with, hashed: the watched parts (every spec but the
    watchdog's own) with their commands and environment, the CRM_EVENTS_* settings they inherit
    from ``environ``, and the working directory that relative paths resolve in. ``up`` computes
    it for the watchdog it would start and replaces a running one whose fingerprint differs
    (other parts, e.g. one more edge, or other settings)."""
    data = {
        "cwd": str(cwd),
        "settings": sorted((k, v) for k, v in environ.items() if k.startswith(SETTINGS_PREFIX)),
        "parts": [
            [
                s.name,
                list(s.argv),
                sorted(s.env.items()),
                s.inherit_env,
                None if s.cwd is None else str(s.cwd),
                s.port,
            ]
            for s in specs
            if s.name != NAME
        ],
    }
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _only_watchdog(run_dir: Path) -> Iterator[bool]:
    """Holds ``watchdog/lock`` for the block; yields False when another process holds it."""
    state_dir(run_dir).mkdir(parents=True, exist_ok=True)
    with (state_dir(run_dir) / LOCK_FILE).open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def configure_logging() -> None:
    """Timestamped lines on stderr (the part's log file), apart from the command's own."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    )
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def run(
    parts: Parts,
    specs: Sequence[ProcessSpec],
    run_dir: Path,
    policy: Policy | None = None,
    stop: threading.Event | None = None,
) -> int:
    """The watchdog process (``crm-events-stack watchdog``): until SIGTERM or SIGINT, or until
    ``stop`` is set when one is given (then no signal handler is installed). Returns the exit
    status: 1 when another watchdog already watches ``run_dir``."""
    with _only_watchdog(run_dir) as mine:
        if not mine:
            other = read_state(run_dir)
            who = f" (pid {other.pid})" if other is not None else ""
            print(
                f"crm-events-stack: error: another watchdog{who} already watches {run_dir}",
                file=sys.stderr,
            )
            return 1
        if stop is None:
            stop = threading.Event()
            stopped = stop

            def on_signal(signum: int, frame: FrameType | None) -> None:
                stopped.set()

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        watched = [s for s in specs if s.name != NAME]
        Watchdog(
            parts,
            watched,
            state_file(run_dir),
            policy=policy,
            fingerprint=fingerprint(watched, os.environ, Path.cwd()),
        ).run(stop)
    return 0
