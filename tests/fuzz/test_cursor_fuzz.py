"""Malformed cursors against the real edge: whatever comes as ``after``, ``last_event_id``
or ``Last-Event-ID``, the answer is a 400 ``invalid_cursor`` (JSON) or, for something that
decodes, a normal answer (a ``reset`` when it is of another topic); never a 5xx.

Inputs are the cursors this edge handed out, mutated byte by byte (flipped, dropped,
inserted, truncated, extended), plus arbitrary text near the cursor alphabet. Each request
is bounded (a stream is read up to its response head only).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.cursor import CursorError, decode_cursor, is_legacy_id
from tests.fuzz.conftest import FuzzEdge
from tests.fuzz.test_oversize_requests import get, send_raw

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180, func_only=True)]

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ 1"
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@st.composite
def mutated(draw: st.DrawFn, cursors: tuple[str, ...]) -> str:
    text = list(draw(st.sampled_from(cursors)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["flip", "drop", "insert", "cut", "extend"]))
        ch = draw(st.sampled_from(ALPHABET))
        if op == "flip" and at < len(text):
            text[at] = ch
        elif op == "drop" and at < len(text):
            del text[at]
        elif op == "insert":
            text.insert(at, ch)
        elif op == "cut":
            del text[at:]
        else:
            text.extend(draw(st.text(ALPHABET, max_size=12)))
    return "".join(text)


def _decodes(value: str) -> bool:
    try:
        decode_cursor(value)
    except CursorError:
        return False
    return True


def _expected(value: str) -> int:
    if value == "" or _decodes(value) or is_legacy_id(value):
        return 200
    return 400


def _history(edge: FuzzEdge, after: str) -> tuple[int, dict[str, object]]:
    query = urllib.parse.urlencode({"after": after, "n": 5})
    request = urllib.request.Request(
        f"{edge.base_url}/crm-events/history?{query}",
        headers={"Authorization": f"Bearer {edge.token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_history_after_is_a_page_or_an_invalid_cursor(fuzz_edge: FuzzEdge) -> None:
    texts = st.one_of(mutated(fuzz_edge.cursors), st.text(ALPHABET, max_size=40))

    @FUZZ
    @given(texts)
    def check(value: str) -> None:
        if value == "":
            return  # an empty ``after`` means none: the newest page
        status, body = _history(fuzz_edge, value)
        assert status == _expected(value), (value, status, body)
        if status == 400:
            assert body["error"] == "invalid_cursor", body
            assert isinstance(body["message"], str) and body["message"]
        else:
            assert isinstance(body["items"], list) and "next_after" in body

    check()


def test_last_event_id_is_a_stream_or_an_invalid_cursor(fuzz_edge: FuzzEdge) -> None:
    # Header values: printable ASCII without leading or trailing spaces (HTTP trims them).
    texts = mutated(fuzz_edge.cursors).map(str.strip)

    @settings(FUZZ, max_examples=60)
    @given(texts, st.booleans())
    def check(value: str, as_header: bool) -> None:
        if as_header:
            request = get(
                "/crm-events",
                f"Last-Event-ID: {value}",
                f"Authorization: Bearer {fuzz_edge.token}",
            )
        else:
            query = urllib.parse.urlencode({"last_event_id": value})
            request = get(f"/crm-events?{query}", f"Authorization: Bearer {fuzz_edge.token}")
        answer = send_raw(fuzz_edge, request)
        assert answer.status == _expected(value), (value, answer)
        if answer.status == 400:
            assert answer.error() == "invalid_cursor"
        else:
            assert answer.content_type.startswith("text/event-stream"), answer

    check()
