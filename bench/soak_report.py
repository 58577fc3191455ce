"""The soak's report from its samples: a verdict per edge, a table and an SVG plot.

The verdict compares each edge's RSS at the end of the run with its RSS at the middle (for
the 2-hour soak: the second hour against the end of the first), after the warm-up in which
the replay ring and the caches fill to their budgets: **plateau** when the second half grew
by at most ``PLATEAU_PCT`` of the middle value, else **growth** with its rate per hour (a
least-squares slope over the second half) and what grew with it: the gc types whose counts
rose most, or, with tracemalloc, the allocation sites.

No plotting library: the SVG is a few polylines, written by hand.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

PLATEAU_PCT = 2.0
MB = 1e6


def load_samples(out_dir: Path) -> list[dict[str, Any]]:
    lines = (out_dir / "samples.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour (0 for fewer than two)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 3600.0


def _at(samples: list[dict[str, Any]], t_s: float) -> dict[str, Any]:
    """The first sample at or after ``t_s`` (the last one if none)."""
    for sample in samples:
        if sample["t_s"] >= t_s:
            return sample
    return samples[-1]


def _grown_types(first: dict[str, Any], last: dict[str, Any], top: int = 8) -> list[str]:
    a = (first.get("python") or {}).get("gc_counts_by_type") or {}
    b = (last.get("python") or {}).get("gc_counts_by_type") or {}
    grew = sorted(((b[k] - a.get(k, 0), k) for k in b), reverse=True)
    return [f"{name} +{delta}" for delta, name in grew[:top] if delta > 0]


def _grown_sites(last: dict[str, Any], top: int = 8) -> list[str]:
    growth = (last.get("tracemalloc") or {}).get("growth_since_first") or []
    return [
        f"{g['site']}: {g['bytes_diff'] / MB:+.2f} MB" for g in growth[:top] if g["bytes_diff"] > 0
    ]


def edge_verdict(samples: list[dict[str, Any]], edge: str) -> dict[str, Any]:
    """Judge the second half of the run: one process throughout (a restart there would
    hide a leak behind a fresh heap), RSS at the end within ``PLATEAU_PCT`` of the middle,
    and the least-squares line over the half rising by no more than that either (one low
    end sample must not pass a rising series)."""
    points = []
    last_pid: int | None = None
    for s in samples:
        rss = (s.get("rss_bytes") or {}).get(edge)
        if not rss:  # missing, or 0: no reading of this edge at this sample
            continue
        pid = (s.get("edges") or {}).get(edge, {}).get("pid")
        points.append((s["t_s"], rss, pid if pid is not None else last_pid, s))
        last_pid = points[-1][2]
    if len(points) < 3:
        return {"edge": edge, "verdict": "too_short", "samples": len(points)}
    run_end_t = samples[-1]["t_s"]
    end_t = points[-1][0]
    mid_t, mid_rss, _, mid = next(p for p in points if p[0] >= end_t / 2)
    _, end_rss, _, last = points[-1]
    half = [p for p in points if p[0] >= mid_t]
    restart_t = [
        later[0]
        for earlier, later in itertools.pairwise(points)
        if earlier[2] is not None and later[2] is not None and earlier[2] != later[2]
    ]
    restarts = [round(t / 60, 1) for t in restart_t]
    judged_samples = [s for s in samples if s["t_s"] >= mid_t]
    growth_pct = (end_rss - mid_rss) / mid_rss * 100.0
    slope = slope_per_hour([(t, v) for t, v, _, _ in half])
    line_pct = slope * (end_t - mid_t) / 3600.0 / mid_rss * 100.0
    verdict: dict[str, Any] = {
        "edge": edge,
        "mid_t_min": round(mid_t / 60, 1),
        "end_t_min": round(end_t / 60, 1),
        "rss_start_mb": round(points[0][1] / MB, 1),
        "rss_mid_mb": round(mid_rss / MB, 1),
        "rss_end_mb": round(end_rss / MB, 1),
        "rss_peak_mb": round(max(p[1] for p in points) / MB, 1),
        "second_half_growth_pct": round(growth_pct, 2),
        "second_half_line_pct": round(line_pct, 2),
        "second_half_slope_mb_per_h": round(slope / MB, 2),
        "restarts_at_min": restarts,
        "missing_samples": len(samples) - len(points),
    }
    if any(t > mid_t for t in restart_t):
        verdict["verdict"] = "restarted"
    elif any(p[2] is None for p in half):
        verdict["verdict"] = "no_pid"  # a restart there could not be seen
    elif end_t < run_end_t or len(half) < len(judged_samples):
        # The judged half must be whole: an edge gone (dead, unreachable) for any part of
        # it, or before the end, is no plateau.
        verdict["verdict"] = "gaps_in_samples"
    elif growth_pct <= PLATEAU_PCT and line_pct <= PLATEAU_PCT:
        verdict["verdict"] = "plateau"
    else:
        verdict["verdict"] = "growth"
    e_mid, e_last = mid["edges"].get(edge, {}), last["edges"].get(edge, {})
    blocks = [(e.get("python") or {}).get("allocated_blocks") for e in (e_mid, e_last)]
    if None not in blocks:
        verdict["python_blocks_mid_end"] = blocks
    arenas = [
        ((e.get("python") or {}).get("obmalloc") or {}).get("arena_bytes") for e in (e_mid, e_last)
    ]
    if None not in arenas:
        verdict["obmalloc_arena_mb_mid_end"] = [round(a / MB, 1) for a in arenas]  # type: ignore[operator]
    free = [(e.get("malloc") or {}).get("free_bytes") for e in (e_mid, e_last)]
    if None not in free:
        verdict["malloc_free_mb_mid_end"] = [round(f / MB, 1) for f in free]  # type: ignore[operator]
    if verdict["verdict"] == "growth":
        verdict["grew_types"] = _grown_types(e_mid, e_last)
        verdict["grew_sites"] = _grown_sites(e_last)
    return verdict


def _edge_names(samples: list[dict[str, Any]]) -> list[str]:
    return sorted(samples[0]["edges"]) if samples else []


def table(samples: list[dict[str, Any]], every_s: float = 600.0) -> str:
    edges = _edge_names(samples)
    head = ["minute", *(f"{e} RSS MB" for e in edges)]
    head += [f"{e} caches+ring MB" for e in edges]
    head += ["clients", "events delivered", "gaps", "dups", "drops"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    picked: list[dict[str, Any]] = []
    next_t = 0.0
    for sample in samples:
        if sample["t_s"] >= next_t:
            picked.append(sample)
            next_t = sample["t_s"] + every_s - 1
    if samples and picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    for s in picked:
        cells = [f"{s['t_s'] / 60:.0f}"]
        cells += [f"{(s['rss_bytes'].get(e) or 0) / MB:.1f}" for e in edges]
        for e in edges:
            g = s["edges"].get(e, {})
            held = sum((g.get("cache_bytes") or {}).values()) + (g.get("ring_bytes") or 0)
            cells.append(f"{held / MB:.1f}")
        lg = s["loadgen"]
        cells += [str(lg.get(k)) for k in ("connected", "events", "gaps", "dups", "drops")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def svg_plot(samples: list[dict[str, Any]], title: str) -> str:
    """RSS per edge (solid), caches+ring (dashed) and Python heap blocks x 64 B (dotted)."""
    width, height, left, bottom, top, right = 900, 420, 70, 50, 40, 190
    edges = _edge_names(samples)
    series: list[tuple[str, str, str, list[tuple[float, float]]]] = []
    for i, edge in enumerate(edges):
        color = COLORS[i % len(COLORS)]
        rss = [(s["t_s"], s["rss_bytes"][edge]) for s in samples if s["rss_bytes"].get(edge)]
        series.append((f"{edge} RSS", color, "", rss))
        held = [
            (
                s["t_s"],
                sum((s["edges"][edge].get("cache_bytes") or {}).values())
                + (s["edges"][edge].get("ring_bytes") or 0),
            )
            for s in samples
            if edge in s["edges"]
        ]
        series.append((f"{edge} caches+ring", color, "6,4", held))
    max_t = max((t for *_, pts in series for t, _ in pts), default=1.0) or 1.0
    max_v = max((v for *_, pts in series for _, v in pts), default=1.0) or 1.0
    max_v *= 1.1
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(t: float, v: float) -> str:
        return f"{left + t / max_t * plot_w:.1f},{top + plot_h - v / max_v * plot_h:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="14">{_escape(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        'stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
    ]
    for k in range(6):
        v = max_v * k / 5
        y = top + plot_h - plot_h * k / 5
        parts.append(
            f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{v / MB:.0f} MB</text>'
        )
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#ddd"/>'
        )
        t = max_t * k / 5
        x = left + plot_w * k / 5
        parts.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 18}" text-anchor="middle">'
            f"{t / 60:.0f} min</text>"
        )
    for i, (label, color, dash, pts) in enumerate(series):
        if len(pts) >= 2:
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            parts.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="1.5"{dash_attr} '
                f'points="{" ".join(xy(t, v) for t, v in pts)}"/>'
            )
        ly = top + 14 + i * 18
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(
            f'<line x1="{width - right + 12}" y1="{ly - 4}" x2="{width - right + 40}" '
            f'y2="{ly - 4}" stroke="{color}" stroke-width="2"{dash_attr}/>'
        )
        parts.append(f'<text x="{width - right + 46}" y="{ly}">{_escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_report(out_dir: Path) -> dict[str, Any]:
    samples = load_samples(out_dir)
    settings = json.loads((out_dir / "settings.json").read_text())
    final_path = out_dir / "final.json"
    final: dict[str, Any] | None = (
        json.loads(final_path.read_text()) if final_path.exists() else None
    )
    verdicts = [edge_verdict(samples, e) for e in _edge_names(samples)]
    # A reset (the edge said it lost events) restarts the clients' checks without a gap, and
    # an unparsable event skips them: either fails the run like a gap would.
    delivery_ok = final is not None and (
        final["gaps"] == 0
        and final["dups"] == 0
        and final.get("resets", 1) == 0
        and final.get("parse_errors", 1) == 0
        and final["clients_caught_up"] == final["clients"]
        and final["produce_failed"] == 0
    )
    # The churn really happened: at least half the reconnects the lifetimes promise.
    expected_drops = (
        settings["clients"] * settings["duration_s"] / settings["life_max_s"] / 2
        if settings["life_max_s"] > 0
        else 0
    )
    churn_ok = final is not None and final.get("drops", 0) >= expected_drops
    memory_ok = bool(verdicts) and all(v["verdict"] == "plateau" for v in verdicts)
    summary = {
        "settings": settings,
        "final": final,
        "verdicts": verdicts,
        "delivery_ok": delivery_ok,
        "churn_ok": churn_ok,
        "memory_ok": memory_ok,
        "passed": delivery_ok and churn_ok and memory_ok,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    minutes = settings["duration_s"] / 60
    title = (
        f"Edge memory: {settings['clients']} clients, {settings['rate']:g} events/s of "
        f"{settings['size']} B, streams live {settings['life_min_s']:g}-"
        f"{settings['life_max_s']:g} s, {minutes:g} min"
    )
    (out_dir / "memory.svg").write_text(svg_plot(samples, title))
    lines = [f"# Soak: {title}", ""]
    for v in verdicts:
        if v["verdict"] == "too_short":
            lines.append(f"- **{v['edge']}**: too few samples for a verdict")
            continue
        lines.append(
            f"- **{v['edge']}**: {v['verdict']}: RSS {v['rss_start_mb']} MB at start, "
            f"{v['rss_mid_mb']} MB at minute {v['mid_t_min']:g}, {v['rss_end_mb']} MB at "
            f"minute {v['end_t_min']:g} ({v['second_half_growth_pct']:+.2f} % over the second "
            f"half, {v['second_half_line_pct']:+.2f} % along its fitted line, "
            f"{v['second_half_slope_mb_per_h']:+.2f} MB/h; limit {PLATEAU_PCT:g} %)"
        )
        if v["restarts_at_min"]:
            lines.append(
                "  - restarted at minute "
                + ", ".join(f"{m:g}" for m in v["restarts_at_min"])
                + " (a restart in the judged half fails it)"
            )
        for key in ("grew_types", "grew_sites"):
            if v.get(key):
                lines.append(f"  - {key.replace('_', ' ')}: " + "; ".join(v[key]))
    if final is not None:
        lines += [
            "",
            f"Delivery: {final['produced']} events produced, {final['events']} delivered; "
            f"{final['clients_caught_up']}/{final['clients']} clients reached the last offset "
            f"of every partition; gaps {final['gaps']}, duplicates {final['dups']}, resets "
            f"{final.get('resets')}, unparsable events {final.get('parse_errors')}, client-side "
            f"drops (reconnects) {final['drops']} (at least {expected_drops:.0f} expected).",
        ]
    lines += ["", table(samples), "", "![memory](memory.svg)", ""]
    lines.append(f"Verdict: {'PASS' if summary['passed'] else 'FAIL'}")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return summary
