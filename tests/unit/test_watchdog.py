"""The watchdog's decisions (devtools/watchdog.py) over a fake of the supervisor's port and a
fake clock: which parts it restarts, how it backs off from one that keeps dying and gives up,
what it counts, logs and writes for ``status``. The same watchdog over real processes:
tests/unit/test_watchdog_processes.py; over the real stack: tests/integration/test_watchdog.py.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from devtools import watchdog
from devtools.supervisor import ProcessSpec, ProcState, StartError
from devtools.watchdog import Policy, Watchdog, WatchdogReady, read_state

NAMES = ("redis", "edge1", "edge2", "producer")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeParts:
    """Parts as the supervisor reports them: a dead part whose stop marked it (``stopping``)
    is STOPPING, as Supervisor.state reports it. ``revive`` follows the real one's rule (only
    a dead part without a stop under way is spawned); ``crashing`` parts die right after;
    ``refuse`` is raised by every revive while set."""

    clock: Clock
    states: dict[str, ProcState] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    stopping: set[str] = field(default_factory=set)
    crashing: set[str] = field(default_factory=set)
    exit_codes: dict[str, int] = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    refuse: Exception | None = None
    revived: list[tuple[str, float]] = field(default_factory=list)
    attempts: list[tuple[str, float]] = field(default_factory=list)
    reaps: int = 0
    _pid: itertools.count[int] = field(default_factory=lambda: itertools.count(5000))

    def state(self, name: str) -> ProcState:
        state = self.states.get(name, ProcState.STOPPED)
        if state is ProcState.DEAD and name in self.stopping:
            return ProcState.STOPPING
        return state

    def pid(self, name: str) -> int | None:
        alive = self.state(name) in (ProcState.RUNNING, ProcState.PAUSED)
        return self.pids.get(name) if alive else None

    def recorded_pid(self, name: str) -> int | None:
        return None if self.state(name) is ProcState.STOPPED else self.pids.get(name)

    def reap_children(self) -> None:
        self.reaps += 1

    def revive(self, spec: ProcessSpec) -> int | None:
        if self.state(spec.name) is not ProcState.DEAD:
            return None
        self.attempts.append((spec.name, self.clock.now))
        if self.refuse is not None:
            raise self.refuse
        self.revived.append((spec.name, self.clock.now))
        self.pids[spec.name] = next(self._pid)
        self.faults.pop(spec.name, None)
        self.states[spec.name] = ProcState.DEAD if spec.name in self.crashing else ProcState.RUNNING
        return self.pids[spec.name]

    def finish_start(self, spec: ProcessSpec, deadline: float | None = None) -> float:
        if self.state(spec.name) is not ProcState.RUNNING:
            raise StartError(f"{spec.name}: exited before it was ready (log: x)\nboom")
        return 0.25

    def exit_status(self, name: str) -> int | None:
        return self.exit_codes.get(name)

    def fault(self, name: str) -> str | None:
        return self.faults.get(name)

    def log_tail(self, name: str, lines: int = 20) -> str:
        return self.logs.get(name, "")

    def kill(self, name: str) -> None:
        self.states[name] = ProcState.DEAD
        self.faults[name] = "SIGKILL"

    def start(self, name: str) -> int:
        """``crm-events-stack start``: a new process that the watchdog did not start."""
        self.states[name] = ProcState.RUNNING
        self.pids[name] = next(self._pid)
        return self.pids[name]


def inline(fn: object) -> None:
    fn()  # type: ignore[operator]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def parts(clock: Clock) -> FakeParts:
    fake = FakeParts(clock)
    for i, name in enumerate(NAMES):
        fake.states[name] = ProcState.RUNNING
        fake.pids[name] = 100 + i
    return fake


def make(parts: FakeParts, clock: Clock, tmp_path: Path, **policy: float) -> Watchdog:
    return Watchdog(
        parts,
        [ProcessSpec(name=n, argv=["true"]) for n in NAMES],
        watchdog.state_file(tmp_path),
        policy=Policy(**policy),  # type: ignore[arg-type]
        clock=clock,
        background=inline,
    )


def run_for(dog: Watchdog, clock: Clock, seconds: float) -> None:
    end = clock.now + seconds
    while clock.now < end:
        dog.tick()
        clock.now += dog.policy.poll_s


def report(tmp_path: Path, name: str) -> watchdog.PartReport:
    found = read_state(tmp_path)
    assert found is not None
    return found.parts[name]


def complaints(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_backoff_doubles_from_an_immediate_restart_then_gives_up() -> None:
    assert [Policy().delay(n) for n in range(6)] == [0.0, 1.0, 2.0, 4.0, 8.0, None]
    capped = Policy(backoff_initial_s=1, backoff_max_s=3, max_failed_restarts=10)
    assert [capped.delay(n) for n in range(1, 5)] == [1.0, 2.0, 3.0, 3.0]
    with pytest.raises(ValueError):
        Policy(max_failed_restarts=0)


def test_a_killed_part_is_restarted_at_the_next_look_counted_and_logged(
    parts: FakeParts, clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crm_events.watchdog")
    dog = make(parts, clock, tmp_path)
    dog.tick()
    assert parts.revived == []
    parts.kill("edge1")
    dog.tick()

    assert parts.revived == [("edge1", clock.now)]
    assert parts.state("edge1") is ProcState.RUNNING
    edge1 = report(tmp_path, "edge1")
    assert edge1.restarts == 1 and edge1.condition == "watching"
    assert edge1.last_reason == "killed by SIGKILL (crm-events-stack kill)"
    assert edge1.last_restart is not None
    assert {n: r.restarts for n, r in read_state(tmp_path).parts.items()} == {  # type: ignore[union-attr]
        "redis": 0,
        "edge1": 1,
        "edge2": 0,
        "producer": 0,
    }
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        line.startswith("edge1 restarted (pid ")
        and "restart 1" in line
        and "killed by SIGKILL" in line
        for line in lines
    ), lines
    assert "edge1 ready 0.2 s after its restart" in lines


def test_stopped_paused_and_being_stopped_parts_are_left_alone(
    parts: FakeParts, clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crm_events.watchdog")
    dog = make(parts, clock, tmp_path)
    parts.states["edge1"] = ProcState.STOPPED  # crm-events-stack stop / down: no pidfile
    parts.states["edge2"] = ProcState.PAUSED  # pause: SIGSTOP is not death
    parts.states["producer"] = ProcState.DEAD  # died while a stop was under way
    parts.stopping.add("producer")
    run_for(dog, clock, 60)

    assert parts.revived == [] and parts.attempts == []
    found = read_state(tmp_path)
    assert found is not None and found.total == 0
    assert found.ticks == 120
    assert {n: r.condition for n, r in found.parts.items()} == dict.fromkeys(NAMES, "watching")
    assert complaints(caplog) == []
    # Once that stop has removed the pidfile, the producer is simply stopped.
    parts.states["producer"] = ProcState.STOPPED
    parts.stopping.clear()
    run_for(dog, clock, 5)
    assert parts.revived == []


def test_a_part_stopped_on_purpose_soon_after_its_restart_is_no_failed_restart(
    parts: FakeParts, clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stop's process exit comes before its pidfile goes (or the stop was interrupted,
    Ctrl-C, and the mark stays): no death, no backoff, no giving up, nothing logged."""
    caplog.set_level(logging.INFO, logger="crm_events.watchdog")
    dog = make(parts, clock, tmp_path)
    parts.kill("edge1")
    dog.tick()
    assert parts.revived == [("edge1", clock.now)]
    clock.now += 1.5
    # crm-events-stack stop edge1, interrupted once the process had gone: mark left behind.
    parts.states["edge1"] = ProcState.DEAD
    parts.stopping.add("edge1")
    run_for(dog, clock, 60)

    assert parts.attempts == [("edge1", clock.now - 61.5)]
    edge1 = report(tmp_path, "edge1")
    assert edge1.condition == "watching" and edge1.failed_restarts == 0 and edge1.restarts == 1
    assert complaints(caplog) == [
        "edge1 restarted (pid 5000, restart 1): killed by SIGKILL (crm-events-stack kill)"
    ]
    # Started again by hand and killed: a fresh death, restarted at once.
    parts.stopping.clear()
    parts.start("edge1")
    dog.tick()
    parts.kill("edge1")
    dog.tick()
    assert parts.revived[-1] == ("edge1", clock.now)
    assert report(tmp_path, "edge1").failed_restarts == 0


def test_a_process_the_watchdog_did_not_start_is_not_charged_to_its_restart(
    parts: FakeParts, clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A user's stop and start right after a restart, and the new process dies before the
    watchdog looks again: restarted at once, not as a failed restart."""
    caplog.set_level(logging.INFO, logger="crm_events.watchdog")
    dog = make(parts, clock, tmp_path)
    parts.kill("edge2")
    dog.tick()  # the watchdog's restart
    for _ in range(8):
        clock.now += 0.5
        parts.start("edge2")  # stop + start between two looks
        parts.states["edge2"] = ProcState.DEAD  # and that process dies at once
        dog.tick()
        assert parts.revived[-1] == ("edge2", clock.now)  # at once, every time
    edge2 = report(tmp_path, "edge2")
    assert edge2.condition == "watching" and edge2.failed_restarts == 0
    assert edge2.restarts == 9
    assert [line for line in complaints(caplog) if "restarted (pid" not in line] == []


def test_a_part_that_keeps_dying_backs_off_gives_up_and_is_watched_again_once_started(
    parts: FakeParts, clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crm_events.watchdog")
    dog = make(parts, clock, tmp_path)
    parts.crashing.add("edge2")
    parts.states["edge2"] = ProcState.DEAD
    parts.exit_codes["edge2"] = 3
    parts.logs["edge2"] = "ValueError: CRM_EVENTS_EDGE_PORT: expected a TCP port\n"
    t0 = clock.now
    run_for(dog, clock, 120)

    times = [t - t0 for name, t in parts.revived if name == "edge2"]
    # At once, then after 1, 2, 4 and 8 s (each death is noticed at the next look, 0.5 s).
    assert times == [0.0, 1.5, 4.0, 8.5, 17.0]
    edge2 = report(tmp_path, "edge2")
    assert edge2.condition == "gave up" and edge2.restarts == 5
    assert edge2.failed_restarts == 5
    why = (
        "exited with status 3; last log line: ValueError: CRM_EVENTS_EDGE_PORT: expected a TCP port"
    )
    assert edge2.last_reason == edge2.last_failure == why
    summary = read_state(tmp_path).summary()  # type: ignore[union-attr]
    assert f"gave up on edge2 after 5 failed restarts (last: {why})" in summary
    assert summary.endswith(": fix it, then 'crm-events-stack start edge2'")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if w.startswith("edge2: dead again")] == [
        f"edge2: dead again 0.5 s after its restart ({why}); next restart in {d} s"
        for d in (1, 2, 4, 8)
    ]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        line.startswith("edge2: gave up after 5 failed restarts in a row") for line in errors
    )
    assert any("not ready after its restart" in line for line in errors)
    assert [p for p in parts.revived if p[0] != "edge2"] == []

    # Fixed and started by hand (crm-events-stack start edge2): watched afresh, so its next
    # death is restarted at once again.
    parts.crashing.clear()
    parts.states["edge2"] = ProcState.RUNNING
    parts.pids["edge2"] = 42
    run_for(dog, clock, 1)
    assert report(tmp_path, "edge2").condition == "watching"
    parts.kill("edge2")
    before = len(parts.revived)
    dog.tick()
    assert parts.revived[before:] == [("edge2", clock.now)]


def test_a_part_that_ran_for_a_while_after_its_restart_is_restarted_at_once_again(
    parts: FakeParts, clock: Clock, tmp_path: Path
) -> None:
    dog = make(parts, clock, tmp_path, stable_s=30.0)
    for _ in range(8):
        parts.kill("producer")
        dog.tick()
        assert parts.revived[-1] == ("producer", clock.now)
        run_for(dog, clock, 30)
    assert report(tmp_path, "producer").restarts == 8
    assert report(tmp_path, "producer").condition == "watching"


def test_a_restart_that_cannot_spawn_is_a_failed_restart_backed_off_then_given_up(
    parts: FakeParts, clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crm_events.watchdog")
    dog = make(parts, clock, tmp_path)
    held = "redis: port 6379 is already in use by a process not started here"
    parts.refuse = StartError(held)
    parts.states["redis"] = ProcState.DEAD
    t0 = clock.now
    run_for(dog, clock, 60)

    # Five attempts, at once then after 1, 2, 4, 8 s; none spawned anything.
    assert [t - t0 for _, t in parts.attempts] == [0.0, 1.0, 3.0, 7.0, 15.0]
    assert parts.revived == []
    redis = report(tmp_path, "redis")
    assert redis.condition == "gave up" and redis.restarts == 0
    assert redis.failed_restarts == 5 and redis.last_failure == f"could not start: {held}"
    assert f"redis: restart failed (could not start: {held}); next restart in 1 s" in caplog.text
    assert "redis: gave up after 5 failed restarts in a row" in caplog.text
    assert "dead again" not in caplog.text
    summary = read_state(tmp_path).summary()  # type: ignore[union-attr]
    assert f"gave up on redis after 5 failed restarts (last: could not start: {held})" in summary

    # Freed and started by hand: watched afresh.
    parts.refuse = None
    parts.start("redis")
    dog.tick()
    assert report(tmp_path, "redis").condition == "watching"


def test_any_error_of_a_restart_backs_off_like_a_start_error(
    parts: FakeParts, clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only StartError (a full disk, a bug in a prepare step): never a retry per look."""
    caplog.set_level(logging.INFO, logger="crm_events.watchdog")
    dog = make(parts, clock, tmp_path)
    parts.refuse = RuntimeError("no space left on device")
    parts.kill("producer")
    run_for(dog, clock, 60)

    assert len(parts.attempts) == 5
    producer = report(tmp_path, "producer")
    assert producer.condition == "gave up"
    assert producer.last_failure == "could not start: no space left on device"
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 5


def test_why_a_part_died_as_far_as_the_watchdog_can_tell(
    parts: FakeParts, clock: Clock, tmp_path: Path
) -> None:
    dog = make(parts, clock, tmp_path)
    cases = [
        ("redis", {"exit_codes": -15}, "killed by SIGTERM"),
        ("edge1", {"exit_codes": 1, "logs": "boom\n"}, "exited with status 1; last log line: boom"),
        (
            "edge2",
            {"logs": "x" * 500},
            "its process is gone (exit status unknown: the watchdog did not start it); "
            "last log line: " + "x" * 200,
        ),
    ]
    for name, facts, _ in cases:
        for attr, value in facts.items():
            getattr(parts, attr)[name] = value
        parts.states[name] = ProcState.DEAD
    dog.tick()
    for name, _, reason in cases:
        assert report(tmp_path, name).last_reason == reason


def test_counts_carry_over_to_a_new_watchdog_of_the_same_run_directory(
    parts: FakeParts, clock: Clock, tmp_path: Path
) -> None:
    first = make(parts, clock, tmp_path)
    parts.kill("edge1")
    first.tick()
    parts.kill("edge1")
    clock.now += 60
    first.tick()
    second = make(parts, clock, tmp_path)
    second.tick()
    assert report(tmp_path, "edge1").restarts == 2
    parts.kill("edge1")
    second.tick()
    assert report(tmp_path, "edge1").restarts == 3


def test_after_stop_no_restart_begins(parts: FakeParts, clock: Clock, tmp_path: Path) -> None:
    dog = make(parts, clock, tmp_path)
    dog.stop()
    parts.kill("edge1")
    dog.tick()
    assert parts.revived == []


def test_each_look_reaps_the_watchdogs_exited_children(
    parts: FakeParts, clock: Clock, tmp_path: Path
) -> None:
    dog = make(parts, clock, tmp_path)
    run_for(dog, clock, 2)
    assert parts.reaps == dog.ticks == 4


def test_the_fingerprint_changes_with_the_parts_the_settings_and_the_directory(
    tmp_path: Path,
) -> None:
    specs = [ProcessSpec(name=n, argv=["true"]) for n in NAMES]
    env = {"CRM_EVENTS_PRODUCER_RATE": "5", "HOME": "/home/a"}
    base = watchdog.fingerprint(specs, env, tmp_path)
    # Its own spec, and variables other than the settings, do not count.
    own = ProcessSpec(name=watchdog.NAME, argv=["watchdog"])
    assert watchdog.fingerprint([*specs, own], {**env, "HOME": "/x"}, tmp_path) == base
    more = [*specs, ProcessSpec(name="edge3", argv=["true"])]
    assert watchdog.fingerprint(more, env, tmp_path) != base
    assert watchdog.fingerprint(specs, {**env, "CRM_EVENTS_PRODUCER_RATE": "9"}, tmp_path) != base
    assert watchdog.fingerprint(specs, env, tmp_path / "elsewhere") != base
    other = [ProcessSpec(name=n, argv=["true"], env={"X": "1"}) for n in NAMES]
    assert watchdog.fingerprint(other, env, tmp_path) != base


def test_status_reads_the_state_file_and_readiness_wants_a_fresh_heartbeat(
    parts: FakeParts, clock: Clock, tmp_path: Path
) -> None:
    dog = make(parts, clock, tmp_path)
    parts.kill("edge1")
    dog.tick()
    found = read_state(tmp_path)
    assert found is not None
    assert found.summary().startswith("watchdog: 1 restart(s) (edge1 1); last: edge1 at ")
    assert found.summary().endswith(", killed by SIGKILL (crm-events-stack kill)")

    own_pid = found.pid
    assert WatchdogReady(tmp_path, lambda: own_pid)()
    assert not WatchdogReady(tmp_path, lambda: own_pid + 1)()
    assert not WatchdogReady(tmp_path, lambda: None)()
    assert found.fresh(time.time()) and not found.fresh(found.updated + 60)

    path = watchdog.state_file(tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), "updated": 0}))
    assert not WatchdogReady(tmp_path, lambda: own_pid)()  # a paused or hung watchdog
    path.write_text("{not json")
    assert read_state(tmp_path) is None
    assert read_state(tmp_path / "nowhere") is None


def test_compose_restarts_every_long_lived_service_as_the_watchdog_does_locally() -> None:
    """docker-compose's counterpart: a restart policy on every service but the one-shot
    ``*-init`` ones (the app services, producer included, take theirs from ``x-app``)."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert "producer" in services
    for name, service in services.items():
        if name.endswith("-init"):
            assert service.get("restart") == "no", name
        else:
            assert service.get("restart") == "unless-stopped", name
