"""Where the newest cursor lives between runs: a ``CursorStore`` (``load`` at start,
``save`` as the consumer moves on).

``stream()`` saves an item's cursor when the consumer asks for the next item (or calls
``commit()``), not when the item is handed over: a consumer that dies while handling an item
gets that item again after a restart. At-least-once at the consumer; the per-partition
duplicate guard and the exact resume of the server make it exactly once as long as the
consumer does not die mid-item.

A cursor is opaque but has a known alphabet: 1 to 16,384 printable ASCII characters without
spaces (``is_cursor``, the same check as the JavaScript client's ``isCursor``). What a store
returns outside it (a damaged file, two lines, bytes that are not UTF-8) is never sent; the
stream's ``on_invalid_cursor`` decides what happens instead.
"""

from __future__ import annotations

import inspect
import os
import re
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

MAX_CURSOR_CHARS = 16_384
_CURSOR = re.compile(rf"[\x21-\x7e]{{1,{MAX_CURSOR_CHARS}}}")


def is_cursor(value: object) -> bool:
    """True when ``value`` can be a cursor (it says nothing of whether the server knows it)."""
    return isinstance(value, str) and _CURSOR.fullmatch(value) is not None


@runtime_checkable
class CursorStore(Protocol):
    async def load(self) -> str | None:
        """The saved cursor, or None to start from now."""
        ...

    async def save(self, cursor: str) -> None:
        """Keep ``cursor`` (replacing the one before)."""
        ...


class MemoryCursorStore:
    """Keeps the cursor in memory (e.g. to hand it to another stream later)."""

    def __init__(self, cursor: str | None = None) -> None:
        self.cursor = cursor

    async def load(self) -> str | None:
        return self.cursor

    async def save(self, cursor: str) -> None:
        self.cursor = cursor


class FileCursorStore:
    """One cursor in a text file, replaced atomically: a temporary file in the same folder,
    then ``os.replace``, so a crash leaves the old cursor or the new one, never half of one.

    ``fsync=True`` also forces each write, and the folder's entry for the replaced file, to
    disk (survives a power cut, at a cost per event);
    the default survives the process dying, which is what a restart needs. The write is a
    few dozen bytes to the page cache, so it runs on the event loop rather than a thread hop.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync

    async def load(self) -> str | None:
        return self.read()

    async def save(self, cursor: str) -> None:
        self.write(cursor)

    def read(self) -> str | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        # Damaged bytes become U+FFFD, which no cursor contains: the stream's check catches
        # them (``on_invalid_cursor``) instead of a UnicodeDecodeError at start.
        text = raw.decode("utf-8", errors="replace").strip()
        return text or None

    def write(self, cursor: str) -> None:
        folder = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(cursor + "\n")
                if self.fsync:
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.fsync:
            # The rename lives in the folder: without this a power cut may bring back the
            # old name's content even though the new file's data reached the disk.
            dir_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


SaveCallback = Callable[[str], Awaitable[None] | None]
LoadCallback = Callable[[], Awaitable[str | None] | str | None]


class CallbackCursorStore:
    """Your own functions (sync or async): e.g. a row in the database the consumer writes
    its results to, so that the cursor and the results commit together."""

    def __init__(self, save: SaveCallback, load: LoadCallback | None = None) -> None:
        self._save = save
        self._load = load

    async def load(self) -> str | None:
        if self._load is None:
            return None
        result = self._load()
        if inspect.isawaitable(result):
            return await result
        return result

    async def save(self, cursor: str) -> None:
        result = self._save(cursor)
        if inspect.isawaitable(result):
            await result
