"""devtools/nginx_conf.py with client certificates: the rendered configuration, read as nginx
reads it (the main file and what it includes) and checked by nginx itself (``nginx -t``).

The promise checked here: the header that carries a verified client certificate to the edges
is set on the mutual-TLS server alone, and blanked on every other server, so that no client can
forge it through nginx.

The blanking is one line per server, inherited by its locations. nginx drops every inherited
proxy_set_header of a location that sets one of its own, so the rule kept here is "headers on
the server only, never in a location", checked on the shared file and on everything rendered.
(Repeating the blank line in each location instead would not be enough: such a location would
also lose Host, X-Forwarded-For, Connection "" and Last-Event-ID, so all of them would have to
be repeated and checked per location, and the mutual-TLS copy would have to rewrite each.)"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import nginx_conf
from devtools.pki import LocalCA

HEADER = nginx_conf.CLIENT_CERT_HEADER


def _certs(tmp_path: Path) -> tuple[nginx_conf.MtlsListener, nginx_conf.UpstreamTls, Path, Path]:
    ca = LocalCA.open(tmp_path / "pki")
    server = ca.issue_server("lb")
    proxy = ca.issue_client("lb-proxy", common_name="lb")
    mtls = nginx_conf.MtlsListener(
        port=19444, cert=server.cert, key=server.key, client_ca=ca.cert_path, crl=ca.crl_path
    )
    upstream = nginx_conf.UpstreamTls(cert=proxy.cert, key=proxy.key, trusted_ca=ca.cert_path)
    return mtls, upstream, server.cert, server.key


def _render_all(tmp_path: Path) -> Path:
    """Every listener: plain, HTTPS, mutual TLS; and TLS to the edges."""
    mtls, upstream, cert, key = _certs(tmp_path)
    return nginx_conf.render(
        tmp_path / "nginx",
        19010,
        [19011, 19012],
        tls_port=19443,
        tls_cert=cert,
        tls_key=key,
        mtls=mtls,
        upstream_tls=upstream,
    )


@dataclasses.dataclass
class Block:
    """One nginx statement: ``words`` (directive and arguments) and, for a block, its body."""

    words: list[str]
    body: list[Block] | None = None


def _tokens(text: str) -> Iterator[str]:
    """nginx's tokens: words (quotes removed), ``{``, ``}`` and ``;``; comments skipped, and
    braces inside quotes (the JSON of the error pages) are text."""
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":
            nl = text.find("\n", i)
            i = len(text) if nl < 0 else nl
        elif c in "{};":
            yield c
            i += 1
        elif c in "'\"":
            end = text.index(c, i + 1)
            yield text[i + 1 : end]
            i = end + 1
        else:
            start = i
            while i < len(text) and not text[i].isspace() and text[i] not in "{};#'\"":
                i += 1
            yield text[start:i]


def _parse(path: Path, base: Path | None) -> list[Block]:
    """The statements of ``path``; with ``base`` (the main file's directory) its includes are
    read in place, as nginx does."""
    stack: list[list[Block]] = [[]]
    words: list[str] = []
    for token in _tokens(path.read_text()):
        if token == ";":
            if words[0] == "include" and base is not None:
                target = Path(words[1])
                stack[-1].extend(_parse(target if target.is_absolute() else base / target, base))
            else:
                stack[-1].append(Block(words))
            words = []
        elif token == "{":
            body: list[Block] = []
            stack[-1].append(Block(words, body))
            stack.append(body)
            words = []
        elif token == "}":
            stack.pop()
        else:
            words.append(token)
    assert len(stack) == 1 and not words, f"{path}: unbalanced braces"
    return stack[0]


def _headers_set_in_locations(statements: list[Block], where: str = "") -> list[str]:
    """One line per location (at any depth) that sets a proxy_set_header of its own."""
    found = []
    for st in statements:
        if st.body is None:
            continue
        inside = f"{where} > {' '.join(st.words)}".lstrip(" >")
        if st.words[0] == "location":
            own = [" ".join(d.words[1:]) for d in st.body if d.words[0] == "proxy_set_header"]
            if own:
                found.append(f"{inside} sets proxy_set_header {own}")
        found += _headers_set_in_locations(st.body, inside)
    return found


def _no_headers_in_locations(statements: list[Block], what: str) -> None:
    found = _headers_set_in_locations(statements)
    assert not found, (
        f"{what}: a location sets its own proxy_set_header; nginx then drops every header the "
        f'server sets for it, `proxy_set_header {HEADER} "";` included, so a client could send '
        "its own certificate header to the edges through it (and Host, X-Forwarded-For, "
        "Connection and Last-Event-ID are lost too). Set headers on the server block only:\n"
        + "\n".join(found)
    )


def _flatten(statements: list[Block]) -> Iterator[str]:
    for st in statements:
        yield " ".join(st.words)
        if st.body is not None:
            yield from _flatten(st.body)


def _servers(statements: list[Block]) -> list[Block]:
    """Every ``server`` block, at any depth."""
    found = []
    for st in statements:
        if st.body is not None:
            found += [st] if st.words[0] == "server" else _servers(st.body)
    return found


def _directives(block: Block, name: str) -> list[list[str]]:
    """The arguments of every ``name`` statement inside ``block``, at any depth, in order (for
    ``location``, the location's match)."""
    found = []
    for st in block.body or []:
        if st.words[0] == name:
            found.append(st.words[1:])
        if st.body is not None:
            found += _directives(st, name)
    return found


def _joined(block: Block, name: str) -> list[str]:
    return [" ".join(words) for words in _directives(block, name)]


def test_no_location_sets_its_own_proxy_headers(tmp_path: Path) -> None:
    shared = nginx_conf.shared_conf_path()
    _no_headers_in_locations(_parse(shared, None), str(shared))
    plain = nginx_conf.render(tmp_path / "plain", 19010, [19011])
    every = _render_all(tmp_path)
    for main in (plain, every):
        tree = _parse(main, main.parent)
        _no_headers_in_locations(tree, f"{main} and its includes")
        # The walk did reach every location: both servers' (mutual TLS: with its error pages).
        locations = [line for line in _flatten(tree) if line.startswith("location ")]
        assert len(locations) == (3 if main == plain else 8), locations


def test_a_location_with_its_own_proxy_header_is_reported(tmp_path: Path) -> None:
    """The check above can fail: a location's own line, even nested, is found and named."""
    mtls, _, _, _ = _certs(tmp_path)
    shared = tmp_path / "shared.conf"
    shared.write_text(
        nginx_conf.shared_conf_path()
        .read_text()
        .replace(
            "proxy_read_timeout 45s;",
            "proxy_read_timeout 45s;\n        location /crm-events/history {\n"
            "            proxy_set_header X-Tenant t-1;\n        }",
        )
    )
    main = nginx_conf.render(tmp_path / "out", 19010, [19011], shared_conf=shared, mtls=mtls)
    found = _headers_set_in_locations(_parse(main, main.parent))
    # Once in the shared server, once in its mutual-TLS copy.
    assert found == 2 * [
        "http > server > location /crm-events > location /crm-events/history "
        "sets proxy_set_header ['X-Tenant t-1']"
    ], found
    with pytest.raises(AssertionError, match="Set headers on the server block only"):
        _no_headers_in_locations(_parse(main, main.parent), "main")


def test_the_header_is_blanked_on_every_server_but_the_mutual_tls_one(tmp_path: Path) -> None:
    main = _render_all(tmp_path)
    servers = _servers(_parse(main, main.parent))
    assert len(servers) == 2
    verified = [s for s in servers if ["on"] in _directives(s, "ssl_verify_client")]
    assert len(verified) == 1
    for server in servers:
        sets = [d for d in _directives(server, "proxy_set_header") if d[0] == HEADER]
        listens = _joined(server, "listen")
        if server in verified:
            assert sets == [[HEADER, "$ssl_client_escaped_cert"]], listens
            assert listens == ["127.0.0.1:19444 ssl"]
        else:
            assert sets == [[HEADER, ""]], listens
            assert sorted(listens) == ["127.0.0.1:19010", "127.0.0.1:19443 ssl http2"]


def test_the_mutual_tls_server_proxies_like_the_shared_one(tmp_path: Path) -> None:
    main = _render_all(tmp_path)
    plain, mtls = _servers(_parse(main, main.parent))
    for name in ("location", "proxy_pass", "proxy_read_timeout", "proxy_buffering"):
        shared = _joined(plain, name)
        assert shared and _joined(mtls, name)[-len(shared) :] == shared, name
    # Refused certificates: JSON from nginx itself, before any location proxies.
    assert _joined(mtls, "error_page") == [
        "496 = @crm_events_no_client_cert",
        "495 = @crm_events_bad_client_cert",
    ]
    assert _directives(mtls, "ssl_crl") and _directives(mtls, "ssl_client_certificate")


def test_tls_to_the_edges_makes_every_proxy_pass_https(tmp_path: Path) -> None:
    main = _render_all(tmp_path)
    (http,) = [st for st in _parse(main, main.parent) if st.words == ["http"]]
    passes = _joined(http, "proxy_pass")
    assert passes and all(p == "https://crm_edges" for p in passes), passes
    for directive in ("proxy_ssl_certificate", "proxy_ssl_trusted_certificate"):
        assert _directives(http, directive), directive
    assert _directives(http, "proxy_ssl_verify") == [["on"]]
    # Without it, the shared file is included as it is (what docker-compose mounts).
    plain = nginx_conf.render(tmp_path / "plain", 19010, [19011])
    assert f'include "{nginx_conf.shared_conf_path()}";' in plain.read_text()


def test_nginx_accepts_the_rendered_config(tmp_path: Path) -> None:
    try:
        binary = nginx_conf.find_nginx()
    except FileNotFoundError:
        pytest.fail("nginx is not installed; run scripts/install.sh")
    main = _render_all(tmp_path)
    proc = subprocess.run(
        nginx_conf.nginx_argv(main, nginx=binary, test_only=True),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_a_shared_file_without_the_blanking_line_is_refused(tmp_path: Path) -> None:
    """The mutual-TLS server is made by turning that line into the relaying one; a shared file
    without it would leave the header to the client on the other servers."""
    mtls, _, _, _ = _certs(tmp_path)
    shared = tmp_path / "shared.conf"
    shared.write_text(
        nginx_conf.shared_conf_path().read_text().replace(f'proxy_set_header {HEADER} "";', "")
    )
    with pytest.raises(ValueError, match=HEADER):
        nginx_conf.render(tmp_path / "out", 19010, [19011], shared_conf=shared, mtls=mtls)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"port": 19010}, "mtls.port"),
        ({"port": 0}, "mtls.port"),
        ({"verify_depth": 0}, "verify_depth"),
        ({"crl": Path("/nonexistent/crl.pem")}, "mtls.crl"),
    ],
)
def test_bad_mutual_tls_settings_are_named(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    mtls, _, _, _ = _certs(tmp_path)
    bad = dataclasses.replace(mtls, **change)  # type: ignore[arg-type]
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        nginx_conf.render(tmp_path / "out", 19010, [19011], mtls=bad)
