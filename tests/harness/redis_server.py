"""A Redis server of a test's own, so that stopping or wiping it disturbs no other test."""

from __future__ import annotations

from pathlib import Path

from devtools.probes import RedisReady
from devtools.supervisor import ProcessSpec, Supervisor

from .cluster import free_port


def private_redis(run: Path, appendonly: bool) -> tuple[Supervisor, ProcessSpec]:
    """A supervisor over ``run`` and the spec of a redis-server on a free port (not started)."""
    port = free_port()
    spec = ProcessSpec(
        name="redis",
        argv=[
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--dir",
            str(run),
        ],
        ready=RedisReady("127.0.0.1", port),
        ready_timeout_s=20,
        port=port,
    )
    return Supervisor(run), spec
