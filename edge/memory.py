"""Opt-in memory diagnostics for soaks: what the Python heap and the C allocator hold.

RSS alone cannot tell a leak from fragmentation. A leak shows as Python objects (gc counts
by type, ``tracemalloc`` traced bytes, allocated blocks) growing with RSS; fragmentation as
those staying flat while RSS grows, the difference sitting in the allocator's free lists
(``mallinfo2``'s ``fordblks``) or in heaps it cannot return to the system.

Off by default (``CRM_EVENTS_MEMORY_DIAGNOSTICS=off``): no route, no tracing, no cost. ``gc``
adds ``GET /debug/memory`` with object counts by type (one walk of the gc's objects per
request, ~50 ms for 300 clients: fine once a minute, not for a scraper every second).
``tracemalloc`` also traces every allocation from the start (a few frames each), which
slows the process and inflates its RSS by the traces themselves: for finding the source of
a growth, not for a production edge. The answer names source files and each request walks
the heap on the event loop, so the route answers only a direct request from this host: a
loopback peer, with none of the headers a proxy adds (the stack's nginx forwards every path,
this one too); anyone else gets the 404 of an unknown route. A sidecar proxy that relays from
loopback without adding those headers (some service meshes do) defeats that test: keep the
setting off where one runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import ipaddress
import os
import sys
import tempfile
import tracemalloc
from collections import Counter
from typing import Any, BinaryIO, Final

from aiohttp import web

from shared.settings import MEMORY_DIAGNOSTICS_MODES as MODES
from shared.settings import MemoryDiagnosticsMode as Mode

TRACE_FRAMES: Final = 1
"""Frames kept per traced allocation. One names the line that allocated; more multiply the
traces' memory and the time a report takes, which an edge spends not serving clients."""
TOP_TYPES: Final = 25
TOP_SITES: Final = 15


class _MallInfo2(ctypes.Structure):
    # glibc >= 2.33; every field is a size_t (man 3 mallinfo2).
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_mallinfo2() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError):  # not glibc (musl), or glibc older than 2.33
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


_mallinfo2 = _load_mallinfo2()


def malloc_figures() -> dict[str, int] | None:
    """The C allocator's main figures, or None where glibc's ``mallinfo2`` is missing.

    ``heap_bytes`` (arena + mmapped) is what malloc took from the system; ``in_use_bytes``
    what is allocated now; ``free_bytes`` what it holds free inside its heaps (fragmentation
    when it grows while ``in_use_bytes`` does not)."""
    if _mallinfo2 is None:
        return None
    info = _mallinfo2()
    return {
        "heap_bytes": int(info.arena + info.hblkhd),
        "mmapped_bytes": int(info.hblkhd),
        "in_use_bytes": int(info.uordblks + info.hblkhd),
        "free_bytes": int(info.fordblks),
        "releasable_bytes": int(info.keepcost),
    }


def rss_bytes() -> int | None:
    """This process's resident set, from /proc (None elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


_OBMALLOC_FIELDS: Final = {
    "# arenas allocated current": "arenas",
    "# arenas highwater mark": "arenas_highwater",
    "# bytes in allocated blocks": "allocated_bytes",
    "# bytes in available blocks": "available_bytes",
    "unused pools": "unused_pool_bytes",
    "Total": "arena_bytes",
}


def obmalloc_figures() -> dict[str, int]:
    """CPython's small-object allocator (objects up to 512 bytes, in 1 MiB arenas that it
    returns to the system only when wholly empty), from ``sys._debugmallocstats``.

    ``arena_bytes`` is what its arenas take; ``allocated_bytes`` what live objects use in
    them; ``available_bytes`` plus ``unused_pool_bytes`` is what it holds free inside arenas
    it cannot return (fragmentation when it grows while ``allocated_bytes`` does not). The
    stats go to the C stderr, so fd 2 is pointed at a temporary file for the call (the
    event loop's thread is the only one that writes there, and it is busy with this)."""
    with _capture_file() as capture:
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode(errors="replace")
    figures: dict[str, int] = {}
    start = text.find("# arenas allocated total")
    for line in text[start:].splitlines():
        if not line.strip():
            if "arena_bytes" in figures:
                break  # the arena map's own "Total" comes after a blank line
            continue
        label, sep, value = line.partition("=")
        if not sep:
            continue
        for prefix, name in _OBMALLOC_FIELDS.items():
            if prefix in label and name not in figures:
                with contextlib.suppress(ValueError):
                    figures[name] = int(value.strip().replace(",", ""))
    return figures


def _capture_file() -> BinaryIO:
    """An anonymous file: in memory where Linux offers it, else in the temporary folder."""
    try:
        return os.fdopen(os.memfd_create("obmalloc-stats"), "w+b")
    except (AttributeError, OSError):
        return tempfile.TemporaryFile()


def _type_name(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def gc_counts(objects: list[Any], top: int = TOP_TYPES) -> dict[str, int]:
    """``objects`` (the collector's) by type, module included, the ``top`` most numerous."""
    counts = Counter(_type_name(type(obj)) for obj in objects)
    return dict(counts.most_common(top))


class MemoryDiagnostics:
    """One process's diagnostics: the mode, and the allocation sites of the first report that
    later ones are compared with (sizes per source line, not a snapshot: bounded by the
    code's lines, whatever clients do)."""

    def __init__(self, mode: Mode) -> None:
        if mode not in MODES:
            raise ValueError(f"memory diagnostics mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self._baseline: dict[str, tuple[int, int]] | None = None
        self._started_tracing = False

    def start(self) -> None:
        if self.mode == "tracemalloc" and not tracemalloc.is_tracing():
            tracemalloc.start(TRACE_FRAMES)
            self._started_tracing = True

    def stop(self) -> None:
        self._baseline = None
        if self._started_tracing:
            tracemalloc.stop()
            self._started_tracing = False

    def _tracemalloc(self) -> dict[str, Any]:
        current, peak = tracemalloc.get_traced_memory()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__),)
        )
        stats = snapshot.statistics("lineno")
        del snapshot  # the copy of every trace: gone before the answer is built
        sites = {str(stat.traceback[0]): (stat.size, stat.count) for stat in stats}
        top = [
            {"site": site, "bytes": size, "blocks": count}
            for site, (size, count) in list(sites.items())[:TOP_SITES]
        ]
        growth: list[dict[str, Any]] = []
        if self._baseline is None:
            self._baseline = sites
        else:
            base = self._baseline
            diffs = sorted(
                (
                    (size - base.get(site, (0, 0))[0], count - base.get(site, (0, 0))[1], site)
                    for site, (size, count) in sites.items()
                ),
                reverse=True,
            )
            growth = [
                {"site": site, "bytes_diff": size, "blocks_diff": count}
                for size, count, site in diffs[:TOP_SITES]
            ]
        return {
            "traced_bytes": current,
            "traced_peak_bytes": peak,
            "tracing_overhead_bytes": tracemalloc.get_tracemalloc_memory(),
            "top_sites": top,
            "growth_since_first": growth,
        }

    def report(self) -> dict[str, Any]:
        objects = gc.get_objects()  # one walk for both figures
        body: dict[str, Any] = {
            "mode": self.mode,
            "rss_bytes": rss_bytes(),
            "malloc": malloc_figures(),
            "python": {
                "allocated_blocks": sys.getallocatedblocks(),
                "obmalloc": obmalloc_figures(),
                "gc_objects": len(objects),
                "gc_counts_by_type": gc_counts(objects),
            },
        }
        del objects
        if self.mode == "tracemalloc" and tracemalloc.is_tracing():
            body["tracemalloc"] = self._tracemalloc()
        return body


_PROXY_HEADERS: Final = ("X-Forwarded-For", "X-Real-IP", "Forwarded")


def _direct_local(request: web.Request) -> bool:
    """A request from this host that no proxy relayed."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    host = peer[0] if isinstance(peer, tuple) and peer else None
    try:
        loopback = host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return loopback and not any(name in request.headers for name in _PROXY_HEADERS)


def add_memory_route(app: web.Application, diagnostics: MemoryDiagnostics) -> None:
    """``GET /debug/memory`` when diagnostics are on; no route (404) when off."""
    if diagnostics.mode == "off":
        return

    async def on_startup(_: web.Application) -> None:
        diagnostics.start()

    async def on_cleanup(_: web.Application) -> None:
        diagnostics.stop()

    async def memory(request: web.Request) -> web.Response:
        # Every method lands here, so that to anyone but a local GET the route looks like
        # no route at all (no 405 naming the methods it has).
        if request.method not in ("GET", "HEAD") or not _direct_local(request):
            raise web.HTTPNotFound()
        return web.json_response(diagnostics.report())

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/debug/memory", memory)
