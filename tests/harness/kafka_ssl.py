"""A private Kafka broker with an SSL listener that requires client certificates, for the tests
of ingest over mutual TLS.

The broker is the stack's (``devtools/kafka_local.py``, the ``deploy/kafka`` templates,
supervised by ``devtools/supervisor.py``) on free ports in its own run directory; only the
jars are shared, through a symlink to the stack's ``kafka/libs``. Its certificates come from a
local CA (``devtools/pki.py``) in ``<run dir>/pki``: the broker's server certificate, and
client certificates issued on demand. The PLAINTEXT listener stays for the broker's own use
and for the tests' checks (consumer groups); clients under test use the SSL one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from devtools import kafka_local
from devtools.pki import Issued, LocalCA
from devtools.probes import KafkaReady, TcpReady
from devtools.stack import StackSettings
from devtools.supervisor import ProcessSpec, StartError, Supervisor
from ingest.kafka_config import client_options
from shared.security_settings import KafkaSecurity

from .cluster import free_port

NAME = "kafka-ssl"
PARTITIONS = 3
#: A refused handshake, as the broker logs it (org.apache.kafka.common.network.Selector, INFO).
HANDSHAKE_FAILED = "SSL handshake failed"


@dataclass(frozen=True)
class BothReady:
    """Ready when the PLAINTEXT listener answers metadata and the SSL one accepts."""

    plaintext: KafkaReady
    ssl: TcpReady

    def __call__(self) -> bool:
        return self.ssl() and self.plaintext()


def stack_kafka_libs() -> Path:
    return kafka_local.KafkaLayout.under(StackSettings.from_env(os.environ).run_dir).libs


class SslKafka:
    """Started by :func:`ssl_kafka`; see the module's docstring."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.sup = Supervisor(self.run_dir)
        self.ca = LocalCA.open(self.run_dir / "pki", name="crm-events test CA")
        self.server = self.ca.issue_server("kafka")
        self.port, self.ssl_port, self.controller_port = free_port(), free_port(), free_port()
        self.layout = kafka_local.KafkaLayout(self.run_dir / "kafka")
        self.listener = kafka_local.SslListener(
            port=self.ssl_port, keystore=self.server.bundle, truststore=self.ca.cert_path
        )

    @property
    def plaintext_bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ssl_bootstrap(self) -> str:
        return self.listener.bootstrap

    def client(self, name: str) -> Issued:
        """A client certificate of the broker's CA."""
        return self.ca.issue_client(name, common_name=name, organization="crm-events-tests")

    def security(self, client: Issued | None, ca: Path | None = None) -> KafkaSecurity:
        """What a client with ``client``'s certificate (None: no certificate) sets."""
        return KafkaSecurity(
            protocol="SSL",
            ca_file=str(ca or self.ca.cert_path),
            cert_file=str(client.cert) if client else None,
            key_file=str(client.key) if client else None,
        )

    def env(self, client: Issued | None) -> dict[str, str]:
        """The Kafka security settings of an ingest with ``client``'s certificate."""
        env = {
            "CRM_EVENTS_KAFKA_SECURITY_PROTOCOL": "SSL",
            "CRM_EVENTS_KAFKA_SSL_CA_FILE": str(self.ca.cert_path),
        }
        if client is not None:
            env["CRM_EVENTS_KAFKA_SSL_CERT_FILE"] = str(client.cert)
            env["CRM_EVENTS_KAFKA_SSL_KEY_FILE"] = str(client.key)
        return env

    def log_text(self) -> str:
        path = self.sup.logfile(NAME)
        return path.read_text(errors="replace") if path.is_file() else ""

    def spec(self) -> ProcessSpec:
        libs = stack_kafka_libs()
        log_file = self.sup.logfile(NAME)

        def prepare() -> None:
            self.layout.home.mkdir(parents=True, exist_ok=True)
            if not self.layout.libs.exists():
                self.layout.libs.symlink_to(libs.resolve(), target_is_directory=True)
            try:
                kafka_local.render_config(
                    self.layout,
                    kafka_port=self.port,
                    controller_port=self.controller_port,
                    partitions=PARTITIONS,
                    log_file=log_file,
                    ssl=self.listener,
                )
                kafka_local.ensure_formatted(self.layout, controller_port=self.controller_port)
            except kafka_local.KafkaError as exc:
                raise StartError(f"{NAME}: {exc}") from exc

        return ProcessSpec(
            name=NAME,
            argv=kafka_local.broker_argv(self.layout),
            cwd=self.layout.home,
            ready=BothReady(
                KafkaReady(self.plaintext_bootstrap), TcpReady("127.0.0.1", self.ssl_port)
            ),
            ready_timeout_s=90,
            stop_timeout_s=20,
            port=self.port,
            prepare=prepare,
        )

    async def produce(
        self, topic: str, records: Iterable[tuple[bytes | None, bytes]], client: Issued
    ) -> None:
        """Send records over the SSL listener with ``client``'s certificate."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self.ssl_bootstrap,
            acks="all",
            **client_options(self.security(client)),
        )
        await producer.start()
        try:
            futures = [await producer.send(topic, value=v, key=k) for k, v in records]
            for f in futures:
                await f
        finally:
            await producer.stop()

    async def group_members(self, group: str) -> int:
        """Members of a consumer group, asked over the PLAINTEXT listener (0 when the group
        never formed)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.plaintext_bootstrap)
        await admin.start()
        try:
            described = await admin.describe_consumer_groups([group])
        finally:
            await admin.close()
        return sum(
            len(group.get("members", []))
            for response in described
            for group in response.to_object().get("groups", [])
        )


@contextlib.contextmanager
def ssl_kafka(run_dir: Path) -> Iterator[SslKafka]:
    """The broker started for the block and stopped after it (also when the start fails)."""
    libs = stack_kafka_libs()
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise StartError(f"no Kafka jars in {libs}: run make install")
    kafka = SslKafka(run_dir)
    try:
        kafka.sup.start(kafka.spec())
        yield kafka
    finally:
        kafka.sup.stop(NAME, timeout_s=20)
