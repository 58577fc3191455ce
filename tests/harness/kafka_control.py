"""Restarting the test Kafka, when it is the one the project's stack started."""

from __future__ import annotations

import os

from devtools.stack import Stack, StackSettings

from .backends import Backends


class KafkaControl:
    def __init__(self, stack: Stack) -> None:
        self._stack = stack

    def stop(self) -> None:
        self._stack.stop(["kafka"])

    def start(self) -> None:
        self._stack.start(["kafka"])

    def restart(self) -> None:
        self.stop()
        self.start()


def kafka_control(backends: Backends) -> KafkaControl | None:
    """A handle on the stack's Kafka if the tests use it, else None (testcontainers, or a
    broker someone else runs)."""
    settings = StackSettings.from_env(os.environ)
    if settings.kafka_bootstrap != backends.kafka_bootstrap:
        return None
    stack = Stack(settings)
    if not stack.supervisor.is_running("kafka"):
        return None
    return KafkaControl(stack)
