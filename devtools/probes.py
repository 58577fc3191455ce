"""Readiness probes: small callables that answer "can this process do its job now?".

Each probe makes one quick attempt and returns a bool; "not yet" (refused connection, 503,
Redis still loading its append-only file) is False, never an exception. They are plain frozen
dataclasses, so a :class:`~devtools.supervisor.ProcessSpec` that holds one stays printable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

__all__ = ["HttpReady", "KafkaReady", "RedisReady", "TcpReady", "run_coroutine_blocking"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class TcpReady:
    host: str
    port: int
    timeout_s: float = 1.0

    def __call__(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout_s):
                return True
        except OSError:
            return False

    def __str__(self) -> str:
        return f"tcp://{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class HttpReady:
    """GET ``url`` answers ``status``. Talks to the address directly: proxy settings in the
    environment must not route a loopback probe elsewhere. An ``https://`` URL needs
    ``context`` (with a client certificate where the server requires one)."""

    url: str
    status: int = 200
    timeout_s: float = 2.0
    context: ssl.SSLContext | None = None

    def __call__(self) -> bool:
        parts = urllib.parse.urlsplit(self.url)
        conn: http.client.HTTPConnection
        if parts.hostname is None or parts.scheme not in ("http", "https"):
            raise ValueError(f"HttpReady needs an http(s):// URL, got {self.url!r}")
        if parts.scheme == "https":
            if self.context is None:
                raise ValueError(f"HttpReady needs a TLS context for {self.url!r}")
            conn = http.client.HTTPSConnection(
                parts.hostname, parts.port or 443, timeout=self.timeout_s, context=self.context
            )
        else:
            conn = http.client.HTTPConnection(
                parts.hostname, parts.port or 80, timeout=self.timeout_s
            )
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            resp = conn.getresponse()
            resp.read(65536)
            return resp.status == self.status
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def __str__(self) -> str:
        return self.url


@dataclasses.dataclass(frozen=True)
class RedisReady:
    """PING answers PONG: unlike a bare TCP connect, this waits out AOF loading."""

    host: str
    port: int
    timeout_s: float = 1.0

    def __call__(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout_s) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def __str__(self) -> str:
        return f"redis://{self.host}:{self.port}"


def run_coroutine_blocking(factory: Callable[[], Awaitable[T]], timeout_s: float) -> T:
    """Run ``factory()`` to completion on a private event loop in a helper thread.

    Lets synchronous code (the supervisor's polling) use asyncio clients even when the caller
    itself runs inside an event loop, where ``asyncio.run`` would refuse.
    """
    box: dict[str, object] = {}

    async def bounded() -> T:
        return await asyncio.wait_for(factory(), timeout_s)

    def target() -> None:
        try:
            box["value"] = asyncio.run(bounded())
        except BaseException as exc:  # noqa: BLE001 - handed over to the calling thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 5.0)
    if thread.is_alive():
        raise TimeoutError(f"probe thread still running after {timeout_s + 5.0:.0f} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class KafkaReady:
    """TCP accepts, then an admin metadata request (``list_topics``) succeeds: the broker has
    joined its own KRaft quorum and serves metadata, not merely opened its socket."""

    bootstrap: str
    timeout_s: float = 5.0

    def __call__(self) -> bool:
        host, _, port = self.bootstrap.rpartition(":")
        if not TcpReady(host, int(port))():
            return False
        try:
            run_coroutine_blocking(self._list_topics, self.timeout_s)
        except (OSError, TimeoutError, KafkaError):
            return False
        return True

    async def _list_topics(self) -> list[str]:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, request_timeout_ms=int(self.timeout_s * 1000)
        )
        await admin.start()
        try:
            topics: list[str] = await admin.list_topics()
        finally:
            await admin.close()
        return topics

    def __str__(self) -> str:
        return f"kafka://{self.bootstrap}"
