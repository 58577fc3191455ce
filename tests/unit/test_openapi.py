"""The OpenAPI document of the edge (edge/openapi.yaml) against the code: it is valid OpenAPI,
every route of the app is in it and everything in it is routed, every error code the code
can emit is listed, and its parameter schemas accept exactly what the edge's parsers accept."""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import openapi_spec_validator
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.app import create_app
from edge.bus_memory import MemoryBus
from edge.openapi import OPENAPI_PATH, add_openapi_route, load_document
from edge.params import MAX_TYPES, MAX_TYPES_PARAM_LEN, parse_types
from edge.resume import RESET_REASONS, Reset, reset_payload
from shared.cursor import (
    MAX_CURSOR_CHARS,
    MAX_PARTITIONS,
    MAX_POSITION,
    Cursor,
    CursorError,
    decode_cursor,
    is_legacy_id,
)
from shared.events import TYPE_RE
from shared.httpkit import ApiError
from shared.settings import DEFAULT_HISTORY_MAX_N, DEFAULT_HISTORY_N, EdgeSettings

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "edge").glob("*.py"), *(ROOT / "shared").glob("*.py")])
# Codes the shared code can emit that no edge request can provoke.
NOT_FROM_THE_EDGE = {
    "request_too_large": "413 is raised only when a handler reads a body; no edge handler does",
}
U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded = yaml.safe_load(load_document())
    assert isinstance(loaded, dict)
    return loaded


def edge_app() -> web.Application:
    # Authentication off, so that no key file is needed; routes do not depend on it.
    settings = EdgeSettings.from_env({"CRM_EVENTS_AUTH_MODE": "off"})
    return create_app(settings, bus=MemoryBus())


def schema_of(doc: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    assert isinstance(node, dict)
    return node


def test_document_is_valid_openapi(doc: dict[str, Any]) -> None:
    openapi_spec_validator.validate(doc)
    assert doc["openapi"].startswith("3.1")


def test_every_route_is_documented_and_every_documented_path_is_routed(
    doc: dict[str, Any],
) -> None:
    routed: set[tuple[str, str]] = set()
    for resource in edge_app().router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter")
        assert isinstance(path, str), info
        # aiohttp answers HEAD for every GET route; OpenAPI leaves HEAD implicit.
        routed |= {(path, route.method.lower()) for route in resource if route.method != "HEAD"}
    documented = {
        (path, method)
        for path, item in doc["paths"].items()
        for method in item
        if method in {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    }
    assert routed - documented == set(), "routes missing from edge/openapi.yaml"
    assert documented - routed == set(), "documented but not routed (wiring missing?)"


def _error_codes_in_source() -> Iterator[tuple[str, str]]:
    """(code, where) for every literal error code in edge/ and shared/: the code argument of
    ``ApiError(...)``, its subclasses and ``json_error(...)``, ``{"error": "<code>"}``
    literals, and ``{status: ("<code>", message)}`` tables."""
    trees = {path: ast.parse(path.read_text(encoding="utf-8")) for path in SOURCES}
    raisers = {"ApiError", "json_error"}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and b.id == "ApiError" for b in node.bases
            ):
                raisers.add(node.name)
    for path, tree in trees.items():
        where = path.relative_to(ROOT).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                code = node.args[1] if name in raisers and len(node.args) > 1 else None
                if isinstance(code, ast.Constant) and isinstance(code.value, str):
                    yield code.value, f"{where}:{node.lineno}"
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if (
                        isinstance(key, ast.Constant)
                        and key.value == "error"
                        and isinstance(value, ast.Constant)
                        and isinstance(value.value, str)
                    ):
                        yield value.value, f"{where}:{node.lineno}"
                    if (
                        isinstance(key, ast.Constant)
                        and isinstance(key.value, int)
                        and 400 <= key.value <= 599
                        and isinstance(value, ast.Tuple)
                        and value.elts
                        and isinstance(value.elts[0], ast.Constant)
                        and isinstance(value.elts[0].value, str)
                    ):
                        yield value.elts[0].value, f"{where}:{node.lineno}"


def _documented_error_codes(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "error" and isinstance(value, dict):
                if isinstance(value.get("const"), str):
                    yield value["const"]
                yield from (v for v in value.get("enum", []) if isinstance(v, str))
            yield from _documented_error_codes(value)
    elif isinstance(node, list):
        for item in node:
            yield from _documented_error_codes(item)


def test_every_error_code_the_code_can_emit_is_documented(doc: dict[str, Any]) -> None:
    emitted: dict[str, str] = {}
    for code, where in _error_codes_in_source():
        emitted.setdefault(code, where)
    # The scan must see the codes we know of, or it proves nothing.
    assert {"invalid_n", "invalid_cursor", "invalid_types", "invalid_query"} <= emitted.keys()
    assert {"not_found", "method_not_allowed", "not_ready", "internal"} <= emitted.keys()
    documented = set(_documented_error_codes(doc))
    missing = {
        code: where
        for code, where in emitted.items()
        if code not in documented and code not in NOT_FROM_THE_EDGE
    }
    assert missing == {}, "error codes emitted by the code but not in edge/openapi.yaml"


def test_every_error_response_is_the_json_error_schema(doc: dict[str, Any]) -> None:
    error_ref = "#/components/schemas/Error"
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            for status, answer in operation["responses"].items():
                if int(status) < 400:
                    continue
                response = schema_of(doc, answer["$ref"]) if "$ref" in answer else answer
                schema = response["content"]["application/json"]["schema"]
                if "$ref" in schema:
                    schema = schema_of(doc, schema["$ref"])
                assert {"$ref": error_ref} in schema["allOf"], (path, method, status)


def test_history_n_bounds_match_the_defaults(doc: dict[str, Any]) -> None:
    n = schema_of(doc, "#/components/parameters/HistoryN")["schema"]
    assert (n["minimum"], n["maximum"], n["default"]) == (
        1,
        DEFAULT_HISTORY_MAX_N,
        DEFAULT_HISTORY_N,
    )


def _accepts(pattern: str, value: str) -> bool:
    # JSON Schema patterns are ECMA-262 searches; these are anchored, and "$" must not match
    # before a trailing newline as Python's does.
    return re.search(pattern.removesuffix("$") + r"\Z", value) is not None


positions = st.one_of(st.none(), st.integers(0, 2**40), st.integers(0, MAX_POSITION))
cursors = st.builds(Cursor, st.integers(0, U32_MAX), st.lists(positions, max_size=80).map(tuple))


def _cursor_schema(doc: dict[str, Any]) -> dict[str, Any]:
    return schema_of(doc, "#/components/schemas/Cursor")


def _admits(schema: dict[str, Any], value: str) -> bool:
    return (
        _accepts(schema["pattern"], value)
        and schema["minLength"] <= len(value) <= schema["maxLength"]
    )


@functools.cache
def _parsed_cursor_schema() -> dict[str, Any]:
    return _cursor_schema(yaml.safe_load(load_document()))


# No deadline: the first example also parses the document and compiles the schema once.
@settings(deadline=None)
@given(cursors)
def test_every_cursor_the_edge_hands_out_fits_the_cursor_schema(cursor: Cursor) -> None:
    assert _admits(_parsed_cursor_schema(), cursor.encode().decode("ascii"))


def test_cursor_bounds_are_the_codecs(doc: dict[str, Any]) -> None:
    schema = _cursor_schema(doc)
    assert schema["maxLength"] == MAX_CURSOR_CHARS
    assert f"At most {MAX_PARTITIONS} partitions, so at most {MAX_CURSOR_CHARS}" in " ".join(
        schema["description"].split()
    )
    largest = Cursor(U32_MAX, (MAX_POSITION,) * MAX_PARTITIONS).encode().decode("ascii")
    smallest = Cursor(0, ()).encode().decode("ascii")
    assert _admits(schema, largest) and _admits(schema, smallest)
    assert len(largest) == schema["maxLength"]
    assert len(smallest) == schema["minLength"]


CURSOR_SAMPLES = [
    "",
    "1.",
    "1.A",
    "1.AAAAAQ",
    "1.AAAAAQMCAwA",
    "1.AAAAAQMCAwA=",
    "1.AAAAAQMCAwAA",  # a byte after the last partition
    "1.AAAAAQMCAwB",  # non-zero unused bits
    "2.AAAAAQMCAwA",
    "1,AAAAAQMCAwA",
    "1.AAAA AQMCAwA",
    "1.AAAAAQMCAw+",
    "1.AAAAAQMCAw/",
    "1.AAAAAQMCAwA\n",
    "1.\u0661AAAAQMCAwA",
    "1." + "A" * (MAX_CURSOR_CHARS - 1),
    "1732870000000-0",
    "not-a-cursor",
]


@pytest.mark.parametrize("value", CURSOR_SAMPLES)
def test_what_the_cursor_schema_refuses_the_edge_refuses(doc: dict[str, Any], value: str) -> None:
    """The pattern cannot check the varints inside a cursor, so it is a superset: whatever
    it refuses must be refused by the decoder (and then answered with a 400, or with a
    ``reset`` for an id of the old format), never accepted."""
    try:
        decode_cursor(value)
        decoded = True
    except CursorError:
        decoded = False
    if not _admits(_cursor_schema(doc), value):
        assert not decoded


LEGACY_SAMPLES = [
    "0-0",
    "1732870000000-0",
    f"{U64_MAX}-{U64_MAX}",
    "99999999999999999999-1",
    "000000000000000000001-0",
    "1-",
    "-1",
    "1",
    "1-1-1",
    "a-1",
    " 1-1",
    "1-1\n",
    "+1-1",
    "\u0661-\u0661",  # Arabic-Indic digits: not [0-9]
    "1.AAAAAQMCAwA",
]


@pytest.mark.parametrize("value", LEGACY_SAMPLES)
def test_legacy_id_pattern_is_exactly_what_the_edge_treats_as_old_format(
    doc: dict[str, Any], value: str
) -> None:
    schema = schema_of(doc, "#/components/schemas/LegacyStreamId")
    assert schema["deprecated"] is True
    assert _accepts(schema["pattern"], value) == is_legacy_id(value)


def test_positions_passed_back_are_cursors_or_legacy_ids(doc: dict[str, Any]) -> None:
    resume = {"$ref": "#/components/schemas/ResumePosition"}
    for ref in ("LastEventIdHeader", "LastEventIdQuery"):
        assert schema_of(doc, f"#/components/parameters/{ref}")["schema"] == resume
    # ``after`` has no "empty means none": an empty value is a 400.
    after = schema_of(doc, "#/components/parameters/After")["schema"]
    assert after == {"$ref": "#/components/schemas/CursorOrLegacyId"}
    either = schema_of(doc, "#/components/schemas/CursorOrLegacyId")["anyOf"]
    assert either == [
        {"$ref": "#/components/schemas/CursorParam"},
        {"$ref": "#/components/schemas/LegacyStreamId"},
    ]
    assert schema_of(doc, "#/components/schemas/ResumePosition")["anyOf"][:2] == either
    # Generated request data must decode: the fuzz run registers this format.
    assert schema_of(doc, "#/components/schemas/CursorParam")["format"] == "crm-events-cursor"


def test_positions_handed_out_are_cursors(doc: dict[str, Any]) -> None:
    cursor = {"$ref": "#/components/schemas/Cursor"}
    item = schema_of(doc, "#/components/schemas/HistoryItem")["allOf"][0]
    assert item["required"] == ["cursor"] and item["properties"]["cursor"] == cursor
    page = schema_of(doc, "#/components/schemas/HistoryPage")["properties"]
    assert cursor in page["next_after"]["anyOf"]
    for variant in schema_of(doc, "#/components/schemas/SseEvent")["oneOf"]:
        assert variant["properties"]["id"] == cursor
    reset = schema_of(doc, "#/components/schemas/Reset")
    assert reset["required"] == ["reason", "partitions", "message"]
    partition = schema_of(doc, "#/components/schemas/PartitionReset")
    assert set(partition["required"]) == {"partition", "requested", "oldest_available", "reason"}


TYPES_SAMPLES = [
    "DealWon",
    "DealWon,DealLost",
    "a" * 128,
    "a" * 129,
    ",".join(["a" * 128] * 63),  # 8190 characters
    ",".join(chr(65 + i % 26) * 128 for i in range(MAX_TYPES)),  # 8255 characters
    "x.y:z-w_1",
    ",".join(f"T{i}" for i in range(MAX_TYPES)),
    ",".join(f"T{i}" for i in range(MAX_TYPES + 1)),
    "",
    ",",
    "A,",
    ",A",
    "A,,B",
    "A B",
    "A;B",
    "Ä",
    "A\n",
]


@pytest.mark.parametrize("value", TYPES_SAMPLES)
def test_types_pattern_is_what_the_edge_accepts(doc: dict[str, Any], value: str) -> None:
    schema = schema_of(doc, "#/components/parameters/Types")["schema"]
    try:
        parse_types(value)
        accepted = True
    except ApiError:
        accepted = False
    # The 8192-character bound is in the description only (see the document).
    valid = (
        _accepts(schema["pattern"], value)
        and len(value) >= schema["minLength"]
        and len(value) <= MAX_TYPES_PARAM_LEN
    )
    assert valid == accepted


def test_types_bounds_are_the_edges(doc: dict[str, Any]) -> None:
    parameter = schema_of(doc, "#/components/parameters/Types")
    assert f"{{0,{MAX_TYPES - 1}}}" in parameter["schema"]["pattern"]
    assert f"({MAX_TYPES})" in parameter["description"]
    assert f"at most {MAX_TYPES_PARAM_LEN} characters" in parameter["description"]


def test_event_type_pattern_is_the_ingest_rule(doc: dict[str, Any]) -> None:
    assert schema_of(doc, "#/components/schemas/EventType")["pattern"] == TYPE_RE.pattern


async def test_document_is_served_once_read_with_an_etag() -> None:
    app = web.Application()
    add_openapi_route(app)
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = str(server.make_url(OPENAPI_PATH))
            async with session.get(url) as resp:
                assert resp.status == 200
                assert resp.content_type == "application/yaml"
                assert await resp.read() == load_document()
                etag = resp.headers["ETag"]
            async with session.get(url, headers={"If-None-Match": etag}) as resp:
                assert resp.status == 304
                assert await resp.read() == b""
    finally:
        await server.close()


async def test_the_edge_serves_the_document() -> None:
    server = TestServer(edge_app())
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(str(server.make_url(OPENAPI_PATH))) as resp,
        ):
            assert resp.status == 200
            assert yaml.safe_load(await resp.read())["openapi"].startswith("3.1")
    finally:
        await server.close()


def test_reset_schema_is_what_the_edge_sends(doc: dict[str, Any]) -> None:
    reset = schema_of(doc, "#/components/schemas/Reset")
    partition = schema_of(doc, "#/components/schemas/PartitionReset")
    assert set(reset["properties"]["reason"]["enum"]) == set(RESET_REASONS)
    assert set(partition["properties"]["reason"]["enum"]) == set(RESET_REASONS)
    payload = reset_payload([Reset(2, 10, 4711, "trimmed"), Reset(0, None, None, "not_retained")])
    assert set(payload) == set(reset["properties"]) == set(reset["required"])
    for item in payload["partitions"]:
        assert set(item) == set(partition["properties"]) == set(partition["required"])
    jsonschema.validate(payload, {**reset, "components": doc["components"]})
