"""The watchdog and the supervisor's part lock over real processes (``sleep``, ``sh``) in a
temporary run directory, no services: the watchdog runs in a thread with its own
:class:`Supervisor`, as the ``watchdog`` part does in a process of its own, while the test
kills, stops and pauses parts through another, as ``crm-events-stack`` does. Where the
watchdog's own process matters (killed -9, replaced by ``up``) it runs in a process: a small
script, or ``crm-events-stack watchdog`` itself on a private run directory and private ports
with no part running."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devtools import supervisor as supervisor_module
from devtools import watchdog
from devtools.stack import REDIS_MODE_FILE, SettingsError, Stack, StackSettings
from devtools.supervisor import BusyError, ProcessSpec, ProcState, StartError, Supervisor
from devtools.watchdog import Policy, WatchdogReady, read_state
from tests.stack_ports import private_stack_ports
from tests.waiting import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
FAST = Policy(poll_s=0.05, stable_s=2.0, backoff_initial_s=0.05, max_failed_restarts=3)


def sleeper(name: str) -> ProcessSpec:
    return ProcessSpec(name=name, argv=["sleep", "60"], stop_timeout_s=5)


def stubborn(name: str, run_dir: Path) -> ProcessSpec:
    """Ignores SIGTERM: a stop of it waits for its timeout, then SIGKILLs. Ready only once
    its shell has set the trap (a marker file written after it): a SIGTERM sent between the
    spawn and the trap would end it, and a test that means to interrupt its stop would find
    it already gone."""
    marker = run_dir / f"{name}.trapped"
    return ProcessSpec(
        name=name,
        argv=["sh", "-c", f"trap '' TERM; : > '{marker}'; sleep 60 & wait"],
        ready=marker.exists,
        prepare=lambda: marker.unlink(missing_ok=True),
    )


def crasher(name: str) -> ProcessSpec:
    return ProcessSpec(name=name, argv=["sh", "-c", "echo boom; exit 3"])


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Supervisor]:
    s = Supervisor(tmp_path)
    yield s
    s.stop_all(timeouts={n: 1.0 for n in s.known()})


def state_of(tmp_path: Path) -> watchdog.WatchdogState:
    found = read_state(tmp_path)
    assert found is not None
    return found


def marked(sup: Supervisor, name: str) -> bool:
    return json.loads(sup.pidfile(name).read_text()).get("stopping") is True


def interrupted_stop(sup: Supervisor, tmp_path: Path, name: str) -> None:
    """``crm-events-stack stop NAME`` killed (as Ctrl-C or a kill would) once it has marked
    the pidfile; then the part's process ends: its pidfile stays, marked. The part must
    ignore SIGTERM (:func:`stubborn`), or the stop could end before it is interrupted."""
    # A part the watchdog just restarted may not have set its trap yet (see stubborn).
    eventually_sync((tmp_path / f"{name}.trapped").exists, 10, "the part's trap")
    stopper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from devtools.supervisor import Supervisor; "
            "Supervisor(sys.argv[1]).stop(sys.argv[2], 60)",
            str(tmp_path),
            name,
        ],
        cwd=ROOT,
    )
    try:
        eventually_sync(lambda: marked(sup, name), 10, "the stop's mark")
    finally:
        stopper.kill()
        stopper.wait()
    sup.kill9(name)


def test_a_stop_marks_the_pidfile_and_revive_never_brings_back_a_part_being_stopped(
    sup: Supervisor, tmp_path: Path
) -> None:
    spec = stubborn("edge1", tmp_path)
    pid = sup.start(spec).pid
    stopping = threading.Thread(target=sup.stop, args=("edge1", 3.0))
    stopping.start()
    eventually_sync(lambda: marked(sup, "edge1"), 5, "the mark")
    assert json.loads(sup.pidfile("edge1").read_text())["pid"] == pid  # still first
    # The process dies (any cause) before the stop has noticed: still not revived.
    sup.kill9("edge1")
    assert sup.revive(spec) is None
    stopping.join(10)
    assert not sup.pidfile("edge1").exists()
    assert sup.revive(spec) is None  # stopped: no pidfile
    assert sup.state("edge1") is ProcState.STOPPED


def test_an_interrupted_stop_leaves_the_part_stopping_until_a_start_or_stop(
    sup: Supervisor, tmp_path: Path
) -> None:
    spec = stubborn("edge1", tmp_path)
    sup.start(spec)
    interrupted_stop(sup, tmp_path, "edge1")
    # Gone, by a stop: STOPPING (not DEAD, which a watchdog would restart), and it stays so.
    assert sup.state("edge1") is ProcState.STOPPING
    assert sup.pid("edge1") is None and sup.revive(spec) is None
    assert sup.state("edge1") is ProcState.STOPPING
    new = sup.start(spec, wait=False)
    assert new.spawned and sup.state("edge1") is ProcState.RUNNING
    interrupted_stop(sup, tmp_path, "edge1")
    assert not sup.stop("edge1") and sup.state("edge1") is ProcState.STOPPED


def test_a_killed_part_is_revived_once_however_many_try_at_once(
    sup: Supervisor, tmp_path: Path
) -> None:
    spec = sleeper("edge1")
    old = sup.start(spec).pid
    assert sup.kill9("edge1") == old
    assert sup.fault("edge1") == "SIGKILL"
    assert sup.state("edge1") is ProcState.DEAD

    # Two watchdogs' worth of revives and a user's start, all at once: one process comes out,
    # from whichever took the part's lock first.
    others = [Supervisor(tmp_path) for _ in range(5)]
    with ThreadPoolExecutor(5) as pool:
        go = threading.Barrier(5)

        def revive(s: Supervisor) -> int | None:
            go.wait()
            return s.revive(spec)

        def start(s: Supervisor) -> int | None:
            go.wait()
            result = s.start(spec, wait=False)
            return result.pid if result.spawned else None

        futures = [pool.submit(revive, s) for s in others[:4]]
        futures.append(pool.submit(start, others[4]))
        results = [f.result() for f in futures]
    spawned = [pid for pid in results if pid is not None]
    assert len(spawned) == 1, results
    assert sup.pid("edge1") == spawned[0] and sup.fault("edge1") is None
    # A live part is not revived either.
    assert sup.revive(spec) is None


def test_the_watchdog_restarts_a_killed_part_and_leaves_stopped_and_paused_ones_alone(
    sup: Supervisor,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # edge1 ignores SIGTERM, so that a stop of it can be interrupted after its mark.
    specs = [stubborn("edge1", tmp_path), sleeper("edge2"), sleeper("producer"), crasher("broken")]
    for spec in specs[:3]:
        sup.start(spec)
    stop = threading.Event()
    thread = threading.Thread(
        target=watchdog.run, args=(Supervisor(tmp_path), specs, tmp_path, FAST, stop), daemon=True
    )
    caplog.set_level(logging.INFO, logger="crm_events.watchdog")
    thread.start()
    try:
        eventually_sync(lambda: read_state(tmp_path), 5, "the state file")

        # kill -9: back within the watchdog's next look.
        old = sup.kill9("edge1")
        t0 = time.monotonic()
        eventually_sync(lambda: sup.pid("edge1") not in (None, old), 5, "edge1 back")
        back_s = time.monotonic() - t0
        assert back_s < 2, back_s
        assert state_of(tmp_path).parts["edge1"].restarts == 1
        # A stop of that restarted part, interrupted after its mark, right after the
        # restart: no death, no failed restart, however often the watchdog looks.
        interrupted_stop(sup, tmp_path, "edge1")
        ticks = state_of(tmp_path).ticks
        eventually_sync(lambda: state_of(tmp_path).ticks >= ticks + 20, 10, "20 more looks")
        edge1 = state_of(tmp_path).parts["edge1"]
        assert (edge1.restarts, edge1.failed_restarts, edge1.condition) == (1, 0, "watching")
        assert sup.state("edge1") is ProcState.STOPPING
        sup.start(specs[0])

        # stop and pause: left alone for as many looks as we care to wait.
        assert sup.stop("edge2")
        paused = sup.pause("producer")
        ticks = state_of(tmp_path).ticks
        eventually_sync(lambda: state_of(tmp_path).ticks >= ticks + 20, 10, "20 more looks")
        assert sup.state("edge2") is ProcState.STOPPED
        assert sup.state("producer") is ProcState.PAUSED and sup.pid("producer") == paused
        assert state_of(tmp_path).parts["edge2"].restarts == 0
        assert state_of(tmp_path).parts["producer"].restarts == 0
        sup.resume("producer")

        # A part that keeps dying: started by hand once, then by the watchdog with backoff,
        # until it gives up; the watchdog spawned those, so it knows their exit status.
        sup.start(specs[3], wait=False)
        eventually_sync(
            lambda: state_of(tmp_path).parts["broken"].condition == "gave up", 10, "giving up"
        )
        broken = state_of(tmp_path).parts["broken"]
        assert broken.restarts == broken.failed_restarts == FAST.max_failed_restarts
        assert broken.last_reason == "exited with status 3; last log line: boom"
        assert sup.state("broken") is ProcState.DEAD

        # One watchdog per run directory: a second one exits at once, naming the first.
        assert watchdog.run(Supervisor(tmp_path), specs, tmp_path, FAST, threading.Event()) == 1
        first = state_of(tmp_path).pid
        assert capsys.readouterr().err == (
            f"crm-events-stack: error: another watchdog (pid {first}) already watches {tmp_path}\n"
        )
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    # Nothing but the broken part's failed restarts was complained about.
    complaints = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "restarted (pid" not in r.getMessage()
    ]
    assert all(line.startswith("broken") for line in complaints), complaints
    # Once the watchdog has stopped, a killed part stays dead.
    sup.kill9("edge1")
    assert sup.state("edge1") is ProcState.DEAD
    assert signal.SIGKILL.name == sup.fault("edge1")


def test_stopping_waits_for_a_spawn_in_progress_so_no_process_is_left_without_a_pidfile(
    sup: Supervisor, tmp_path: Path
) -> None:
    preparing = threading.Event()
    release = threading.Event()

    def slow_prepare() -> None:  # a Kafka format, a Sentinel query
        preparing.set()
        release.wait(10)

    spec = dataclasses.replace(sleeper("kafka"), prepare=slow_prepare)
    sup.start(dataclasses.replace(spec, prepare=None))
    stop = threading.Event()
    thread = threading.Thread(
        target=watchdog.run, args=(Supervisor(tmp_path), [spec], tmp_path, FAST, stop), daemon=True
    )
    thread.start()
    try:
        eventually_sync(lambda: read_state(tmp_path), 5, "the state file")
        old = sup.kill9("kafka")
        assert preparing.wait(5)
        stop.set()  # `down` stops the watchdog while it is preparing the spawn
        thread.join(0.5)
        assert thread.is_alive(), "the watchdog left before its spawn was done"
        release.set()
        thread.join(10)
        assert not thread.is_alive()
    finally:
        release.set()
        stop.set()
    # The spawn finished and recorded its process: `down`, next, stops it.
    assert sup.pid("kafka") not in (None, old)


def test_a_spawn_whose_pidfile_cannot_be_written_leaves_no_process(
    sup: Supervisor, tmp_path: Path
) -> None:
    # A duration no other process uses, to find this one in /proc.
    argv = ["sleep", f"{60 + os.getpid() % 1000 / 1000:.3f}"]
    spec = ProcessSpec(name="producer", argv=argv)
    # The pidfile is written through a temporary file: make that name unusable.
    (sup.pid_dir / "producer.pid.tmp").mkdir(parents=True)
    with pytest.raises(StartError, match=r"cannot write .*producer\.pid.*was killed"):
        sup.start(spec)
    assert processes_running(argv) == []  # killed and reaped
    assert sup.state("producer") is ProcState.STOPPED


def processes_running(argv: list[str]) -> list[int]:
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == wanted:
                found.append(int(entry.name))
    return found


def test_a_corrupt_pidfile_is_not_revived_and_a_held_lock_is_named(
    sup: Supervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = sleeper("producer")
    sup.pid_dir.mkdir(parents=True)
    sup.pidfile("producer").write_text("{half a write")
    assert sup.state("producer") is ProcState.DEAD
    # A copy of it may still run: better none than two.
    with pytest.raises(StartError, match="cannot be read"):
        sup.revive(spec)
    assert sup.start(spec).spawned

    monkeypatch.setattr(supervisor_module, "LOCK_TIMEOUT_S", 0.3)
    with (sup.pid_dir / "producer.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a paused watchdog in the middle of a restart
        t0 = time.monotonic()
        with pytest.raises(BusyError, match=f"process {os.getpid()} has held .*producer.lock"):
            sup.stop("producer")
        assert time.monotonic() - t0 < 5
    assert sup.stop("producer")


def test_stopped_children_of_the_watchdog_do_not_stay_zombies(
    sup: Supervisor, tmp_path: Path
) -> None:
    mine = Supervisor(tmp_path)  # the watchdog's
    pid = mine.start(sleeper("edge1")).pid
    # `crm-events-stack stop edge1`, a process of its own; the watchdog never looks at that
    # pid again, as the pidfile is gone.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from devtools.supervisor import Supervisor; "
            "assert Supervisor(sys.argv[1]).stop('edge1')",
            str(tmp_path),
        ],
        cwd=ROOT,
        check=True,
    )
    assert Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    mine.reap_children()
    assert not Path(f"/proc/{pid}").exists()
    assert mine.exit_status("edge1") is None  # no pidfile: nothing to explain


WATCHDOG_SCRIPT = """
import sys
from pathlib import Path
from devtools import watchdog
from devtools.supervisor import ProcessSpec, Supervisor
run_dir = Path(sys.argv[1])
specs = [ProcessSpec(name="edge1", argv=["sleep", "60"], stop_timeout_s=5)]
policy = watchdog.Policy(poll_s=0.05)
watchdog.configure_logging()
sys.exit(watchdog.run(Supervisor(run_dir), specs, run_dir, policy))
"""


def test_a_watchdog_killed_9_frees_its_lock_and_the_next_one_carries_its_counts_over(
    sup: Supervisor, tmp_path: Path
) -> None:
    spec = ProcessSpec(
        name=watchdog.NAME,
        argv=[sys.executable, "-c", WATCHDOG_SCRIPT, str(tmp_path)],
        cwd=ROOT,
        ready=WatchdogReady(tmp_path, lambda: sup.pid(watchdog.NAME)),
        ready_timeout_s=20,
    )
    sup.start(sleeper("edge1"))
    first = sup.start(spec).pid
    old = sup.kill9("edge1")
    eventually_sync(lambda: sup.pid("edge1") not in (None, old), 5, "edge1 back")
    eventually_sync(lambda: state_of(tmp_path).parts["edge1"].restarts == 1, 5, "counted")

    sup.kill9(watchdog.NAME)
    assert sup.state(watchdog.NAME) is ProcState.DEAD
    second = sup.start(spec).pid  # as `up` does: the dead one's lock went with it
    assert second != first and state_of(tmp_path).pid == second
    assert state_of(tmp_path).parts["edge1"].restarts == 1  # carried over
    old = sup.kill9("edge1")
    eventually_sync(lambda: state_of(tmp_path).parts["edge1"].restarts == 2, 5, "counted on")
    assert sup.pid("edge1") not in (None, old)
    sup.stop(watchdog.NAME)


# -- `up` and the watchdog of an earlier `up` --------------------------------------------------


@pytest.fixture
def private_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """This process's environment as a user's shell for a stack on a private run directory
    and private ports, none of whose parts runs; returns three edge ports."""
    for key in [k for k in os.environ if k.startswith("CRM_EVENTS_")]:
        monkeypatch.delenv(key)
    env, edge_ports = private_stack_ports(2, spare=1)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CRM_EVENTS_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.chdir(ROOT)
    return edge_ports


def test_up_replaces_a_watchdog_that_watches_other_parts_or_settings(
    private_env: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    def stack() -> Stack:
        return Stack(StackSettings.from_env(os.environ))

    first = stack()
    try:
        [started] = first.start([watchdog.NAME])
        found = first.watchdog_state()
        assert found is not None and found.fingerprint == first.watchdog_fingerprint()
        # The same settings again (`make up` twice): the same watchdog.
        [again] = stack().start([watchdog.NAME])
        assert not again.spawned and again.pid == started.pid

        # One more edge (the runbook's CRM_EVENTS_EDGE_PORTS=9011,9012,9013 make up): replaced
        # by one that watches edge3 too.
        monkeypatch.setenv("CRM_EVENTS_EDGE_PORTS", ",".join(map(str, private_env)))
        bigger = stack()
        [replaced] = bigger.start([watchdog.NAME])
        assert replaced.spawned and replaced.pid != started.pid
        found = bigger.watchdog_state()
        assert found is not None and found.pid == replaced.pid
        assert "edge3" in found.parts and found.fingerprint == bigger.watchdog_fingerprint()

        # Another setting alone (the producer's rate): replaced too.
        monkeypatch.setenv("CRM_EVENTS_PRODUCER_RATE", "7")
        [faster] = stack().start([watchdog.NAME])
        assert faster.spawned and faster.pid != replaced.pid
    finally:
        first.stop([watchdog.NAME])
    assert first.supervisor.known() == []


def test_restart_refuses_to_mix_redis_modes_like_start(
    private_env: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_EVENTS_REDIS_MODE", "cluster")
    stack = Stack(StackSettings.from_env(os.environ))
    # A part of a running single-mode stack (a stand-in process: only its pidfile matters).
    running = stack.supervisor.start(sleeper("ingest")).pid
    (stack.settings.run_dir / REDIS_MODE_FILE).write_text("single\n")
    with pytest.raises(SettingsError, match="runs in single mode"):
        stack.restart(["ingest"])
    assert stack.supervisor.pid("ingest") == running  # not stopped either
    stack.supervisor.stop("ingest")
