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

Run it with :func:`nginx_argv`. CLI::

    python -m devtools.nginx_conf OUT_DIR --lb-port 9010 --edge-ports 9011,9012 \\
        [--tls-port 9443 --tls-dir OUT_DIR/tls]
"""

from __future__ import annotations

import argparse
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
    "LISTEN_INC",
    "MAIN_CONF",
    "TLS_CERT",
    "TLS_KEY",
    "UPSTREAM_INC",
    "TlsError",
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
) -> Path:
    """Write the main config and both include files into ``out_dir``; return the main config.

    ``host`` is both the listen address and the edges' address. ``shared_conf`` defaults to
    :func:`shared_conf_path`. Pure apart from the files it writes: safe to call repeatedly and
    from several tests at once with different directories.

    ``tls_port`` (with ``tls_cert`` and ``tls_key``, PEM files) adds the HTTPS + HTTP/2
    listener. ``http2_directive`` selects nginx >= 1.25.1's ``http2 on;`` over the older
    ``listen ... ssl http2`` form (see :func:`http2_directive_supported`).
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

    include "{conf}";
}}
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
