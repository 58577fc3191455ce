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
