"""Private Kafka and Redis for a benchmark run.

The stack's own Kafka and Redis are shared with everything else on the machine (the
integration tests restart them on purpose); a benchmark on them measures whatever else is
going on. By default ``python -m bench`` (quick, full) starts its own broker and Redis on
free ports under the run directory, pinned to the non-server core, with the same settings as
the stack (``deploy/kafka`` templates; Redis with an append-only file), and stops them at the
end. Only the Kafka jars are shared, through a symlink to the stack's ``kafka/libs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from devtools import kafka_local
from devtools.probes import KafkaReady, RedisReady
from devtools.supervisor import ProcessSpec, StartError, Supervisor
from tests.harness.backends import Backends
from tests.harness.cluster import free_port

from .tools import OTHER_CORE, ROOT, BenchError, pinned, say

PARTITIONS = 3


def stack_kafka_libs() -> Path:
    run_dir = Path(os.environ.get("CRM_EVENTS_RUN_DIR", str(ROOT / "run")))
    return kafka_local.KafkaLayout.under(run_dir).libs


def _redis_spec(home: Path, port: int) -> ProcessSpec:
    data = home / "data"
    conf = home / "redis.conf"

    def prepare() -> None:
        data.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            f'port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\nlogfile ""\n'
            f'dir "{data}"\nappendonly yes\nappendfsync everysec\nsave ""\n'
        )

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    return ProcessSpec(
        name="redis",
        argv=pinned([binary, str(conf)], OTHER_CORE),
        cwd=home,
        ready=RedisReady("127.0.0.1", port),
        ready_timeout_s=30,
        port=port,
        prepare=prepare,
    )


def _kafka_spec(sup: Supervisor, home: Path, port: int, controller: int) -> ProcessSpec:
    layout = kafka_local.KafkaLayout(home)
    libs = stack_kafka_libs()
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise BenchError(f"no Kafka jars in {libs}: run make install first")

    def prepare() -> None:
        home.mkdir(parents=True, exist_ok=True)
        if not layout.libs.exists():
            layout.libs.symlink_to(libs.resolve(), target_is_directory=True)
        try:
            kafka_local.render_config(
                layout,
                kafka_port=port,
                controller_port=controller,
                partitions=PARTITIONS,
                log_file=sup.logfile("kafka"),
            )
            kafka_local.ensure_formatted(layout, controller_port=controller)
        except kafka_local.KafkaError as exc:
            raise StartError(f"kafka: {exc}") from exc

    return dataclasses.replace(
        ProcessSpec(
            name="kafka",
            argv=kafka_local.broker_argv(layout),
            cwd=home,
            ready=KafkaReady(f"127.0.0.1:{port}"),
            ready_timeout_s=120,
            stop_timeout_s=30,
            port=port,
            prepare=prepare,
        ),
        argv=pinned(kafka_local.broker_argv(layout), OTHER_CORE),
    )


@contextlib.contextmanager
def private_backends(run_dir: Path) -> Iterator[Backends]:
    home = run_dir / "backends"
    sup = Supervisor(home)
    redis_port, kafka_port, controller = free_port(), free_port(), free_port()
    specs = [
        _redis_spec(home / "redis", redis_port),
        _kafka_spec(sup, home / "kafka", kafka_port, controller),
    ]
    say(f"starting a private Redis (:{redis_port}) and Kafka (:{kafka_port}) on core {OTHER_CORE}")
    try:
        for spec in specs:
            sup.start(spec)
        yield Backends(f"127.0.0.1:{kafka_port}", f"redis://127.0.0.1:{redis_port}/0", "private")
    finally:
        for spec in reversed(specs):
            with contextlib.suppress(Exception):
                sup.stop(spec.name, timeout_s=30)
        # The broker's log segments and the AOF can be hundreds of MB after scenario D.
        for data in (home / "kafka" / "data", home / "redis" / "data"):
            shutil.rmtree(data, ignore_errors=True)
        say("stopped the private Redis and Kafka")
