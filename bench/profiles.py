"""Sizes of a run: ``quick`` (make bench, under 10 minutes), ``full`` (make bench-full) and
``smoke`` (the test in tests/bench: tiny, checks the harness, never speed)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    scenarios: tuple[str, ...]
    servers: tuple[str, ...]
    """Servers for A, B, C and E; the naive baseline runs in A only."""
    a_clients: tuple[int, ...]
    naive_clients: tuple[int, ...]
    a_step_s: float
    """Seconds of publishing per rate step."""
    a_start_deliveries: float
    """Deliveries/s of the first step; then doubled until a step fails, then bisected."""
    a_refine: int
    """Bisection steps after the first failing rate."""
    a_max_steps: int
    a_fixed_rate: float | None
    """Smoke: one step at this event rate instead of the search."""
    b_clients: int
    b_window_s: float
    c_clients: int
    c_behind: int
    c_timeout_s: float
    d_backlog: int
    e_duration_s: float
    e_connections: int
    e_rounds: int
    """E measures every server this many times, in turns (see ``scenario_e``)."""
    connect_rate: float
    """New streams per second while the clients of A and B connect (a ramp)."""
    event_size: int = 256
    p99_limit_ms: float = 100.0
    capacity_p99_ms: float = 1000.0
    """A step whose p99 passes this is not keeping up (its backlog grows)."""
    target_p99_ms: float = 50.0
    f1_masters: tuple[int, ...] = (1, 2, 3)
    """F1: Redis Cluster sizes (masters, no replicas)."""
    f1_workers: tuple[int, ...] = (1, 2, 3)
    """F1: ingest workers at each size."""
    f1_backlog: int = 150_000
    """F1: events each cell works through (written while its workers are paused: at ~100,000
    events/s it must stay well below the consumers' 10 s session timeout)."""
    f1_rounds: int = 1
    """F1: times the grid is measured (up, then down, ...); each cell's figure is the mean."""
    f2_edges: tuple[int, ...] = (1, 2, 4, 8, 16)
    """F2: edge counts, after a step with none."""
    f2_rate: float = 1000.0
    """F2: events/s published throughout."""
    f2_window_s: float = 3.0
    f2_rounds: int = 2
    """F2: windows per visit of an edge count (each count is visited twice, see
    ``bench.scenario_f.visit_order``)."""
    f2_settle_s: float = 2.0
    """F2: wait after the edges changed, before the window."""
    f3_edges: int = 4
    f3_masters: int = 3
    """F3: scenario C's storm (``c_clients``, ``c_behind``) over this many edges and masters."""


# One process cannot hold more sockets than its RLIMIT_NOFILE; where the hard limit is 20,000
# and cannot be raised (no CAP_SYS_RESOURCE), the "20k" tier is clamped (see __main__).
TWENTY_K = 20000

QUICK = Profile(
    name="quick",
    scenarios=("A", "B", "C", "D", "E", "F"),
    servers=("edge", "centrifugo"),
    a_clients=(1000, 10000),
    naive_clients=(1000,),
    a_step_s=2.0,
    a_start_deliveries=20000,
    a_refine=1,
    a_max_steps=7,
    a_fixed_rate=None,
    b_clients=TWENTY_K,
    b_window_s=10.0,
    c_clients=2000,
    c_behind=1000,
    c_timeout_s=60.0,
    d_backlog=200_000,
    e_duration_s=5.0,
    e_connections=32,
    e_rounds=3,
    connect_rate=2500,
)

FULL = Profile(
    name="full",
    scenarios=("A", "B", "C", "D", "E", "F"),
    servers=("edge", "centrifugo"),
    a_clients=(1000, 5000, 10000, TWENTY_K),
    naive_clients=(1000, 5000, 10000),
    a_step_s=5.0,
    a_start_deliveries=20000,
    a_refine=3,
    a_max_steps=12,
    a_fixed_rate=None,
    b_clients=TWENTY_K,
    b_window_s=30.0,
    c_clients=10000,
    c_behind=1000,
    c_timeout_s=180.0,
    d_backlog=1_000_000,
    e_duration_s=10.0,
    e_connections=32,
    e_rounds=5,
    connect_rate=2500,
    f1_backlog=300_000,
    f1_rounds=2,
    f2_window_s=5.0,
    f2_rounds=3,
)

SMOKE = Profile(
    name="smoke",
    scenarios=("A", "C", "D", "E"),
    servers=("edge", "centrifugo"),
    a_clients=(20,),
    naive_clients=(20,),
    a_step_s=1.0,
    a_start_deliveries=0,
    a_refine=0,
    a_max_steps=1,
    a_fixed_rate=200.0,
    b_clients=20,
    b_window_s=2.0,
    c_clients=20,
    c_behind=200,
    c_timeout_s=30.0,
    d_backlog=2000,
    e_duration_s=1.0,
    e_connections=4,
    e_rounds=1,
    connect_rate=0,
    f1_masters=(1, 2),
    f1_workers=(1, 2),
    f1_backlog=20_000,
    f2_edges=(1, 2),
    f2_rate=200.0,
    f2_window_s=1.0,
    f2_rounds=2,
    f2_settle_s=1.0,
    f3_edges=2,
)

PROFILES = {p.name: p for p in (QUICK, FULL, SMOKE)}
