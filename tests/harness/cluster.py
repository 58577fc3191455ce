"""A private crm-events deployment for one test module (or one benchmark): ingest workers,
edges and a load balancer (nginx, or HAProxy with ``lb="haproxy"``) on free ports, over the
shared Kafka and Redis, with a unique topic, consumer group and Redis prefix so that nothing
is shared between tests.

It also injects faults: stop/start, kill -9, SIGSTOP/SIGCONT of any process, and dropping
one edge's Redis connections (CLIENT KILL).

With ``lb_mtls`` the load balancer also has a listener that requires client certificates
(``lb_mtls_url``); with ``edge_tls`` (nginx only) the edges serve HTTPS that requires the
proxy's client certificate, and nginx reaches them over mutual TLS.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self, cast

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from devtools import haproxy_conf, nginx_conf
from devtools.pki import Issued, LocalCA
from devtools.probes import HttpReady
from devtools.supervisor import ProcessSpec, Supervisor
from shared.contract import FIELD_DATA, RedisKeys, parse_meta, position_of
from shared.redis_client import make_redis
from shared.settings import RedisSettings

from .backends import Backends

LoadBalancer = Literal["nginx", "haproxy"]
LOAD_BALANCERS: tuple[LoadBalancer, ...] = ("nginx", "haproxy")

Rows = list[tuple[bytes, dict[bytes, bytes]]]
"""XRANGE rows as redis-py returns them (bytes ids and fields)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LbMtls:
    """The load balancer's mutual-TLS listener: its own certificate, and the CA (and CRL) the
    clients' certificates are checked against."""

    server: Issued
    client_ca: Path
    crl: Path | None

    @classmethod
    def from_ca(cls, ca: LocalCA) -> LbMtls:
        return cls(ca.issue_server("lb-mtls"), ca.cert_path, ca.crl_path)


@dataclass(frozen=True)
class EdgeTls:
    """Mutual TLS between nginx and the edges: the edges' certificate and the CA a client
    (nginx) must show a certificate of; nginx's client certificate and the CA it checks the
    edges against."""

    server: Issued
    client_ca: Path
    proxy: Issued
    trusted_ca: Path

    @classmethod
    def from_ca(cls, ca: LocalCA) -> EdgeTls:
        proxy = ca.issue_client("lb-proxy", common_name="crm-events load balancer")
        return cls(ca.issue_server("edge-tls"), ca.cert_path, proxy, ca.cert_path)

    def client_context(self, *, with_cert: bool = True) -> ssl.SSLContext:
        """What a client of the edges needs: the CA and (``with_cert``) the proxy's cert."""
        ctx = ssl.create_default_context(cafile=str(self.trusted_ca))
        if with_cert:
            ctx.load_cert_chain(str(self.proxy.cert), str(self.proxy.key))
        return ctx


@dataclass
class Cluster:
    run_dir: Path
    backends: Backends
    edges: int = 2
    ingests: int = 1
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra CRM_EVENTS_* settings for every ingest and edge process."""
    with_nginx: bool = True
    """Start a load balancer in front of the edges (the name predates the choice of ``lb``)."""
    lb: LoadBalancer = "nginx"
    """Which load balancer: its process is named after it (``nginx`` or ``haproxy``)."""
    lb_mtls: LbMtls | None = None
    """Also a listener that requires client certificates (``lb_mtls_port``)."""
    edge_tls: EdgeTls | None = None
    """Edges serve HTTPS requiring the proxy's certificate; nginx speaks mutual TLS to them."""

    def __post_init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.topic = f"crm-test-{tag}"
        self.group = f"crm-test-group-{tag}"
        self.prefix = f"crm-test-{tag}"
        self.sup = Supervisor(self.run_dir)
        self.edge_ports = [free_port() for _ in range(self.edges)]
        self.ingest_ports = [free_port() for _ in range(self.ingests)]
        self.lb_port = free_port()
        self.lb_mtls_port = free_port() if self.lb_mtls is not None else None
        if self.edge_tls is not None and self.with_nginx and self.lb != "nginx":
            raise ValueError("edge_tls: only nginx speaks TLS to the edges in this harness")
        self._specs: dict[str, ProcessSpec] = {}
        for i, port in enumerate(self.ingest_ports, start=1):
            self._specs[f"ingest{i}"] = self._ingest_spec(i, port)
        for i, port in enumerate(self.edge_ports, start=1):
            self._specs[f"edge{i}"] = self._edge_spec(i, port)
        if self.lb not in LOAD_BALANCERS:
            raise ValueError(f"lb: expected one of {LOAD_BALANCERS}, got {self.lb!r}")
        if self.with_nginx:
            spec = self._haproxy_spec() if self.lb == "haproxy" else self._nginx_spec()
            self._specs[spec.name] = spec

    # -- process specs --------------------------------------------------------------------

    def _common_env(self) -> dict[str, str]:
        return {
            "CRM_EVENTS_REDIS_URL": self.backends.redis_url,
            "CRM_EVENTS_REDIS_PREFIX": self.prefix,
            "CRM_EVENTS_LOG_LEVEL": "INFO",
            # Auth is on by default in production; tests that exercise it pass their own
            # CRM_EVENTS_AUTH_MODE and key through ``env``.
            "CRM_EVENTS_AUTH_MODE": "off",
            **self.env,
        }

    def _ingest_spec(self, i: int, port: int) -> ProcessSpec:
        env = {
            **self._common_env(),
            "CRM_EVENTS_KAFKA_BOOTSTRAP": self.backends.kafka_bootstrap,
            "CRM_EVENTS_KAFKA_TOPIC": self.topic,
            "CRM_EVENTS_KAFKA_GROUP": self.group,
            "CRM_EVENTS_INGEST_PORT": str(port),
            "CRM_EVENTS_NODE_ID": f"ingest-{i}",
        }
        return ProcessSpec(
            name=f"ingest{i}",
            argv=[sys.executable, "-m", "ingest"],
            env=env,
            ready=HttpReady(f"http://127.0.0.1:{port}/readyz"),
            ready_timeout_s=90,
            port=port,
        )

    def _edge_spec(self, i: int, port: int) -> ProcessSpec:
        env = {
            **self._common_env(),
            "CRM_EVENTS_EDGE_PORT": str(port),
            "CRM_EVENTS_NODE_ID": f"edge-{i}",
        }
        ready = HttpReady(f"http://127.0.0.1:{port}/readyz")
        if self.edge_tls is not None:
            tls = self.edge_tls
            env |= {
                "CRM_EVENTS_EDGE_TLS_CERT_FILE": str(tls.server.cert),
                "CRM_EVENTS_EDGE_TLS_KEY_FILE": str(tls.server.key),
                "CRM_EVENTS_EDGE_TLS_CLIENT_CA_FILE": str(tls.client_ca),
            }
            ready = HttpReady(f"https://127.0.0.1:{port}/readyz", context=tls.client_context())
        return ProcessSpec(
            name=f"edge{i}",
            argv=[sys.executable, "-m", "edge"],
            env=env,
            ready=ready,
            ready_timeout_s=30,
            port=port,
        )

    def _nginx_config(self, out: Path) -> Path:
        """Render nginx's configuration under ``out``; returns its main file."""
        mtls = None
        if self.lb_mtls is not None:
            assert self.lb_mtls_port is not None
            mtls = nginx_conf.MtlsListener(
                port=self.lb_mtls_port,
                cert=self.lb_mtls.server.cert,
                key=self.lb_mtls.server.key,
                client_ca=self.lb_mtls.client_ca,
                crl=self.lb_mtls.crl,
            )
        upstream_tls = None
        if self.edge_tls is not None:
            upstream_tls = nginx_conf.UpstreamTls(
                cert=self.edge_tls.proxy.cert,
                key=self.edge_tls.proxy.key,
                trusted_ca=self.edge_tls.trusted_ca,
            )
        return nginx_conf.render(
            out, self.lb_port, self.edge_ports, mtls=mtls, upstream_tls=upstream_tls
        )

    def _nginx_spec(self) -> ProcessSpec:
        main = self._nginx_config(self.run_dir / "nginx")
        return ProcessSpec(
            name="nginx",
            argv=nginx_conf.nginx_argv(main),
            ready=HttpReady(f"http://127.0.0.1:{self.lb_port}/nginx-health"),
            ready_timeout_s=20,
            port=self.lb_port,
        )

    def _haproxy_config(self, out: Path) -> Path:
        """Render HAProxy's configuration under ``out``; returns it."""
        mtls = None
        if self.lb_mtls is not None:
            assert self.lb_mtls_port is not None
            mtls = haproxy_conf.MtlsBind(
                port=self.lb_mtls_port,
                pem=self.lb_mtls.server.bundle,
                client_ca=self.lb_mtls.client_ca,
                crl=self.lb_mtls.crl,
            )
        return haproxy_conf.render(out, self.lb_port, self.edge_ports, mtls=mtls)

    def _haproxy_spec(self) -> ProcessSpec:
        conf = self._haproxy_config(self.run_dir / "haproxy")
        return ProcessSpec(
            name="haproxy",
            argv=haproxy_conf.haproxy_argv(conf),
            ready=HttpReady(f"http://127.0.0.1:{self.lb_port}{haproxy_conf.HEALTH_PATH}"),
            ready_timeout_s=20,
            port=self.lb_port,
        )

    # -- lifecycle and faults ---------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> ProcessSpec:
        return self._specs[name]

    def start(self, *names: str) -> None:
        for name in names or self.names:
            self.sup.start(self._specs[name])

    def stop(self, *names: str, timeout_s: float = 10.0) -> None:
        for name in names or list(reversed(self.names)):
            self.sup.stop(name, timeout_s=timeout_s)

    @contextlib.contextmanager
    def running(self) -> Iterator[Self]:
        """Every process started for the block and stopped after it, also when starting
        fails half-way (nothing is left running for the next test)."""
        try:
            self.start()
            yield self
        finally:
            self.stop()

    def kill9(self, name: str) -> None:
        self.sup.kill9(name)

    def pause(self, name: str) -> None:
        self.sup.pause(name)

    def resume(self, name: str) -> None:
        self.sup.resume(name)

    def is_running(self, name: str) -> bool:
        return self.sup.is_running(name)

    def log(self, name: str) -> str:
        return self.sup.log_tail(name, 200)

    # -- addresses --------------------------------------------------------------------------

    def lb_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.lb_port}{path}"

    def lb_mtls_url(self, path: str) -> str:
        assert self.lb_mtls_port is not None, "this cluster has no mutual-TLS listener"
        return f"https://127.0.0.1:{self.lb_mtls_port}{path}"

    def edge_url(self, i: int, path: str) -> str:
        scheme = "https" if self.edge_tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.edge_ports[i - 1]}{path}"

    def ingest_url(self, i: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ingest_ports[i - 1]}{path}"

    @property
    def keys(self) -> RedisKeys:
        """This deployment's Redis names: per partition ``keys.stream(p)``, ``keys.state(p)``,
        ``keys.dead(p)``, ``keys.live(p)``, and ``keys.meta``."""
        return RedisKeys(self.prefix)

    def redis(self) -> Redis | RedisCluster:
        """A client for the test's own reads: redis-py's ``RedisCluster`` on a Redis Cluster
        (a third-party router, not the product's), otherwise a client of the one server the
        URL names (through the Sentinels for a ``redis+sentinel://`` URL)."""
        settings = RedisSettings(url=self.backends.redis_url, prefix=self.prefix, timeout_s=5.0)
        target = settings.cluster
        if target is None:
            return make_redis(settings, "test:check")
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.seeds])

    async def redis_servers(self) -> list[Redis]:
        """A plain client of every Redis server (each node of a Cluster, masters and
        replicas), e.g. to list or kill connections."""
        settings = RedisSettings(url=self.backends.redis_url)
        target = settings.cluster
        if target is None:
            # A plain or Sentinel URL: the one server every service connection goes to.
            return [make_redis(settings, "test:servers")]
        router = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.seeds])
        try:
            await router.initialize()
            return [Redis(host=n.host, port=int(n.port)) for n in router.get_nodes()]
        finally:
            await router.aclose()

    # -- Kafka and Redis helpers -------------------------------------------------------------

    async def produce(self, records: Iterable[tuple[bytes | None, bytes | None]]) -> list[Any]:
        """Send ``(key, value)`` records with a plain Kafka producer; returns their metadata."""
        producer = AIOKafkaProducer(bootstrap_servers=self.backends.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            futures = [await producer.send(self.topic, value=v, key=k) for k, v in records]
            return [await f for f in futures]
        finally:
            await producer.stop()

    async def partitions(self) -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.backends.kafka_bootstrap)
        await admin.start()
        try:
            described = await admin.describe_topics([self.topic])
        finally:
            await admin.close()
        return len(described[0]["partitions"])

    async def stored_partitions(self, redis: Redis | RedisCluster) -> int:
        """How many partitions ingest announced in the meta hash (0 before it wrote it)."""
        meta = parse_meta(cast(dict[bytes, bytes], await redis.hgetall(self.keys.meta)))
        return meta.partitions if meta is not None else 0

    async def stored_events(self) -> list[dict[str, Any]]:
        """Every envelope in the partitions' streams, partition by partition, each in
        stream (offset) order; each stream id is checked to be the record's ``offset + 1``."""
        redis = self.redis()
        try:
            out: list[dict[str, Any]] = []
            for p in range(await self.stored_partitions(redis)):
                for id_b, fields in cast(Rows, await redis.xrange(self.keys.stream(p))):
                    envelope = json.loads(fields[FIELD_DATA.encode()])
                    assert envelope["partition"] == p, f"{id_b!r} in partition {p}'s stream"
                    assert position_of(id_b) == envelope["offset"] + 1, f"entry id {id_b!r}"
                    out.append(envelope)
            return out
        finally:
            await redis.aclose()

    async def stored_dead_letters(self) -> list[dict[bytes, bytes]]:
        """The fields of every dead letter, partition by partition."""
        redis = self.redis()
        try:
            out: list[dict[bytes, bytes]] = []
            for p in range(await self.stored_partitions(redis)):
                out += [fields for _, fields in cast(Rows, await redis.xrange(self.keys.dead(p)))]
            return out
        finally:
            await redis.aclose()

    async def stream_length(self) -> int:
        """Entries in all the partitions' streams together."""
        redis = self.redis()
        try:
            total = 0
            for p in range(await self.stored_partitions(redis)):
                total += await redis.xlen(self.keys.stream(p))
            return total
        finally:
            await redis.aclose()

    async def committed(self) -> dict[int, int]:
        """The consumer group's committed offset per partition of the topic."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.backends.kafka_bootstrap)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(self.group)
        finally:
            await admin.close()
        return {tp.partition: m.offset for tp, m in offsets.items() if tp.topic == self.topic}

    async def drop_redis_connections(self, node_id: str) -> int:
        """CLIENT KILL every Redis connection of one node (named ``<node>:<purpose>``), on
        every Redis server."""
        killed = 0
        for redis in await self.redis_servers():
            try:
                for client in await redis.client_list():
                    if str(client.get("name", "")).startswith(f"{node_id}:"):
                        await redis.client_kill_filter(_id=client["id"])
                        killed += 1
            finally:
                await redis.aclose()
        return killed


def crm_event(seq: int, type_: str = "ContactCreated", key: str | None = None) -> bytes:
    """A .NET-outbox style event carrying a sequence number for the tests' bookkeeping."""
    return json.dumps(
        {
            "Type": type_,
            "Ts": "2026-11-29T10:00:00Z",
            "Seq": seq,
            "AggregateId": key or f"agg-{seq % 30}",
            "Data": {"Name": f"Customer {seq}", "Note": "ünïcode ✓"},
        },
        ensure_ascii=False,
    ).encode()
