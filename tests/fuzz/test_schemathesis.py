"""Property-based fuzzing of a real edge with schemathesis, from its OpenAPI document.

Every operation of edge/openapi.yaml is called with generated valid and invalid requests
(schemathesis's examples, coverage and fuzzing phases, positive and negative data) against
the edge of ``conftest.py`` (authentication on, events stored). Each response must:

* not be a 5xx (``not_a_server_error``);
* if it is a 4xx/5xx, be JSON with string ``error`` and ``message`` (``json_error_body``);
* conform to the document: documented status, content type, headers and body schema, SSE
  events included (each ``data:`` validated against ``Envelope``/``Reset``);
* accept valid data and reject invalid data (``positive_data_acceptance``,
  ``negative_data_rejection``), and enforce authentication (``ignored_auth``: once per
  operation, a successful request is repeated without the token and with a wrong one, and
  must get 401).

**The endless stream.** ``GET /crm-events`` never ends by itself. Schemathesis reads a
``text/event-stream`` answer only until ``max-stream-events`` events have arrived or the
request timeout has passed *in total*, then closes it, and validates the complete events it
read. This operation gets 3 events and 0.3 s: a stream with stored events to replay returns
at once, a live one with nothing to send costs 0.3 s; every other operation keeps a 10 s
timeout. Nothing here can hang: each request is bounded, Hypothesis runs a bounded number
of examples per operation, and pytest-timeout bounds the test (the edge's start is bounded
by the harness's own readiness timeouts).

**Cursors.** A cursor's rules (minimal varints, canonical base64, nothing after the last
partition) are more than a schema pattern can say, so the document gives the positions
passed back to the edge (``after``, ``Last-Event-ID``, ``last_event_id``) the format
``crm-events-cursor``, registered here: valid data are cursors the edge handed out, cursors
of this topic at other positions (some beyond the topic's partitions), and cursors of other
epochs (answered with ``reset``); invalid data are anything else, which must be a 400 (or a
``reset`` for an id of the old format). ``test_cursor_fuzz.py`` mutates cursors byte by byte.

``CRM_EVENTS_FUZZ_EXAMPLES`` (default 40) sets the examples per operation and phase for a
longer run by hand.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import schemathesis
from hypothesis import strategies as st

from shared.cursor import MAX_POSITION, Cursor, decode_cursor
from tests.fuzz.conftest import FuzzEdge

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120, func_only=True)]

EXAMPLES = int(os.environ.get("CRM_EVENTS_FUZZ_EXAMPLES", "40"))
STREAM_EVENTS = 3
STREAM_TIMEOUT_S = 0.3
REQUEST_TIMEOUT_S = 10.0
# schemathesis's defaults for positive_data_acceptance / negative_data_rejection (5xx is
# left to not_a_server_error), plus the edge's size refusals.
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429"]
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429"]
TOO_LARGE = ["414", "431"]


def _config(fuzz_edge: FuzzEdge) -> Any:
    return schemathesis.Config.from_dict(
        {
            "base-url": fuzz_edge.base_url,
            "request-timeout": REQUEST_TIMEOUT_S,
            "max-redirects": 0,
            "generation": {
                "mode": "all",
                "max-examples": EXAMPLES,
                # No example database (Hypothesis keeps only its self-ignored .hypothesis/).
                "database": "none",
            },
            "phases": {"stateful": {"enabled": False}},
            "auth": {"openapi": {"bearerAuth": {"bearer": fuzz_edge.token}}},
            "checks": {
                # A request line or header section over the edge's caps is refused (414, 431,
                # both documented) before the parameters are looked at: valid or not, a
                # parameter that makes the request that large gets one of these.
                "positive_data_acceptance": {"expected-statuses": [*ACCEPTED, *TOO_LARGE]},
                "negative_data_rejection": {"expected-statuses": [*REJECTED, *TOO_LARGE]},
            },
            "operations": [
                {
                    "include-operation-id": "streamEvents",
                    "max-stream-events": STREAM_EVENTS,
                    "request-timeout": STREAM_TIMEOUT_S,
                }
            ],
        }
    )


# Filled by the ``edge_schema`` fixture before anything is generated (the strategy below is
# deferred, so it is built at the first draw).
_HANDED_OUT: list[str] = []


def _cursors() -> st.SearchStrategy[str]:
    handed_out = st.sampled_from(_HANDED_OUT)
    epoch = decode_cursor(_HANDED_OUT[-1]).epoch
    positions = st.one_of(st.none(), st.integers(0, 300), st.integers(0, MAX_POSITION))
    vectors = st.lists(positions, max_size=8).map(tuple)
    this_topic = st.builds(Cursor, st.just(epoch), vectors)
    any_epoch = st.builds(Cursor, st.integers(0, 2**32 - 1), vectors)
    made = st.one_of(this_topic, any_epoch).map(lambda c: c.encode().decode("ascii"))
    return st.one_of(handed_out, made)


schemathesis.openapi.format("crm-events-cursor", st.deferred(_cursors))


def _served(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def edge_schema(fuzz_edge: FuzzEdge) -> Any:
    """The document the edge serves (``GET /openapi.yaml``, public), so that route is fuzzed
    too. Not served is a failure: a fallback to the file would hide a lost route."""
    url = f"{fuzz_edge.base_url}/openapi.yaml"
    assert _served(url), f"the edge does not serve {url}"
    _HANDED_OUT[:] = fuzz_edge.cursors
    return schemathesis.openapi.from_url(url, config=_config(fuzz_edge))


def json_error_body(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx is ``{"error": "<code>", "message": "<text>"}``."""
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.split(";")[0].strip() == "application/json", (
        f"{response.status_code} answered with Content-Type {content_type!r}, not JSON: "
        f"{response.content[:200]!r}"
    )
    try:
        body = json.loads(response.content)
    except ValueError as exc:
        raise AssertionError(f"{response.status_code} body is not JSON: {exc}") from None
    assert isinstance(body, dict), f"{response.status_code} body is not an object: {body!r}"
    assert isinstance(body.get("error"), str) and body["error"], f"no 'error' code: {body!r}"
    assert isinstance(body.get("message"), str) and body["message"], f"no 'message': {body!r}"
    return True


schema = schemathesis.pytest.from_fixture("edge_schema")


@schema.parametrize()
def test_edge_api_conforms_to_its_openapi_document(case: Any) -> None:
    case.call_and_validate(additional_checks=[json_error_body])
