"""Render the crm-events HAProxy configuration, the second supported load balancer.

``render(out_dir, lb_port, edge_ports)`` writes ``out_dir/haproxy.cfg`` from the checkout's
``deploy/haproxy/crm-events.cfg.template``: the listen address, one server per edge and the
limits are filled in, everything else (timeouts, health checks, no-delay, leastconn,
X-Forwarded-For) is the template's. HAProxy runs in the foreground with no pidfile, socket or
file of its own, so two instances (a developer stack and a test) never share anything but
the edges they point at.

``mtls=MtlsBind(...)`` adds a listener that requires a client certificate (``verify
required`` with a CA file and a CRL: refused at the TLS handshake otherwise); the template
relays the verified certificate to the edges in ``X-Client-Cert`` (base64 DER) and drops that
header on every other request, so that no client can forge it through HAProxy.

Run it with :func:`haproxy_argv`; :func:`haproxy_argv` with ``check_only=True`` asks HAProxy
to validate the file (``haproxy -c``). CLI::

    python -m devtools.haproxy_conf OUT_DIR --lb-port 9010 --edge-ports 9011,9012 [--check]
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import string
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from devtools.atomic import write_text_atomically

__all__ = [
    "DEFAULT_MAXCONN",
    "DEFAULT_STREAM_TIMEOUT_S",
    "HEALTH_PATH",
    "MAIN_CONF",
    "CheckResult",
    "MtlsBind",
    "check",
    "find_haproxy",
    "haproxy_argv",
    "render",
    "template_path",
]

MAIN_CONF = "haproxy.cfg"
HEALTH_PATH = "/haproxy-health"
"""Answered by HAProxy itself (``monitor-uri``): the load balancer is up."""
DEFAULT_MAXCONN = 8192
DEFAULT_STREAM_TIMEOUT_S = 45
"""Three of the edges' default 15 s keepalive intervals, as nginx's ``proxy_read_timeout``."""
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def template_path() -> Path:
    """deploy/haproxy/crm-events.cfg.template of this checkout."""
    return Path(__file__).resolve().parent.parent / "deploy" / "haproxy" / "crm-events.cfg.template"


@dataclasses.dataclass(frozen=True)
class MtlsBind:
    """A listener that requires a client certificate signed by ``client_ca``."""

    port: int
    pem: Path
    """The listener's private key and certificate (chain) in one PEM file, as ``crt`` wants."""
    client_ca: Path
    crl: Path | None = None
    """PEM CRL of that CA: a revoked certificate is refused. Read at start and on reload."""


def _checked_file(what: str, path: Path) -> Path:
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"{what} not found: {resolved}")
    if any(c.isspace() or c in "\"'#\\" for c in str(resolved)):
        raise ValueError(f"{what}: HAProxy cannot take this path unquoted: {resolved}")
    return resolved


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
    maxconn: int = DEFAULT_MAXCONN,
    stream_timeout_s: int = DEFAULT_STREAM_TIMEOUT_S,
    http_no_delay: bool = True,
    template: Path | None = None,
    mtls: MtlsBind | None = None,
) -> Path:
    """Write ``out_dir/haproxy.cfg``; return its path.

    ``host`` is both the listen address and the edges' address. ``stream_timeout_s`` must
    exceed the edges' keepalive interval (``CRM_EVENTS_SSE_PING_INTERVAL_S``) or idle streams
    are cut. ``http_no_delay=False`` exists only to measure what the option saves: without it
    HAProxy delays lone events by up to 200 ms. ``mtls`` adds the mutual-TLS listener.
    Pure apart from the file it writes.
    """
    _check_port("lb_port", lb_port)
    if not edge_ports:
        raise ValueError("edge_ports: at least one edge is needed")
    for port in edge_ports:
        _check_port("edge_ports", port)
    if lb_port in edge_ports:
        raise ValueError(f"lb_port {lb_port} is also an edge port")
    if isinstance(maxconn, bool) or not isinstance(maxconn, int) or maxconn < 1:
        raise ValueError(f"maxconn: expected a positive integer, got {maxconn!r}")
    if (
        isinstance(stream_timeout_s, bool)
        or not isinstance(stream_timeout_s, int)
        or stream_timeout_s < 1
    ):
        raise ValueError(f"stream_timeout_s: expected whole seconds >= 1, got {stream_timeout_s!r}")
    if not host or any(c.isspace() or c in "\"'#\\" for c in host):
        raise ValueError(f"host: not an address HAProxy can take unquoted: {host!r}")
    source = Path(template).resolve() if template is not None else template_path()
    if not source.is_file():
        raise FileNotFoundError(f"HAProxy template not found: {source}")
    # IPv6 literals need brackets before the port.
    addr = f"[{host}]" if ":" in host else host
    binds = [f"    bind {addr}:{lb_port}"]
    if mtls is not None:
        _check_port("mtls.port", mtls.port)
        if mtls.port == lb_port or mtls.port in edge_ports:
            raise ValueError(f"mtls.port {mtls.port} is also the lb port or an edge port")
        pem = _checked_file("mtls.pem", mtls.pem)
        ca = _checked_file("mtls.client_ca", mtls.client_ca)
        crl = f" crl-file {_checked_file('mtls.crl', mtls.crl)}" if mtls.crl is not None else ""
        binds.append(
            f"    bind {addr}:{mtls.port} ssl crt {pem} ssl-min-ver TLSv1.2 alpn http/1.1"
            f" ca-file {ca}{crl} verify required"
        )
    values = {
        "bind_lines": "\n".join(binds),
        "server_lines": "\n".join(
            f"    server edge{i} {addr}:{port}" for i, port in enumerate(edge_ports, start=1)
        ),
        "maxconn": str(maxconn),
        "stream_timeout": f"{stream_timeout_s}s",
        "no_delay": (
            "option http-no-delay"
            if http_no_delay
            else "# option http-no-delay: left out on purpose, to measure the delay"
        ),
    }
    text = string.Template(source.read_text()).substitute(values)
    out_dir = Path(out_dir).resolve()
    path = out_dir / MAIN_CONF
    write_text_atomically(
        path, "# Generated by devtools/haproxy_conf.py; rewritten on every start.\n" + text
    )
    return path


def find_haproxy() -> str:
    found = shutil.which("haproxy")
    if found is not None:
        return found
    # Debian puts it in /usr/sbin, which a non-root PATH may lack.
    for d in _SBIN_DIRS:
        if (Path(d) / "haproxy").is_file():
            return str(Path(d) / "haproxy")
    raise FileNotFoundError("haproxy not found; run scripts/install.sh (Debian package haproxy)")


def haproxy_argv(conf: Path, *, haproxy: str | None = None, check_only: bool = False) -> list[str]:
    """argv to run HAProxy in the foreground (``-db``: no daemon, log to stdout) on a config
    written by :func:`render`, or to validate it (``-c``)."""
    argv = [haproxy or find_haproxy(), "-f", str(Path(conf).resolve())]
    argv.append("-c" if check_only else "-db")
    return argv


class CheckResult:
    """``haproxy -c``: ``ok`` and HAProxy's own words (warnings count as failures)."""

    def __init__(self, returncode: int, output: str) -> None:
        self.returncode = returncode
        self.output = output

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and "[WARNING]" not in self.output

    def __repr__(self) -> str:
        return f"CheckResult(returncode={self.returncode}, output={self.output!r})"


def check(conf: Path, *, haproxy: str | None = None) -> CheckResult:
    """Validate a rendered config with HAProxy itself."""
    proc = subprocess.run(
        haproxy_argv(conf, haproxy=haproxy, check_only=True),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return CheckResult(proc.returncode, proc.stdout + proc.stderr)


def _ports(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ports, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.haproxy_conf",
        description="Render the crm-events HAProxy config into a directory.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--lb-port", type=int, default=9010)
    parser.add_argument("--edge-ports", type=_ports, default=[9011, 9012])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--maxconn", type=int, default=DEFAULT_MAXCONN)
    parser.add_argument(
        "--stream-timeout",
        type=int,
        default=DEFAULT_STREAM_TIMEOUT_S,
        help="idle limit of a stream, seconds (longer than the edges' keepalive interval)",
    )
    parser.add_argument("--check", action="store_true", help="validate it with haproxy -c")
    args = parser.parse_args(argv)
    try:
        path = render(
            args.out_dir,
            args.lb_port,
            args.edge_ports,
            host=args.host,
            maxconn=args.maxconn,
            stream_timeout_s=args.stream_timeout,
        )
        if args.check:
            result = check(path)
            if not result.ok:
                print(f"haproxy_conf: haproxy -c failed:\n{result.output}", file=sys.stderr)
                return 1
    except (ValueError, OSError, subprocess.SubprocessError) as exc:
        print(f"haproxy_conf: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    print("run: " + shlex.join(haproxy_argv(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
