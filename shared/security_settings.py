"""Settings for who may connect and how much (edge), and for secure backends (both).

Read from the same ``CRM_EVENTS_*`` mapping as the rest of the settings; a wrong value
raises ``SettingsError`` naming the variable. Secrets are read from files (``*_FILE``) so
that they never sit in the environment or in ``repr``.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import SettingsError
from .settings_env import ENV_PREFIX, Env

AUTH_MODES = ("jwt", "off", "cert", "jwt-or-cert", "jwt-and-cert")
TOKEN_MODES = frozenset({"jwt", "jwt-or-cert", "jwt-and-cert"})
"""Modes in which the edge verifies JWTs."""
CERT_MODES = frozenset({"cert", "jwt-or-cert", "jwt-and-cert"})
"""Modes in which the edge reads the client certificate a trusted proxy relays."""
KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

DEFAULT_AUTH_COOKIE = "crm_events_token"
DEFAULT_TYPES_CLAIM = "crm_types"
DEFAULT_MATCH_CLAIM = "crm_match"
DEFAULT_JWT_LEEWAY_S = 30
DEFAULT_JWKS_REFRESH_S = 300.0
DEFAULT_JWKS_MIN_REFETCH_S = 10.0
DEFAULT_JWKS_GRACE_S = 3600.0
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_MAX_CONNECTIONS_PER_IP = 200
DEFAULT_HISTORY_RATE_PER_S = 20.0
DEFAULT_HISTORY_BURST = 40
DEFAULT_MAX_TYPES = 64
DEFAULT_MAX_REQUEST_LINE_BYTES = 4096
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_TRUSTED_PROXIES = ("127.0.0.1", "::1")
DEFAULT_BREAKER_FAILURES = 3
DEFAULT_BREAKER_RESET_S = 1.0
DEFAULT_CLIENT_CERT_HEADER = "X-Client-Cert"

_CLAIM_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}")
_COOKIE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ORIGIN_RE = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+")
_HEADER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
# Headers that carry something else the edge reads: a certificate there would be confused with it.
_RESERVED_HEADERS = frozenset({"authorization", "cookie", "host", "x-forwarded-for"})


def _read_secret(env: Env, name: str) -> str | None:
    """The content of the file named by ``CRM_EVENTS_<name>``, stripped; None if unset."""
    path = env.raw(name)
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(ENV_PREFIX + name, f"cannot read {path}: {exc.strerror}") from None
    if not text:
        raise SettingsError(ENV_PREFIX + name, f"{path} is empty")
    return text


def _existing_file(env: Env, name: str) -> str | None:
    path = env.raw(name)
    if path is not None and not Path(path).is_file():
        raise SettingsError(ENV_PREFIX + name, f"no such file: {path}")
    return path


def _http_url(env: Env, name: str) -> str | None:
    """An absolute http(s) URL with a host, or None when unset."""
    value = env.raw(name)
    if value is None:
        return None
    try:
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.fragment
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        ok = False
    if not ok:
        raise SettingsError(
            ENV_PREFIX + name, f"expected an http:// or https:// URL with a host, got {value!r}"
        )
    return value


def _flag(env: Env, name: str, default: bool) -> bool:
    value = env.raw(name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(ENV_PREFIX + name, f"expected true or false, got {value!r}")


@dataclass(frozen=True, slots=True)
class AuthSettings:
    mode: str = "off"
    """``jwt`` (the default when read from the environment) or ``off``."""
    secret: str | None = field(default=None, repr=False)
    """HS256 shared secret (from ``CRM_EVENTS_JWT_SECRET_FILE``)."""
    public_key_pem: str | None = field(default=None, repr=False)
    """RS256/ES256 public key (from ``CRM_EVENTS_JWT_PUBLIC_KEY_FILE``)."""
    jwks_file: str | None = None
    """RS256/ES256 keys as a JWKS document; tokens pick theirs by ``kid``."""
    jwks_url: str | None = None
    """The identity provider's JWKS document, fetched and refreshed over HTTP (edge/jwks.py)."""
    oidc_issuer: str | None = None
    """An OpenID Connect issuer: its discovery document names the JWKS URL (edge/oidc.py);
    tokens must carry it as ``iss``."""
    jwks_refresh_s: float = DEFAULT_JWKS_REFRESH_S
    """Age after which the fetched keys are refreshed in the background."""
    jwks_min_refetch_s: float = DEFAULT_JWKS_MIN_REFETCH_S
    """Shortest time between two fetches caused by tokens with an unknown ``kid``."""
    jwks_grace_s: float = DEFAULT_JWKS_GRACE_S
    """How long a key the provider stopped publishing still verifies tokens."""
    audience: str | None = None
    issuer: str | None = None
    leeway_s: int = DEFAULT_JWT_LEEWAY_S
    cookie: str = DEFAULT_AUTH_COOKIE
    query_token: bool = False
    """Accept ``?access_token=`` (URLs end up in logs and histories: off by default)."""
    types_claim: str = DEFAULT_TYPES_CLAIM
    match_claim: str = DEFAULT_MATCH_CLAIM
    cert_header: str = DEFAULT_CLIENT_CERT_HEADER
    """The header in which a trusted proxy relays the client certificate it verified."""
    cert_grants_file: str | None = None
    """JSON rules: what each client certificate (by subject or SAN) may see
    (edge/client_cert.py)."""
    cert_trusted_proxies: frozenset[str] = frozenset(DEFAULT_TRUSTED_PROXIES)
    """Peers whose relayed client certificate header is believed: a list of its own, apart
    from ``LimitSettings.trusted_proxies`` (X-Forwarded-For), since a peer here may assert
    any client identity."""

    def __post_init__(self) -> None:
        # from_env refuses these with the variable's name; this holds for every other maker.
        if self.mode not in AUTH_MODES:
            raise ValueError(f"unknown authentication mode {self.mode!r}")
        if self.certs and self.cert_grants_file is None:
            raise ValueError(f"mode {self.mode} needs a client certificate grants file")
        if self.remote_keys and self.audience is None:
            raise ValueError("keys from an identity provider need an audience")
        if self.remote_keys and self.jwks_url is not None and self.issuer is None:
            raise ValueError("keys from a JWKS URL need an issuer")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def check_cert_proxies(self, mutual_tls: bool) -> None:
        """Refuse (``SettingsError`` naming CRM_EVENTS_CLIENT_CERT_TRUSTED_PROXIES) a
        certificate mode trusting a whole network for the header, unless the edge's port
        requires the proxy's own certificate (``mutual_tls``): otherwise every host of that
        network could speak as any client by sending the header itself."""
        if not self.certs or mutual_tls:
            return
        wide = sorted(
            net
            for net in self.cert_trusted_proxies
            if ipaddress.ip_network(net, strict=False).num_addresses > 1
        )
        if wide:
            raise SettingsError(
                ENV_PREFIX + "CLIENT_CERT_TRUSTED_PROXIES",
                f"{wide[0]!r} is a network, not one address: with CRM_EVENTS_AUTH_MODE="
                f"{self.mode} any host in it could send the client certificate header and be "
                "taken for any client. List the load balancers' own addresses, or set "
                "CRM_EVENTS_EDGE_TLS_CLIENT_CA_FILE so that only a peer holding that CA's "
                "certificate (the load balancer) can connect",
            )

    @property
    def tokens(self) -> bool:
        """Whether JWTs are verified (``jwt``, ``jwt-or-cert``, ``jwt-and-cert``)."""
        return self.mode in TOKEN_MODES

    @property
    def certs(self) -> bool:
        """Whether relayed client certificates are read (``cert``, ``jwt-or-cert``,
        ``jwt-and-cert``)."""
        return self.mode in CERT_MODES

    @property
    def remote_keys(self) -> bool:
        """Whether the keys come from the network (a JWKS URL or an OIDC issuer) and are
        used: without tokens nothing is fetched, and readiness waits for no keys."""
        return self.tokens and (self.jwks_url is not None or self.oidc_issuer is not None)

    @property
    def algorithms(self) -> list[str]:
        # Never offer HMAC when the key is public: that is the algorithm-confusion attack.
        return ["HS256"] if self.secret is not None else ["RS256", "ES256"]

    @classmethod
    def from_env(cls, env: Env) -> AuthSettings:
        mode = env.string("AUTH_MODE", "jwt").lower()
        if mode not in AUTH_MODES:
            raise SettingsError(
                ENV_PREFIX + "AUTH_MODE", "expected jwt, off, cert, jwt-or-cert or jwt-and-cert"
            )
        secret = _read_secret(env, "JWT_SECRET_FILE")
        public_key = _read_secret(env, "JWT_PUBLIC_KEY_FILE")
        jwks = _existing_file(env, "JWT_JWKS_FILE")
        jwks_url = _http_url(env, "AUTH_JWKS_URL")
        oidc_issuer = _http_url(env, "AUTH_OIDC_ISSUER")
        issuer = env.raw("JWT_ISSUER")
        if mode in TOKEN_MODES:
            given = [
                name
                for name, value in (
                    ("JWT_SECRET_FILE", secret),
                    ("JWT_PUBLIC_KEY_FILE", public_key),
                    ("JWT_JWKS_FILE", jwks),
                    ("AUTH_JWKS_URL", jwks_url),
                    ("AUTH_OIDC_ISSUER", oidc_issuer),
                )
                if value is not None
            ]
            if not given:
                raise SettingsError(
                    ENV_PREFIX + "AUTH_MODE",
                    f"{'jwt (the default)' if mode == 'jwt' else mode} needs "
                    "CRM_EVENTS_JWT_SECRET_FILE, "
                    "CRM_EVENTS_JWT_PUBLIC_KEY_FILE, CRM_EVENTS_JWT_JWKS_FILE, "
                    "CRM_EVENTS_AUTH_JWKS_URL or CRM_EVENTS_AUTH_OIDC_ISSUER; "
                    "set CRM_EVENTS_AUTH_MODE=off to serve without authentication",
                )
            if len(given) > 1:
                raise SettingsError(
                    ENV_PREFIX + given[1],
                    f"give only one source of JWT keys ({ENV_PREFIX + given[0]} is set too)",
                )
            if secret is not None and len(secret.encode()) < 32:
                raise SettingsError(
                    ENV_PREFIX + "JWT_SECRET_FILE", "an HS256 secret needs at least 32 bytes"
                )
        if oidc_issuer is not None:
            # The discovered provider is the issuer: its tokens must say so.
            if issuer is not None and issuer != oidc_issuer:
                raise SettingsError(
                    ENV_PREFIX + "JWT_ISSUER",
                    f"differs from CRM_EVENTS_AUTH_OIDC_ISSUER ({oidc_issuer!r}); "
                    "leave it unset or give the same URL",
                )
            issuer = oidc_issuer
        audience = env.raw("JWT_AUDIENCE")
        if mode in TOKEN_MODES and (jwks_url is not None or oidc_issuer is not None):
            # A provider signs the tokens of every application (and, for Entra ID's common
            # keys, of every tenant) with the same keys: only iss and aud say the token is
            # meant for this deployment. Neither check can be left out.
            if jwks_url is not None and issuer is None:
                raise SettingsError(
                    ENV_PREFIX + "JWT_ISSUER",
                    "is required with CRM_EVENTS_AUTH_JWKS_URL: the provider's keys also "
                    "sign other issuers' (tenants') tokens; give the issuer its tokens carry "
                    "as 'iss'",
                )
            if audience is None:
                source = "AUTH_JWKS_URL" if jwks_url is not None else "AUTH_OIDC_ISSUER"
                raise SettingsError(
                    ENV_PREFIX + "JWT_AUDIENCE",
                    f"is required with {ENV_PREFIX + source}: the provider's keys also sign "
                    "tokens for other applications; give the audience (client id or API "
                    "identifier) this deployment's tokens carry as 'aud'",
                )
        refresh_s = env.number("AUTH_JWKS_REFRESH_S", DEFAULT_JWKS_REFRESH_S, 1.0, 86_400.0)
        min_refetch_s = env.number(
            "AUTH_JWKS_MIN_REFETCH_S", DEFAULT_JWKS_MIN_REFETCH_S, 0.1, 3600.0
        )
        if min_refetch_s > refresh_s:
            raise SettingsError(
                ENV_PREFIX + "AUTH_JWKS_MIN_REFETCH_S",
                f"{min_refetch_s} is longer than CRM_EVENTS_AUTH_JWKS_REFRESH_S ({refresh_s})",
            )
        return cls(
            mode=mode,
            secret=secret,
            public_key_pem=public_key,
            jwks_file=jwks,
            jwks_url=jwks_url,
            oidc_issuer=oidc_issuer,
            jwks_refresh_s=refresh_s,
            jwks_min_refetch_s=min_refetch_s,
            jwks_grace_s=env.number("AUTH_JWKS_GRACE_S", DEFAULT_JWKS_GRACE_S, 0.0, 604_800.0),
            audience=audience,
            issuer=issuer,
            leeway_s=env.integer("JWT_LEEWAY_S", DEFAULT_JWT_LEEWAY_S, 0, 600),
            cookie=env.string("AUTH_COOKIE", DEFAULT_AUTH_COOKIE, _COOKIE_RE),
            query_token=_flag(env, "AUTH_QUERY_TOKEN", False),
            types_claim=env.string("JWT_TYPES_CLAIM", DEFAULT_TYPES_CLAIM, _CLAIM_RE),
            match_claim=env.string("JWT_MATCH_CLAIM", DEFAULT_MATCH_CLAIM, _CLAIM_RE),
            cert_header=_cert_header(env),
            cert_grants_file=_cert_grants_file(env, mode),
            cert_trusted_proxies=frozenset(
                _networks(
                    "CLIENT_CERT_TRUSTED_PROXIES",
                    env.names("CLIENT_CERT_TRUSTED_PROXIES", DEFAULT_TRUSTED_PROXIES, _NETWORK_RE),
                )
            ),
        )


def _cert_header(env: Env) -> str:
    name = env.string("CLIENT_CERT_HEADER", DEFAULT_CLIENT_CERT_HEADER, _HEADER_NAME_RE)
    if name.lower() in _RESERVED_HEADERS:
        raise SettingsError(
            ENV_PREFIX + "CLIENT_CERT_HEADER", f"{name} carries something else; choose another"
        )
    return name


def _cert_grants_file(env: Env, mode: str) -> str | None:
    # Read only where certificates are: a leftover setting on a jwt edge stops nothing.
    # The file's rules are checked when the edge builds its app (edge/client_cert.py).
    if mode not in CERT_MODES:
        return None
    path = _existing_file(env, "CLIENT_CERT_GRANTS_FILE")
    if path is None:
        raise SettingsError(
            ENV_PREFIX + "CLIENT_CERT_GRANTS_FILE",
            f"is required with CRM_EVENTS_AUTH_MODE={mode}: a JSON file of rules saying "
            "what each client certificate (by subject or SAN) may see",
        )
    return path


_NETWORK_RE = re.compile(r"[0-9a-fA-F.:/]+")


def _networks(name: str, items: tuple[str, ...]) -> tuple[str, ...]:
    """``items`` (of ``CRM_EVENTS_<name>``), each an address or a CIDR network."""
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise SettingsError(
                ENV_PREFIX + name, f"{item!r} is not an address or network"
            ) from None
    return items


@dataclass(frozen=True, slots=True)
class LimitSettings:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    """SSE streams one edge serves; past it, 503 with Retry-After."""
    max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP
    """SSE streams per client address on one edge; past it, 429."""
    history_rate_per_s: float = DEFAULT_HISTORY_RATE_PER_S
    """History requests per second per client address (token bucket); past it, 429."""
    history_burst: int = DEFAULT_HISTORY_BURST
    max_types: int = DEFAULT_MAX_TYPES
    """Most event types one ``types=`` may list."""
    max_request_line_bytes: int = DEFAULT_MAX_REQUEST_LINE_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    """Total size of the request headers; past it, 431."""
    trusted_proxies: frozenset[str] = frozenset(DEFAULT_TRUSTED_PROXIES)
    """Peers whose X-Forwarded-For names the client (the load balancer)."""
    cors_origins: frozenset[str] = frozenset()
    """Origins allowed to call the API from a browser (empty: no CORS)."""

    @classmethod
    def from_env(cls, env: Env) -> LimitSettings:
        proxies = _networks(
            "TRUSTED_PROXIES", env.names("TRUSTED_PROXIES", DEFAULT_TRUSTED_PROXIES, _NETWORK_RE)
        )
        origins = env.raw("CORS_ORIGINS")
        allowed: frozenset[str] = frozenset()
        if origins is not None:
            items = [o.strip().rstrip("/") for o in origins.split(",") if o.strip()]
            bad = [o for o in items if not _ORIGIN_RE.fullmatch(o)]
            if bad:
                raise SettingsError(
                    ENV_PREFIX + "CORS_ORIGINS",
                    f"expected scheme://host[:port] origins, got {bad[0]!r}",
                )
            allowed = frozenset(items)
        return cls(
            max_connections=env.integer("MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, 1, 1_000_000),
            max_connections_per_ip=env.integer(
                "MAX_CONNECTIONS_PER_IP", DEFAULT_MAX_CONNECTIONS_PER_IP, 1, 1_000_000
            ),
            history_rate_per_s=env.number(
                "HISTORY_RATE_PER_S", DEFAULT_HISTORY_RATE_PER_S, 0.01, 1_000_000.0
            ),
            history_burst=env.integer("HISTORY_BURST", DEFAULT_HISTORY_BURST, 1, 1_000_000),
            max_types=env.integer("MAX_TYPES", DEFAULT_MAX_TYPES, 1, 1024),
            max_request_line_bytes=env.integer(
                "MAX_REQUEST_LINE_BYTES", DEFAULT_MAX_REQUEST_LINE_BYTES, 256, 65_536
            ),
            max_header_bytes=env.integer(
                "MAX_HEADER_BYTES", DEFAULT_MAX_HEADER_BYTES, 1024, 1 << 20
            ),
            trusted_proxies=frozenset(proxies),
            cors_origins=allowed,
        )


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failures: int = DEFAULT_BREAKER_FAILURES
    """Consecutive failures that open a backend's circuit."""
    reset_s: float = DEFAULT_BREAKER_RESET_S
    """First open period before a half-open probe; doubles (with jitter) while probes fail."""

    @classmethod
    def from_env(cls, env: Env) -> BreakerSettings:
        return cls(
            failures=env.integer("BREAKER_FAILURES", DEFAULT_BREAKER_FAILURES, 1, 1000),
            reset_s=env.number("BREAKER_RESET_S", DEFAULT_BREAKER_RESET_S, 0.01, 600.0),
        )


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def from_env(cls, env: Env) -> KafkaSecurity:
        protocol = env.string("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper()
        if protocol not in KAFKA_PROTOCOLS:
            raise SettingsError(
                ENV_PREFIX + "KAFKA_SECURITY_PROTOCOL",
                f"expected one of {', '.join(KAFKA_PROTOCOLS)}",
            )
        mechanism = env.raw("KAFKA_SASL_MECHANISM")
        username = env.raw("KAFKA_SASL_USERNAME")
        password = _read_secret(env, "KAFKA_SASL_PASSWORD_FILE")
        if protocol.startswith("SASL_"):
            mechanism = (mechanism or "PLAIN").upper()
            if mechanism not in SASL_MECHANISMS:
                raise SettingsError(
                    ENV_PREFIX + "KAFKA_SASL_MECHANISM",
                    f"expected one of {', '.join(SASL_MECHANISMS)}",
                )
            if username is None or password is None:
                raise SettingsError(
                    ENV_PREFIX + "KAFKA_SASL_USERNAME",
                    f"{protocol} needs CRM_EVENTS_KAFKA_SASL_USERNAME and "
                    "CRM_EVENTS_KAFKA_SASL_PASSWORD_FILE",
                )
        return cls(
            protocol=protocol,
            sasl_mechanism=mechanism if protocol.startswith("SASL_") else None,
            sasl_username=username,
            sasl_password=password,
            ca_file=_existing_file(env, "KAFKA_SSL_CA_FILE"),
            cert_file=_existing_file(env, "KAFKA_SSL_CERT_FILE"),
            key_file=_existing_file(env, "KAFKA_SSL_KEY_FILE"),
        )


@dataclass(frozen=True, slots=True)
class RedisTls:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    password: str | None = field(default=None, repr=False)
    """From ``CRM_EVENTS_REDIS_PASSWORD_FILE``; overrides a password in the URL."""
    sentinel_username: str | None = None
    """ACL user on the Sentinels (``CRM_EVENTS_REDIS_SENTINEL_USERNAME``)."""
    sentinel_password: str | None = field(default=None, repr=False)
    """Password of the Sentinels themselves (``CRM_EVENTS_REDIS_SENTINEL_PASSWORD_FILE``):
    Sentinels have their own ``requirepass``/ACL, separate from the Redis servers'."""

    @classmethod
    def from_env(cls, env: Env) -> RedisTls:
        return cls(
            ca_file=_existing_file(env, "REDIS_TLS_CA_FILE"),
            cert_file=_existing_file(env, "REDIS_TLS_CERT_FILE"),
            key_file=_existing_file(env, "REDIS_TLS_KEY_FILE"),
            password=_read_secret(env, "REDIS_PASSWORD_FILE"),
            sentinel_username=env.raw("REDIS_SENTINEL_USERNAME"),
            sentinel_password=_read_secret(env, "REDIS_SENTINEL_PASSWORD_FILE"),
        )


@dataclass(frozen=True, slots=True)
class EdgeTls:
    """HTTPS on the edge's own port, for the link from the load balancer; with a client CA,
    mutual TLS: only a peer holding a certificate that CA signed (the proxy) can connect.
    Off (plain HTTP) unless a certificate is given."""

    cert_file: str | None = None
    key_file: str | None = None
    """May be left unset when ``cert_file`` holds the key too."""
    client_ca_file: str | None = None
    context: ssl.SSLContext | None = field(default=None, init=False, repr=False, compare=False)
    """Built once, here, so that a file that does not load stops the edge at start, naming
    its setting, before the port is bound; the server uses this very context."""

    def __post_init__(self) -> None:
        if self.cert_file is None:
            if self.key_file is not None or self.client_ca_file is not None:
                given = (
                    "CRM_EVENTS_EDGE_TLS_KEY_FILE"
                    if self.key_file is not None
                    else "CRM_EVENTS_EDGE_TLS_CLIENT_CA_FILE"
                )
                raise SettingsError(
                    ENV_PREFIX + "EDGE_TLS_CERT_FILE",
                    f"is required with {given}: the edge serves TLS only with a certificate "
                    "of its own",
                )
            return
        object.__setattr__(self, "context", self._server_context(self.cert_file))

    @property
    def enabled(self) -> bool:
        return self.context is not None

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def _server_context(self, cert_file: str) -> ssl.SSLContext:
        # Not create_default_context(CLIENT_AUTH): that also trusts the system's CAs for
        # client certificates, and any certificate a public CA issued would then connect.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if "-----BEGIN CERTIFICATE-----" not in _pem_text(cert_file, "EDGE_TLS_CERT_FILE"):
            raise SettingsError(
                ENV_PREFIX + "EDGE_TLS_CERT_FILE", f"{cert_file} holds no PEM certificate"
            )
        key_setting = "EDGE_TLS_KEY_FILE" if self.key_file is not None else "EDGE_TLS_CERT_FILE"
        if self.key_file is not None:
            _pem_text(self.key_file, "EDGE_TLS_KEY_FILE")
        try:
            context.load_cert_chain(cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            where = self.key_file or cert_file
            raise SettingsError(
                ENV_PREFIX + key_setting,
                f"{where}: no private key that loads and matches the certificate in "
                f"{cert_file} ({exc.strerror or exc})",
            ) from None
        if self.client_ca_file is not None:
            _pem_text(self.client_ca_file, "EDGE_TLS_CLIENT_CA_FILE")
            try:
                context.load_verify_locations(cafile=self.client_ca_file)
            except (ssl.SSLError, OSError) as exc:
                raise SettingsError(
                    ENV_PREFIX + "EDGE_TLS_CLIENT_CA_FILE",
                    f"{self.client_ca_file} holds no PEM CA certificate that loads "
                    f"({exc.strerror or exc})",
                ) from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    @classmethod
    def from_env(cls, env: Env) -> EdgeTls:
        return cls(
            cert_file=_existing_file(env, "EDGE_TLS_CERT_FILE"),
            key_file=_existing_file(env, "EDGE_TLS_KEY_FILE"),
            client_ca_file=_existing_file(env, "EDGE_TLS_CLIENT_CA_FILE"),
        )


def _pem_text(path: str, name: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) else "not a PEM (ASCII) file"
        raise SettingsError(ENV_PREFIX + name, f"cannot read {path}: {problem}") from None
