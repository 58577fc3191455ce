"""``python -m bench``: run the benchmarks and write the results.

    python -m bench                    # quick profile (make bench), under 10 minutes
    python -m bench --profile full     # make bench-full
    python -m bench --profile smoke    # tiny; what tests/bench runs

Results go to bench/results/<UTC timestamp>.json and latest.json, latest.md, PNG plots, and the
table in bench/README.md (``--no-readme`` to leave it alone). Process logs and py-spy profiles
go under run/bench/ (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.harness.backends import Backends, provide

from . import report
from .backends import private_backends
from .machine import describe_machine, loadavg, versions
from .profiles import PROFILES, Profile
from .scenario_f import scenario_f
from .scenarios import (
    Bench,
    guard,
    scenario_a,
    scenario_b,
    scenario_c,
    scenario_d,
    scenario_e,
)
from .servers import BENCH_EDGE_ENV
from .tools import (
    OTHER_CORE,
    ROOT,
    BenchError,
    accept_queue,
    backends_pinned,
    build_centrifugo,
    centrifugo_path,
    pin_self,
    say,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument(
        "--scenarios",
        help="comma-separated subset of A,B,C,D,E,F (F: scaling over Redis Cluster masters, "
        "ingest workers and edges)",
    )
    p.add_argument("--servers", help="comma-separated subset of edge,centrifugo")
    p.add_argument("--clients", help="comma-separated client counts for A (overrides profile)")
    p.add_argument(
        "--c-clients", type=int, help="clients of the C reconnect storm (overrides profile)"
    )
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline in A")
    p.add_argument("--no-build", action="store_true", help="never build Centrifugo; skip it")
    p.add_argument(
        "--shared-backends",
        action="store_true",
        help="use the stack's Kafka and Redis (pinned to core 1 for the run) instead of "
        "private ones; the smoke profile always does",
    )
    p.add_argument(
        "--no-pin-backends", action="store_true", help="with shared backends: leave their CPU masks"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--run-dir", type=Path, default=None, help="logs (default run/bench/<ts>)")
    p.add_argument("--pyspy", action="store_true", help="py-spy profiles of edge/ingest")
    p.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    p.add_argument(
        "--server-pythonpath",
        help="put DIR first on the PYTHONPATH of the edge and ingest processes (measure a "
        "patched copy of edge/ or ingest/, or an extra package such as hiredis, without "
        "changing the checkout); implies --no-readme",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="CRM_EVENTS_X=VALUE",
        help="extra setting for the edge and ingest processes (repeatable; implies --no-readme)",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only rewrite latest.md, the plots and the README table from a results file",
    )
    return p.parse_args(argv)


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


async def run(
    args: argparse.Namespace, backends: Backends, profile: Profile, stamp: str
) -> dict[str, Any]:
    run_dir: Path = args.run_dir
    scenarios = (
        tuple(s.strip().upper() for s in args.scenarios.split(","))
        if args.scenarios
        else profile.scenarios
    )
    servers = (
        [s.strip() for s in args.servers.split(",")] if args.servers else list(profile.servers)
    )
    notes: list[str] = []
    if "centrifugo" in servers:
        try:
            built = build_centrifugo(allow_build=not args.no_build)
        except (BenchError, OSError) as exc:
            built = None
            notes.append(f"Centrifugo could not be built: {exc}")
        if built is None:
            servers.remove("centrifugo")
            notes.append("Centrifugo skipped: not built (bench/.build/bin/centrifugo)")
    if args.no_naive:
        profile = dataclasses.replace(profile, naive_clients=())
    if args.clients:
        counts = tuple(int(c) for c in args.clients.split(","))
        naive = tuple(c for c in counts if c in profile.naive_clients or not args.no_naive)
        profile = dataclasses.replace(
            profile, a_clients=counts, naive_clients=naive if profile.naive_clients else ()
        )
    if args.c_clients:
        profile = dataclasses.replace(profile, c_clients=args.c_clients)

    bench = Bench(run_dir, backends, profile)
    if args.pyspy:
        bench.pyspy_dir = run_dir / "pyspy"
    if args.server_pythonpath:
        bench.server_pythonpath = args.server_pythonpath
        notes.append(
            "experiment: edge and ingest ran with a patched PYTHONPATH (--server-pythonpath)"
        )
    if args.set:
        notes.append("experiment: extra settings " + ", ".join(args.set))
    if bench.max_clients < max((*profile.a_clients, profile.b_clients, profile.c_clients)):
        notes.append(
            f"RLIMIT_NOFILE cannot be raised above its hard limit here (no CAP_SYS_RESOURCE), "
            f"so no process can hold more than about that many sockets: client counts are "
            f"clamped to {bench.max_clients:,}"
        )
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {
            "profile": profile.name,
            "command": "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "started_utc": stamp,
            "machine": describe_machine(),
            "versions": versions(backends, centrifugo_path() if "centrifugo" in servers else None),
            "loadavg_before": loadavg(),
            "servers": servers,
            "scenarios": list(scenarios),
            "notes": notes,
            "profile_settings": profile.__dict__,
            "pinning": {
                "server_core": 0,
                "other_core": OTHER_CORE,
                "what": "server under test (edge, naive or Centrifugo; ingest in D and F1; "
                "the edges of F2 and F3) on core 0; load generator, publisher, ingest (A-C, E, "
                "F2, F3), Kafka, Redis (F: every Redis Cluster node), wrk on core 1; "
                "every process the harness starts runs at nice -10 (root), so that unrelated "
                "work on a shared machine yields to it",
            },
        }
    }
    say(f"profile {profile.name}: scenarios {','.join(scenarios)}; servers {','.join(servers)}")
    if "A" in scenarios:
        results["A"] = await scenario_a(bench, servers)
    if "B" in scenarios:
        results["B"] = await scenario_b(bench, servers)
    if "C" in scenarios:
        results["C"] = await scenario_c(bench, servers)
    if "E" in scenarios:
        results["E"] = await scenario_e(bench, servers)
    if "D" in scenarios:
        results["D"] = await guard("D", scenario_d(bench))
    if "F" in scenarios:
        results["F"] = await scenario_f(bench)
    meta = results["meta"]
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_after"] = loadavg()
    meta["run_dir"] = rel(run_dir)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render:
        return render(args)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("CRM_EVENTS_"):
            raise SystemExit(f"--set expects CRM_EVENTS_NAME=VALUE, got {item!r}")
        BENCH_EDGE_ENV[key] = value
    if args.set:
        args.no_readme = True
    if args.server_pythonpath:
        args.server_pythonpath = str(Path(args.server_pythonpath).resolve())
    profile = PROFILES[args.profile]
    pin_self(OTHER_CORE)
    os.chdir(ROOT)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    if args.run_dir is None:
        args.run_dir = ROOT / "run" / "bench" / stamp
    args.run_dir = args.run_dir.resolve()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    # The smoke run (part of the tests) leaves the host's settings alone.
    queue = accept_queue() if profile.name != "smoke" else contextlib.nullcontext({})
    with queue as accept_report:
        if profile.name != "smoke" and not args.shared_backends:
            with private_backends(args.run_dir) as backends:
                results = asyncio.run(run(args, backends, profile, stamp))
            results["meta"]["pinning"]["backends"] = {
                "kafka": "private broker for this run, core 1",
                "redis": "private redis-server for this run, core 1",
            }
        else:
            with provide() as backends:
                ports = {
                    "kafka": int(backends.kafka_bootstrap.rsplit(":", 1)[1]),
                    "redis": backends.redis_port,
                }
                pin_ctx: Any = (
                    _no_pin() if args.no_pin_backends else backends_pinned(ports, OTHER_CORE)
                )
                with pin_ctx as pin_report:
                    results = asyncio.run(run(args, backends, profile, stamp))
                    results["meta"]["pinning"]["backends"] = pin_report
    if accept_report:
        results["meta"]["accept_queue"] = accept_report
        if "note" in accept_report:
            results["meta"]["notes"].append(accept_report["note"])
        elif accept_report["during"] != accept_report["before"]:
            results["meta"]["notes"].append(
                f"net.core.somaxconn raised from {accept_report['before']:,} to "
                f"{accept_report['during']:,} for the run (restored after), for every server"
            )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1, default=str)
    (out / f"{stamp}.json").write_text(text + "\n")
    (out / "latest.json").write_text(text + "\n")
    plots = [] if args.no_plots else report.plots(results, out)
    table = report.markdown(results, plots, out)
    (out / "latest.md").write_text(table)
    if not args.no_readme and not args.server_pythonpath and profile.name != "smoke":
        report.update_readme(ROOT / "bench" / "README.md", table)
    say(f"results: {rel(out / (stamp + '.json'))}, {rel(out / 'latest.md')}")
    say(f"total {results['meta']['duration_s']} s")
    print(table)
    return 0


def render(args: argparse.Namespace) -> int:
    results = json.loads(args.render.read_text())
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    plots = [] if args.no_plots else report.plots(results, out)
    table = report.markdown(results, plots, out)
    (out / "latest.md").write_text(table)
    if not args.no_readme and results["meta"]["profile"] != "smoke":
        report.update_readme(ROOT / "bench" / "README.md", table)
    print(table)
    return 0


class _no_pin:
    def __enter__(self) -> dict[str, str]:
        return {"kafka": "not pinned (--no-pin-backends)", "redis": "not pinned"}

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    sys.exit(main())
