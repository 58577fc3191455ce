"""Start, watch and stop local processes through pidfiles in one run directory.

Used by ``crm-events-stack`` (``make up/down/status``), by the integration-test harness and by
benchmarks. Everything hangs off a :class:`Supervisor` bound to one run directory, so a test can
run its own set of processes in a temporary directory next to the developer's stack::

    sup = Supervisor(tmp_path)
    spec = ProcessSpec(name="edge1", argv=[...], env={...}, ready=HttpReady("http://..."))
    sup.start(spec)              # spawns, then waits until ``spec.ready`` passes
    sup.pause("edge1")           # SIGSTOP the process group
    sup.resume("edge1")
    sup.stop("edge1")            # SIGTERM, wait, then SIGKILL

Layout under the run directory: ``pids/<name>.pid``, ``pids/<name>.lock`` and
``logs/<name>.log``.

Each process is started in a new session, so it outlives the command that started it and owns
a process group of its own; signals go to that group, which also reaches any workers it forked
(nginx). A pidfile records the process's start time as well as its pid: a pid the kernel has
since given to another program is never signalled.

Several commands may act on one part at once (``crm-events-stack start`` while the watchdog
restarts the part, ``stop`` while it does): each start and stop decides and records under an
exclusive lock on the part's ``.lock`` file, so a part is never spawned twice, and a stop marks
the pidfile ``stopping`` before it signals, so that a watchdog tells a part stopped on purpose
(:attr:`ProcState.STOPPING`, then :attr:`ProcState.STOPPED`) from one that died
(:attr:`ProcState.DEAD`; :meth:`Supervisor.revive` starts only the latter). A command that
waits longer than :data:`LOCK_TIMEOUT_S` for that lock gives up with :class:`BusyError`, naming
the process that holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import fcntl
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

__all__ = [
    "LOCK_TIMEOUT_S",
    "POLL_INTERVAL_S",
    "BusyError",
    "NotRunningError",
    "ProcState",
    "ProcessSpec",
    "ReadyCheck",
    "StartError",
    "StartResult",
    "Supervisor",
    "SupervisorError",
    "deadline_in",
]

POLL_INTERVAL_S = 0.1
DEFAULT_READY_TIMEOUT_S = 60.0
DEFAULT_STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 20
PORT_RELEASE_S = 2.0
#: How long a start or stop waits for another command's hold on the part's lock. Holders keep
#: it for a spawn (port check, ``prepare``: seconds) or a signal (instant); a longer hold is a
#: paused or hung holder (``pause watchdog`` during a restart), which waiting would not end.
LOCK_TIMEOUT_S = 60.0
LOCK_POLL_S = 0.02
_HAVE_PROC = Path("/proc/self/stat").exists()

#: A readiness probe: one quick attempt, True when the process can do its job now. Probes must
#: return within a second or two and must not raise for "not yet" (connection refused, 503).
ReadyCheck = Callable[[], bool]


class SupervisorError(Exception):
    """Base of this module's errors.

    SupervisorError
    ├── StartError        the process exited, or was not ready before its deadline
    ├── NotRunningError   a signal was asked for a part that is not running
    └── BusyError         another command held the part's lock for too long
    """


class StartError(SupervisorError):
    pass


class NotRunningError(SupervisorError):
    pass


class BusyError(SupervisorError):
    pass


class ProcState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    #: A pidfile exists but its process is gone (crashed, killed, or the machine restarted).
    DEAD = "dead"
    #: The process is gone because a stop ended it: its pidfile, marked ``stopping``, is about
    #: to be removed, or stays because that stop was interrupted (Ctrl-C, the command killed).
    #: Stopped on purpose, like STOPPED; the next ``start`` or ``stop`` clears it.
    STOPPING = "stopping"
    #: No pidfile.
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """How to run one long-lived process.

    ``env`` is laid over the supervisor's own environment unless ``inherit_env`` is False.
    ``prepare`` runs before every spawn (render config files, format storage) and may raise
    to refuse the start; ``after_ready`` runs once the process is ready after a fresh spawn
    (create a Kafka topic). ``port`` is the main port the process listens on: a start refuses
    to spawn when something else already holds it, and ``status`` shows it.
    """

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    inherit_env: bool = True
    cwd: Path | None = None
    ready: ReadyCheck | None = None
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S
    stop_signal: signal.Signals = signal.SIGTERM
    port: int | None = None
    prepare: Callable[[], None] | None = None
    after_ready: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"bad process name {self.name!r}")
        if not self.argv:
            raise ValueError(f"{self.name}: empty argv")


@dataclasses.dataclass(frozen=True)
class StartResult:
    name: str
    pid: int
    #: False when the process was already running and nothing was spawned.
    spawned: bool
    #: Seconds from spawn (or from the call, when already running) until ready; None if not waited.
    ready_after_s: float | None


@dataclasses.dataclass(frozen=True)
class _PidRecord:
    pid: int
    start_ticks: int | None
    argv: tuple[str, ...]
    #: A stop is under way: the process is going away on purpose.
    stopping: bool = False
    #: A signal sent as a fault (``kill9``), so a watchdog can say why the part died.
    fault: str | None = None


def deadline_in(seconds: float) -> float:
    """An absolute deadline on the :func:`time.monotonic` clock, for ``wait_ready``."""
    return time.monotonic() + seconds


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc, or None when there is no such pid.

    Without /proc (not Linux) only liveness is known: state "S", start time 0.
    """
    if not _HAVE_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "S", 0
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ")".
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _send(pid: int, sig: signal.Signals) -> None:
    """``sig`` to the process group ``pid`` leads (start_new_session made it a leader, and
    workers it forked are in the group), else to the process; nothing if it is gone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _flock_holder(path: Path) -> int | None:
    """A process holding a flock on ``path``, from /proc/locks (None when unknown)."""
    try:
        ino = path.stat().st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF" (a "->" marks a waiter).
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        if fields[5].rsplit(":", 1)[-1] == str(ino) and fields[4].isdigit():
            return int(fields[4])
    return None


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Supervisor:
    """Processes started from, and recorded in, one run directory. Holds no other state that
    matters: a second Supervisor on the same directory (another command) sees the same parts."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.pid_dir = self.run_dir / "pids"
        self.log_dir = self.run_dir / "logs"
        # Popen objects of children spawned by this instance, so that a long-lived caller (the
        # test harness) reaps them instead of collecting zombies.
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        # (pid, return code) of the last child of each name this instance reaped.
        self._exit_codes: dict[str, tuple[int, int]] = {}
        # A watchdog's threads spawn and reap at once: the two dicts change together.
        self._children_lock = threading.Lock()

    # -- paths and records ---------------------------------------------------------------------

    def pidfile(self, name: str) -> Path:
        return self.pid_dir / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def known(self) -> list[str]:
        """Names that have a pidfile (running or dead), sorted."""
        if not self.pid_dir.is_dir():
            return []
        return sorted(p.stem for p in self.pid_dir.glob("*.pid"))

    def _read_record(self, name: str) -> _PidRecord | None:
        try:
            data = json.loads(self.pidfile(name).read_text())
            return _PidRecord(
                pid=int(data["pid"]),
                start_ticks=None if data.get("start_ticks") is None else int(data["start_ticks"]),
                argv=tuple(str(a) for a in data.get("argv", ())),
                stopping=data.get("stopping") is True,
                fault=None if data.get("fault") is None else str(data["fault"]),
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            # A pidfile we cannot read is treated as stale: we cannot prove we own that pid.
            return _PidRecord(pid=-1, start_ticks=None, argv=())

    def _write_record(self, name: str, rec: _PidRecord) -> None:
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.pidfile(name).with_suffix(".pid.tmp")
        # "pid" first: scripts/install.sh looks for '"pid": <n>,' in pidfiles.
        data: dict[str, object] = {
            "pid": rec.pid,
            "start_ticks": rec.start_ticks,
            "argv": list(rec.argv),
        }
        if rec.stopping:
            data["stopping"] = True
        if rec.fault is not None:
            data["fault"] = rec.fault
        tmp.write_text(json.dumps(data) + "\n")
        tmp.replace(self.pidfile(name))

    @contextlib.contextmanager
    def _part_lock(self, name: str) -> Iterator[None]:
        """Exclusive, across processes and threads (each holder opens the file anew), for the
        short steps that decide and record a start or a stop of ``name``. Raises
        :class:`BusyError` after :data:`LOCK_TIMEOUT_S` rather than hang behind a stuck
        holder."""
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        path = self.pid_dir / f"{name}.lock"
        timeout_s = LOCK_TIMEOUT_S
        with path.open("a") as fh:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = _flock_holder(path)
                        who = "another process" if holder is None else f"process {holder}"
                        raise BusyError(
                            f"{name}: {who} has held {path} for over {timeout_s:.0f} s (a "
                            "paused watchdog, or a start stuck preparing?); resume or stop it, "
                            "then try again"
                        ) from None
                    time.sleep(LOCK_POLL_S)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _reap(self, name: str, pid: int) -> None:
        child = self._children.get(name)
        if child is not None and child.pid == pid:
            self._poll_child(name, child)
            return
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)

    def _poll_child(self, name: str, child: subprocess.Popen[bytes]) -> None:
        if child.poll() is None:
            return
        with self._children_lock:
            self._exit_codes[name] = (child.pid, child.returncode)
            # Only this child: a restart may have spawned the next one meanwhile.
            if self._children.get(name) is child:
                del self._children[name]

    def reap_children(self) -> None:
        """Collect every child of this instance that has exited, so that none lingers as a
        zombie (a part this instance spawned and another command stopped: nothing here
        looks at its pid again). Their exit statuses stay for :meth:`exit_status`."""
        with self._children_lock:
            children = list(self._children.items())
        for name, child in children:
            self._poll_child(name, child)

    def _live_state(self, name: str, rec: _PidRecord) -> ProcState:
        if rec.pid <= 0:
            return ProcState.DEAD
        stat = _proc_stat(rec.pid)
        if stat is not None and stat[0] == "Z":
            self._reap(name, rec.pid)
            stat = _proc_stat(rec.pid)
        if stat is None or stat[0] in ("Z", "X"):
            return ProcState.DEAD
        if rec.start_ticks is not None and stat[1] != rec.start_ticks:
            return ProcState.DEAD  # the pid was reused by an unrelated process
        return ProcState.PAUSED if stat[0] in ("T", "t") else ProcState.RUNNING

    def state(self, name: str) -> ProcState:
        rec = self._read_record(name)
        if rec is None:
            return ProcState.STOPPED
        live = self._live_state(name, rec)
        # One read of the pidfile for both facts: a watchdog must never see this part DEAD
        # between the process's exit and the stop removing its pidfile.
        return ProcState.STOPPING if live is ProcState.DEAD and rec.stopping else live

    def recorded_pid(self, name: str) -> int | None:
        """The pid in the part's pidfile, alive or not; None without a pidfile. Tells whose
        process died: the one a watchdog restarted, or one someone started after it."""
        rec = self._read_record(name)
        return None if rec is None else rec.pid

    def pid(self, name: str) -> int | None:
        """The pid of the part when it is alive (running or paused), else None."""
        rec = self._read_record(name)
        if rec is None or self._live_state(name, rec) not in (ProcState.RUNNING, ProcState.PAUSED):
            return None
        return rec.pid

    def is_running(self, name: str) -> bool:
        """Alive, paused included: a paused process still holds its ports and its pidfile."""
        return self.pid(name) is not None

    def exit_status(self, name: str) -> int | None:
        """How the part's recorded process ended, when this instance spawned it and it has
        ended: its return code (negative: the signal that killed it). None otherwise (alive,
        or started by another command, whose exit status went to that command or to init)."""
        rec = self._read_record(name)
        if rec is None or self._live_state(name, rec) is not ProcState.DEAD:
            return None
        ended = self._exit_codes.get(name)
        return ended[1] if ended is not None and ended[0] == rec.pid else None

    def fault(self, name: str) -> str | None:
        """The signal :meth:`kill9` sent to the part's recorded process, if it did."""
        rec = self._read_record(name)
        return None if rec is None else rec.fault

    def log_tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with self.logfile(name).open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 16384))
                text = fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- start and readiness -------------------------------------------------------------------

    def start(
        self, spec: ProcessSpec, *, wait: bool = True, deadline: float | None = None
    ) -> StartResult:
        """Start ``spec`` unless it is already alive; then (``wait``) block until it is ready.

        A stale pidfile is replaced. Raises :class:`StartError` when the port is held by a
        process this supervisor did not start, when ``prepare`` fails, when the process exits
        early, or when it is not ready by ``deadline`` (default: ``spec.ready_timeout_s`` from
        now); in the last two cases the error carries the tail of the part's log.
        """
        t0 = time.monotonic()
        with self._part_lock(spec.name):
            pid = self.pid(spec.name)
            if pid is None:
                self.pidfile(spec.name).unlink(missing_ok=True)
                pid = self._launch(spec)
                spawned = True
            else:
                spawned = False
        if not wait:
            return StartResult(spec.name, pid, spawned=spawned, ready_after_s=None)
        if not spawned:
            self.wait_ready(spec, deadline)
            return StartResult(spec.name, pid, False, time.monotonic() - t0)
        ready_after = self.finish_start(spec, deadline)
        return StartResult(spec.name, pid, spawned=True, ready_after_s=ready_after)

    def revive(self, spec: ProcessSpec) -> int | None:
        """Spawn ``spec`` again if it died on its own: its pidfile is there, its process is
        gone, and no stop is under way. Returns the new pid, or None when the part is in any
        other state (stopped or being stopped on purpose, alive, started meanwhile by someone
        else). Does not wait: :meth:`finish_start` does.

        Unlike :meth:`start`, a failure (port held, ``prepare`` failed) keeps the stale
        pidfile, so the part still shows as dead and a watchdog tries again later.
        """
        with self._part_lock(spec.name):
            rec = self._read_record(spec.name)
            if rec is None or rec.stopping:
                return None
            if rec.pid <= 0:
                # Whether a process of it still runs is unknown: a second copy is worse than none.
                raise StartError(
                    f"{spec.name}: its pidfile {self.pidfile(spec.name)} cannot be read; "
                    f"'crm-events-stack stop {spec.name}' or 'start {spec.name}' replaces it"
                )
            if self._live_state(spec.name, rec) is not ProcState.DEAD:
                return None
            return self._launch(spec)

    def finish_start(self, spec: ProcessSpec, deadline: float | None = None) -> float:
        """After a spawn: wait until ready (``deadline`` as in :meth:`start`), then run
        ``after_ready``. Returns the seconds until ready; raises :class:`StartError`."""
        t0 = time.monotonic()
        self.wait_ready(
            spec, deadline if deadline is not None else deadline_in(spec.ready_timeout_s)
        )
        ready_after = time.monotonic() - t0
        if spec.after_ready is not None:
            try:
                spec.after_ready()
            except (OSError, ValueError, RuntimeError) as exc:
                raise StartError(f"{spec.name}: post-start step failed: {exc}") from exc
        return ready_after

    def _launch(self, spec: ProcessSpec) -> int:
        """Port check, ``prepare``, spawn. Called with the part's lock held."""
        if spec.port is not None and not self._port_frees(spec.port):
            raise StartError(
                f"{spec.name}: port {spec.port} is already in use by a process not started "
                f"from {self.run_dir}; stop it or choose another port"
            )
        if spec.prepare is not None:
            try:
                spec.prepare()
            except StartError:
                raise
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                raise StartError(f"{spec.name}: preparing to start failed: {exc}") from exc
        return self._spawn(spec)

    @staticmethod
    def _port_frees(port: int) -> bool:
        # A process killed a moment ago may still be closing its listener.
        deadline = time.monotonic() + PORT_RELEASE_S
        while _port_taken(port):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL_S)
        return True

    def _spawn(self, spec: ProcessSpec) -> int:
        env = dict(os.environ) if spec.inherit_env else {}
        env.update(spec.env)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with self.logfile(spec.name).open("ab") as log:
                log.write(f"=== {stamp} start: {' '.join(spec.argv)}\n".encode())
                log.flush()
                try:
                    child = subprocess.Popen(
                        list(spec.argv),
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=spec.cwd,
                        env=env,
                        start_new_session=True,
                    )
                except OSError as exc:
                    raise StartError(f"{spec.name}: cannot run {spec.argv[0]!r}: {exc}") from exc
        except OSError as exc:  # the log (disk full, permissions); Popen's are StartError
            raise StartError(f"{spec.name}: cannot write {self.logfile(spec.name)}: {exc}") from exc
        stat = _proc_stat(child.pid)
        try:
            self._write_record(
                spec.name,
                _PidRecord(
                    pid=child.pid,
                    start_ticks=None if stat is None else stat[1],
                    argv=tuple(spec.argv),
                ),
            )
        except OSError as exc:
            # Without its pidfile nothing could ever stop it (and a watchdog would spawn
            # another): it goes at once.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise StartError(
                f"{spec.name}: cannot write {self.pidfile(spec.name)}: {exc}; "
                "the process just started was killed"
            ) from exc
        with self._children_lock:
            self._children[spec.name] = child
        return child.pid

    def check_ready(self, spec: ProcessSpec) -> bool:
        """One probe: alive and (if it has a check) passing it. Never raises for "not yet"."""
        if self.state(spec.name) is not ProcState.RUNNING:
            return False
        return spec.ready is None or spec.ready()

    def wait_ready(self, spec: ProcessSpec, deadline: float | None = None) -> float:
        """Poll until ``spec`` is ready; returns the seconds waited.

        ``deadline`` is absolute, on the :func:`time.monotonic` clock (see :func:`deadline_in`);
        default ``spec.ready_timeout_s`` from now. Fails fast when the process exits.
        """
        t0 = time.monotonic()
        if deadline is None:
            deadline = t0 + spec.ready_timeout_s
        while True:
            st = self.state(spec.name)
            if st is ProcState.PAUSED:
                raise StartError(f"{spec.name}: is paused; resume it first")
            if st in (ProcState.STOPPING, ProcState.STOPPED):
                raise StartError(f"{spec.name}: was stopped before it was ready")
            if st is not ProcState.RUNNING:
                raise StartError(self._failure(spec.name, "exited before it was ready"))
            if spec.ready is None or spec.ready():
                return time.monotonic() - t0
            if time.monotonic() >= deadline:
                raise StartError(
                    self._failure(spec.name, f"not ready after {time.monotonic() - t0:.1f} s")
                )
            time.sleep(POLL_INTERVAL_S)

    async def wait_ready_async(self, spec: ProcessSpec, deadline: float | None = None) -> float:
        """:meth:`wait_ready` for async callers: the polling runs in a worker thread, so the
        caller's event loop keeps serving while it waits."""
        return await asyncio.to_thread(self.wait_ready, spec, deadline)

    def _failure(self, name: str, what: str) -> str:
        tail = self.log_tail(name)
        msg = f"{name}: {what} (log: {self.logfile(name)})"
        return f"{msg}\n{tail}" if tail else msg

    # -- signals -------------------------------------------------------------------------------

    def _signal(self, name: str, sig: signal.Signals) -> int:
        rec = self._read_record(name)
        if rec is None or self._live_state(name, rec) is ProcState.DEAD:
            raise NotRunningError(f"{name}: not running")
        _send(rec.pid, sig)
        return rec.pid

    def stop(
        self,
        name: str,
        timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
        sig: signal.Signals = signal.SIGTERM,
    ) -> bool:
        """Stop ``name``: ``sig``, wait up to ``timeout_s``, then SIGKILL. Removes the pidfile.

        Returns False when it was not running (a stale pidfile is just removed). The pidfile
        is marked ``stopping`` first, so a watchdog leaves the part alone.
        """
        with self._part_lock(name):
            rec = self._read_record(name)
            if rec is None:
                return False
            if self._live_state(name, rec) is ProcState.DEAD:
                self.pidfile(name).unlink(missing_ok=True)
                return False
            rec = dataclasses.replace(rec, stopping=True)
            self._write_record(name, rec)
            # Signalled under the lock, the process just checked: no start can have put
            # another process in the pidfile by now.
            _send(rec.pid, sig)
            # A stopped process keeps a SIGTERM pending until it is continued.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec.pid, signal.SIGCONT)
        deadline = time.monotonic() + timeout_s
        while self._live_state(name, rec) is not ProcState.DEAD:
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(rec.pid, signal.SIGKILL)
                self._wait_dead(name, rec, 5.0)
                break
            time.sleep(POLL_INTERVAL_S)
        self._forget(name, rec)
        return True

    def _forget(self, name: str, rec: _PidRecord) -> None:
        """Remove the pidfile if it still records ``rec``'s process: a start that came in
        after that process ended has written its own, which stays."""
        with self._part_lock(name):
            now = self._read_record(name)
            if now is not None and now.pid == rec.pid:
                self.pidfile(name).unlink(missing_ok=True)

    def _wait_dead(self, name: str, rec: _PidRecord, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._live_state(name, rec) is not ProcState.DEAD and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_S)

    def kill9(self, name: str) -> int:
        """SIGKILL the process group, wait until it is gone; the pidfile stays (the part shows
        as dead, a watchdog restarts it, and the next start replaces it). Returns the pid."""
        with self._part_lock(name):
            rec = self._read_record(name)
            if rec is None or self._live_state(name, rec) is ProcState.DEAD:
                raise NotRunningError(f"{name}: not running")
            # Recorded first, so that whoever sees the part dead knows why; signalled under
            # the lock, so that it is this process that dies.
            rec = dataclasses.replace(rec, fault=signal.SIGKILL.name)
            self._write_record(name, rec)
            _send(rec.pid, signal.SIGKILL)
        self._wait_dead(name, rec, 5.0)
        return rec.pid

    def pause(self, name: str) -> int:
        """SIGSTOP the process group: it keeps its sockets open but answers nothing."""
        return self._signal(name, signal.SIGSTOP)

    def resume(self, name: str) -> int:
        return self._signal(name, signal.SIGCONT)

    def stop_all(
        self, order: Sequence[str] = (), timeouts: Mapping[str, float] | None = None
    ) -> list[str]:
        """Stop every part with a pidfile: those in ``order`` first, in that order, then the
        rest. Returns the names that were running."""
        timeouts = timeouts or {}
        names = [n for n in order if n in self.known()]
        names += [n for n in self.known() if n not in names]
        return [n for n in names if self.stop(n, timeouts.get(n, DEFAULT_STOP_TIMEOUT_S))]
