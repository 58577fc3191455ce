"""Redis key names now live in ``shared.contract`` with the rest of the contract; this module
re-exports ``RedisKeys`` for the code that still imports it from here."""

from __future__ import annotations

from shared.contract import RedisKeys

__all__ = ["RedisKeys"]
