"""Redis primary + replica + Sentinels on one machine: their configuration files, who is primary,
and readiness probes. Used by the local stack (``CRM_EVENTS_REDIS_MODE=sentinel``) and by the
integration tests' :class:`~tests.harness.backends.SentinelGroup`.

Every question here is one quick synchronous round trip with a short timeout; "no answer" is
None, never an exception, so that the probes and ``status`` work while parts are down.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

__all__ = [
    "Address",
    "ReplicaReady",
    "Role",
    "SentinelReady",
    "current_primary",
    "existing_myid",
    "quorum",
    "redis_conf_text",
    "role",
    "sentinel_conf_text",
    "sentinel_primary",
    "sentinel_view",
]

Address = tuple[str, int]
QUERY_TIMEOUT_S = 1.0
_MYID_RE = re.compile(r"^sentinel myid ([0-9a-f]{40})$", re.MULTILINE)


def quorum(sentinels: int) -> int:
    """Sentinels that must agree the primary is down: a majority, so a lone Sentinel cut off
    from the others can never start a failover on its own."""
    return sentinels // 2 + 1


def redis_conf_text(
    port: int,
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    appendonly: bool = True,
    replicaof: Address | None = None,
) -> str:
    lines = [
        f"port {port}",
        f"bind {host}",
        "protected-mode no",
        "daemonize no",
        # stdout goes to the supervisor's log of this part.
        'logfile ""',
        f'dir "{data_dir}"',
        f"appendonly {'yes' if appendonly else 'no'}",
        "appendfsync everysec",
        # The append-only file is the persistence; no RDB snapshots on top.
        'save ""',
        # A replica's full sync starts at once instead of waiting 5 s for more replicas.
        "repl-diskless-sync-delay 0",
    ]
    if replicaof is not None:
        lines.append(f"replicaof {replicaof[0]} {replicaof[1]}")
    return "# Generated; rewritten on every start.\n" + "\n".join(lines) + "\n"


def sentinel_conf_text(
    port: int,
    work_dir: Path,
    service: str,
    primary: Address,
    *,
    sentinels: int,
    down_after_ms: int,
    failover_timeout_ms: int,
    host: str = "127.0.0.1",
    myid: str | None = None,
) -> str:
    """A Sentinel's file. Sentinel rewrites it as it learns (replicas, other Sentinels, epochs),
    so it must stay writable; ``myid`` keeps its identity across a rewrite from scratch."""
    lines = [
        f"port {port}",
        f"bind {host}",
        "protected-mode no",
        "daemonize no",
        'logfile ""',
        f'dir "{work_dir}"',
        f"sentinel monitor {service} {primary[0]} {primary[1]} {quorum(sentinels)}",
        f"sentinel down-after-milliseconds {service} {down_after_ms}",
        f"sentinel failover-timeout {service} {failover_timeout_ms}",
        f"sentinel parallel-syncs {service} 1",
    ]
    if myid is not None:
        lines.append(f"sentinel myid {myid}")
    return "# Generated; Sentinel adds what it learns below.\n" + "\n".join(lines) + "\n"


def existing_myid(conf: Path) -> str | None:
    try:
        found = _MYID_RE.search(conf.read_text())
    except OSError:
        return None
    return found.group(1) if found else None


def client(address: Address, timeout_s: float) -> redis.Redis:
    """A short-lived client of one server for a query: no retry, bounded waits."""
    return redis.Redis(
        host=address[0],
        port=address[1],
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def ask(address: Address, *command: str | int | bytes, timeout_s: float = QUERY_TIMEOUT_S) -> Any:
    """One command's raw answer (given as separate words, redis-py applies no response
    callback); None when the server does not answer or answers an error."""
    c = client(address, timeout_s)
    try:
        return c.execute_command(*command)  # type: ignore[no-untyped-call]
    except (RedisError, OSError):
        return None
    finally:
        c.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class Role:
    """The answer to ROLE."""

    kind: str
    """``master``, ``replica`` or ``sentinel``."""
    primary: Address | None = None
    """A replica's primary."""
    link: str | None = None
    """A replica's replication state: ``connected`` once in sync with its primary."""
    offset: int | None = None
    replicas: tuple[Address, ...] = ()
    """A primary's connected replicas."""

    def __str__(self) -> str:
        if self.kind == "master":
            names = ", ".join(f"{h}:{p}" for h, p in self.replicas) or "none"
            return f"primary (offset {self.offset}, replicas: {names})"
        if self.kind == "replica" and self.primary is not None:
            return f"replica of {self.primary[0]}:{self.primary[1]} ({self.link})"
        return self.kind


def role(address: Address, timeout_s: float = QUERY_TIMEOUT_S) -> Role | None:
    """ROLE of the server at ``address``; None when it does not answer."""
    answer = ask(address, "ROLE", timeout_s=timeout_s)
    if not answer:
        return None
    kind = _text(answer[0])
    if kind == "master":
        replicas = tuple((_text(r[0]), int(r[1])) for r in answer[2])
        return Role("master", offset=int(answer[1]), replicas=replicas)
    if kind == "slave":
        return Role(
            "replica",
            primary=(_text(answer[1]), int(answer[2])),
            link=_text(answer[3]),
            offset=int(answer[4]),
        )
    return Role(kind)


def sentinel_primary(
    sentinel: Address, service: str, timeout_s: float = QUERY_TIMEOUT_S
) -> Address | None:
    """``SENTINEL get-master-addr-by-name`` of one Sentinel; None when it does not answer."""
    answer = ask(sentinel, "SENTINEL", "get-master-addr-by-name", service, timeout_s=timeout_s)
    if not answer:
        return None
    return _text(answer[0]), int(answer[1])


def sentinel_view(
    sentinel: Address, service: str, timeout_s: float = QUERY_TIMEOUT_S
) -> tuple[int, int] | None:
    """(replicas, other Sentinels) one Sentinel knows of for ``service``; None when it does
    not answer or does not watch it."""
    c = client(sentinel, timeout_s)
    try:
        masters = c.sentinel_masters()
    except (RedisError, OSError):
        return None
    finally:
        c.close()
    state = masters.get(service) if isinstance(masters, dict) else None
    if state is None:
        return None
    return int(state["num-slaves"]), int(state["num-other-sentinels"])


def current_primary(
    sentinels: Iterable[Address], nodes: Sequence[Address], service: str
) -> Address | None:
    """The primary as the Sentinels name it (the first that answers), else the only node that
    answers ROLE as a primary; None when nobody knows (a first start)."""
    for sentinel in sentinels:
        found = sentinel_primary(sentinel, service)
        if found is not None:
            return found
    primaries = [n for n in nodes if (r := role(n)) is not None and r.kind == "master"]
    return primaries[0] if len(primaries) == 1 else None


@dataclasses.dataclass(frozen=True)
class ReplicaReady:
    """ROLE says replica and the link to its primary is up (the initial sync is done), or
    primary: a node restarted after a failover may rightly be the primary now."""

    host: str
    port: int

    def __call__(self) -> bool:
        found = role((self.host, self.port))
        return found is not None and (found.kind == "master" or found.link == "connected")

    def __str__(self) -> str:
        return f"redis://{self.host}:{self.port} (replica in sync)"


@dataclasses.dataclass(frozen=True)
class SentinelReady:
    """The Sentinel answers and names a primary for the service."""

    host: str
    port: int
    service: str

    def __call__(self) -> bool:
        return sentinel_primary((self.host, self.port), self.service) is not None

    def __str__(self) -> str:
        return f"sentinel://{self.host}:{self.port}/{self.service}"
