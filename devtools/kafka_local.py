"""A single-node KRaft Kafka broker run from the jars that scripts/install.sh fetched.

Files under ``<run dir>/kafka``: ``libs/`` (jars), ``data/`` (log dirs and KRaft metadata),
``server.properties`` and ``log4j2.yaml`` (rendered from ``deploy/kafka/*.template`` on every
start, so a port change takes effect at once), ``cluster-id`` and ``formatted.json`` (what the
storage was formatted for).

The broker listens in PLAINTEXT; :class:`SslListener` adds a second listener that takes only
clients with a certificate of a given CA (``ssl.client.auth=required``), from PEM files such
as those of ``devtools/pki.py``. Off unless asked for, so the stack's broker is unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import shutil
import string
import subprocess
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from devtools.probes import run_coroutine_blocking

__all__ = [
    "JVM_OPTS",
    "KafkaError",
    "KafkaLayout",
    "SslListener",
    "broker_argv",
    "ensure_formatted",
    "ensure_topic",
    "find_java",
    "render_config",
    "template_dir",
]

# Suits a 2-core machine that also runs Redis, nginx and the Python services.
JVM_OPTS = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-Djava.awt.headless=true",
)
FORMAT_TIMEOUT_S = 120.0
TOPIC_TIMEOUT_S = 30.0


class KafkaError(RuntimeError):
    """The local broker cannot be set up (jars missing, storage formatted for other ports)."""


def template_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "deploy" / "kafka"


@dataclasses.dataclass(frozen=True)
class KafkaLayout:
    home: Path

    @classmethod
    def under(cls, run_dir: Path) -> KafkaLayout:
        return cls(Path(run_dir).resolve() / "kafka")

    @property
    def libs(self) -> Path:
        return self.home / "libs"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def server_properties(self) -> Path:
        return self.home / "server.properties"

    @property
    def log4j_config(self) -> Path:
        return self.home / "log4j2.yaml"

    @property
    def cluster_id_file(self) -> Path:
        return self.home / "cluster-id"

    @property
    def formatted_marker(self) -> Path:
        return self.home / "formatted.json"

    @property
    def classpath(self) -> str:
        return str(self.libs / "*")


@dataclasses.dataclass(frozen=True)
class SslListener:
    """An extra ``SSL://127.0.0.1:<port>`` listener requiring client certificates."""

    port: int
    keystore: Path
    """One PEM file: the broker's unencrypted PKCS#8 key, then its certificate chain
    (``devtools.pki.Issued.bundle``)."""
    truststore: Path
    """PEM CA certificates whose clients the listener admits."""

    def __post_init__(self) -> None:
        for what, path in (("keystore", self.keystore), ("truststore", self.truststore)):
            if not Path(path).is_file():
                raise KafkaError(f"SSL listener {what}: no such file {path}")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    # Without java, spawning fails with "cannot run 'java'" when the part starts.
    return shutil.which("java") or "java"


def _check_libs(layout: KafkaLayout) -> None:
    if not any(layout.libs.glob("kafka_2.13-*.jar")):
        raise KafkaError(
            f"no Kafka jars in {layout.libs}; run scripts/install.sh (or make install)"
        )


def _render(name: str, values: dict[str, str]) -> str:
    return string.Template((template_dir() / name).read_text()).substitute(values)


def render_config(
    layout: KafkaLayout,
    *,
    kafka_port: int,
    controller_port: int,
    partitions: int,
    log_file: Path,
    ssl: SslListener | None = None,
) -> None:
    """Write server.properties and log4j2.yaml from the templates in deploy/kafka; with
    ``ssl``, server.properties also opens that listener (ssl-listener.properties.template)."""
    _check_libs(layout)
    layout.data.mkdir(parents=True, exist_ok=True)
    values = {
        "kafka_port": str(kafka_port),
        "controller_port": str(controller_port),
        "data_dir": str(layout.data),
        "partitions": str(partitions),
        "log_file": str(Path(log_file).resolve()),
        "ssl_listener": f",SSL://{ssl.bootstrap}" if ssl is not None else "",
        "ssl_protocol": ",SSL:SSL" if ssl is not None else "",
    }
    server = _render("server.properties.template", values)
    if ssl is not None:
        server += _render(
            "ssl-listener.properties.template",
            {
                "ssl_port": str(ssl.port),
                "keystore": str(Path(ssl.keystore).resolve()),
                "truststore": str(Path(ssl.truststore).resolve()),
            },
        )
    for out, text in (
        (layout.server_properties, server),
        (layout.log4j_config, _render("log4j2.yaml.template", values)),
    ):
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)


def _new_cluster_id() -> str:
    # Kafka's format: 16 random bytes, base64url without padding; a leading "-" would be read
    # as an option by the storage tool.
    while True:
        cid = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def ensure_formatted(layout: KafkaLayout, *, controller_port: int) -> None:
    """Format the KRaft storage once; later calls only check it still fits the settings.

    The metadata log records the controller's endpoint, so a storage formatted for one
    controller port does not start with another: refuse with a clear message instead.
    """
    if layout.formatted_marker.is_file() and (layout.data / "meta.properties").is_file():
        marker = json.loads(layout.formatted_marker.read_text())
        if int(marker.get("controller_port", -1)) != controller_port:
            raise KafkaError(
                f"Kafka storage in {layout.data} was formatted for controller port "
                f"{marker.get('controller_port')}, not {controller_port} "
                "(CRM_EVENTS_KAFKA_CONTROLLER_PORT); delete that directory to start afresh"
            )
        return
    if layout.cluster_id_file.is_file():
        cluster_id = layout.cluster_id_file.read_text().strip()
    else:
        cluster_id = _new_cluster_id()
        layout.cluster_id_file.write_text(cluster_id + "\n")
    argv = [
        find_java(),
        f"-Dlog4j2.configurationFile={layout.log4j_config}",
        "-cp",
        layout.classpath,
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(layout.server_properties),
        "--standalone",
        "--ignore-formatted",
    ]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=FORMAT_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip().splitlines()[-10:]
        raise KafkaError("formatting Kafka storage failed:\n" + "\n".join(out))
    layout.formatted_marker.write_text(
        json.dumps({"cluster_id": cluster_id, "controller_port": controller_port}) + "\n"
    )


def broker_argv(layout: KafkaLayout) -> list[str]:
    return [
        find_java(),
        *JVM_OPTS,
        f"-Dlog4j2.configurationFile={layout.log4j_config}",
        "-cp",
        layout.classpath,
        "kafka.Kafka",
        str(layout.server_properties),
    ]


async def _ensure_topic(bootstrap: str, topic: str, partitions: int) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )
        # The admin client reports per-topic failures in the response instead of raising.
        for entry in resp.topic_errors:
            code = int(entry[1])
            if code not in (0, TopicAlreadyExistsError.errno):
                raise KafkaError(f"creating topic {topic!r} failed: {for_code(code).__name__}")
        # A new topic's leaders appear in the metadata shortly after the create returns.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TOPIC_TIMEOUT_S / 2
        while True:
            described = await admin.describe_topics([topic])
            parts = described[0]["partitions"] if described else []
            if (
                described
                and described[0]["error_code"] == 0
                and parts
                and all(p["error_code"] == 0 and p["leader"] >= 0 for p in parts)
            ):
                return len(parts)
            if loop.time() >= deadline:
                raise KafkaError(f"topic {topic!r} has no leaders yet: {described!r}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def ensure_topic(bootstrap: str, topic: str, partitions: int) -> int:
    """Create ``topic`` unless it exists; returns its partition count (which may differ from
    ``partitions`` when the topic already existed)."""
    return run_coroutine_blocking(
        lambda: _ensure_topic(bootstrap, topic, partitions), TOPIC_TIMEOUT_S
    )
