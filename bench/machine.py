"""What the results were measured on: machine and versions."""

from __future__ import annotations

import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from tests.harness.backends import Backends

from .tools import CENTRIFUGO_VERSION, ROOT, go_binary, sysctl


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def describe_machine() -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _mem_gib(),
        "kernel": platform.release(),
        "os": _os_name(),
        "nofile_soft_hard": [soft, hard],
        "ip_local_port_range": sysctl("net.ipv4.ip_local_port_range"),
        "somaxconn": sysctl("net.core.somaxconn"),
        "tcp_max_syn_backlog": sysctl("net.ipv4.tcp_max_syn_backlog"),
    }


def _os_name() -> str:
    try:
        text = Path("/etc/os-release").read_text()
        m = re.search(r'^PRETTY_NAME="?([^"\n]+)', text, re.M)
        return m.group(1) if m else "?"
    except OSError:
        return "?"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _pkg(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def _redis_version(backends: Backends) -> str:
    try:
        with socket.create_connection((backends.redis_host, backends.redis_port), 2) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"redis_version" not in data or not data.endswith(b"\r\n\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > 100_000:
                    break
        m = re.search(rb"redis_version:(\S+)", data)
        return m.group(1).decode() if m else "?"
    except OSError:
        return "?"


def _kafka_version() -> str:
    run_dir = Path(os.environ.get("CRM_EVENTS_RUN_DIR", ROOT / "run"))
    jars = sorted((run_dir / "kafka" / "libs").glob("kafka-clients-*.jar"))
    if jars:
        return jars[-1].stem.removeprefix("kafka-clients-")
    return "?"


def _wrk_version(wrk: str) -> str:
    m = re.search(r"wrk (?:debian/)?([\w.+-]+)", _run([wrk, "-v"]))
    return m.group(1) if m else "?"


def versions(backends: Backends, centrifugo: Path | None) -> dict[str, str]:
    go = go_binary()
    wrk = shutil.which("wrk")
    out = {
        "python": sys.version.split()[0],
        "aiohttp": _pkg("aiohttp"),
        "aiohttp-sse": _pkg("aiohttp-sse"),
        "redis-py": _pkg("redis"),
        "hiredis": _pkg("hiredis"),
        "aiokafka": _pkg("aiokafka"),
        "redis_server": _redis_version(backends),
        "kafka": _kafka_version(),
        "go": _run([go, "version"]).removeprefix("go version ") if go else "-",
        "wrk": _wrk_version(wrk) if wrk else "-",
    }
    if centrifugo is not None and centrifugo.exists():
        built = _run([str(centrifugo), "version"])
        out["centrifugo"] = f"{CENTRIFUGO_VERSION} ({built})"
    return out
