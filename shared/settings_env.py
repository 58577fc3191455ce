"""Reading ``CRM_EVENTS_*`` variables: conversion and validation with one-line errors that
start with the variable's name."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from .errors import SettingsError

ENV_PREFIX = "CRM_EVENTS_"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

T = TypeVar("T")


class Env:
    """Reads ``CRM_EVENTS_*`` variables from a mapping, converting and validating each."""

    def __init__(self, source: Mapping[str, str]) -> None:
        self._source = source

    def raw(self, name: str) -> str | None:
        value = self._source.get(ENV_PREFIX + name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def _get(self, name: str, default: T, convert: Callable[[str], T], what: str) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return convert(value)
        except ValueError:
            raise SettingsError(ENV_PREFIX + name, f"expected {what}, got {value!r}") from None

    def string(self, name: str, default: str, pattern: re.Pattern[str] | None = None) -> str:
        value = self.raw(name)
        if value is None:
            return default
        if pattern is not None and not pattern.fullmatch(value):
            raise SettingsError(ENV_PREFIX + name, f"{value!r} does not match {pattern.pattern}")
        return value

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        value = self._get(name, default, int, "an integer")
        if not minimum <= value <= maximum:
            raise SettingsError(
                ENV_PREFIX + name, f"{value} is outside the allowed range {minimum}..{maximum}"
            )
        return value

    def number(self, name: str, default: float, minimum: float, maximum: float) -> float:
        value = self._get(name, default, float, "a number")
        if not minimum <= value <= maximum:
            raise SettingsError(
                ENV_PREFIX + name, f"{value} is outside the allowed range {minimum}..{maximum}"
            )
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(name, default).upper()
        if value not in choices:
            raise SettingsError(ENV_PREFIX + name, f"expected one of {', '.join(choices)}")
        return value

    def names(
        self, name: str, default: tuple[str, ...], pattern: re.Pattern[str]
    ) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return default
        items = tuple(part.strip() for part in value.split(","))
        bad = [item for item in items if not pattern.fullmatch(item)]
        if not items or bad:
            raise SettingsError(
                ENV_PREFIX + name, f"expected a comma-separated list of names, got {value!r}"
            )
        return items

    def redis_url(self) -> str:
        value = self.string("REDIS_URL", DEFAULT_REDIS_URL)
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix") or (
            parts.scheme != "unix" and not parts.hostname
        ):
            raise SettingsError(
                ENV_PREFIX + "REDIS_URL",
                "expected redis://[user:password@]host:port/db, rediss://... or unix://...",
            )
        try:
            _ = parts.port
        except ValueError:
            raise SettingsError(ENV_PREFIX + "REDIS_URL", "the port is not a number") from None
        return value


def mask_url(url: str) -> str:
    """The URL with any password replaced, for logs and ``repr``: the one in its user info
    and a ``password=`` query parameter (redis-py takes one from either)."""
    parts = urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
    if query:
        query = "&".join(
            f"{field.partition('=')[0]}=***"
            if field.partition("=")[0].lower() == "password" and field.partition("=")[2]
            else field
            for field in query.split("&")
        )
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
