"""An incremental Server-Sent Events parser (pure): bytes in, dispatched messages out.

It follows the WHATWG "event stream interpretation" rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):

* lines end with CRLF, LF or CR; a CR at the end of one chunk may be the first half of a
  CRLF split across chunks, so it is held until the next byte is known;
* one UTF-8 byte order mark at the very start of the stream is skipped;
* a line starting with ``:`` is a comment (the server's keepalives and its ``node`` note);
* ``field: value`` (one optional space after the colon), or ``field`` alone (empty value);
* ``data`` lines are joined with ``\\n``; ``event`` names the event (default ``message``);
* ``id`` sets the last event id unless it contains NUL, and the id persists: an event
  without an ``id`` field carries the previous one; an ``id`` in a block without ``data``
  still moves it (reported as a message with ``has_data=False``);
* ``retry`` with ASCII digits only sets the reconnection time;
* a blank line dispatches; a block without ``data`` dispatches nothing but its id.

Bounded: a line longer than ``max_size`` characters, or a block whose ``data`` lines add up
to more, raises ``ProtocolError`` (the default, 4 MiB, is far above the largest envelope an
edge sends), so a broken or hostile server cannot make the client buffer without end. Each
chunk is scanned once: the unfinished line is kept as pieces and joined when its end comes,
so a long line in small chunks costs linear time, not quadratic.

Divergence: the browser's ``EventSource`` drops an id-only block silently; this parser
reports it so that a client can keep the newest cursor exactly as a browser would.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from .errors import ProtocolError

_BOM = "\ufeff"
MAX_SIZE = 4 * 1024 * 1024
"""The longest line, and the most ``data`` of one block, in characters."""


@dataclass(frozen=True, slots=True)
class SseMessage:
    event: str
    """The event name (``message`` when the block had no ``event`` field)."""
    data: str
    id: str | None
    """The last event id after this block (the spec's persistent last-event-id buffer)."""
    has_data: bool = True
    """False for a block that only changed the id (it dispatches no event)."""


class SseParser:
    """Feed raw bytes with ``feed``; each call returns the messages completed by them."""

    def __init__(self, max_size: int = MAX_SIZE) -> None:
        self.retry_ms: int | None = None
        """The newest ``retry:`` hint, in milliseconds (None until the server sends one)."""
        self.comments: list[str] = []
        """Comments since the caller last cleared this list (without the leading colon)."""
        self.last_event_id: str | None = None
        self.max_size = max_size
        self._partial: list[str] = []  # the unfinished line, in the pieces it came in
        self._partial_len = 0
        self._pending_cr = False
        self._started = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._data: list[str] = []
        self._data_len = 0
        self._event = ""
        self._id_seen = False

    def feed(self, chunk: bytes) -> list[SseMessage]:
        text = self._decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix(_BOM)
        if self._pending_cr and text:
            # The CR that ended the last chunk ended a line; a LF right after it belongs to it.
            self._pending_cr = False
            text = text.removeprefix("\n")
        out: list[SseMessage] = []
        start = 0
        length = len(text)
        # Only the new text is searched for line ends; what came before had none.
        while start < length:
            cr = text.find("\r", start)
            lf = text.find("\n", start)
            if cr == -1 and lf == -1:
                break
            end = lf if cr == -1 else cr if lf == -1 else min(cr, lf)
            line = text[start:end]
            if self._partial:
                self._partial.append(line)
                line = "".join(self._partial)
                self._partial, self._partial_len = [], 0
            if len(line) > self.max_size:
                raise ProtocolError(f"an SSE line longer than {self.max_size} characters")
            if text[end] == "\r":
                if end + 1 == length:
                    self._pending_cr = True
                    start = end + 1
                elif text[end + 1] == "\n":
                    start = end + 2
                else:
                    start = end + 1
            else:
                start = end + 1
            message = self._line(line)
            if message is not None:
                out.append(message)
        if start < length:
            self._partial.append(text[start:])
            self._partial_len += length - start
            if self._partial_len > self.max_size:
                raise ProtocolError(f"an SSE line longer than {self.max_size} characters")
        return out

    def _decode(self, chunk: bytes) -> str:
        # Incremental: a multi-byte UTF-8 character may be split across chunks.
        return self._decoder.decode(chunk)

    def _line(self, line: str) -> SseMessage | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:].removeprefix(" "))
            return None
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "data":
            self._data_len += len(value) + 1
            if self._data_len > self.max_size:
                raise ProtocolError(f"an SSE event with more than {self.max_size} characters")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
                self._id_seen = True
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        # Any other field is ignored, as the spec says.
        return None

    def _dispatch(self) -> SseMessage | None:
        data, event, id_seen = self._data, self._event, self._id_seen
        self._data, self._event, self._id_seen = [], "", False
        self._data_len = 0
        if not data:
            if id_seen:
                return SseMessage("", "", self.last_event_id, has_data=False)
            return None
        return SseMessage(event or "message", "\n".join(data), self.last_event_id)
