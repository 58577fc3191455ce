"""The project's own exception tree.

    CrmEventsError
     ├── SettingsError          a setting is missing or malformed (names the setting)
     └── BackendError           a dependency failed; ``retriable`` tells the caller
          ├── RedisUnavailable  Redis could not be reached or answered an error
          └── KafkaUnavailable  Kafka could not be reached

Adapters map client-library errors into this tree at the edge, so the rest of the
code never catches ``redis.exceptions`` or ``aiokafka.errors`` directly.
"""

from __future__ import annotations


class CrmEventsError(Exception):
    """Base of every error this project raises on purpose."""


class SettingsError(CrmEventsError):
    """A setting is wrong. ``str(err)`` is one line that starts with the setting's name."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


class BackendError(CrmEventsError):
    retriable: bool = True


class RedisUnavailable(BackendError):
    pass


class KafkaUnavailable(BackendError):
    pass
