"""Render a self-contained nginx configuration for the crm-events load balancer.

``render(out_dir, lb_port, edge_ports)`` writes into ``out_dir``:

- ``nginx.conf``: the main file. pid, logs and temp paths all live in ``out_dir``, so nginx
  runs as root or not without touching /var, and two instances (developer stack and a test)
  never share a file. Its http block includes the checkout's ``deploy/nginx/crm-events.conf``,
  the very file docker-compose mounts, so both stacks proxy the same way.
- ``crm-events-upstream.inc`` and ``crm-events-listen.inc``: the per-stack parts that
  crm-events.conf includes by relative path (nginx resolves those against the directory of
  the main config file, i.e. ``out_dir``).

TLS is opt-in: with ``tls_port``, ``tls_cert`` and ``tls_key`` the listen include adds an
HTTPS listener that speaks HTTP/2 (ALPN ``h2``, HTTP/1.1 for clients without it) next to the
plain HTTP one, in the same ``server`` block, so both ports proxy exactly alike (SSE
unbuffered, same timeouts). Browsers get HTTP/2, where one connection carries every
EventSource of a page instead of HTTP/1.1's six per origin; scripts keep plain HTTP.
:func:`ensure_self_signed_cert` makes a certificate for a local stack with ``openssl``.

Client certificates are opt-in too: ``mtls=MtlsListener(...)`` adds a second server block,
``crm-events-mtls.conf``, listening with TLS and ``ssl_verify_client on`` (a CA bundle, a CRL),
that relays the verified certificate to the edges in ``X-Client-Cert`` (URL-escaped PEM). Its
proxy settings and locations are copied from the shared file's server block, so both proxy
alike; only that header differs (the shared server blanks it, so no client can forge it through
the proxy). A missing or refused certificate is answered by nginx with a JSON error before any
request reaches an edge. ``upstream_tls=UpstreamTls(...)`` makes nginx speak mutual TLS to the
edges (``proxy_ssl_*`` at http level, ``https://`` in a rendered copy of the shared file).

Run it with :func:`nginx_argv`. CLI::

    python -m devtools.nginx_conf OUT_DIR --lb-port 9010 --edge-ports 9011,9012 \\
        [--tls-port 9443 --tls-dir OUT_DIR/tls]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from devtools.atomic import write_text_atomically

__all__ = [
    "CLIENT_CERT_HEADER",
    "LISTEN_INC",
    "MAIN_CONF",
    "MTLS_CONF",
    "SHARED_COPY",
    "TLS_CERT",
    "TLS_KEY",
    "UPSTREAM_INC",
    "MtlsListener",
    "TlsError",
    "UpstreamTls",
    "ensure_self_signed_cert",
    "find_nginx",
    "http2_directive_supported",
    "nginx_argv",
    "nginx_version",
    "render",
    "shared_conf_path",
]

MAIN_CONF = "nginx.conf"
UPSTREAM_INC = "crm-events-upstream.inc"
LISTEN_INC = "crm-events-listen.inc"
DEFAULT_WORKER_CONNECTIONS = 8192
MTLS_CONF = "crm-events-mtls.conf"
#: The shared file, rewritten to proxy over https when the edges speak TLS.
SHARED_COPY = "crm-events-shared.conf"
#: Where the mutual-TLS listener relays the verified certificate; the shared file blanks it
#: (the edges' CRM_EVENTS_CLIENT_CERT_HEADER must keep this default behind nginx).
CLIENT_CERT_HEADER = "X-Client-Cert"
_BLANK_HEADER = f'proxy_set_header {CLIENT_CERT_HEADER} "";'
_RELAY_HEADER = f"proxy_set_header {CLIENT_CERT_HEADER} $ssl_client_escaped_cert;"
_PLAIN_UPSTREAM = "proxy_pass http://crm_edges;"
_TLS_UPSTREAM = "proxy_pass https://crm_edges;"
TLS_CERT = "cert.pem"
TLS_KEY = "key.pem"
#: nginx 1.25.1 replaced ``listen ... http2`` with the ``http2 on;`` directive.
HTTP2_DIRECTIVE_SINCE = (1, 25, 1)
SELF_SIGNED_DAYS = 825
SELF_SIGNED_NAMES = ("localhost", "127.0.0.1", "::1")
# Where Debian and most distributions put the binary; root's PATH has it, other users' may not.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def shared_conf_path() -> Path:
    """deploy/nginx/crm-events.conf of this checkout."""
    return Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "crm-events.conf"


def _check_port(what: str, port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what}: expected a TCP port 1-65535, got {port!r}")
    return port


@dataclasses.dataclass(frozen=True)
class MtlsListener:
    """A listener that requires a client certificate signed by ``client_ca``."""

    port: int
    cert: Path
    """The listener's own certificate (chain), PEM."""
    key: Path
    client_ca: Path
    """CA bundle (PEM) the client certificates must chain to."""
    crl: Path | None = None
    """PEM CRL of that CA: a revoked certificate is refused. nginx reads it at start and on
    reload (SIGHUP), so a revocation takes effect at the next reload."""
    verify_depth: int = 2


@dataclasses.dataclass(frozen=True)
class UpstreamTls:
    """nginx -> edge over mutual TLS: nginx presents ``cert`` and checks the edges' certificates
    against ``trusted_ca`` for the name ``server_name``."""

    cert: Path
    key: Path
    trusted_ca: Path
    server_name: str = "localhost"


def _checked_file(what: str, path: Path) -> Path:
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"{what} not found: {resolved}")
    if '"' in str(resolved) or "\\" in str(resolved):
        raise ValueError(f"nginx cannot quote this path: {resolved}")
    return resolved


def _server_body(shared_text: str) -> list[str]:
    """The directives of the shared file's server block, without its listen include and
    server name: what the mutual-TLS server copies so that both proxy alike."""
    start = re.search(r"^server\s*\{[ \t]*$", shared_text, re.M)
    if start is None:
        raise ValueError("shared nginx config: no 'server {' block found")
    depth, end, i = 1, None, start.end()
    while i < len(shared_text):
        c = shared_text[i]
        if c == "#":
            # A comment runs to the end of its line; braces in it do not count.
            nl = shared_text.find("\n", i)
            i = len(shared_text) if nl < 0 else nl
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                end = i
                break
        i += 1
    if end is None:
        raise ValueError("shared nginx config: the server block is not closed")
    lines = shared_text[start.end() : end].strip("\n").splitlines()
    kept = [
        line for line in lines if line.strip() not in (f"include {LISTEN_INC};", "server_name _;")
    ]
    relayed = []
    for line in kept:
        if _BLANK_HEADER in line:
            indent = line[: len(line) - len(line.lstrip())]
            relayed.append(f"{indent}# Here not blank: the certificate nginx verified.")
            relayed.append(line.replace(_BLANK_HEADER, _RELAY_HEADER))
        else:
            relayed.append(line)
    if sum(_RELAY_HEADER in line for line in relayed) != 1:
        raise ValueError(
            f"shared nginx config: expected exactly one '{_BLANK_HEADER}' in its server block"
        )
    return relayed


def _mtls_server(host: str, mtls: MtlsListener, body: list[str]) -> str:
    """The mutual-TLS server block (http context)."""
    crl = f'    ssl_crl "{mtls.crl}";\n' if mtls.crl is not None else ""
    return (
        "# Generated by devtools/nginx_conf.py: the mutual-TLS listener. Settings and locations\n"
        "# below the marker are copied from the shared server block.\n"
        "server {\n"
        f"    listen {host}:{mtls.port} ssl;\n"
        "    server_name _;\n"
        f'    ssl_certificate "{mtls.cert}";\n'
        f'    ssl_certificate_key "{mtls.key}";\n'
        "    ssl_protocols TLSv1.2 TLSv1.3;\n"
        "    ssl_session_cache shared:crm_events_mtls:1m;\n"
        "    ssl_session_timeout 1h;\n"
        "    # Only clients with a certificate signed by this CA (and not revoked) get past the\n"
        "    # request line. nginx completes the handshake either way and answers 496 (none\n"
        "    # sent) or 495 (not verified) before any location runs: no request reaches an edge.\n"
        "    ssl_verify_client on;\n"
        f'    ssl_client_certificate "{mtls.client_ca}";\n'
        + crl
        + f"    ssl_verify_depth {mtls.verify_depth};\n"
        "    # Those answers in the product's JSON error shape, not nginx's HTML page.\n"
        "    error_page 496 = @crm_events_no_client_cert;\n"
        "    error_page 495 = @crm_events_bad_client_cert;\n"
        "    location @crm_events_no_client_cert {\n"
        "        default_type application/json;\n"
        '        return 401 \'{"error":"client_certificate_required","message":'
        '"this listener requires a client certificate"}\';\n'
        "    }\n"
        "    location @crm_events_bad_client_cert {\n"
        "        default_type application/json;\n"
        '        return 403 \'{"error":"invalid_client_certificate","message":'
        '"the client certificate is not signed by a trusted CA, has expired or is revoked"}\';\n'
        "    }\n"
        "\n"
        "    # -- copied from the shared server block --\n" + "\n".join(body) + "\n}\n"
    )


def _upstream_tls_lines(tls: UpstreamTls) -> str:
    """http-level proxy_ssl_* directives: every server and location inherits them."""
    return (
        "    # nginx -> edge over mutual TLS: nginx shows its own client certificate and checks\n"
        "    # the edges' certificates.\n"
        f'    proxy_ssl_certificate "{tls.cert}";\n'
        f'    proxy_ssl_certificate_key "{tls.key}";\n'
        f'    proxy_ssl_trusted_certificate "{tls.trusted_ca}";\n'
        "    proxy_ssl_verify on;\n"
        "    proxy_ssl_verify_depth 2;\n"
        f"    proxy_ssl_name {tls.server_name};\n"
        "    proxy_ssl_server_name on;\n"
        "    proxy_ssl_protocols TLSv1.2 TLSv1.3;\n"
        "    proxy_ssl_session_reuse on;\n"
    )


def render(
    out_dir: Path,
    lb_port: int,
    edge_ports: Sequence[int],
    *,
    host: str = "127.0.0.1",
    worker_connections: int = DEFAULT_WORKER_CONNECTIONS,
    shared_conf: Path | None = None,
    tls_port: int | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    http2_directive: bool = False,
    mtls: MtlsListener | None = None,
    upstream_tls: UpstreamTls | None = None,
) -> Path:
    """Write the main config and both include files into ``out_dir``; return the main config.

    ``host`` is both the listen address and the edges' address. ``shared_conf`` defaults to
    :func:`shared_conf_path`. Pure apart from the files it writes: safe to call repeatedly and
    from several tests at once with different directories.

    ``tls_port`` (with ``tls_cert`` and ``tls_key``, PEM files) adds the HTTPS + HTTP/2
    listener. ``http2_directive`` selects nginx >= 1.25.1's ``http2 on;`` over the older
    ``listen ... ssl http2`` form (see :func:`http2_directive_supported`).

    ``mtls`` adds the mutual-TLS listener (its own server block, ``MTLS_CONF``);
    ``upstream_tls`` makes nginx reach the edges over mutual TLS (the shared file is then
    included as a rendered copy, ``SHARED_COPY``, that proxies to ``https://``).
    """
    out_dir = Path(out_dir).resolve()
    _check_port("lb_port", lb_port)
    if not edge_ports:
        raise ValueError("edge_ports: at least one edge is needed")
    for port in edge_ports:
        _check_port("edge_ports", port)
    if lb_port in edge_ports:
        raise ValueError(f"lb_port {lb_port} is also an edge port")
    conf = Path(shared_conf).resolve() if shared_conf is not None else shared_conf_path()
    if not conf.is_file():
        raise FileNotFoundError(f"shared nginx config not found: {conf}")
    tls: tuple[int, Path, Path] | None = None
    if tls_port is not None:
        _check_port("tls_port", tls_port)
        if tls_port == lb_port or tls_port in edge_ports:
            raise ValueError(f"tls_port {tls_port} is also the lb port or an edge port")
        if tls_cert is None or tls_key is None:
            raise ValueError("tls_port needs tls_cert and tls_key")
        cert, key = Path(tls_cert).resolve(), Path(tls_key).resolve()
        for what, path in (("tls_cert", cert), ("tls_key", key)):
            if not path.is_file():
                raise FileNotFoundError(f"{what} not found: {path}")
        tls = (tls_port, cert, key)
    elif tls_cert is not None or tls_key is not None:
        raise ValueError("tls_cert and tls_key need tls_port")
    for path in (out_dir, conf, *(tls[1:] if tls else ())):
        if '"' in str(path) or "\\" in str(path):
            raise ValueError(f"nginx cannot quote this path: {path}")
    if mtls is not None:
        _check_port("mtls.port", mtls.port)
        taken = {lb_port, *edge_ports, *([tls[0]] if tls else [])}
        if mtls.port in taken:
            raise ValueError(f"mtls.port {mtls.port} is also the lb, TLS or an edge port")
        if isinstance(mtls.verify_depth, bool) or not 1 <= mtls.verify_depth <= 10:
            raise ValueError(f"mtls.verify_depth: expected 1-10, got {mtls.verify_depth!r}")
        mtls = dataclasses.replace(
            mtls,
            cert=_checked_file("mtls.cert", mtls.cert),
            key=_checked_file("mtls.key", mtls.key),
            client_ca=_checked_file("mtls.client_ca", mtls.client_ca),
            crl=_checked_file("mtls.crl", mtls.crl) if mtls.crl is not None else None,
        )
    if upstream_tls is not None:
        if not re.fullmatch(r"[A-Za-z0-9.:-]+", upstream_tls.server_name):
            raise ValueError(
                f"upstream_tls.server_name: not a host name: {upstream_tls.server_name!r}"
            )
        upstream_tls = dataclasses.replace(
            upstream_tls,
            cert=_checked_file("upstream_tls.cert", upstream_tls.cert),
            key=_checked_file("upstream_tls.key", upstream_tls.key),
            trusted_ca=_checked_file("upstream_tls.trusted_ca", upstream_tls.trusted_ca),
        )
    shared_text = conf.read_text()
    included = conf
    if upstream_tls is not None:
        if _PLAIN_UPSTREAM not in shared_text:
            raise ValueError(f"shared nginx config: no '{_PLAIN_UPSTREAM}' to switch to https")
        shared_text = shared_text.replace(_PLAIN_UPSTREAM, _TLS_UPSTREAM)
        included = out_dir / SHARED_COPY
        write_text_atomically(
            included,
            f"# Generated by devtools/nginx_conf.py from {conf.name}: proxies over https.\n"
            + shared_text,
        )
    # The relative includes in an included file resolve against the main file's directory, so
    # the copy (in out_dir) and the original behave alike.
    includes = [f'    include "{included}";\n']
    if mtls is not None:
        mtls_path = out_dir / MTLS_CONF
        write_text_atomically(mtls_path, _mtls_server(host, mtls, _server_body(shared_text)))
        includes.append(f'    include "{mtls_path}";\n')

    temp = out_dir / "temp"
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (temp / sub).mkdir(parents=True, exist_ok=True)

    upstream = "".join(
        f"server {host}:{port} max_fails=1 fail_timeout=2s;\n" for port in edge_ports
    )
    write_text_atomically(
        out_dir / UPSTREAM_INC, "# Generated by devtools/nginx_conf.py.\n" + upstream
    )
    listen = f"# Generated by devtools/nginx_conf.py.\nlisten {host}:{lb_port};\n"
    if tls is not None:
        listen += _tls_listen(host, *tls, http2_directive=http2_directive)
    write_text_atomically(out_dir / LISTEN_INC, listen)
    # Each SSE client holds two connections (client side and upstream side).
    rlimit = 2 * worker_connections + 256
    main = f"""\
# Generated by devtools/nginx_conf.py; rewritten on every start.
daemon off;
worker_processes 1;
worker_rlimit_nofile {rlimit};
pid "{out_dir}/nginx.pid";
error_log "{out_dir}/error.log" warn;

events {{
    worker_connections {worker_connections};
}}

http {{
    access_log "{out_dir}/access.log";
    client_body_temp_path "{temp}/client_body";
    proxy_temp_path "{temp}/proxy";
    fastcgi_temp_path "{temp}/fastcgi";
    uwsgi_temp_path "{temp}/uwsgi";
    scgi_temp_path "{temp}/scgi";
{_upstream_tls_lines(upstream_tls) if upstream_tls is not None else ""}
{"".join(includes)}}}
"""
    main_path = out_dir / MAIN_CONF
    write_text_atomically(main_path, main)
    return main_path


def _tls_listen(host: str, port: int, cert: Path, key: Path, *, http2_directive: bool) -> str:
    """The HTTPS listener's lines, for the listen include (server context)."""
    if http2_directive:
        listen = f"listen {host}:{port} ssl;\nhttp2 on;\n"
    else:
        listen = f"listen {host}:{port} ssl http2;\n"
    return (
        "# HTTPS with HTTP/2 (ALPN h2; HTTP/1.1 for clients without it). Same locations as the\n"
        "# plain port, so SSE stays unbuffered here too.\n"
        + listen
        + f'ssl_certificate "{cert}";\n'
        + f'ssl_certificate_key "{key}";\n'
        + "ssl_protocols TLSv1.2 TLSv1.3;\n"
        + "ssl_session_cache shared:crm_events_tls:1m;\n"
        + "ssl_session_timeout 1h;\n"
    )


def nginx_version(nginx: str | None = None) -> tuple[int, ...] | None:
    """``nginx -v`` as a tuple, e.g. ``(1, 22, 1)``; None when it cannot be told."""
    try:
        proc = subprocess.run(
            [nginx or find_nginx(), "-v"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"nginx/(\d+(?:\.\d+)*)", proc.stderr + proc.stdout)
    return tuple(int(p) for p in found.group(1).split(".")) if found else None


def http2_directive_supported(nginx: str | None = None) -> bool:
    """True when this nginx wants ``http2 on;`` (1.25.1 and later; the ``http2`` parameter
    of ``listen`` still works there, with a deprecation warning on every start)."""
    version = nginx_version(nginx)
    return version is not None and version >= HTTP2_DIRECTIVE_SINCE


class TlsError(RuntimeError):
    """The self-signed certificate could not be made; the message says why."""


def _cert_valid(openssl: str, cert: Path, min_days: int = 7) -> bool:
    proc = subprocess.run(
        [openssl, "x509", "-noout", "-checkend", str(min_days * 86400), "-in", str(cert)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return proc.returncode == 0


def ensure_self_signed_cert(
    tls_dir: Path,
    *,
    names: Sequence[str] = SELF_SIGNED_NAMES,
    days: int = SELF_SIGNED_DAYS,
    openssl: str | None = None,
) -> tuple[Path, Path]:
    """``(cert, key)`` in ``tls_dir``: kept when both exist and the certificate is valid for
    another week, otherwise made with ``openssl`` (ECDSA P-256, self-signed, SANs for
    ``names``). Browsers warn about it until it is trusted; test browsers ignore the warning.
    A certificate that an operator put there (any issuer) is used as it is.
    """
    tls_dir = Path(tls_dir)
    cert, key = tls_dir / TLS_CERT, tls_dir / TLS_KEY
    binary = openssl or shutil.which("openssl")
    if binary is None:
        if cert.is_file() and key.is_file():
            return cert, key
        raise TlsError("openssl not found; run scripts/install.sh (package openssl)")
    if cert.is_file() and key.is_file() and _cert_valid(binary, cert):
        return cert, key
    tls_dir.mkdir(parents=True, exist_ok=True)
    san = ",".join(
        f"IP:{n}" if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]*:[0-9a-fA-F:]*", n) else f"DNS:{n}"
        for n in names
    )
    tmp_cert = tls_dir / f".{TLS_CERT}.{os.getpid()}.tmp"
    tmp_key = tls_dir / f".{TLS_KEY}.{os.getpid()}.tmp"
    argv = [
        binary,
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        str(days),
        "-subj",
        f"/O=crm-events local stack/CN={names[0]}",
        "-addext",
        f"subjectAltName={san}",
        "-addext",
        "extendedKeyUsage=serverAuth",
        "-keyout",
        str(tmp_key),
        "-out",
        str(tmp_cert),
    ]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise TlsError(f"openssl req failed ({proc.returncode}): {last}")
        tmp_key.chmod(0o600)
        tmp_key.replace(key)
        tmp_cert.replace(cert)
    except (OSError, subprocess.SubprocessError) as exc:
        raise TlsError(f"cannot make a certificate in {tls_dir}: {exc}") from exc
    finally:
        for tmp in (tmp_cert, tmp_key):
            tmp.unlink(missing_ok=True)
    return cert, key


def find_nginx() -> str:
    found = shutil.which("nginx")
    if found is None:
        for d in _SBIN_DIRS:
            if (Path(d) / "nginx").is_file():
                return str(Path(d) / "nginx")
        raise FileNotFoundError("nginx not found; run scripts/install.sh")
    return found


def nginx_argv(main_conf: Path, *, nginx: str | None = None, test_only: bool = False) -> list[str]:
    """argv to run nginx in the foreground on a config written by :func:`render`.

    ``-e stderr`` keeps nginx's messages from before it read the config (it would otherwise
    open the compiled-in error log under /var) on its stderr, i.e. in the supervisor's log.
    """
    main_conf = Path(main_conf).resolve()
    argv = [
        nginx or find_nginx(),
        "-p",
        str(main_conf.parent),
        "-c",
        str(main_conf),
        "-e",
        "stderr",
    ]
    if test_only:
        argv.append("-t")
    return argv


def _ports(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ports, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.nginx_conf",
        description="Render the crm-events nginx config into a directory.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--lb-port", type=int, default=9010)
    parser.add_argument("--edge-ports", type=_ports, default=[9011, 9012])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tls-port", type=int, default=None, help="add HTTPS + HTTP/2 here")
    parser.add_argument(
        "--tls-dir",
        type=Path,
        default=None,
        help="holds cert.pem and key.pem, made self-signed when missing (default OUT_DIR/tls)",
    )
    args = parser.parse_args(argv)
    try:
        cert = key = None
        if args.tls_port is not None:
            cert, key = ensure_self_signed_cert(args.tls_dir or args.out_dir / "tls")
        path = render(
            args.out_dir,
            args.lb_port,
            args.edge_ports,
            host=args.host,
            tls_port=args.tls_port,
            tls_cert=cert,
            tls_key=key,
            http2_directive=args.tls_port is not None and http2_directive_supported(),
        )
    except (ValueError, OSError, TlsError) as exc:
        print(f"nginx_conf: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    print("run: " + shlex.join(nginx_argv(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
