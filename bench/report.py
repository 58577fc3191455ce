"""Results -> Markdown table, PNG plots and the table in bench/README.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README_START = "<!-- bench-results:start -->"
README_END = "<!-- bench-results:end -->"
SERVER_LABEL = {"edge": "crm-events edge", "centrifugo": "Centrifugo", "naive": "naive aiohttp-sse"}


def _fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "—"
    if isinstance(v, float | int):
        return f"{v:,.{digits}f}"
    return str(v)


def _ratio(ours: Any, theirs: Any, digits: int = 2) -> str:
    if not isinstance(ours, int | float) or not isinstance(theirs, int | float) or not theirs:
        return "—"
    return f"{ours / theirs:.{digits}f}"


def _series(results: dict[str, Any], server: str, clients: int) -> dict[str, Any] | None:
    found: dict[str, Any] | None = None
    for s in results.get("A", []):
        if s.get("server") == server and s.get("clients") == clients:
            found = s
    return found


def _rounds(*rows: dict[str, Any] | None) -> str:
    n = max((len(r.get("rounds_requests_per_s") or ()) for r in rows if r), default=0)
    return f", median of {n} rounds in turns" if n > 1 else ""


def _spread(row: dict[str, Any] | None) -> str:
    rounds = (row or {}).get("rounds_requests_per_s") or []
    if len(rounds) < 2:
        return ""
    return f" ({_fmt(min(rounds))}-{_fmt(max(rounds))})"


def _by_server(rows: list[dict[str, Any]] | None, server: str) -> dict[str, Any] | None:
    for r in rows or []:
        if r.get("server") == server:
            return r
    return None


def _field(row: dict[str, Any] | None, key: str) -> Any:
    """``row[key]`` of a server's result, None when that server has no result or field."""
    return row.get(key) if row else None


def _best(series: dict[str, Any] | None, key: str = "best") -> tuple[Any, Any]:
    if not series or not series.get(key):
        return None, None
    b = series[key]
    value = b["deliveries_per_s"]
    if key == "capacity" and not series.get("saturated", True):
        value = f"≥ {value:,}"  # the search ran out of steps before the server did
    return value, b["latency_ms"]["p99"]


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def side_by_side(results: dict[str, Any]) -> list[str]:
    lines = [
        "| scenario | measure | crm-events edge | Centrifugo | ratio edge/Centrifugo "
        "| naive baseline | target | met |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    clients = sorted({s["clients"] for s in results.get("A", []) if "clients" in s})
    for n in clients:
        e, e99 = _best(_series(results, "edge", n))
        c, c99 = _best(_series(results, "centrifugo", n))
        nv, nv99 = _best(_series(results, "naive", n))
        lines.append(
            f"| A {n:,} clients | highest deliveries/s with p99 ≤ 100 ms, no loss "
            f"[p99 ms] | {_fmt(e)} [{_fmt(e99, 1)}] | {_fmt(c)} [{_fmt(c99, 1)}] "
            f"| {_ratio(e, c)} | {_fmt(nv)} [{_fmt(nv99, 1)}] | | |"
        )
        e, e99 = _best(_series(results, "edge", n), "capacity")
        c, c99 = _best(_series(results, "centrifugo", n), "capacity")
        nv, nv99 = _best(_series(results, "naive", n), "capacity")
        lines.append(
            f"| A {n:,} clients | highest sustained deliveries/s: no loss, p99 ≤ 1 s "
            f"[p99 ms] | {_fmt(e)} [{_fmt(e99, 1)}] | {_fmt(c)} [{_fmt(c99, 1)}] "
            f"| {_ratio(e, c)} | {_fmt(nv)} [{_fmt(nv99, 1)}] | | |"
        )
        e50, e5099 = _best(_series(results, "edge", n), "best_p99_50")
        c50, c5099 = _best(_series(results, "centrifugo", n), "best_p99_50")
        is_target = n == 10000
        met = None
        if is_target and e50 is not None and c50 is not None:
            met = e50 / c50 >= 1.0
        elif is_target and e50 is None and _series(results, "edge", n):
            met = False
        lines.append(
            f"| A {n:,} clients | same, with p99 ≤ 50 ms [p99 ms] | {_fmt(e50)} [{_fmt(e5099, 1)}] "
            f"| {_fmt(c50)} [{_fmt(c5099, 1)}] | {_ratio(e50, c50)} | | "
            f"{'ratio ≥ 1.0' if is_target else ''} | {_met(met) if is_target else ''} |"
        )
    b_e, b_c = _by_server(results.get("B"), "edge"), _by_server(results.get("B"), "centrifugo")
    if b_e or b_c:
        ev, cv = _field(b_e, "rss_per_conn_kb"), _field(b_c, "rss_per_conn_kb")
        n = (b_e or b_c or {}).get("clients")
        met = None if ev is None or cv is None else ev <= cv
        lines.append(
            f"| B {_fmt(n)} idle clients, 1 event/s | RSS per connection, KB (lower is better) "
            f"| {_fmt(ev, 1)} | {_fmt(cv, 1)} | {_ratio(ev, cv)} | | ≤ Centrifugo | {_met(met)} |"
        )
        ecpu, ccpu = _field(b_e, "cpu_pct"), _field(b_c, "cpu_pct")
        lines.append(
            f"| B | CPU % of one core (lower is better) | {_fmt(ecpu, 1)} | {_fmt(ccpu, 1)} "
            f"| {_ratio(ecpu, ccpu)} | | | |"
        )
    c_e, c_c = _by_server(results.get("C"), "edge"), _by_server(results.get("C"), "centrifugo")
    if c_e or c_c:
        ev, cv = _field(c_e, "all_caught_up_s"), _field(c_c, "all_caught_up_s")
        n = (c_e or c_c or {}).get("clients")
        behind = (c_e or c_c or {}).get("behind")

        def cell(r: dict[str, Any] | None) -> str:
            if not r:
                return "—"
            if "error" in r:
                return "error"
            clean = r["gaps"] == 0 and r["dups"] == 0
            if r.get("all_caught_up_s") is None:
                got = f"not all in {r['wall_s']:.0f} s ({r['caught']:,}/{r['clients']:,} caught up"
            else:
                got = f"{r['all_caught_up_s']:.2f}"
                got += " (all exact" if r.get("correct") else " (**inexact**"
            return got + (", no gap/dup)" if clean else ", **gaps or duplicates**)")

        met = None if ev is None else (ev <= 5.0 and bool(c_e and c_e.get("correct")))
        if c_e and ev is None:
            met = False
        lines.append(
            f"| C {_fmt(n)} clients reconnect {_fmt(behind)} behind | seconds until all caught up "
            f"(lower is better) | {cell(c_e)} | {cell(c_c)} "
            f"| {_ratio(ev, cv)} | | ≤ 5 s | {_met(met)} |"
        )
    d = results.get("D")
    if d:
        v = d.get("events_per_s")
        lines.append(
            f"| D ingest, backlog {_fmt(d.get('backlog'))} | Kafka → Redis events/s, one ingest "
            f"| {_fmt(v)} | no equivalent | — | | ≥ 50,000 | "
            f"{_met(None if v is None else v >= 50000)} |"
        )
    f1 = (results.get("F") or {}).get("F1") or {}
    if "ingest_flat_over_masters" in f1:
        dev = f1.get("ingest_from_first_over_masters")
        lines.append(
            f"| F1 ingest, 1 → {max(c['masters'] for c in f1['cells'])} Redis Cluster masters "
            f"| ingest CPU per event: largest deviation from 1 master, at any worker count "
            f"| {_pct(dev)} | no equivalent | — | | within ±15 % "
            f"| {_met(f1.get('ingest_flat_over_masters'))} |"
        )
    e_e, e_c = _by_server(results.get("E"), "edge"), _by_server(results.get("E"), "centrifugo")
    if e_e or e_c:
        ev, cv = _field(e_e, "requests_per_s"), _field(e_c, "requests_per_s")
        lines.append(
            f"| E history n=100 | requests/s{_rounds(e_e, e_c)} | {_fmt(ev)}{_spread(e_e)} "
            f"| {_fmt(cv)}{_spread(e_c)} (server API "
            f"`/api/history`) | {_ratio(ev, cv)} | | ≥ 5,000 | "
            f"{_met(None if ev is None else ev >= 5000)} |"
        )
        lines.append(
            f"| E | p99 latency, ms | {_fmt(_field(e_e, 'p99_ms'), 2)} "
            f"| {_fmt(_field(e_c, 'p99_ms'), 2)} | | | | |"
        )
    return lines


def _pct(v: Any, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f} %"


def _values(vals: list[Any], digits: int = 2) -> str:
    return ", ".join("—" if v is None else f"{v:.{digits}f}" for v in vals)


COST_LABEL = {"ingest_us_per_event": "ingest", "redis_us_per_event": "Redis (all masters)"}


def f_details(results: dict[str, Any]) -> list[str]:
    """Scenario F's tables: the F1 grid and its flatness, F2's fan-out steps, F3's storm."""
    f = results.get("F")
    if not f:
        return []
    lines = ["", "#### F: scaling on this machine (issue 13)", ""]
    f1 = f.get("F1") or {}
    if "error" in f1:
        lines += [f"F1: error: {f1['error'][:300]}", ""]
    elif f1:
        rounds = f1.get("rounds", 1)
        lines += [
            f"F1, ingest: a fresh {f1['partitions']}-partition topic per cell with "
            f"{f1['backlog']:,} events, written while the cell's workers (already in the group) "
            f"were paused; streams capped at {f1['stream_maxlen']:,} entries per partition "
            f"(trimmed as in production); {f1['placement']}. Events/s and CPU per event "
            "between 10 % and 90 % of the backlog"
            + (f"; mean of {rounds} rounds (the grid up, then down)" if rounds > 1 else "")
            + ".",
            "",
            "| Redis masters | ingest workers | events/s | ingest CPU µs/event "
            "| Redis CPU µs/event (all masters) | Kafka CPU µs/event "
            "| model: events/s with a core per worker and per master (extrapolated) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in f1.get("cells", []):
            if "error" in c:
                lines.append(
                    f"| {c['masters']} | {c['workers']} | error: {c['error'][:100]} | | | | |"
                )
                continue
            lines.append(
                f"| {c['masters']} | {c['workers']} | {_fmt(c['events_per_s'])} "
                f"| {c['ingest_us_per_event']:.2f} | {c['redis_us_per_event']:.2f} "
                f"| {c['kafka_us_per_event']:.2f} | {_fmt(c.get('model_events_per_s'))} |"
            )
        lines += [
            "",
            "| CPU per event of | as these grow | with | µs per event | max/min - 1 "
            "| largest deviation from 1 unit | flat within ±15 %? |",
            "|---|---|---|---|---:|---:|---|",
        ]
        for ln in f1.get("flatness", []):
            fixed = (
                f"{ln['workers']} worker(s)"
                if ln["along"] == "masters"
                else f"{ln['masters']} master(s)"
            )
            units = ln["units"]
            lines.append(
                f"| {COST_LABEL.get(ln['cost'], ln['cost'])} | {ln['along']} "
                f"{units[0]} → {units[-1]} | {fixed} | {_values(ln['values'])} "
                f"| {_pct(ln['spread'])} | {_pct(ln['from_first'])} | {_met(ln['flat'])} |"
            )
    f2 = f.get("F2") or {}
    if "error" in f2:
        lines += ["", f"F2: error: {f2['error'][:300]}"]
    elif f2:
        order = ", ".join(str(n) for n in f2["order"])
        lines += [
            "",
            f"F2, pub/sub fan-out: the run's single Redis, one ingest, {f2['rate']:,.0f} events/s "
            f"published one by one over {f2['partitions']} partitions, streams capped at "
            f"{f2['stream_maxlen']:,}; edges without clients (an edge subscribes to every "
            f"partition's live channel when it starts); {f2['placement']}. Edge counts in the "
            f"order {order}, {f2['windows_per_visit']} windows of {f2['window_s']:g} s per "
            "visit. A step keeps up when every edge shows the newest stored events within "
            "3 s and never lost its subscription.",
            "",
            "| edges | events/s | events per script run | Redis CPU µs/event "
            "| Redis µs per script run, net of per-event work [± s.e.] "
            "| increment of one edge, µs per script run [±] | edges' CPU, % of core 0 "
            "| each edge's CPU µs/event | kept up |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        net, se = f2.get("net_us_per_batch", {}), f2.get("net_us_per_batch_se", {})
        inc, unc = f2.get("increment_us_per_edge", {}), f2.get("increment_uncertainty_us", {})
        for st in f2.get("steps", []):
            n = str(st["edges"])
            increment = f"{inc[n]:.2f} [± {unc[n]:.2f}]" if n in inc else "—"
            lines.append(
                f"| {st['edges']} | {_fmt(st['events_per_s'])} | {_fmt(st['events_per_batch'], 2)} "
                f"| {st['redis_us_per_event']:.2f} "
                f"| {_fmt(net.get(n), 1)} [± {_fmt(se.get(n), 1)}] | {increment} "
                f"| {st['edges_cpu_pct']} | {_fmt(st['edge_us_per_event_each'], 1)} "
                f"| {'yes' if st['kept_up'] else '**no** ' + ', '.join(st['not_keeping_up'])} |"
            )
        flat = f2.get("increment_flatness") or {}
        resolved = f2.get("resolved_edges") or []
        below = [n for n in inc if int(n) not in resolved]
        verdict = (
            f"judged at {', '.join(str(n) for n in resolved)} edges: "
            f"{_met(flat.get('flat'))} (largest deviation {_pct(flat.get('from_first'))})"
            if len(resolved) > 1
            else "not judged: fewer than two edge counts resolve the increment to ±15 %"
        )
        lines += [
            "",
            f"Least squares over every window: Redis µs = {f2['base_us_per_batch']:.1f} x "
            f"script runs + {f2['per_event_us']:.1f} x events + "
            f"{f2['per_edge_us_per_batch']:.2f} x edges x script runs: each edge adds "
            f"{f2['per_edge_us_per_event']:.2f} µs per event at this run's "
            f"{f2['events_per_batch']:.2f} events per script run. Flatness of the increment: "
            f"{verdict}"
            + (f"; below this machine's noise at {', '.join(below)} edge(s)" if below else "")
            + f". No-edge cost at the end against the start: {_pct(f2.get('drift_no_edges'))}.",
        ]
    f3 = f.get("F3") or {}
    c_e = _by_server(results.get("C"), "edge")
    if "error" in f3:
        lines += ["", f"F3: error: {f3['error'][:300]}"]
    elif f3:
        got = f3.get("all_caught_up_s")
        c_val = (c_e or {}).get("all_caught_up_s")
        same = c_e and c_e.get("clients") == f3["clients"] and c_e.get("behind") == f3["behind"]
        lines += [
            "",
            f"F3, catch-up in cluster mode: scenario C's storm over {f3['edges']} edges "
            f"({', '.join(str(n) for n in f3['clients_per_edge'])} clients) on a "
            f"{f3['masters']}-master Redis Cluster; {f3['placement']}.",
            "",
            "| clients | behind | edges | masters | seconds until all caught up "
            "| exact (no gap/dup, all at the head) | C: one edge, single Redis, same run "
            "| ratio F3/C | edges' CPU s | load generators' CPU s |",
            "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
            f"| {f3['clients']:,} | {f3['behind']:,} | {f3['edges']} | {f3['masters']} "
            f"| {_fmt(got, 2) if got is not None else 'not all in ' + str(f3['wall_s']) + ' s'} "
            f"| {'yes' if f3.get('correct') else '**no**'} "
            f"| {_fmt(c_val, 2) if same else '— (not in this run)'} "
            f"| {_ratio(got, c_val) if same else '—'} | {f3['server_cpu_s']} "
            f"| {f3['loadgen_cpu_s']} |",
        ]
    note = f.get("model_note")
    if note:
        lines += ["", f"{note}."]
    return lines


def _verdict(step: dict[str, Any]) -> str:
    if step["passed"]:
        return "pass"
    if step.get("sustained"):
        return f"sustained; {step['why']}"
    return "fail: " + str(step["why"])


def a_details(results: dict[str, Any]) -> list[str]:
    lines = [
        "| server | clients | events/s | deliveries/s | p50 ms | p99 ms | max ms "
        "| Kafka→Redis p99 ms | server CPU % | loadgen CPU % | others on server core % "
        "| result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in results.get("A", []):
        if "error" in s:
            lines.append(f"| {s.get('case')} | | | | | | | | | | | error: {s['error'][:120]} |")
            continue
        for st in s["steps"]:
            lat = st["latency_ms"]
            lines.append(
                f"| {SERVER_LABEL.get(s['server'], s['server'])} | {s['clients']:,} "
                f"| {st['event_rate']:g} | {st['deliveries_per_s']:,} | {lat['p50']} "
                f"| {lat['p99']} "
                f"| {lat['max']} | {(st.get('pipeline_ms') or {}).get('p99', '—')} "
                f"| {st['server_cpu_pct']} | {st.get('loadgen_cpu_pct', '—')} "
                f"| {st.get('other_cpu_on_server_core_pct', '—')} "
                f"| {_verdict(st)} |"
            )
    return lines


def markdown(results: dict[str, Any], plots: list[Path], out: Path) -> str:
    meta = results["meta"]
    m, v = meta["machine"], meta["versions"]
    lines = [
        f"### Results: profile `{meta['profile']}`, {meta['started_utc']}",
        "",
        f"Command: `{meta['command']}` (took {meta.get('duration_s', '?')} s)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}, "
        f"kernel {m['kernel']}; load average before/after: {meta.get('loadavg_before')} / "
        f"{meta.get('loadavg_after')}.",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        f"Pinning: {meta['pinning']['what']}.",
        "",
    ]
    for note in meta.get("notes", []):
        lines.append(f"Note: {note}.")
        lines.append("")
    lines += side_by_side(results)
    lines += ["", "#### A: every rate step", ""]
    lines += a_details(results)
    lines += f_details(results)
    for key in ("B", "C", "E"):
        rows = results.get(key) or []
        errs = [r for r in rows if "error" in r]
        for r in errs:
            lines += ["", f"{key} {r.get('case', '')}: error: {r['error'][:300]}"]
    d = results.get("D")
    if d and "error" in d:
        lines += ["", f"D: error: {d['error'][:300]}"]
    if plots:
        lines += ["", "#### Plots", ""]
        for p in plots:
            lines.append(f"![{p.stem}](results/{p.name})")
    lines.append("")
    return "\n".join(lines)


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text() if readme.exists() else ""
    block = f"{README_START}\n{table}\n{README_END}"
    if README_START in text and README_END in text:
        text = re.sub(
            re.escape(README_START) + r".*?" + re.escape(README_END),
            lambda _: block,
            text,
            flags=re.S,
        )
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)


def _pyplot() -> Any:
    """matplotlib (optional: without it there are no plots), with a file-only backend."""
    import matplotlib  # noqa: PLC0415 - optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    try:
        plt = _pyplot()
    except ImportError:
        return []
    made: list[Path] = []
    series = [s for s in results.get("A", []) if "steps" in s]
    colors = {"edge": "tab:blue", "centrifugo": "tab:orange", "naive": "tab:gray"}
    if series:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for server in ("edge", "centrifugo", "naive"):
            for key, style, what in (
                ("capacity", "o-", "sustained (no loss, p99 ≤ 1 s)"),
                ("best", "s--", "p99 ≤ 100 ms"),
            ):
                pts = sorted(
                    (s["clients"], s[key]["deliveries_per_s"])
                    for s in series
                    if s["server"] == server and s.get(key)
                )
                if pts:
                    ax.plot(
                        [x for x, _ in pts],
                        [y for _, y in pts],
                        style,
                        label=f"{SERVER_LABEL[server]}: {what}",
                        color=colors[server],
                    )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clients")
        ax.set_ylabel("highest deliveries/s")
        ax.set_title("A. Broadcast fan-out, one core")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        path = out / "throughput_vs_clients.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

        counts = sorted({s["clients"] for s in series})
        fig, axes = plt.subplots(1, len(counts), figsize=(4.2 * len(counts), 4), squeeze=False)
        for ax, n in zip(axes[0], counts, strict=True):
            for s in series:
                if s["clients"] != n:
                    continue
                steps = sorted(s["steps"], key=lambda st: st["deliveries_per_s"])
                xs = [st["deliveries_per_s"] for st in steps]
                ax.plot(
                    xs,
                    [st["latency_ms"]["p99"] for st in steps],
                    "o-",
                    color=colors[s["server"]],
                    label=f"{SERVER_LABEL[s['server']]} p99",
                )
                ax.plot(
                    xs,
                    [st["latency_ms"]["p50"] for st in steps],
                    "x--",
                    color=colors[s["server"]],
                    alpha=0.6,
                    label=f"{s['server']} p50",
                )
            ax.axhline(100, color="red", lw=0.8, ls=":")
            ax.axhline(50, color="green", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.set_title(f"{n:,} clients")
            ax.set_xlabel("deliveries/s")
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("latency, ms (p50 dashed, p99 solid)")
        handles: dict[str, Any] = {}
        for ax in axes[0]:
            for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, h)
        axes[0][0].legend(list(handles.values()), list(handles), fontsize=7)
        fig.suptitle("A. Latency percentiles against load")
        path = out / "latency_percentiles.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    b_rows = [r for r in results.get("B", []) if "rss_per_conn_kb" in r]
    if b_rows:
        fig, ax = plt.subplots(figsize=(5, 4))
        names = [SERVER_LABEL[r["server"]] for r in b_rows]
        vals = [r["rss_per_conn_kb"] for r in b_rows]
        ax.bar(names, vals, color=[colors[r["server"]] for r in b_rows])
        for i, val in enumerate(vals):
            ax.text(i, val, f"{val:.1f}", ha="center", va="bottom")
        ax.set_ylabel("RSS per idle connection, KB")
        ax.set_title(f"B. Memory per connection ({b_rows[0]['clients']:,} clients)")
        path = out / "memory_per_connection.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made
