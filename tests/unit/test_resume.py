"""edge.resume: can a client resume from its last id without a gap, and if not, why not."""

from __future__ import annotations

import json

import pytest

from edge.bus import StreamInfo
from edge.resume import Reset, Resume, boundary, check_position
from shared.ids import ZERO, StreamId, parse_id

U64_MAX = 2**64 - 1


def sid(text: str) -> StreamId:
    return parse_id(text)


def stream(
    first: str | None,
    last: str,
    *,
    length: int = 5,
    added: int | None = None,
    max_deleted: str = "0-0",
    genesis: str | None = "first",
) -> StreamInfo:
    """An existing stream; by default never trimmed (added == length) and never lost
    (genesis == first)."""
    return StreamInfo(
        exists=True,
        length=length,
        first_id=sid(first) if first is not None else None,
        last_id=sid(last),
        max_deleted_id=sid(max_deleted),
        entries_added=length if added is None else added,
        genesis=(sid(first) if first else None) if genesis == "first" else genesis and sid(genesis),
    )


MISSING = StreamInfo(
    exists=False,
    length=0,
    first_id=None,
    last_id=ZERO,
    max_deleted_id=ZERO,
    entries_added=0,
    genesis=None,
)
HEALTHY = stream("10-0", "20-0")
NO_GENESIS = stream("10-0", "20-0", genesis=None)
XDELETED = stream("10-0", "20-0", max_deleted="12-0", added=6)
TRIMMED = stream("50-0", "100-0", length=10, added=60, genesis="10-0")
TRIMMED_EMPTY = stream(None, "100-0", length=0, added=5, genesis="10-0")
RECREATED = stream("100-0", "120-0", length=3)
RECREATED_TRIMMED = stream("110-0", "120-0", length=5, added=10, genesis="100-0")

# "From the beginning" (0-0) predates every incarnation; it resumes on a recreated stream
# that was never trimmed, so on a trimmed one the honest reason is "trimmed", not a loss.

INFOS = {
    "missing": MISSING,
    "healthy": HEALTHY,
    "no-genesis": NO_GENESIS,
    "xdeleted": XDELETED,
    "trimmed": TRIMMED,
    "trimmed-empty": TRIMMED_EMPTY,
    "recreated": RECREATED,
    "recreated-trimmed": RECREATED_TRIMMED,
}


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        pytest.param(MISSING, ZERO, id="missing"),
        pytest.param(HEALTHY, StreamId(9, U64_MAX), id="healthy-genesis-predecessor"),
        pytest.param(NO_GENESIS, ZERO, id="no-genesis-never-trimmed"),
        pytest.param(XDELETED, sid("12-0"), id="xdel-max-deleted"),
        pytest.param(TRIMMED, StreamId(49, U64_MAX), id="trimmed-first-predecessor"),
        pytest.param(TRIMMED_EMPTY, sid("100-0"), id="trimmed-to-empty-last-id"),
        pytest.param(RECREATED, StreamId(99, U64_MAX), id="recreated-genesis-predecessor"),
        pytest.param(RECREATED_TRIMMED, StreamId(109, U64_MAX), id="recreated-then-trimmed"),
        pytest.param(stream("0-1", "0-5"), ZERO, id="genesis-0-1"),
    ],
)
def test_boundary(info: StreamInfo, expected: StreamId) -> None:
    assert boundary(info) == expected


@pytest.mark.parametrize(
    ("requested", "info", "expected"),
    [
        # gap-free
        pytest.param("15-0", HEALTHY, Resume(sid("15-0")), id="middle"),
        pytest.param("20-0", HEALTHY, Resume(sid("20-0")), id="at-last-id"),
        pytest.param("10-0", HEALTHY, Resume(sid("10-0")), id="at-first"),
        pytest.param(f"9-{U64_MAX}", HEALTHY, Resume(StreamId(9, U64_MAX)), id="before-first"),
        pytest.param("0-0", HEALTHY, Resume(ZERO), id="zero-never-trimmed"),
        pytest.param("0-0", NO_GENESIS, Resume(ZERO), id="zero-no-genesis"),
        pytest.param("5-0", NO_GENESIS, Resume(sid("5-0")), id="old-no-genesis"),
        pytest.param("12-0", XDELETED, Resume(sid("12-0")), id="at-xdel-max"),
        pytest.param("60-0", TRIMMED, Resume(sid("60-0")), id="after-trim-point"),
        pytest.param("100-0", TRIMMED_EMPTY, Resume(sid("100-0")), id="emptied-at-last"),
        pytest.param("0-0", RECREATED, Resume(ZERO), id="zero-on-recreated-never-trimmed"),
        pytest.param("0-0", MISSING, Resume(ZERO), id="zero-on-missing"),
        # trimmed
        pytest.param(
            "11-0",
            XDELETED,
            Reset("trimmed", sid("11-0"), sid("12-0"), sid("10-0")),
            id="xdel-after-requested",
        ),
        pytest.param(
            "0-0",
            XDELETED,
            Reset("trimmed", ZERO, sid("12-0"), sid("10-0")),
            id="zero-xdeleted",
        ),
        pytest.param(
            "20-0",
            TRIMMED,
            Reset("trimmed", sid("20-0"), StreamId(49, U64_MAX), sid("50-0")),
            id="maxlen-trimmed",
        ),
        pytest.param(
            "0-0",
            TRIMMED,
            Reset("trimmed", ZERO, StreamId(49, U64_MAX), sid("50-0")),
            id="zero-maxlen-trimmed",
        ),
        pytest.param(
            "50-0",
            TRIMMED_EMPTY,
            Reset("trimmed", sid("50-0"), sid("100-0"), None),
            id="trimmed-to-empty",
        ),
        pytest.param(
            "105-0",
            RECREATED_TRIMMED,
            Reset("trimmed", sid("105-0"), StreamId(109, U64_MAX), sid("110-0")),
            id="recreated-then-trimmed-after-genesis",
        ),
        # stream lost and recreated
        pytest.param(
            "50-0",
            RECREATED,
            Reset("stream_lost", sid("50-0"), StreamId(99, U64_MAX), sid("100-0")),
            id="lost",
        ),
        pytest.param(
            "50-0",
            RECREATED_TRIMMED,
            Reset("stream_lost", sid("50-0"), StreamId(109, U64_MAX), sid("110-0")),
            id="lost-and-trimmed",
        ),
        # missing
        pytest.param(
            "5-0", MISSING, Reset("stream_empty", sid("5-0"), ZERO, None), id="missing-stream"
        ),
        # ahead of the stream
        pytest.param(
            "20-1",
            HEALTHY,
            Reset("unknown_position", sid("20-1"), sid("20-0"), sid("10-0")),
            id="ahead-by-one-seq",
        ),
        pytest.param(
            f"{U64_MAX}-{U64_MAX}",
            TRIMMED,
            Reset("unknown_position", StreamId(U64_MAX, U64_MAX), sid("100-0"), sid("50-0")),
            id="far-ahead",
        ),
        pytest.param(
            "101-0",
            TRIMMED_EMPTY,
            Reset("unknown_position", sid("101-0"), sid("100-0"), None),
            id="ahead-of-emptied",
        ),
    ],
)
def test_check_position(requested: str, info: StreamInfo, expected: Resume | Reset) -> None:
    assert check_position(sid(requested), info) == expected


@pytest.mark.parametrize("info", list(INFOS.values()), ids=list(INFOS))
def test_a_reset_never_repeats_on_reconnect_from_its_own_id(info: StreamInfo) -> None:
    # Every position from which a reset can be issued on this stream.
    positions = [ZERO, sid("1-0"), sid("11-0"), sid("50-0"), sid("105-0"), sid("200-0")]
    resets = [r for p in positions if isinstance(r := check_position(p, info), Reset)]
    assert resets, "the table should reset at least once per stream"

    for reset in resets:
        assert check_position(reset.after, info) == Resume(reset.after)


LOSSY = ["xdeleted", "trimmed", "trimmed-empty", "recreated", "recreated-trimmed"]


@pytest.mark.parametrize("info", [INFOS[name] for name in LOSSY], ids=LOSSY)
def test_the_boundary_resumes_and_the_id_before_it_resets(info: StreamInfo) -> None:
    floor = boundary(info)

    assert check_position(floor, info) == Resume(floor)
    assert isinstance(check_position(floor.predecessor(), info), Reset)


REASON_CASES = [
    Reset("trimmed", sid("20-0"), StreamId(49, U64_MAX), sid("50-0")),
    Reset("stream_lost", sid("50-0"), StreamId(99, U64_MAX), sid("100-0")),
    Reset("stream_empty", sid("5-0"), ZERO, None),
    Reset("unknown_position", sid("21-0"), sid("20-0"), sid("10-0")),
]


@pytest.mark.parametrize("reset", REASON_CASES, ids=lambda r: r.reason)
def test_reset_payload(reset: Reset) -> None:
    payload = reset.payload()

    assert set(payload) == {"reason", "requested", "resume_from", "oldest_available", "message"}
    assert payload["reason"] == reset.reason
    assert payload["requested"] == str(reset.requested)
    assert payload["resume_from"] == str(reset.after)
    expected_oldest = None if reset.oldest_available is None else str(reset.oldest_available)
    assert payload["oldest_available"] == expected_oldest
    assert isinstance(payload["message"], str)
    assert payload["message"]
    assert json.loads(json.dumps(payload)) == payload


def test_payload_ids_parse_back() -> None:
    payload = REASON_CASES[0].payload()

    assert parse_id(payload["resume_from"]) == StreamId(49, U64_MAX)
    assert parse_id(payload["requested"]) == sid("20-0")
    assert parse_id(payload["oldest_available"]) == sid("50-0")
