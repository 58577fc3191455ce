"""Requests no schema describes, sent as raw bytes to the real edge: oversized request lines
and header sections must still get the documented JSON refusals (414
``request_line_too_long``, 431 ``headers_too_large``), whichever layer sees them first, and
a malformed ``last_event_id`` is a 400 (``invalid_cursor``) even when a valid
``Last-Event-ID`` header is present.

The edge's own caps (``CRM_EVENTS_MAX_REQUEST_LINE_BYTES``, 4096, and
``CRM_EVENTS_MAX_HEADER_BYTES``, 16384, by default) answer in JSON; aiohttp's HTTP parser has
fixed limits of its own (8190 bytes per line, 128 headers) and answers above them with a
plain-text 400, unless the edge raises them above its caps.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from tests.fuzz.conftest import FuzzEdge

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60, func_only=True)]


@dataclass(frozen=True)
class RawAnswer:
    status: int
    content_type: str
    body: bytes

    def error(self) -> str:
        assert self.content_type.split(";")[0] == "application/json", (
            f"{self.status} with Content-Type {self.content_type!r}: {self.body[:160]!r}"
        )
        payload = json.loads(self.body)
        assert isinstance(payload.get("message"), str)
        return str(payload["error"])


def send_raw(edge: FuzzEdge, request: bytes) -> RawAnswer:
    """One request on its own connection; the head, then the body up to its Content-Length
    (a stream has none: its body is whatever came with the head)."""
    url = urlsplit(edge.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = (line.partition(":") for line in lines[1:])
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        length = int(headers.get("content-length", "0"))
        while len(body) < length and (chunk := sock.recv(65536)):
            body += chunk
    return RawAnswer(int(lines[0].split()[1]), headers.get("content-type", ""), body)


def get(target: str, *headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: edge", "Connection: close", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


@pytest.mark.parametrize("length", [5_000, 9_000, 16_000])
def test_a_long_request_line_is_a_json_414(fuzz_edge: FuzzEdge, length: int) -> None:
    answer = send_raw(fuzz_edge, get("/crm-events/history?pad=" + "a" * length))
    assert (answer.status, answer.error()) == (414, "request_line_too_long")


def test_one_header_over_aiohttps_line_limit_but_within_the_cap_reaches_the_api(
    fuzz_edge: FuzzEdge,
) -> None:
    # 9 KB is within the 16 KiB cap on all headers: the API answers (401, no token here).
    answer = send_raw(fuzz_edge, get("/crm-events/history", "X-Pad: " + "a" * 9_000))
    assert (answer.status, answer.error()) == (401, "unauthorized")


def test_one_header_over_the_cap_is_a_json_431(fuzz_edge: FuzzEdge) -> None:
    answer = send_raw(fuzz_edge, get("/crm-events/history", "X-Pad: " + "a" * 20_000))
    assert (answer.status, answer.error()) == (431, "headers_too_large")


def test_many_large_headers_are_a_json_431(fuzz_edge: FuzzEdge) -> None:
    pads = [f"X-Pad-{i}: {'a' * 1_000}" for i in range(20)]
    answer = send_raw(fuzz_edge, get("/crm-events/history", *pads))
    assert (answer.status, answer.error()) == (431, "headers_too_large")


def test_too_many_small_headers_are_a_json_431(fuzz_edge: FuzzEdge) -> None:
    pads = [f"X-Pad-{i}: {'a' * 100}" for i in range(200)]  # about 22 KB in all
    answer = send_raw(fuzz_edge, get("/crm-events/history", *pads))
    assert (answer.status, answer.error()) == (431, "headers_too_large")


def test_a_malformed_last_event_id_is_refused_even_when_the_header_wins(
    fuzz_edge: FuzzEdge,
) -> None:
    answer = send_raw(
        fuzz_edge,
        get(
            "/crm-events?last_event_id=not-a-cursor",
            f"Last-Event-ID: {fuzz_edge.cursors[-1]}",
            f"Authorization: Bearer {fuzz_edge.token}",
        ),
    )
    assert (answer.status, answer.error()) == (400, "invalid_cursor")
