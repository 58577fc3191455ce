"""shared.sse: exact bytes on the wire, and refusal of anything that would break a frame."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.sse import (
    FrameError,
    comment_frame,
    control_frame,
    event_frame,
    event_frame_trusted,
    retry_frame,
)

EVENT_ID = b"1732870000000-0"
DATA = b'{"type":"ContactCreated","event":{"Type":"ContactCreated","Name":"Zo\xc3\xab"}}'


@pytest.mark.parametrize("frame", [event_frame, event_frame_trusted], ids=["checked", "trusted"])
def test_event_frame_is_id_then_one_data_line_without_event_name(frame: Any) -> None:
    assert frame(EVENT_ID, DATA) == b"id: " + EVENT_ID + b"\ndata: " + DATA + b"\n\n"


def test_event_frame_with_empty_data() -> None:
    assert event_frame(b"0-1", b"") == b"id: 0-1\ndata: \n\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            ("reset", {"reason": "trimmed", "n": 1}),
            b'event: reset\ndata: {"reason":"trimmed","n":1}\n\n',
            id="without-id",
        ),
        pytest.param(
            ("reset", {"reason": "trimmed"}, b"5-0"),
            b'id: 5-0\nevent: reset\ndata: {"reason":"trimmed"}\n\n',
            id="with-id",
        ),
        pytest.param(
            ("reset", {"message": "a\nb\r\nc", "name": "Zoë"}),
            b'event: reset\ndata: {"message":"a\\nb\\r\\nc","name":"Zo\\u00eb"}\n\n',
            id="payload-newlines-escaped",
        ),
        pytest.param(("hello", {}), b"event: hello\ndata: {}\n\n", id="empty-payload"),
    ],
)
def test_control_frame_bytes(args: tuple[Any, ...], expected: bytes) -> None:
    frame = control_frame(*args)

    assert frame == expected
    data_line = frame.split(b"\n")[-3]
    assert json.loads(data_line.removeprefix(b"data: ")) == args[1]


@pytest.mark.parametrize(
    ("retry_ms", "expected"),
    [
        pytest.param(2000, b"retry: 2000\n\n", id="2000"),
        pytest.param(0, b"retry: 0\n\n", id="zero"),
        pytest.param(600_000, b"retry: 600000\n\n", id="large"),
    ],
)
def test_retry_frame_bytes(retry_ms: int, expected: bytes) -> None:
    assert retry_frame(retry_ms) == expected


@pytest.mark.parametrize("retry_ms", [-1, -2000], ids=["minus-one", "minus-2000"])
def test_negative_retry_is_refused(retry_ms: int) -> None:
    with pytest.raises(FrameError, match="negative"):
        retry_frame(retry_ms)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("ping", b": ping\n\n", id="ping"),
        pytest.param("", b": \n\n", id="empty"),
        pytest.param("Zoë", b": Zo\xc3\xab\n\n", id="unicode"),
    ],
)
def test_comment_frame_bytes(text: str, expected: bytes) -> None:
    assert comment_frame(text) == expected


BAD = {"CR": "\r", "LF": "\n", "CRLF": "\r\n", "NUL": "\0"}
PLACES = {"start": "{}x", "middle": "x{}y", "end": "x{}"}
HOSTILE = [
    pytest.param(place.format(char), id=f"{char_name}-{place_name}")
    for char_name, char in BAD.items()
    for place_name, place in PLACES.items()
]


@pytest.mark.parametrize("text", HOSTILE)
def test_event_frame_refuses_line_breaks_and_nul_in_id(text: str) -> None:
    with pytest.raises(FrameError, match="id"):
        event_frame(text.encode(), b"{}")


@pytest.mark.parametrize("text", HOSTILE)
def test_event_frame_refuses_line_breaks_and_nul_in_data(text: str) -> None:
    with pytest.raises(FrameError, match="data"):
        event_frame(b"1-0", text.encode())


@pytest.mark.parametrize("text", HOSTILE)
def test_control_frame_refuses_line_breaks_and_nul_in_event_name(text: str) -> None:
    with pytest.raises(FrameError, match="event"):
        control_frame(text, {})


@pytest.mark.parametrize("text", HOSTILE)
def test_control_frame_refuses_line_breaks_and_nul_in_id(text: str) -> None:
    with pytest.raises(FrameError, match="id"):
        control_frame("reset", {}, text.encode())


@pytest.mark.parametrize("text", HOSTILE)
def test_comment_frame_refuses_line_breaks_and_nul(text: str) -> None:
    with pytest.raises(FrameError, match="comment"):
        comment_frame(text)


def test_frame_error_is_a_value_error() -> None:
    assert issubclass(FrameError, ValueError)
