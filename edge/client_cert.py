"""Client certificates relayed by a trusted proxy, and the rules saying what each may see.

The load balancer verifies the client's certificate at the TLS handshake (its CA, its CRL)
and passes it on in one header (``CRM_EVENTS_CLIENT_CERT_HEADER``), in either of two
encodings: URL-escaped PEM (nginx's ``$ssl_client_escaped_cert``) or base64 DER (HAProxy's
``%[ssl_c_der,base64]``). The edge does not verify the chain again (it holds no CA); it
believes the header only from a peer in ``CRM_EVENTS_CLIENT_CERT_TRUSTED_PROXIES``
(edge/auth.py).

The rules file (``CRM_EVENTS_CLIENT_CERT_GRANTS_FILE``) is read once, when the app is built::

    {"rules": [
      {"subject": "CN=crm-sync,O=Acme Corp", "types": ["*"], "match": {"TenantId": "t-1"}},
      {"uri": "spiffe://acme/crm-sync", "issuer": "CN=Acme Services CA", "types": ["DealWon"]}
    ]}

Each rule names exactly one of: the certificate's ``subject`` (RFC 4514 text, compared as a
parsed name: attribute by attribute, the attributes of a multi-valued RDN in any order), or
one SAN value of a given type, exactly: ``uri``, ``dns`` or ``email``. An optional ``issuer``
(compared like ``subject``) narrows the rule to certificates of that CA. The first matching
rule grants; none matching grants nothing. Pure: no I/O but reading the rules file.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from cryptography import x509

from shared.errors import SettingsError
from shared.events import TYPE_RE

GRANTS_SETTING = "CRM_EVENTS_CLIENT_CERT_GRANTS_FILE"
MAX_HEADER_CHARS = 8 * 1024
"""A client certificate is 1-2 KiB (4-5 KiB URL-escaped with an RSA-4096 key and many SANs);
anything past this is refused before it is decoded. Half the edge's default cap on the whole
header section (``CRM_EVENTS_MAX_HEADER_BYTES``, 16 KiB), so that the largest certificate
accepted here still reaches this check with a token and cookies beside it, rather than being
refused as 431 ``headers_too_large``."""
MAX_GRANTS_FILE_BYTES = 1 << 20
SAN_KEYS = ("uri", "dns", "email")
"""The rule keys naming a SAN value, by its type."""
_SAN_KINDS: tuple[tuple[type[x509.GeneralName], str], ...] = (
    (x509.UniformResourceIdentifier, "uri"),
    (x509.DNSName, "dns"),
    (x509.RFC822Name, "email"),
)
_RULE_KEYS = frozenset({"subject", *SAN_KEYS, "issuer", "types", "match"})
_SPACED_RE = re.compile(r"\s*([,+=])\s*")
_EMAIL_ATTRIBUTE_RE = re.compile(r"(?:^|[,+])\s*(?:E|EMAIL|EMAILADDRESS)\s*=", re.IGNORECASE)
_KNOWN_ATTRIBUTES = "CN, O, OU, L, ST, C, STREET, DC, UID"
"""The attribute names ``cryptography`` reads and prints; it prints others as dotted OIDs."""


class CertificateError(ValueError):
    """The relayed header does not hold one readable certificate (the message says why)."""


@dataclass(frozen=True, slots=True)
class ClientCert:
    """What the edge reads from a relayed certificate."""

    subject: x509.Name
    issuer: x509.Name
    sans: tuple[tuple[str, str], ...]
    """URI, DNS and e-mail SAN values, each with its rule key: ``("uri", "spiffe://…")``."""
    not_before: float
    not_after: float
    """Unix times of the certificate's validity."""

    @property
    def subject_text(self) -> str:
        """RFC 4514, as ``x509.Name.rfc4514_string()`` prints it (for messages and logs)."""
        return self.subject.rfc4514_string()


def parse_relayed(value: str) -> ClientCert:
    """Decode the header's value: URL-escaped PEM or base64 DER, one certificate."""
    if len(value) > MAX_HEADER_CHARS:
        raise CertificateError(f"the header is longer than {MAX_HEADER_CHARS} characters")
    value = value.strip()
    try:
        # Base64 has no '%' and PEM starts with dashes: unescaping tells them apart.
        text = unquote(value, errors="strict")
        if text.startswith("-----BEGIN"):
            cert = x509.load_pem_x509_certificate(text.encode("ascii"))
        else:
            cert = x509.load_der_x509_certificate(base64.b64decode(value, validate=True))
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the client's 401
        # Whatever the header holds is the client's doing, relayed: every failure to read it
        # is the client's 401, never a 500. (ValueError covers UnicodeError, cryptography's
        # parse errors and binascii.Error.)
        raise CertificateError(_brief(exc)) from None
    return _read(cert)


def _brief(exc: Exception) -> str:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"neither URL-escaped PEM nor base64 DER of one certificate ({detail[:120]})"


def _read(cert: x509.Certificate) -> ClientCert:
    try:
        subject, issuer = cert.subject, cert.issuer
        subject.rfc4514_string()  # what messages print must print
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            sans: tuple[tuple[str, str], ...] = ()
        else:
            sans = tuple(
                (key, str(name.value))
                for name in names
                for kind, key in _SAN_KINDS
                if isinstance(name, kind)
            )
        not_before = cert.not_valid_before_utc.timestamp()
        not_after = cert.not_valid_after_utc.timestamp()
    except Exception as exc:  # noqa: BLE001 - as above: never a 500 for the client's bytes
        # A well-formed envelope around a malformed name or extension (parsed lazily):
        # besides ValueError, cryptography raises x509.DuplicateExtension and
        # x509.UnsupportedGeneralNameType (x400Address, ediPartyName SANs), which are not.
        raise CertificateError(f"a malformed certificate: {_brief(exc)}") from None
    return ClientCert(subject, issuer, sans, not_before, not_after)


@dataclass(frozen=True, slots=True)
class CertRule:
    """One rule of the grants file: what it names (``key``: ``subject``, ``uri``, ``dns`` or
    ``email``; ``value`` as written), the CA it is narrowed to, and what it grants."""

    key: str
    value: str
    types: frozenset[bytes] | None
    """None: every type (``["*"]``)."""
    match: frozenset[tuple[str, str]]
    issuer: x509.Name | None = None
    subject: x509.Name | None = None
    """The parsed ``value`` of a ``subject`` rule."""


class CertGrants:
    """The rules, with the first matching rule found by lookups rather than a scan."""

    def __init__(self, rules: Sequence[CertRule]) -> None:
        self.rules = tuple(rules)
        # Names compare (and hash) attribute by attribute, each RDN as a set: a multi-valued
        # RDN written in another order than the certificate's DER still matches.
        self._by_subject: dict[x509.Name, list[int]] = {}
        self._by_san: dict[tuple[str, str], list[int]] = {}
        for index, rule in enumerate(self.rules):
            if rule.subject is not None:
                self._by_subject.setdefault(rule.subject, []).append(index)
            else:
                self._by_san.setdefault((rule.key, rule.value), []).append(index)

    def rule_for(self, cert: ClientCert) -> CertRule | None:
        """The first rule (in file order) matching the subject or a SAN of its type, and the
        issuer when the rule names one; None if none."""
        indices = list(self._by_subject.get(cert.subject, ()))
        for san in cert.sans:
            indices.extend(self._by_san.get(san, ()))
        for index in sorted(indices):
            rule = self.rules[index]
            if rule.issuer is None or rule.issuer == cert.issuer:
                return rule
        return None

    @classmethod
    def load(cls, path: str) -> CertGrants:
        """Read and check the rules file; any fault is a ``SettingsError`` naming the setting,
        the file and the rule."""
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_GRANTS_FILE_BYTES + 1)
        except OSError as exc:
            raise SettingsError(GRANTS_SETTING, f"cannot read {path}: {exc.strerror}") from None
        if len(raw) > MAX_GRANTS_FILE_BYTES:
            raise SettingsError(GRANTS_SETTING, f"{path} is larger than 1 MiB")
        try:
            document = json.loads(raw)
        except (ValueError, UnicodeError) as exc:
            raise SettingsError(GRANTS_SETTING, f"{path} is not JSON: {exc}") from None
        if not isinstance(document, dict) or set(document) != {"rules"}:
            raise SettingsError(GRANTS_SETTING, f'{path}: expected {{"rules": [...]}}')
        items = document["rules"]
        if not isinstance(items, list) or not items:
            raise SettingsError(GRANTS_SETTING, f"{path}: 'rules' must be a non-empty list")
        rules = []
        for number, item in enumerate(items, 1):
            try:
                rules.append(_rule(item))
            except ValueError as exc:
                raise SettingsError(GRANTS_SETTING, f"{path}: rule {number}: {exc}") from None
        return cls(rules)


def _rule(item: Any) -> CertRule:
    if not isinstance(item, dict):
        raise ValueError("expected an object")
    if "san" in item:
        # The SAN's type is part of the identity: an e-mail rule must not be met by a URI SAN
        # of the same text.
        raise ValueError(
            "'san' is not a rule key: name the SAN's type, 'uri', 'dns' or 'email' "
            '(e.g. {"uri": "spiffe://acme/crm-sync", ...})'
        )
    unknown = sorted(set(item) - _RULE_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_RULE_KEYS))})")
    named = [key for key in ("subject", *SAN_KEYS) if key in item]
    if len(named) != 1:
        raise ValueError("give exactly one of 'subject', 'uri', 'dns' and 'email'")
    key = named[0]
    for field in (key, "issuer"):
        value = item.get(field)
        if field in item and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"'{field}' must be a non-empty string")
    value = item[key]
    issuer = _name("issuer", item["issuer"]) if "issuer" in item else None
    return CertRule(
        key,
        value,
        _types(item.get("types")),
        _match(item.get("match", {})),
        issuer,
        _name("subject", value) if key == "subject" else None,
    )


def _name(field: str, text: str) -> x509.Name:
    """An RFC 4514 name; text the edge would read another way, or not at all, is refused with
    the form to write, since such a rule would silently never match."""
    try:
        return x509.Name.from_rfc4514_string(text)
    except ValueError:
        pass
    if _EMAIL_ATTRIBUTE_RE.search(text):
        raise ValueError(
            f"'{field}' {text!r}: the e-mail attribute is written "
            "'1.2.840.113549.1.9.1=…', as the edge prints it (not E= or emailAddress=, "
            "as OpenSSL does)"
        )
    try:
        printed = x509.Name.from_rfc4514_string(_SPACED_RE.sub(r"\1", text)).rfc4514_string()
    except ValueError:
        raise ValueError(
            f"'{field}' {text!r} is not an RFC 4514 name such as 'CN=crm-sync,O=Acme' "
            f"(attribute names: {_KNOWN_ATTRIBUTES}, in capitals; any other as a dotted OID)"
        ) from None
    raise ValueError(
        f"'{field}' {text!r} would never match: write it {printed!r} "
        "(RFC 4514 as the edge prints it: no spaces around ',', '+' and '=')"
    )


def _types(raw: Any) -> frozenset[bytes] | None:
    if not isinstance(raw, list) or not raw or not all(isinstance(t, str) for t in raw):
        raise ValueError("'types' must be a non-empty list of event types, or [\"*\"]")
    if "*" in raw:
        return None
    bad = [t for t in raw if not TYPE_RE.fullmatch(t)]
    if bad:
        raise ValueError(f"'types' holds an invalid event type {bad[0]!r}")
    return frozenset(t.encode() for t in raw)


def _match(raw: Any) -> frozenset[tuple[str, str]]:
    # The same shape as the tokens' crm_match claim.
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str | int | float) and not isinstance(v, bool)
        for k, v in raw.items()
    ):
        raise ValueError("'match' must map event field names to values")
    return frozenset((k, str(v)) for k, v in raw.items())
