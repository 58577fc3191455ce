"""Writing a file so that a reader never sees half of it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of its own in the same folder,
    renamed over it: a reader (nginx, Prometheus's file_sd and rule loading, another render)
    sees the old file or the new one, and two writers never share a temporary name. The file
    is readable by all (0644), as a plain write under the usual umask would leave it."""
    write_bytes_atomically(path, text.encode("utf-8"))


def write_bytes_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """:func:`write_text_atomically` for bytes, with ``mode`` set before any byte is written
    (a private key, 0600, is never readable by others, not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp's 0600 would hide a 0644 file from a daemon of another user.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
