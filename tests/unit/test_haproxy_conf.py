"""devtools/haproxy_conf.py: the rendered configuration, checked by HAProxy itself (``-c``)
and for the options the SSE path depends on. No network: ``haproxy -c`` only parses."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from devtools import haproxy_conf
from devtools.pki import LocalCA
from shared.settings import DEFAULT_PING_INTERVAL_S


def _active(text: str) -> list[str]:
    """The configuration's directives: comments and blank lines dropped."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def _render(tmp_path: Path, **kwargs: object) -> tuple[Path, list[str]]:
    path = haproxy_conf.render(tmp_path, 9010, [9011, 9012], **kwargs)  # type: ignore[arg-type]
    return path, _active(path.read_text())


def test_the_default_config_is_valid_for_haproxy(tmp_path: Path) -> None:
    path, _ = _render(tmp_path)
    result = haproxy_conf.check(path)
    assert result.ok, result


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host": "::1"},
        {"maxconn": 100, "stream_timeout_s": 5},
        {"http_no_delay": False},
    ],
    ids=["ipv6", "limits", "without-no-delay"],
)
def test_every_variant_is_valid_for_haproxy(tmp_path: Path, kwargs: dict[str, object]) -> None:
    path, _ = _render(tmp_path, **kwargs)
    result = haproxy_conf.check(path)
    assert result.ok, result


def test_haproxy_check_catches_a_broken_file(tmp_path: Path) -> None:
    """The check above can fail: a directive HAProxy does not know is reported."""
    path, _ = _render(tmp_path)
    path.write_text(
        path.read_text().replace(
            "balance leastconn", "balance leastconn\n    option no-such-option"
        )
    )
    result = haproxy_conf.check(path)
    assert not result.ok
    assert "no-such-option" in result.output


def test_sse_path_options(tmp_path: Path) -> None:
    _, lines = _render(tmp_path)
    # No 200 ms hold-back of small writes (MSG_MORE): lone events leave at once.
    assert "option http-no-delay" in lines
    # The edge sees a client's close at once, not at its next keepalive.
    assert "option abortonclose" in lines
    assert "balance leastconn" in lines
    assert "option forwardfor" in lines
    assert "http-request del-header X-Forwarded-For" in lines
    assert "option httpchk" in lines
    assert "http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host crm-events-lb" in lines
    assert "http-check expect status 200" in lines
    assert "retry-on conn-failure empty-response" in lines and "option redispatch 1" in lines
    assert f"monitor-uri {haproxy_conf.HEALTH_PATH}" in lines


def test_stream_timeouts_outlast_several_keepalives(tmp_path: Path) -> None:
    _, lines = _render(tmp_path)
    for side in ("client", "server", "tunnel"):
        found = [re.fullmatch(rf"timeout {side} (\d+)s", line) for line in lines]
        seconds = [int(m.group(1)) for m in found if m]
        assert seconds == [haproxy_conf.DEFAULT_STREAM_TIMEOUT_S], side
        assert seconds[0] >= 3 * DEFAULT_PING_INTERVAL_S, side


def test_listen_address_and_one_server_per_edge(tmp_path: Path) -> None:
    _, lines = _render(tmp_path, host="::1")
    assert "bind [::1]:9010" in lines
    assert [line for line in lines if line.startswith("server ")] == [
        "server edge1 [::1]:9011",
        "server edge2 [::1]:9012",
    ]


def test_without_no_delay_the_option_is_not_active(tmp_path: Path) -> None:
    _, lines = _render(tmp_path, http_no_delay=False)
    assert "option http-no-delay" not in lines


@pytest.mark.parametrize(
    ("lb_port", "edge_ports", "kwargs", "message"),
    [
        (0, [9011], {}, "lb_port"),
        (9010, [], {}, "at least one edge"),
        (9010, [70000], {}, "edge_ports"),
        (9010, [9010], {}, "also an edge port"),
        (9010, [9011], {"maxconn": 0}, "maxconn"),
        (9010, [9011], {"stream_timeout_s": 0}, "stream_timeout_s"),
        (9010, [9011], {"host": "127.0.0.1 # x"}, "host"),
    ],
)
def test_bad_arguments_are_refused(
    tmp_path: Path, lb_port: int, edge_ports: list[int], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        haproxy_conf.render(tmp_path, lb_port, edge_ports, **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / haproxy_conf.MAIN_CONF).exists()


def test_cli_renders_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert haproxy_conf.main([str(tmp_path), "--lb-port", "9100", "--check"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / haproxy_conf.MAIN_CONF) in out
    assert "-db" in out
    assert haproxy_conf.main([str(tmp_path), "--lb-port", "9011"]) == 2


# -- client certificates ---------------------------------------------------------------------


def _mtls(tmp_path: Path, **change: object) -> haproxy_conf.MtlsBind:
    ca = LocalCA.open(tmp_path / "pki")
    server = ca.issue_server("lb")
    bind = haproxy_conf.MtlsBind(
        port=9444, pem=server.bundle, client_ca=ca.cert_path, crl=ca.crl_path
    )
    return dataclasses.replace(bind, **change)  # type: ignore[arg-type]


def test_the_mutual_tls_bind_is_valid_for_haproxy(tmp_path: Path) -> None:
    path, lines = _render(tmp_path, mtls=_mtls(tmp_path))
    result = haproxy_conf.check(path)
    assert result.ok, result
    [bind] = [line for line in lines if line.startswith("bind 127.0.0.1:9444 ")]
    words = bind.split()
    # Refused at the handshake without a certificate of that CA, or with a revoked one.
    assert words[words.index("verify") + 1] == "required"
    assert words[words.index("ca-file") + 1] == str(tmp_path / "pki" / "ca.crt")
    assert words[words.index("crl-file") + 1] == str(tmp_path / "pki" / "crl.pem")
    assert "bind 127.0.0.1:9010" in lines


def test_the_certificate_header_is_dropped_and_set_only_from_a_verified_certificate(
    tmp_path: Path,
) -> None:
    for kwargs in ({}, {"mtls": _mtls(tmp_path)}):
        _, lines = _render(tmp_path, **kwargs)
        header = [line for line in lines if "X-Client-Cert" in line]
        # Dropped first, on every request of every bind; then set from HAProxy's own check.
        assert header == [
            "http-request del-header X-Client-Cert",
            "http-request set-header X-Client-Cert %[ssl_c_der,base64]"
            " if { ssl_c_used } { ssl_c_verify 0 }",
        ]
        assert lines.index(header[0]) < lines.index("default_backend crm_edges")


def test_bad_mutual_tls_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"mtls\.port"):
        _render(tmp_path, mtls=_mtls(tmp_path, port=9010))
    with pytest.raises(FileNotFoundError, match=r"mtls\.crl"):
        _render(tmp_path, mtls=_mtls(tmp_path, crl=tmp_path / "missing.pem"))
