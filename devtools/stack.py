"""The local crm-events stack without Docker: settings, its parts, and ``crm-events-stack``.

Parts, in start order: ``kafka``, ``redis`` (with CRM_EVENTS_REDIS_MODE=sentinel also
``redis-replica``, ``sentinel1`` … ``sentinelN``; with CRM_EVENTS_REDIS_MODE=cluster instead
``redis-node1`` … ``redis-nodeN``), ``ingest``, ``edge1`` … ``edgeN``, ``nginx``,
``alertmanager``, ``prometheus``, ``producer``, ``watchdog``. Each is a
:class:`~devtools.supervisor.ProcessSpec` built from :class:`StackSettings`; a
:class:`~devtools.supervisor.Supervisor` on the run directory starts and stops them through
pidfiles, so ``down`` stops exactly what ``up`` started (the watchdog first).

The ``watchdog`` part (:mod:`devtools.watchdog`) restarts a part that died (a crash,
``crm-events-stack kill``) within about a second, never one that ``stop`` or ``down`` stopped
or that ``pause`` paused, backs off from a part whose restarts fail (it cannot start, or dies
again within 30 s) and gives up on it after five failed restarts in a row. ``status`` shows its
restart counts; ``logs/watchdog.log`` has a line per restart with the reason. ``up`` replaces a
running watchdog that watches other parts or settings (an earlier ``up`` with other
CRM_EVENTS_* variables). ``restart PART...`` restarts parts one at a time (stop, start,
ready): ``crm-events-stack restart edge1 edge2`` is a rolling restart of the edges.

Library use (test harness, benchmarks)::

    settings = StackSettings(run_dir=tmp_path, redis_port=free_port(), edge_ports=(p1, p2), ...)
    stack = Stack(settings)
    stack.start(["redis", "edge1", "edge2", "nginx"])
    stack.supervisor.pause("edge1")
    stack.down()

Settings (environment, all optional):

=================================  =================  ========================================
variable                           default            meaning
=================================  =================  ========================================
CRM_EVENTS_RUN_DIR                 <checkout>/run     pidfiles, logs, configs, Kafka/Redis data
CRM_EVENTS_KAFKA_PORT              9092               Kafka client listener (127.0.0.1)
CRM_EVENTS_KAFKA_CONTROLLER_PORT   19093              KRaft controller listener
CRM_EVENTS_KAFKA_TOPIC             aetherlink.events  topic the producer writes, ingest reads
CRM_EVENTS_KAFKA_PARTITIONS        3 (cluster: 12)    partitions when the stack creates it
CRM_EVENTS_REDIS_PORT              6379               Redis (the first primary in sentinel
                                                      mode; unused in cluster mode)
CRM_EVENTS_REDIS_MODE              single             ``single``; ``sentinel``: a primary, a
                                                      replica and Sentinels, the stack's URL
                                                      is then ``redis+sentinel://``;
                                                      ``cluster``: a Redis Cluster, the URL
                                                      ``redis+cluster://`` (its masters)
CRM_EVENTS_REDIS_REPLICA_PORT      6380               the replica (sentinel mode)
CRM_EVENTS_REDIS_SENTINEL_PORTS    26379,26380,26381  one Sentinel per port (sentinel mode)
CRM_EVENTS_REDIS_CLUSTER_PORTS     7000,…,7005        one cluster node per port (cluster mode):
                                                      the first half masters, the second half
                                                      their replicas; each also uses port +
                                                      10000 (the cluster bus)
CRM_EVENTS_INGEST_PORT             9020               ingest worker's /healthz /readyz /metrics
CRM_EVENTS_EDGE_PORTS              9011,9012          one edge per port: edge1, edge2, …
CRM_EVENTS_LB_PORT                 9010               nginx in front of the edges, plain HTTP
CRM_EVENTS_LB_TLS_PORT             9443               the same over HTTPS + HTTP/2; 0 = off
CRM_EVENTS_LB_TLS_CERT             (self-signed)      PEM certificate (chain) for the TLS port
CRM_EVENTS_LB_TLS_KEY              (self-signed)      its PEM private key; both or neither
CRM_EVENTS_LB_MTLS_PORT            9444               HTTPS that requires a client certificate
                                                      of the local CA (mutual TLS); 0 = off
CRM_EVENTS_AUTH_MODE               jwt-or-cert        the edges' mode: a token or a relayed
                                   (mTLS port off:    client certificate; a value set here
                                   jwt)               (any edge mode) is passed as it is
CRM_EVENTS_CLIENT_CERT_GRANTS_FILE (the local CA's)   the edges' certificate grants (JSON)
CRM_EVENTS_PRODUCER_RATE           5                  sample events per second
=================================  =================  ========================================

Without CRM_EVENTS_LB_TLS_CERT/KEY, nginx's first start makes a self-signed certificate for
localhost and 127.0.0.1 in ``<run dir>/nginx/tls/`` (kept and reused while it is valid).

Client certificates: the first start makes a local CA in ``<run dir>/pki/``
(:mod:`devtools.pki`) with nginx's certificate for the mutual-TLS port (``nginx-mtls``), a
client certificate ``crm-sync`` (``CN=crm-sync,O=crm-events local``), a revoked one
(``crm-sync-revoked``) and the CRL, and ``client-cert-grants.json`` granting ``crm-sync`` every
event type (written when missing: an operator's edits stay). Every nginx start re-signs the CRL
for another year (nginx reads it at start and reload), so a running stack never holds an
expired one. nginx relays a verified certificate to the edges in ``X-Client-Cert``; the edges
honour it from 127.0.0.1 (their default trusted proxies) only. Without the mutual-TLS port the
edges default to ``jwt``: nothing could relay a certificate to them.

The Redis mode of a running stack is remembered in ``<run dir>/redis-mode`` (written by ``up``
and ``start``, removed by ``down``): ``status``, ``down`` and a second ``up`` without
CRM_EVENTS_REDIS_MODE follow the running stack, and switching modes needs a ``down`` first.

In cluster mode, once every node answers and none belongs to a cluster yet, the node started
last creates the cluster (``redis-cli --cluster create``, replicas 1). Each node keeps its
``nodes.conf`` in ``<run dir>/redis-nodeN/data``, so a later start rejoins that cluster and
never creates another; a node killed while a master comes back as a replica of the one that
took over.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from devtools import kafka_local, nginx_conf, redis_cluster, redis_ha, watchdog
from devtools.atomic import write_text_atomically
from devtools.monitoring_stack import (
    MonitoringSettings,
    MonitoringSettingsError,
    monitoring_specs,
)
from devtools.pki import LocalCA, PkiError
from devtools.probes import HttpReady, KafkaReady, RedisReady
from devtools.supervisor import (
    NotRunningError,
    ProcessSpec,
    ProcState,
    StartError,
    StartResult,
    Supervisor,
    SupervisorError,
)
from edge.auth import issue_token
from shared import cli
from shared.contract import META_PARTITIONS, RedisKeys, partition_slot
from shared.settings import DEFAULT_REDIS_PREFIX

__all__ = [
    "DEFAULT_CLUSTER_KAFKA_PARTITIONS",
    "DEFAULT_CLUSTER_PORTS",
    "DEFAULT_EDGE_AUTH_MODE",
    "DEFAULT_EDGE_AUTH_MODE_WITHOUT_MTLS",
    "DEFAULT_EDGE_PORTS",
    "DEFAULT_INGEST_PORT",
    "DEFAULT_KAFKA_CONTROLLER_PORT",
    "DEFAULT_KAFKA_PARTITIONS",
    "DEFAULT_KAFKA_PORT",
    "DEFAULT_KAFKA_TOPIC",
    "DEFAULT_LB_MTLS_PORT",
    "DEFAULT_LB_PORT",
    "DEFAULT_LB_TLS_PORT",
    "DEFAULT_PRODUCER_RATE",
    "DEFAULT_REDIS_PORT",
    "DEFAULT_REDIS_REPLICA_PORT",
    "DEFAULT_SENTINEL_PORTS",
    "HOST",
    "REDIS_MODES",
    "SENTINEL_SERVICE",
    "ClusterTopology",
    "PartStatus",
    "RedisTopology",
    "SettingsError",
    "Stack",
    "StackSettings",
    "build_specs",
    "checkout_dir",
    "cluster_node_spec",
    "edge_spec",
    "ensure_local_pki",
    "ingest_spec",
    "kafka_spec",
    "main",
    "nginx_spec",
    "producer_spec",
    "redis_replica_spec",
    "redis_spec",
    "sentinel_conf_text",
    "sentinel_spec",
    "watchdog_spec",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_KAFKA_PORT = 9092
DEFAULT_KAFKA_CONTROLLER_PORT = 19093
DEFAULT_KAFKA_TOPIC = "aetherlink.events"
DEFAULT_KAFKA_PARTITIONS = 3
DEFAULT_REDIS_PORT = 6379
DEFAULT_REDIS_REPLICA_PORT = 6380
DEFAULT_SENTINEL_PORTS: tuple[int, ...] = (26379, 26380, 26381)
DEFAULT_CLUSTER_PORTS: tuple[int, ...] = (7000, 7001, 7002, 7003, 7004, 7005)
#: Enough partitions that every master of the default cluster owns several.
DEFAULT_CLUSTER_KAFKA_PARTITIONS = 12
#: A cluster node's bus (gossip, failover votes) listens on its port plus this.
CLUSTER_BUS_OFFSET = 10_000
#: A silent master stays master this long before its replica takes over (as the Sentinels'
#: down-after); Redis's own default (15 s) is for production networks.
STACK_CLUSTER_NODE_TIMEOUT_MS = 5000
REDIS_MODES = ("single", "sentinel", "cluster")
#: Sentinel's name for the primary it watches (the ``<service>`` of the stack's URL).
SENTINEL_SERVICE = "crm-events"
#: Sentinel declares the primary down after this long without an answer. Sentinel's own default
#: (30 s) is for production networks; a local stack fails over in a few seconds.
STACK_SENTINEL_DOWN_AFTER_MS = 5000
STACK_SENTINEL_FAILOVER_TIMEOUT_MS = 60_000
REDIS_MODE_FILE = "redis-mode"
DEFAULT_INGEST_PORT = 9020
DEFAULT_EDGE_PORTS: tuple[int, ...] = (9011, 9012)
DEFAULT_LB_PORT = 9010
DEFAULT_LB_TLS_PORT = 9443
DEFAULT_LB_MTLS_PORT = 9444
#: Browsers with tokens and services with client certificates both work on the local stack.
DEFAULT_EDGE_AUTH_MODE = "jwt-or-cert"
#: The edges' default when nginx has no mutual-TLS listener: no certificate can be relayed, so
#: a mode that honours the header would only widen what a local process may claim.
DEFAULT_EDGE_AUTH_MODE_WITHOUT_MTLS = "jwt"
#: The edges' CRM_EVENTS_AUTH_MODE values (shared/security_settings.py decides; the stack only
#: needs to know which involve certificates, and refuses a typo before starting anything).
EDGE_AUTH_MODES = ("jwt", "off", "cert", "jwt-or-cert", "jwt-and-cert")
PKI_DIR = "pki"
GRANTS_FILE = "client-cert-grants.json"
#: Names of the local CA's certificates (files ``<name>.crt``, ``.key``, ``.pem`` in PKI_DIR).
MTLS_SERVER_CERT = "nginx-mtls"
CLIENT_CERT = "crm-sync"
REVOKED_CLIENT_CERT = "crm-sync-revoked"
CLIENT_CERT_ORG = "crm-events local"
DEFAULT_PRODUCER_RATE = 5.0

KAFKA_READY_TIMEOUT_S = 90.0
# A clean broker shutdown (controlled shutdown, log flush) takes a few seconds.
KAFKA_STOP_TIMEOUT_S = 30.0
SERVICE_READY_TIMEOUT_S = 60.0
SERVICE_STOP_TIMEOUT_S = 10.0
DEV_TOKEN_TTL_S = 24 * 3600.0

_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class SettingsError(ValueError):
    """A setting has a bad value; the message is one line and names the variable."""


def recorded_redis_mode(run_dir: Path) -> str | None:
    """The Redis mode the stack in ``run_dir`` was started in, if it still runs."""
    try:
        mode = (Path(run_dir) / REDIS_MODE_FILE).read_text().strip()
    except OSError:
        return None
    return mode if mode in REDIS_MODES else None


def checkout_dir() -> Path:
    """The repository checkout this module belongs to."""
    return Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class StackSettings:
    run_dir: Path
    kafka_port: int = DEFAULT_KAFKA_PORT
    kafka_controller_port: int = DEFAULT_KAFKA_CONTROLLER_PORT
    kafka_topic: str = DEFAULT_KAFKA_TOPIC
    kafka_partitions: int = DEFAULT_KAFKA_PARTITIONS
    redis_port: int = DEFAULT_REDIS_PORT
    ingest_port: int = DEFAULT_INGEST_PORT
    edge_ports: tuple[int, ...] = DEFAULT_EDGE_PORTS
    lb_port: int = DEFAULT_LB_PORT
    producer_rate: float = DEFAULT_PRODUCER_RATE
    lb_tls_port: int | None = DEFAULT_LB_TLS_PORT
    """HTTPS + HTTP/2 port of the load balancer; None = plain HTTP only."""
    lb_tls_cert: Path | None = None
    lb_tls_key: Path | None = None
    """An operator's certificate and key; None = a self-signed one in the run directory."""
    redis_mode: str = "single"
    """``single``: one Redis. ``sentinel``: a primary, a replica and Sentinels."""
    redis_replica_port: int = DEFAULT_REDIS_REPLICA_PORT
    sentinel_ports: tuple[int, ...] = DEFAULT_SENTINEL_PORTS
    redis_cluster_ports: tuple[int, ...] = DEFAULT_CLUSTER_PORTS
    """Cluster mode: the first half masters, the second half one replica each (``from_env``
    also raises the default partitions to :data:`DEFAULT_CLUSTER_KAFKA_PARTITIONS`)."""
    lb_mtls_port: int | None = DEFAULT_LB_MTLS_PORT
    """nginx's mutual-TLS port (client certificates of the local CA); None = off."""
    edge_auth_mode: str = ""
    """The edges' CRM_EVENTS_AUTH_MODE; "" = :data:`DEFAULT_EDGE_AUTH_MODE` with the mutual-TLS
    listener, :data:`DEFAULT_EDGE_AUTH_MODE_WITHOUT_MTLS` without it (set on construction)."""
    client_cert_grants_file: Path | None = None
    """An operator's grants file for the edges; None = the local CA's (``crm-sync``: all)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir).resolve())
        if (self.lb_tls_cert is None) != (self.lb_tls_key is None):
            raise SettingsError(
                "CRM_EVENTS_LB_TLS_CERT, CRM_EVENTS_LB_TLS_KEY: set both or neither"
            )
        object.__setattr__(self, "edge_ports", tuple(self.edge_ports))
        object.__setattr__(self, "sentinel_ports", tuple(self.sentinel_ports))
        object.__setattr__(self, "redis_cluster_ports", tuple(self.redis_cluster_ports))
        if self.redis_mode not in REDIS_MODES:
            raise SettingsError(
                "CRM_EVENTS_REDIS_MODE: expected single, sentinel or cluster, "
                f"got {self.redis_mode!r}"
            )
        if self.sentinel and not self.sentinel_ports:
            raise SettingsError("CRM_EVENTS_REDIS_SENTINEL_PORTS: at least one Sentinel is needed")
        n_nodes = len(self.redis_cluster_ports)
        if self.cluster and (n_nodes < 2 or n_nodes % 2):
            raise SettingsError(
                "CRM_EVENTS_REDIS_CLUSTER_PORTS: expected an even number of ports (masters, "
                f"then as many replicas), got {n_nodes}"
            )
        if not self.edge_ports:
            raise SettingsError("CRM_EVENTS_EDGE_PORTS: at least one edge port is needed")
        if not self.edge_auth_mode:
            object.__setattr__(
                self,
                "edge_auth_mode",
                DEFAULT_EDGE_AUTH_MODE
                if self.lb_mtls_port is not None
                else DEFAULT_EDGE_AUTH_MODE_WITHOUT_MTLS,
            )
        if self.edge_auth_mode not in EDGE_AUTH_MODES:
            raise SettingsError(
                f"CRM_EVENTS_AUTH_MODE: expected one of {', '.join(EDGE_AUTH_MODES)}, "
                f"got {self.edge_auth_mode!r}"
            )
        if not self.producer_rate > 0 or not math.isfinite(self.producer_rate):
            raise SettingsError(
                f"CRM_EVENTS_PRODUCER_RATE: expected events per second > 0, "
                f"got {self.producer_rate!r}"
            )
        if self.kafka_partitions < 1:
            raise SettingsError(
                f"CRM_EVENTS_KAFKA_PARTITIONS: expected >= 1, got {self.kafka_partitions}"
            )
        if not _TOPIC_RE.match(self.kafka_topic):
            raise SettingsError(
                f"CRM_EVENTS_KAFKA_TOPIC: expected 1-249 of [A-Za-z0-9._-], "
                f"got {self.kafka_topic!r}"
            )
        seen: dict[int, str] = {}
        for var, port in self._ports():
            if not 1 <= port <= 65535:
                raise SettingsError(f"{var}: expected a TCP port 1-65535, got {port}")
            if port in seen:
                raise SettingsError(f"{var}: port {port} is also used by {seen[port]}")
            seen[port] = var

    def _ports(self) -> list[tuple[str, int]]:
        return [
            ("CRM_EVENTS_KAFKA_PORT", self.kafka_port),
            ("CRM_EVENTS_KAFKA_CONTROLLER_PORT", self.kafka_controller_port),
            *([] if self.cluster else [("CRM_EVENTS_REDIS_PORT", self.redis_port)]),
            *(("CRM_EVENTS_REDIS_CLUSTER_PORTS", p) for p in self.cluster_ports_in_use),
            *(
                ("CRM_EVENTS_REDIS_CLUSTER_PORTS (cluster bus: port + 10000)", p)
                for p in self.cluster_bus_ports
            ),
            *(
                [("CRM_EVENTS_REDIS_REPLICA_PORT", self.redis_replica_port)]
                + [("CRM_EVENTS_REDIS_SENTINEL_PORTS", p) for p in self.sentinel_ports]
                if self.sentinel
                else []
            ),
            ("CRM_EVENTS_INGEST_PORT", self.ingest_port),
            *(("CRM_EVENTS_EDGE_PORTS", p) for p in self.edge_ports),
            ("CRM_EVENTS_LB_PORT", self.lb_port),
            *(
                [("CRM_EVENTS_LB_TLS_PORT", self.lb_tls_port)]
                if self.lb_tls_port is not None
                else []
            ),
            *(
                [("CRM_EVENTS_LB_MTLS_PORT", self.lb_mtls_port)]
                if self.lb_mtls_port is not None
                else []
            ),
        ]

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, checkout: Path | None = None) -> StackSettings:
        """Read the ``CRM_EVENTS_*`` variables; raises :class:`SettingsError` on a bad value."""

        def port(var: str, default: int) -> int:
            raw = env.get(var, "").strip()
            if not raw:
                return default
            try:
                return int(raw)
            except ValueError:
                raise SettingsError(f"{var}: expected a TCP port 1-65535, got {raw!r}") from None

        def ports(var: str, default: tuple[int, ...]) -> tuple[int, ...]:
            raw = env.get(var, "").strip()
            if not raw:
                return default
            try:
                return tuple(int(p) for p in raw.split(","))
            except ValueError:
                raise SettingsError(f"{var}: expected comma-separated ports, got {raw!r}") from None

        edge_ports = ports("CRM_EVENTS_EDGE_PORTS", DEFAULT_EDGE_PORTS)

        raw_rate = env.get("CRM_EVENTS_PRODUCER_RATE", "").strip()
        rate = DEFAULT_PRODUCER_RATE
        if raw_rate:
            try:
                rate = float(raw_rate)
            except ValueError:
                raise SettingsError(
                    f"CRM_EVENTS_PRODUCER_RATE: expected events per second > 0, got {raw_rate!r}"
                ) from None

        raw_run = env.get("CRM_EVENTS_RUN_DIR", "").strip()
        run_dir = Path(raw_run).expanduser() if raw_run else (checkout or checkout_dir()) / "run"
        mode = env.get("CRM_EVENTS_REDIS_MODE", "").strip().lower() or recorded_redis_mode(run_dir)

        raw_parts = env.get("CRM_EVENTS_KAFKA_PARTITIONS", "").strip()
        partitions = (
            DEFAULT_CLUSTER_KAFKA_PARTITIONS if mode == "cluster" else DEFAULT_KAFKA_PARTITIONS
        )
        if raw_parts:
            try:
                partitions = int(raw_parts)
            except ValueError:
                raise SettingsError(
                    f"CRM_EVENTS_KAFKA_PARTITIONS: expected an integer >= 1, got {raw_parts!r}"
                ) from None

        raw_tls = env.get("CRM_EVENTS_LB_TLS_PORT", "").strip()
        tls_port: int | None = DEFAULT_LB_TLS_PORT
        if raw_tls.lower() in ("0", "off"):
            tls_port = None
        elif raw_tls:
            tls_port = port("CRM_EVENTS_LB_TLS_PORT", DEFAULT_LB_TLS_PORT)
        raw_mtls = env.get("CRM_EVENTS_LB_MTLS_PORT", "").strip()
        mtls_port: int | None = DEFAULT_LB_MTLS_PORT
        if raw_mtls.lower() in ("0", "off"):
            mtls_port = None
        elif raw_mtls:
            mtls_port = port("CRM_EVENTS_LB_MTLS_PORT", DEFAULT_LB_MTLS_PORT)
        raw_grants = env.get("CRM_EVENTS_CLIENT_CERT_GRANTS_FILE", "").strip()
        grants = Path(raw_grants).expanduser().resolve() if raw_grants else None
        if grants is not None and not grants.is_file():
            raise SettingsError(f"CRM_EVENTS_CLIENT_CERT_GRANTS_FILE: no such file: {raw_grants!r}")
        tls_files: dict[str, Path | None] = {}
        for var in ("CRM_EVENTS_LB_TLS_CERT", "CRM_EVENTS_LB_TLS_KEY"):
            raw_path = env.get(var, "").strip()
            tls_files[var] = Path(raw_path).expanduser().resolve() if raw_path else None
            if raw_path and not Path(raw_path).expanduser().is_file():
                raise SettingsError(f"{var}: no such file: {raw_path!r}")

        return cls(
            run_dir=run_dir,
            kafka_port=port("CRM_EVENTS_KAFKA_PORT", DEFAULT_KAFKA_PORT),
            kafka_controller_port=port(
                "CRM_EVENTS_KAFKA_CONTROLLER_PORT", DEFAULT_KAFKA_CONTROLLER_PORT
            ),
            kafka_topic=env.get("CRM_EVENTS_KAFKA_TOPIC", "").strip() or DEFAULT_KAFKA_TOPIC,
            kafka_partitions=partitions,
            redis_port=port("CRM_EVENTS_REDIS_PORT", DEFAULT_REDIS_PORT),
            ingest_port=port("CRM_EVENTS_INGEST_PORT", DEFAULT_INGEST_PORT),
            edge_ports=edge_ports,
            lb_port=port("CRM_EVENTS_LB_PORT", DEFAULT_LB_PORT),
            producer_rate=rate,
            lb_tls_port=tls_port,
            lb_tls_cert=tls_files["CRM_EVENTS_LB_TLS_CERT"],
            lb_tls_key=tls_files["CRM_EVENTS_LB_TLS_KEY"],
            redis_mode=mode or "single",
            redis_replica_port=port("CRM_EVENTS_REDIS_REPLICA_PORT", DEFAULT_REDIS_REPLICA_PORT),
            sentinel_ports=ports("CRM_EVENTS_REDIS_SENTINEL_PORTS", DEFAULT_SENTINEL_PORTS),
            redis_cluster_ports=ports("CRM_EVENTS_REDIS_CLUSTER_PORTS", DEFAULT_CLUSTER_PORTS),
            lb_mtls_port=mtls_port,
            # Unset: follows the mutual-TLS listener (__post_init__); set: passed as it is.
            edge_auth_mode=env.get("CRM_EVENTS_AUTH_MODE", "").strip().lower(),
            client_cert_grants_file=grants,
        )

    @property
    def sentinel(self) -> bool:
        return self.redis_mode == "sentinel"

    @property
    def cluster(self) -> bool:
        return self.redis_mode == "cluster"

    @property
    def cluster_ports_in_use(self) -> tuple[int, ...]:
        """The cluster nodes' ports in cluster mode, else none."""
        return self.redis_cluster_ports if self.cluster else ()

    @property
    def cluster_bus_ports(self) -> tuple[int, ...]:
        return tuple(p + CLUSTER_BUS_OFFSET for p in self.cluster_ports_in_use)

    @property
    def cluster_masters(self) -> list[tuple[str, int]]:
        """The nodes ``redis-cli --cluster create`` makes masters (first half of the ports);
        after a failover a master may be elsewhere, ``make status`` tells."""
        half = len(self.cluster_ports_in_use) // 2
        return [(HOST, p) for p in self.cluster_ports_in_use[:half]]

    @property
    def cluster_replicas(self) -> list[tuple[str, int]]:
        half = len(self.cluster_ports_in_use) // 2
        return [(HOST, p) for p in self.cluster_ports_in_use[half:]]

    @property
    def kafka_bootstrap(self) -> str:
        return f"{HOST}:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        """What ingest and the edges connect to: the Redis, the Sentinels in front of it, or
        the cluster's first masters as seeds."""
        if self.cluster:
            seeds = ",".join(f"{h}:{p}" for h, p in self.cluster_masters)
            return f"redis+cluster://{seeds}"
        if self.sentinel:
            sentinels = ",".join(f"{HOST}:{p}" for p in self.sentinel_ports)
            return f"redis+sentinel://{sentinels}/{SENTINEL_SERVICE}/0"
        return f"redis://{HOST}:{self.redis_port}/0"

    @property
    def redis_nodes(self) -> list[tuple[str, int]]:
        """(part, port) of every Redis server (not the Sentinels)."""
        if self.cluster:
            return [
                (f"redis-node{i}", port) for i, port in enumerate(self.redis_cluster_ports, start=1)
            ]
        nodes = [("redis", self.redis_port)]
        if self.sentinel:
            nodes.append(("redis-replica", self.redis_replica_port))
        return nodes

    @property
    def sentinel_names(self) -> list[str]:
        return (
            [f"sentinel{i}" for i in range(1, len(self.sentinel_ports) + 1)]
            if self.sentinel
            else []
        )

    @property
    def lb_url(self) -> str:
        return f"http://{HOST}:{self.lb_port}"

    @property
    def lb_https_url(self) -> str | None:
        """The HTTPS + HTTP/2 address, or None when TLS is off."""
        return None if self.lb_tls_port is None else f"https://{HOST}:{self.lb_tls_port}"

    @property
    def lb_mtls_url(self) -> str | None:
        """The mutual-TLS address, or None when it is off."""
        return None if self.lb_mtls_port is None else f"https://{HOST}:{self.lb_mtls_port}"

    @property
    def pki_dir(self) -> Path:
        """The local CA (devtools/pki.py) and its certificates."""
        return self.run_dir / PKI_DIR

    @property
    def edge_cert_auth(self) -> bool:
        """The edges' mode takes client certificates (and so needs a grants file)."""
        return "cert" in self.edge_auth_mode

    @property
    def grants_file(self) -> Path:
        """The grants file the edges read: the operator's or the local CA's."""
        return self.client_cert_grants_file or self.pki_dir / GRANTS_FILE

    def edge_url(self, port: int) -> str:
        return f"http://{HOST}:{port}"

    @property
    def ingest_url(self) -> str:
        return f"http://{HOST}:{self.ingest_port}"

    @property
    def edge_names(self) -> list[str]:
        return [f"edge{i}" for i in range(1, len(self.edge_ports) + 1)]

    @property
    def part_names(self) -> list[str]:
        """All parts, in start order."""
        return [
            "kafka",
            *(name for name, _ in self.redis_nodes),
            *self.sentinel_names,
            "ingest",
            *self.edge_names,
            "nginx",
            "alertmanager",
            "prometheus",
            "producer",
            watchdog.NAME,
        ]


# -- the parts -------------------------------------------------------------------------------


def _python_entry(script: str, module: str) -> list[str]:
    """The console script installed next to the running interpreter (the checkout's .venv),
    falling back to ``python -m`` so a missing script link does not stop the stack."""
    candidate = Path(sys.executable).parent / script
    if candidate.is_file():
        return [str(candidate)]
    return [sys.executable, "-m", module]


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is not None:
        return found
    # Daemons live in sbin, which a non-root PATH often lacks.
    for d in ("/usr/sbin", "/usr/local/sbin"):
        if (Path(d) / name).is_file():
            return str(Path(d) / name)
    return name  # spawning then fails with "cannot run 'name'", at start time


def kafka_spec(settings: StackSettings) -> ProcessSpec:
    layout = kafka_local.KafkaLayout.under(settings.run_dir)
    log_file = Supervisor(settings.run_dir).logfile("kafka")

    def prepare() -> None:
        try:
            kafka_local.render_config(
                layout,
                kafka_port=settings.kafka_port,
                controller_port=settings.kafka_controller_port,
                partitions=settings.kafka_partitions,
                log_file=log_file,
            )
            kafka_local.ensure_formatted(layout, controller_port=settings.kafka_controller_port)
        except kafka_local.KafkaError as exc:
            raise StartError(f"kafka: {exc}") from exc

    def after_ready() -> None:
        n = kafka_local.ensure_topic(
            settings.kafka_bootstrap, settings.kafka_topic, settings.kafka_partitions
        )
        if n != settings.kafka_partitions:
            # Never added here: Kafka would then hash keys to other partitions, and a key's
            # later events could overtake its earlier ones in another partition.
            log.warning(
                "topic %s has %d partitions, not %d: it existed before, and the stack does not "
                "add partitions to it (keys would map to other partitions). Ingest uses the %d; "
                "for %d, name a new topic (CRM_EVENTS_KAFKA_TOPIC)",
                settings.kafka_topic,
                n,
                settings.kafka_partitions,
                n,
                settings.kafka_partitions,
            )

    return ProcessSpec(
        name="kafka",
        argv=kafka_local.broker_argv(layout),
        cwd=layout.home,
        ready=KafkaReady(settings.kafka_bootstrap),
        ready_timeout_s=KAFKA_READY_TIMEOUT_S,
        stop_timeout_s=KAFKA_STOP_TIMEOUT_S,
        port=settings.kafka_port,
        prepare=prepare,
        after_ready=after_ready,
    )


def redis_conf_text(
    settings: StackSettings,
    data_dir: Path,
    *,
    port: int | None = None,
    replicaof: tuple[str, int] | None = None,
) -> str:
    return redis_ha.redis_conf_text(
        settings.redis_port if port is None else port, data_dir, host=HOST, replicaof=replicaof
    )


def _sentinel_addresses(settings: StackSettings) -> list[tuple[str, int]]:
    return [(HOST, p) for p in settings.sentinel_ports] if settings.sentinel else []


def _primary_now(settings: StackSettings) -> tuple[str, int] | None:
    """Who the running Sentinels (else the running Redis servers) say is primary."""
    nodes = [(HOST, port) for _, port in settings.redis_nodes]
    return redis_ha.current_primary(_sentinel_addresses(settings), nodes, SENTINEL_SERVICE)


def _redis_node_spec(settings: StackSettings, name: str, port: int) -> ProcessSpec:
    home = settings.run_dir / name

    def prepare() -> None:
        (home / "data").mkdir(parents=True, exist_ok=True)
        replicaof: tuple[str, int] | None = None
        if settings.sentinel:
            # After a failover the primary is whoever the Sentinels say, not the first port:
            # a restarted node rejoins as a replica of it (or as the primary it still is).
            primary = _primary_now(settings) or (HOST, settings.redis_port)
            replicaof = None if primary == (HOST, port) else primary
        (home / "redis.conf").write_text(
            redis_conf_text(settings, home / "data", port=port, replicaof=replicaof)
        )

    ready: Callable[[], bool] = RedisReady(HOST, port)
    if name != "redis":
        ready = redis_ha.ReplicaReady(HOST, port)
    return ProcessSpec(
        name=name,
        argv=[_binary("redis-server"), str(home / "redis.conf")],
        cwd=home,
        ready=ready,
        ready_timeout_s=SERVICE_READY_TIMEOUT_S,
        port=port,
        prepare=prepare,
    )


def redis_spec(settings: StackSettings) -> ProcessSpec:
    """The Redis on CRM_EVENTS_REDIS_PORT: the only one, or the first primary (sentinel mode)."""
    return _redis_node_spec(settings, "redis", settings.redis_port)


def redis_replica_spec(settings: StackSettings) -> ProcessSpec:
    return _redis_node_spec(settings, "redis-replica", settings.redis_replica_port)


def cluster_node_spec(settings: StackSettings, index: int) -> ProcessSpec:
    """Cluster node number ``index`` (1-based), ``redis-node<index>``. Its redis.conf is written
    afresh on every start; its ``nodes.conf`` (identity, epochs, slot map) is Redis's own and
    kept, so a restart rejoins the cluster."""
    name = f"redis-node{index}"
    port = settings.redis_cluster_ports[index - 1]
    home = settings.run_dir / name
    data = home / "data"

    def prepare() -> None:
        data.mkdir(parents=True, exist_ok=True)
        recorded = redis_cluster.recorded_address(data / "nodes.conf")
        if recorded is not None and recorded[1] != port:
            raise StartError(
                f"{name}: {data / 'nodes.conf'} belongs to a cluster node on port {recorded[1]}, "
                f"not {port} (CRM_EVENTS_REDIS_CLUSTER_PORTS changed after the cluster was "
                f"created); set it back, or stop the stack and remove "
                f"{settings.run_dir}/redis-node*/ to create a new cluster"
            )
        (home / "redis.conf").write_text(
            redis_cluster.node_conf_text(
                port, data, host=HOST, node_timeout_ms=STACK_CLUSTER_NODE_TIMEOUT_MS
            )
        )

    def after_ready() -> None:
        _ensure_cluster(settings)

    return ProcessSpec(
        name=name,
        argv=[_binary("redis-server"), str(home / "redis.conf")],
        cwd=home,
        ready=RedisReady(HOST, port),
        ready_timeout_s=SERVICE_READY_TIMEOUT_S,
        port=port,
        prepare=prepare,
        after_ready=after_ready,
    )


def _ensure_cluster(settings: StackSettings) -> None:
    """Once every node answers: create the cluster if none of them is in one yet, then wait
    until it has settled with every replica in sync. Until then (the first nodes of ``up``)
    nothing to do: the node started last does it."""
    nodes = [(HOST, port) for _, port in settings.redis_nodes]
    fresh = [redis_cluster.is_fresh(address) for address in nodes]
    if any(f is None for f in fresh):
        return
    if all(fresh):
        redis_cluster.create(
            settings.cluster_masters,
            settings.cluster_replicas,
            redis_cli=_binary("redis-cli"),
            timeout_s=SERVICE_READY_TIMEOUT_S,
        )
    elif any(fresh):
        lost = [name for (name, _), f in zip(settings.redis_nodes, fresh, strict=True) if f]
        raise StartError(
            f"{', '.join(lost)}: not in the cluster the other nodes form (its data directory "
            f"was removed?); stop the stack (make down) and remove "
            f"{settings.run_dir}/redis-node*/ to create the cluster afresh"
        )
    redis_cluster.wait_settled(nodes, SERVICE_READY_TIMEOUT_S, replicas_in_sync=True)


def sentinel_conf_text(settings: StackSettings, index: int, primary: tuple[str, int]) -> str:
    home = settings.run_dir / f"sentinel{index}"
    return redis_ha.sentinel_conf_text(
        settings.sentinel_ports[index - 1],
        home,
        SENTINEL_SERVICE,
        primary,
        sentinels=len(settings.sentinel_ports),
        down_after_ms=STACK_SENTINEL_DOWN_AFTER_MS,
        failover_timeout_ms=STACK_SENTINEL_FAILOVER_TIMEOUT_MS,
        host=HOST,
        myid=redis_ha.existing_myid(home / "sentinel.conf"),
    )


def sentinel_spec(settings: StackSettings, index: int) -> ProcessSpec:
    """Sentinel number ``index`` (1-based). Its file is written afresh on every start, watching
    the primary the other Sentinels name (so a restart after a failover follows it); the epochs
    and the lists of replicas and Sentinels it then relearns within a second from the others."""
    port = settings.sentinel_ports[index - 1]
    home = settings.run_dir / f"sentinel{index}"
    conf = home / "sentinel.conf"

    def prepare() -> None:
        home.mkdir(parents=True, exist_ok=True)
        primary = _primary_now(settings) or (HOST, settings.redis_port)
        conf.write_text(sentinel_conf_text(settings, index, primary))

    return ProcessSpec(
        name=f"sentinel{index}",
        argv=_sentinel_argv(conf),
        cwd=home,
        ready=redis_ha.SentinelReady(HOST, port, SENTINEL_SERVICE),
        ready_timeout_s=SERVICE_READY_TIMEOUT_S,
        stop_timeout_s=SERVICE_STOP_TIMEOUT_S,
        port=port,
        prepare=prepare,
    )


def _sentinel_argv(conf: Path) -> list[str]:
    # Debian's redis-sentinel package; without it, the same binary in Sentinel mode.
    found = _binary("redis-sentinel")
    if Path(found).is_file():
        return [found, str(conf)]
    return [_binary("redis-server"), str(conf), "--sentinel"]


def ingest_spec(settings: StackSettings) -> ProcessSpec:
    return ProcessSpec(
        name="ingest",
        argv=_python_entry("crm-events-ingest", "ingest"),
        env={
            "CRM_EVENTS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "CRM_EVENTS_KAFKA_TOPIC": settings.kafka_topic,
            "CRM_EVENTS_KAFKA_PARTITIONS": str(settings.kafka_partitions),
            "CRM_EVENTS_REDIS_URL": settings.redis_url,
            "CRM_EVENTS_INGEST_PORT": str(settings.ingest_port),
            "CRM_EVENTS_NODE_ID": "ingest-1",
            # With a replica, a batch's offsets are committed once the replica has it too.
            **(
                {"CRM_EVENTS_REDIS_WAIT_REPLICAS": "1"}
                if settings.sentinel or settings.cluster
                else {}
            ),
        },
        cwd=settings.run_dir,
        ready=HttpReady(f"{settings.ingest_url}/readyz"),
        ready_timeout_s=SERVICE_READY_TIMEOUT_S,
        stop_timeout_s=SERVICE_STOP_TIMEOUT_S,
        port=settings.ingest_port,
    )


def jwt_secret_file(settings: StackSettings) -> Path:
    """The local stack's JWT secret: made once, kept in the run directory (never committed)."""
    return settings.run_dir / "auth" / "jwt-secret"


def ensure_jwt_secret(settings: StackSettings) -> Path:
    path = jwt_secret_file(settings)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48) + "\n")
        path.chmod(0o600)
    return path


def dev_token(settings: StackSettings, ttl_s: float = DEV_TOKEN_TTL_S) -> str:
    """A development token granting every event type, signed with the stack's secret."""
    secret = ensure_jwt_secret(settings).read_text().strip()
    return issue_token(secret, types=["*"], ttl_s=ttl_s, subject="local-developer")


def edge_spec(settings: StackSettings, index: int) -> ProcessSpec:
    """Edge number ``index`` (1-based), on ``settings.edge_ports[index - 1]``. Authentication
    is on (a JWT signed with the stack's own secret, or a client certificate of the local CA
    relayed by nginx) unless CRM_EVENTS_AUTH_MODE=off is set."""
    port = settings.edge_ports[index - 1]

    def prepare() -> None:
        ensure_jwt_secret(settings)
        if settings.edge_cert_auth and settings.client_cert_grants_file is None:
            ensure_local_pki(settings)

    cert_env = (
        {"CRM_EVENTS_CLIENT_CERT_GRANTS_FILE": str(settings.grants_file)}
        if settings.edge_cert_auth
        else {}
    )
    return ProcessSpec(
        name=f"edge{index}",
        argv=_python_entry("crm-events-edge", "edge"),
        env={
            "CRM_EVENTS_REDIS_URL": settings.redis_url,
            "CRM_EVENTS_EDGE_PORT": str(port),
            "CRM_EVENTS_NODE_ID": f"edge-{index}",
            "CRM_EVENTS_JWT_SECRET_FILE": str(jwt_secret_file(settings)),
            "CRM_EVENTS_AUTH_MODE": settings.edge_auth_mode,
            **cert_env,
        },
        prepare=prepare,
        cwd=settings.run_dir,
        ready=HttpReady(f"{settings.edge_url(port)}/readyz"),
        ready_timeout_s=SERVICE_READY_TIMEOUT_S,
        stop_timeout_s=SERVICE_STOP_TIMEOUT_S,
        port=port,
    )


def nginx_spec(settings: StackSettings) -> ProcessSpec:
    home = settings.run_dir / "nginx"
    main_conf = home / nginx_conf.MAIN_CONF

    def prepare() -> None:
        cert, key = settings.lb_tls_cert, settings.lb_tls_key
        if settings.lb_tls_port is not None and cert is None:
            try:
                cert, key = nginx_conf.ensure_self_signed_cert(home / "tls")
            except nginx_conf.TlsError as exc:
                raise StartError(f"nginx: {exc}") from exc
        mtls = None
        if settings.lb_mtls_port is not None:
            ca = ensure_local_pki(settings)
            # nginx reads the CRL only now: a fresh year of it, so that this nginx never
            # refuses every certificate because its copy of the list expired.
            try:
                ca.renew_crl()
            except (PkiError, OSError) as exc:
                raise StartError(f"nginx: CRL in {settings.pki_dir}: {exc}") from exc
            server = ca.files(MTLS_SERVER_CERT)
            mtls = nginx_conf.MtlsListener(
                port=settings.lb_mtls_port,
                cert=server.cert,
                key=server.key,
                client_ca=ca.cert_path,
                crl=ca.crl_path,
            )
        nginx_conf.render(
            home,
            settings.lb_port,
            settings.edge_ports,
            host=HOST,
            tls_port=settings.lb_tls_port,
            tls_cert=cert if settings.lb_tls_port is not None else None,
            tls_key=key if settings.lb_tls_port is not None else None,
            http2_directive=nginx_conf.http2_directive_supported(_binary("nginx")),
            mtls=mtls,
        )

    return ProcessSpec(
        name="nginx",
        argv=nginx_conf.nginx_argv(main_conf, nginx=_binary("nginx")),
        cwd=home,
        ready=HttpReady(f"{settings.lb_url}/nginx-health"),
        ready_timeout_s=SERVICE_READY_TIMEOUT_S,
        stop_timeout_s=SERVICE_STOP_TIMEOUT_S,
        port=settings.lb_port,
        prepare=prepare,
    )


def ensure_local_pki(settings: StackSettings) -> LocalCA:
    """The local CA in ``<run dir>/pki`` with what the stack uses (module docstring): made on
    the first start, reused later (certificates are renewed a day before they end, the CRL
    a third of its life before; nginx's start re-signs it anyway). The grants file is written
    only when missing, so an operator's edits survive restarts. Safe from several parts at
    once (devtools/pki.py locks; two parts writing a missing grants file write the same)."""
    try:
        ca = LocalCA.open(settings.pki_dir)
        ca.issue_server(MTLS_SERVER_CERT)
        client = ca.issue_client(CLIENT_CERT, common_name=CLIENT_CERT, organization=CLIENT_CERT_ORG)
        revoked = ca.issue_client(
            REVOKED_CLIENT_CERT, common_name=REVOKED_CLIENT_CERT, organization=CLIENT_CERT_ORG
        )
        if not ca.is_revoked(revoked.certificate()):
            ca.revoke(revoked.cert)
        grants_path = settings.pki_dir / GRANTS_FILE
        if not grants_path.exists():
            subject = client.certificate().subject.rfc4514_string()
            grants = {"rules": [{"subject": subject, "types": ["*"]}]}
            write_text_atomically(grants_path, json.dumps(grants, indent=2) + "\n")
    except (PkiError, OSError, ValueError) as exc:
        raise StartError(f"local CA in {settings.pki_dir}: {exc}") from exc
    return ca


def producer_spec(settings: StackSettings, *, count: int = 0) -> ProcessSpec:
    return ProcessSpec(
        name="producer",
        argv=_python_entry("crm-events-producer", "devtools.producer"),
        env={
            "CRM_EVENTS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "CRM_EVENTS_KAFKA_TOPIC": settings.kafka_topic,
            "CRM_EVENTS_PRODUCER_RATE": repr(settings.producer_rate),
            "CRM_EVENTS_PRODUCER_COUNT": str(count),
        },
        cwd=settings.run_dir,
        # No endpoint to ask: ready as soon as it runs (it retries Kafka on its own).
        ready=None,
        stop_timeout_s=SERVICE_STOP_TIMEOUT_S,
    )


def watchdog_spec(settings: StackSettings) -> ProcessSpec:
    """``crm-events-stack watchdog``: last to start (it then finds every part running), first
    to stop (nothing is restarted while ``down`` stops the rest)."""
    return ProcessSpec(
        name=watchdog.NAME,
        argv=[*_python_entry("crm-events-stack", "devtools.stack"), "watchdog"],
        # It restarts parts with the specs it builds from its own environment: the one `up` ran
        # in (inherited), in the same working directory (cwd None: relative paths in the
        # settings resolve alike), with the run directory spelled out.
        env={"CRM_EVENTS_RUN_DIR": str(settings.run_dir)},
        ready=watchdog.WatchdogReady(
            settings.run_dir, functools.partial(Supervisor(settings.run_dir).pid, watchdog.NAME)
        ),
        ready_timeout_s=SERVICE_READY_TIMEOUT_S,
        # Longer than the watchdog's own wait for a spawn in progress: `down` never SIGKILLs
        # it between a spawn and its pidfile.
        stop_timeout_s=watchdog.SPAWN_WAIT_S + 10.0,
    )


def build_specs(settings: StackSettings, env: Mapping[str, str] | None = None) -> list[ProcessSpec]:
    """Every part, in start order."""
    mon = MonitoringSettings.for_stack(settings, os.environ if env is None else env)
    return [
        kafka_spec(settings),
        *([] if settings.cluster else [redis_spec(settings)]),
        *([redis_replica_spec(settings)] if settings.sentinel else []),
        *(cluster_node_spec(settings, i) for i in range(1, len(settings.cluster_ports_in_use) + 1)),
        *(sentinel_spec(settings, i) for i in range(1, len(settings.sentinel_names) + 1)),
        ingest_spec(settings),
        *(edge_spec(settings, i) for i in range(1, len(settings.edge_ports) + 1)),
        nginx_spec(settings),
        *monitoring_specs(mon),
        producer_spec(settings),
        watchdog_spec(settings),
    ]


# -- the stack -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PartStatus:
    name: str
    pid: int | None
    state: ProcState
    #: None when the part has no readiness check or is not running.
    ready: bool | None
    port: int | None
    #: Restarts the watchdog made; None when it has no record of the part.
    restarts: int | None = None


@dataclasses.dataclass(frozen=True)
class RestartResult:
    name: str
    old_pid: int | None
    """None when the part was not running (then it is only started)."""
    new_pid: int
    stopped_s: float
    """From the stop signal until the old process was gone (its drain)."""
    ready_s: float
    """From then until the new process was ready."""


@dataclasses.dataclass(frozen=True)
class RedisTopology:
    sentinels: list[tuple[str, int, tuple[str, int] | None]]
    """(part, port, the primary it names or None when it does not answer)."""
    nodes: list[tuple[str, int, redis_ha.Role | None]]
    """(part, port, its ROLE or None when it does not answer)."""

    @property
    def primary(self) -> tuple[str, int] | None:
        """The primary a majority of the Sentinels name; None without a majority."""
        named = [p for _, _, p in self.sentinels if p is not None]
        for candidate in dict.fromkeys(named):
            if named.count(candidate) >= redis_ha.quorum(len(self.sentinels)):
                return candidate
        return None

    def lines(self) -> list[str]:
        primary = self.primary
        owner = {(HOST, port): name for name, port, _ in self.nodes}
        if primary is None:
            head = "redis primary: unknown (no majority of the Sentinels names one)"
        else:
            part = owner.get(primary, "not a part of this stack")
            head = f"redis primary: {primary[0]}:{primary[1]} ({part}), per the Sentinels"
        rows = [head]
        for name, port, named in self.sentinels:
            said = "no answer" if named is None else f"names {named[0]}:{named[1]}"
            rows.append(f"  {name:<14} {HOST}:{port:<6} {said}")
        for name, port, role in self.nodes:
            rows.append(f"  {name:<14} {HOST}:{port:<6} {role or 'no answer'}")
        return rows


def _named(address: tuple[str, int], owner: Mapping[tuple[str, int], str]) -> str:
    return f"{address[0]}:{address[1]} ({owner.get(address, 'not a part of this stack')})"


@dataclasses.dataclass(frozen=True)
class ClusterTopology:
    nodes: list[tuple[str, int, redis_ha.Role | None]]
    """(part, port, its ROLE or None when it does not answer)."""
    view: redis_cluster.ClusterView | None
    """CLUSTER NODES of the first node that answers; None when none does."""
    info: Mapping[str, str] | None
    """CLUSTER INFO of that same node."""
    partitions: int = 0
    """Kafka partitions to place on the masters by their hash tag's slot (0: not shown)."""

    def lines(self) -> list[str]:
        owner = {(HOST, port): name for name, port, _ in self.nodes}
        view, info = self.view, self.info or {}
        if view is None:
            head = "redis cluster: no node answers"
        elif view.assigned == 0 and len(view.nodes) == 1:
            head = "redis cluster: not created yet (the nodes know no cluster)"
        else:
            head = (
                f"redis cluster: state {info.get('cluster_state', '?')}, "
                f"{info.get('cluster_slots_ok', '?')}/{redis_cluster.TOTAL_SLOTS} slots served "
                f"by {len(view.masters())} masters, per {_named(view.source, owner)}"
            )
        rows = [head]
        for name, port, role in self.nodes:
            node = None if view is None else view.by_address((HOST, port))
            rows.append(f"  {name:<14} {HOST}:{port:<6} {self._describe(node, role, owner)}")
        return rows

    def _describe(
        self,
        node: redis_cluster.Node | None,
        role: redis_ha.Role | None,
        owner: Mapping[tuple[str, int], str],
    ) -> str:
        view = self.view
        if role is None:
            if node is not None and node.failing:
                return "no answer (the cluster marks it failed)"
            return "no answer"
        if role.kind == "replica" and role.primary is not None:
            return f"replica of {_named(role.primary, owner)}, link {role.link}"
        if role.kind != "master":
            return role.kind
        if node is None or view is None:
            return "master (not in the cluster's view)"
        if not node.slots:
            return "master, no slots"
        text = f"master, slots {redis_cluster.format_ranges(node.slots)} ({node.slot_count})"
        if self.partitions:
            mine = [
                str(p)
                for p in range(self.partitions)
                if any(s <= partition_slot(p) <= e for s, e in node.slots)
            ]
            text += f", partitions {','.join(mine) or 'none'}"
        for slot, peer in node.migrating:
            to = view.by_id(peer)
            text += f", moving slot {slot} to {_named(to.address, owner) if to else peer}"
        replicas = [
            owner.get(r.address, f"{r.address[0]}:{r.address[1]}") for r in view.replicas_of(node)
        ]
        return f"{text}, replicas: {', '.join(replicas) or 'none'}"


def _stored_partitions(addresses: list[tuple[str, int]]) -> int | None:
    """The partition count ingest recorded in the meta hash (the topic's real one, which an
    existing topic may hold apart from CRM_EVENTS_KAFKA_PARTITIONS); None before ingest ran."""
    meta = RedisKeys(DEFAULT_REDIS_PREFIX).meta
    for address in addresses:
        # Nodes that do not hold the meta hash's slot answer MOVED, which reads as None.
        raw = redis_ha.ask(address, "HGET", meta, META_PARTITIONS)
        if isinstance(raw, bytes) and raw.isdigit():
            return int(raw)
    return None


class Stack:
    """The parts of one :class:`StackSettings`, managed through one run directory."""

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.supervisor = Supervisor(settings.run_dir)
        self.monitoring = MonitoringSettings.for_stack(settings, os.environ)
        self.specs: dict[str, ProcessSpec] = {s.name: s for s in build_specs(settings)}

    def select(self, parts: Iterable[str] | None) -> list[ProcessSpec]:
        """Specs of the named parts (default: all), in start order; SettingsError if unknown."""
        if parts is None:
            return list(self.specs.values())
        wanted = list(dict.fromkeys(parts))
        unknown = [p for p in wanted if p not in self.specs]
        if unknown:
            raise SettingsError(
                f"unknown part(s) {', '.join(unknown)}; parts are: {', '.join(self.specs)}"
            )
        # Always in start order, whatever order they were named in.
        return [s for s in self.specs.values() if s.name in wanted]

    def start(
        self,
        parts: Iterable[str] | None = None,
        *,
        report: Callable[[StartResult], None] | None = None,
    ) -> list[StartResult]:
        """Start the named parts (default: all) that are not running, in start order, each
        ready before the next starts. Raises StartError on the first part that fails."""
        specs = self.select(parts)
        self._record_redis_mode()
        results = []
        for spec in specs:
            if spec.name == watchdog.NAME:
                self._retire_other_watchdog(spec)
            result = self.supervisor.start(spec)
            if report is not None:
                report(result)
            results.append(result)
        return results

    def watchdog_fingerprint(self, spec: ProcessSpec | None = None) -> str:
        """The :func:`~devtools.watchdog.fingerprint` of the watchdog this command would start:
        it runs in this environment with the spec's variables laid over it (as every part)."""
        spec = spec or self.specs[watchdog.NAME]
        return watchdog.fingerprint(
            list(self.specs.values()), {**os.environ, **spec.env}, Path.cwd()
        )

    def _retire_other_watchdog(self, spec: ProcessSpec) -> None:
        """Stop a running watchdog that restarts parts with other parts or settings than this
        command's (an earlier `up` with another CRM_EVENTS_EDGE_PORTS, producer rate, …), so
        that the start that follows starts one with this command's."""
        running = self.supervisor.pid(watchdog.NAME)
        if running is None:
            return
        found = self.watchdog_state()
        if (
            found is not None
            and found.pid == running
            and found.fingerprint == self.watchdog_fingerprint(spec)
        ):
            return
        log.warning(
            "the running watchdog watches other parts or settings than this command's: "
            "replacing it (its restart counts carry over)"
        )
        self.supervisor.stop(watchdog.NAME, spec.stop_timeout_s, spec.stop_signal)

    def stop(self, parts: Iterable[str] | None = None) -> list[str]:
        """Stop the named parts (default: every part with a pidfile, including parts this
        configuration no longer has, e.g. after CRM_EVENTS_EDGE_PORTS shrank) in reverse start
        order. Returns the names that were running."""
        if parts is None:
            names = list(reversed(self.specs))
            names += [n for n in self.supervisor.known() if n not in names]
        else:
            names = [s.name for s in reversed(self.select(parts))]
        stopped = []
        for name in names:
            spec = self.specs.get(name)
            if spec is None:
                was_running = self.supervisor.stop(name, SERVICE_STOP_TIMEOUT_S)
            else:
                was_running = self.supervisor.stop(name, spec.stop_timeout_s, spec.stop_signal)
            if was_running:
                stopped.append(name)
        return stopped

    def down(self) -> list[str]:
        stopped = self.stop(None)
        (self.settings.run_dir / REDIS_MODE_FILE).unlink(missing_ok=True)
        # The restart counts are per `up`; logs/watchdog.log keeps every restart.
        watchdog.state_file(self.settings.run_dir).unlink(missing_ok=True)
        return stopped

    def restart(
        self,
        parts: Iterable[str],
        *,
        report: Callable[[RestartResult], None] | None = None,
    ) -> list[RestartResult]:
        """Restart the named parts one at a time, in start order: stop (the part's stop
        signal, so an edge drains its streams), start, wait until ready, then the next; a
        rolling restart. A part that was not running is only started."""
        specs = self.select(parts)
        # As `start` does: a part restarted in another Redis mode would point elsewhere.
        self._record_redis_mode()
        results = []
        for spec in specs:
            old_pid = self.supervisor.pid(spec.name)
            t0 = time.monotonic()
            self.supervisor.stop(spec.name, spec.stop_timeout_s, spec.stop_signal)
            t1 = time.monotonic()
            started = self.supervisor.start(spec)
            result = RestartResult(spec.name, old_pid, started.pid, t1 - t0, time.monotonic() - t1)
            if report is not None:
                report(result)
            results.append(result)
        return results

    def _record_redis_mode(self) -> None:
        """Remember the mode for later commands; refuse to mix modes in one running stack (the
        running ingest and edges would keep pointing at the other Redis setup)."""
        s = self.settings
        recorded = recorded_redis_mode(s.run_dir)
        if recorded not in (None, s.redis_mode) and any(
            self.supervisor.is_running(n) for n in self.supervisor.known()
        ):
            raise SettingsError(
                f"CRM_EVENTS_REDIS_MODE: the stack in {s.run_dir} runs in {recorded} mode; "
                f"stop it first (make down) to switch to {s.redis_mode}"
            )
        s.run_dir.mkdir(parents=True, exist_ok=True)
        (s.run_dir / REDIS_MODE_FILE).write_text(s.redis_mode + "\n")

    def redis_topology(self) -> RedisTopology | ClusterTopology | None:
        """Sentinel mode: what each Sentinel names as primary and each Redis's ROLE. Cluster
        mode: each node's ROLE and the slot map as the first node that answers sees it."""
        s = self.settings
        if s.cluster:
            addresses = [(HOST, port) for _, port in s.redis_nodes]
            view = redis_cluster.first_view(addresses)
            return ClusterTopology(
                nodes=[(name, port, redis_ha.role((HOST, port))) for name, port in s.redis_nodes],
                view=view,
                info=None if view is None else redis_cluster.cluster_info(view.source),
                partitions=_stored_partitions(addresses) or s.kafka_partitions,
            )
        if not s.sentinel:
            return None
        return RedisTopology(
            sentinels=[
                (name, port, redis_ha.sentinel_primary((HOST, port), SENTINEL_SERVICE))
                for name, port in zip(s.sentinel_names, s.sentinel_ports, strict=True)
            ],
            nodes=[(name, port, redis_ha.role((HOST, port))) for name, port in s.redis_nodes],
        )

    def status(self, parts: Iterable[str] | None = None) -> list[PartStatus]:
        counts = self.watchdog_state()
        rows = []
        for spec in self.select(parts):
            state = self.supervisor.state(spec.name)
            ready: bool | None = None
            if state is ProcState.RUNNING and spec.ready is not None:
                ready = spec.ready()
            report = None if counts is None else counts.parts.get(spec.name)
            rows.append(
                PartStatus(
                    spec.name,
                    self.supervisor.pid(spec.name),
                    state,
                    ready,
                    spec.port,
                    None if report is None else report.restarts,
                )
            )
        return rows

    def watchdog_state(self) -> watchdog.WatchdogState | None:
        return watchdog.read_state(self.settings.run_dir)

    def watchdog_line(self) -> str | None:
        """What ``status`` says under the table about the watchdog; None before any ``up``."""
        found = self.watchdog_state()
        alive = self.supervisor.is_running(watchdog.NAME)
        if alive and found is not None:
            return found.summary()
        if alive:
            return "watchdog: starting"
        if not any(self.supervisor.is_running(n) for n in self.supervisor.known()):
            return None
        line = "watchdog: not running, so a part that dies stays dead ('make up' starts it)"
        if found is not None and found.total:
            line += f"; before it stopped, {found.summary().removeprefix('watchdog: ')}"
        return line

    def urls(self) -> list[tuple[str, str]]:
        s = self.settings
        rows = [
            ("load balancer", f"{s.lb_url}/crm-events"),
            ("", f"{s.lb_url}/crm-events/history?n=100"),
        ]
        if s.lb_https_url is not None:
            note = "" if s.lb_tls_cert is not None else "  (self-signed certificate)"
            rows += [("command center", f"{s.lb_https_url}/ops/crm-events{note}")]
            rows += [("", f"{s.lb_url}/ops/crm-events  (plain HTTP)")]
        else:
            rows += [("command center", f"{s.lb_url}/ops/crm-events")]
        for name, port in zip(s.edge_names, s.edge_ports, strict=True):
            base = s.edge_url(port)
            rows += [(name, f"{base}/healthz  {base}/readyz  {base}/metrics")]
        rows += [
            ("ingest", f"{s.ingest_url}/metrics  {s.ingest_url}/readyz"),
            ("kafka", f"{s.kafka_bootstrap}  topic {s.kafka_topic}"),
            ("redis", s.redis_url),
            *([("", "make status: which Redis is primary (Sentinel mode)")] if s.sentinel else []),
            *(
                [("", "make status: each node's role and slots (cluster mode)")]
                if s.cluster
                else []
            ),
            ("prometheus", self.monitoring.prometheus_url),
            ("alertmanager", self.monitoring.alertmanager_url),
            ("logs", str(self.supervisor.log_dir)),
            ("watchdog", "restarts a part that dies; make status counts the restarts"),
        ]
        if s.lb_mtls_url is not None:
            pki = _shown_path(s.pki_dir)
            rows += [
                (
                    "client cert",
                    f"curl -N --cacert {pki}/ca.crt --cert {pki}/{CLIENT_CERT}.crt "
                    f"--key {pki}/{CLIENT_CERT}.key {s.lb_mtls_url}/crm-events",
                ),
            ]
            if not s.edge_cert_auth:
                rows += [("", f"(the edges ignore it: CRM_EVENTS_AUTH_MODE={s.edge_auth_mode})")]
        if s.edge_auth_mode != "off":
            token = dev_token(s)
            page = s.lb_https_url or s.lb_url
            rows += [
                ("dev token", f"{token}  (every type, 24 h; also: make token)"),
                ("", f"curl -N -H 'Authorization: Bearer {token}' {s.lb_url}/crm-events"),
                ("", f"{page}/ops/crm-events#token={token}"),
            ]
        return rows


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (``run/pki``, as the
    README shows it), otherwise absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- CLI -------------------------------------------------------------------------------------


def _print_result(result: StartResult) -> None:
    when = f" ready in {result.ready_after_s:.1f} s" if result.ready_after_s is not None else ""
    what = "started" if result.spawned else "already running"
    print(f"[stack] {result.name:<13} {what} (pid {result.pid}){when}", flush=True)


def _print_restarted(result: RestartResult) -> None:
    if result.old_pid is None:
        what = f"was not running; started (pid {result.new_pid})"
    else:
        what = (
            f"restarted: pid {result.old_pid} stopped in {result.stopped_s:.2f} s, "
            f"pid {result.new_pid} ready {result.ready_s:.2f} s later"
        )
    print(f"[stack] {result.name:<13} {what}", flush=True)


def _print_status(rows: Sequence[PartStatus]) -> None:
    print(f"{'PART':<14} {'PID':>8}  {'STATE':<8} {'READY':<6} {'PORT':<6} RESTARTS")
    for r in rows:
        ready = "-" if r.ready is None else ("yes" if r.ready else "no")
        pid = "-" if r.pid is None else str(r.pid)
        port = "-" if r.port is None else str(r.port)
        restarts = "-" if r.restarts is None else str(r.restarts)
        print(f"{r.name:<14} {pid:>8}  {r.state.value:<8} {ready:<6} {port:<6} {restarts}")


def _build_parser() -> cli.Parser:
    parser = cli.parser(
        "crm-events-stack",
        "Run the crm-events local stack (Kafka, Redis, ingest, edges, nginx, producer, "
        "Prometheus, Alertmanager) as background processes with pidfiles under the run "
        "directory. Runs from a checkout of the repository (it reads deploy/ and monitoring/).",
    )
    # Required, but checked after parsing so that an unknown argument is the one named.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("up", help="start every part that is not running, then print the URLs")
    sub.add_parser("down", help="stop every part this run directory started, in reverse order")
    st = sub.add_parser(
        "status", help="table of parts; with PARTs, exit 0 only if all of them are alive"
    )
    st.add_argument("parts", nargs="*", metavar="PART")
    for name, text in (
        ("start", "start the named parts (in start order) and wait until ready"),
        (
            "stop",
            "stop the named parts (SIGTERM, then SIGKILL after a timeout); the watchdog "
            "leaves them stopped",
        ),
        (
            "restart",
            "restart the named parts one at a time: stop, start, wait until ready "
            "(restart edge1 edge2: a rolling restart)",
        ),
        ("kill", "SIGKILL the named parts (a fault: the watchdog restarts them)"),
        ("pause", "SIGSTOP the named parts (the watchdog leaves them paused)"),
        ("resume", "SIGCONT the named parts"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("parts", nargs="+", metavar="PART")
    sub.add_parser(
        "watchdog",
        help="run the watchdog in the foreground ('up' starts it as the part 'watchdog')",
    )
    tok = sub.add_parser("token", help="print a development JWT signed with the stack's secret")
    tok.add_argument("--types", default="*", help="comma-separated event types (default: all)")
    tok.add_argument("--tenant", default=None, help="restrict to events with this TenantId")
    tok.add_argument("--ttl", type=float, default=DEV_TOKEN_TTL_S, help="lifetime in seconds")
    return parser


def _run(args: argparse.Namespace, stack: Stack) -> int:
    sup = stack.supervisor
    cmd: str = args.command
    if cmd == "up":
        stack.start(None, report=_print_result)
        print("\ncrm-events local stack is up:")
        for label, url in stack.urls():
            print(f"  {label:<14} {url}")
        return 0
    if cmd == "token":
        secret = ensure_jwt_secret(stack.settings).read_text().strip()
        match = {"TenantId": args.tenant} if args.tenant else None
        print(
            issue_token(
                secret,
                types=args.types.split(","),
                match=match,
                ttl_s=args.ttl,
                subject="local-developer",
            )
        )
        return 0
    if cmd == "down":
        stopped = stack.down()
        print(f"[stack] stopped: {', '.join(stopped)}" if stopped else "[stack] nothing running")
        return 0
    if cmd == "status":
        rows = stack.status(args.parts or None)
        _print_status(rows)
        line = None if args.parts else stack.watchdog_line()
        if line is not None:
            print()
            print(line)
        topology = stack.redis_topology()
        if topology is not None and not args.parts:
            print()
            print("\n".join(topology.lines()))
        if args.parts and any(r.pid is None for r in rows):
            return 3
        return 0
    if cmd == "start":
        stack.start(args.parts, report=_print_result)
        return 0
    if cmd == "restart":
        stack.restart(args.parts, report=_print_restarted)
        return 0
    if cmd == "watchdog":
        watchdog.configure_logging()
        return watchdog.run(sup, list(stack.specs.values()), stack.settings.run_dir)
    if cmd == "stop":
        stopped = stack.stop(args.parts)
        for name in [s.name for s in reversed(stack.select(args.parts))]:
            print(f"[stack] {name:<13} {'stopped' if name in stopped else 'was not running'}")
        return 0
    signals: dict[str, Callable[[str], int]] = {
        "kill": sup.kill9,
        "pause": sup.pause,
        "resume": sup.resume,
    }
    rc = 0
    for spec in stack.select(args.parts):
        try:
            pid = signals[cmd](spec.name)
            print(f"[stack] {spec.name:<13} {cmd} sent (pid {pid})")
        except NotRunningError as exc:
            print(f"crm-events-stack: {exc}", file=sys.stderr)
            rc = 1
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse(argv)
    if args.command is None:
        parser.error("a COMMAND is required")
    if not (checkout_dir() / "deploy").is_dir():
        # Installed from a wheel rather than editable from a checkout: no configs to run.
        print(
            f"crm-events-stack: error: no deploy/ beside {Path(__file__).parent}; the stack "
            "runs from a checkout (scripts/install.sh installs it editable)",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING, format="crm-events-stack: %(message)s")
    # The readiness probes poll a broker that is still starting; aiokafka would log each
    # refused attempt as an error.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        stack = Stack(StackSettings.from_env(os.environ))
        return _run(args, stack)
    except (SettingsError, MonitoringSettingsError) as exc:
        print(f"crm-events-stack: error: {exc}", file=sys.stderr)
        return 2
    except SupervisorError as exc:
        print(f"crm-events-stack: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into a pager or `head` that quit early: not an error of ours.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
