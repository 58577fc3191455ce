"""A small local certificate authority for development and tests: no openssl command needed.

One directory holds one CA::

    ca = LocalCA.open(run_dir / "pki")               # creates the CA once, later reuses it
    server = ca.issue_server("kafka", hosts=["kafka.local"])
    client = ca.issue_client("ingest", common_name="ingest", organization="crm-events")
    ca.revoke(client.cert)                            # and rewrites crl.pem

Files in that directory: ``ca.key`` and ``ca.crt`` (the authority), ``crl.pem`` (its current
revocation list, PEM; always present, empty at first; valid for a year, re-signed by ``open``
when a third of that is left and by ``renew_crl`` at any time), ``revoked.json`` (what
``crl.pem`` is made from), and per issued name ``<name>.key``, ``<name>.crt`` (the certificate
alone) and ``<name>.pem`` (key, certificate and CA certificate in one file, what a PEM keystore
such as Kafka's ``ssl.keystore.type=PEM`` reads). Private keys, and the files that hold one,
are 0600; certificates and the CRL are 0644.

Keys are ECDSA P-256: fast to make (tests create several per run), and accepted by OpenSSL
(nginx, Redis, Python) and Java (Kafka) alike. Every write goes through a temporary file
renamed over the target, under a lock on ``.lock``, so that two commands (``make up`` and a
test) sharing the directory never see half a file or make two CAs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import ipaddress
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes as PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devtools.atomic import write_bytes_atomically

__all__ = [
    "CA_DAYS",
    "CRL_DAYS",
    "LEAF_DAYS",
    "Issued",
    "LocalCA",
    "PkiError",
]

CA_DAYS = 3650
#: Under the 398 days browsers accept for a server certificate.
LEAF_DAYS = 397
#: A CRL past its next update makes nginx and OpenSSL refuse every certificate, silently for
#: the operator. A local CA's list is published by nobody but its own directory, so a long
#: life costs nothing: ``open`` rewrites one that has less than a third of this left, and
#: :meth:`LocalCA.renew_crl` (the local stack, on every nginx start) re-signs it outright.
CRL_DAYS = 365
#: Clock skew between this machine and a peer must not make a fresh certificate "not yet valid".
BACKDATE = dt.timedelta(minutes=5)
#: A certificate this close to its end is issued anew instead of reused.
RENEW_BEFORE = dt.timedelta(days=1)
DEFAULT_CA_NAME = "crm-events local CA"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RESERVED = frozenset({"ca", "crl"})


class PkiError(RuntimeError):
    """A name, a file or a request the CA cannot use."""


@dataclasses.dataclass(frozen=True)
class Issued:
    """The files of one issued certificate."""

    name: str
    key: Path
    cert: Path
    bundle: Path
    """Key, certificate and CA certificate in one PEM file (0600)."""

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert.read_bytes())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS#8 ("BEGIN PRIVATE KEY"): the one form Kafka's PEM keystore reads
    # without ssl.key.password, and what OpenSSL reads everywhere.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name) or name in _RESERVED:
        raise PkiError(
            f"bad certificate name {name!r}: letters, digits, '.', '_' and '-' "
            f"(not {', '.join(sorted(_RESERVED))})"
        )


def _subject(common_name: str, organization: str | None) -> x509.Name:
    attrs = []
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _host_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


class LocalCA:
    """One certificate authority in one directory; see the module's docstring."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.directory = directory
        self._key = key
        self.ca_cert = cert

    # -- paths ----------------------------------------------------------------------------

    @staticmethod
    def _paths(directory: Path) -> tuple[Path, Path]:
        return directory / "ca.key", directory / "ca.crt"

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def crl_path(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def _revoked_path(self) -> Path:
        return self.directory / "revoked.json"

    def files(self, name: str) -> Issued:
        _check_name(name)
        d = self.directory
        return Issued(name, d / f"{name}.key", d / f"{name}.crt", d / f"{name}.pem")

    # -- the authority ------------------------------------------------------------------------

    @staticmethod
    @contextlib.contextmanager
    def _locked(directory: Path) -> Iterator[None]:
        with open(directory / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @classmethod
    def open(cls, directory: Path, *, name: str = DEFAULT_CA_NAME) -> LocalCA:
        """The CA in ``directory``: made (key, self-signed certificate, empty CRL) when the
        directory has none, otherwise loaded as it is (``name`` is then ignored)."""
        directory = Path(directory).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = cls._paths(directory)
        with cls._locked(directory):
            if key_path.is_file() and cert_path.is_file():
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                if not isinstance(key, ec.EllipticCurvePrivateKey) or _spki(
                    key.public_key()
                ) != _spki(cert.public_key()):
                    raise PkiError(f"{key_path} and {cert_path} are not one key pair of this CA")
            elif key_path.exists() or cert_path.exists():
                raise PkiError(
                    f"{directory} has only one of ca.key and ca.crt; remove it to start afresh"
                )
            else:
                key, cert = cls._make_ca(name)
                write_bytes_atomically(key_path, _key_pem(key), 0o600)
                write_bytes_atomically(cert_path, _cert_pem(cert), 0o644)
            ca = cls(directory, key, cert)
            crl = ca._load_crl()
            left = crl.next_update_utc if crl is not None else None
            if left is None or left - _now() < dt.timedelta(days=CRL_DAYS / 3):
                ca._write_crl()
            return ca

    @staticmethod
    def _make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    # -- issuing --------------------------------------------------------------------------------

    def issue_server(
        self,
        name: str,
        *,
        hosts: Sequence[str] = (),
        common_name: str | None = None,
        days: int = LEAF_DAYS,
        reuse: bool = True,
    ) -> Issued:
        """A TLS server certificate (``serverAuth``) for 127.0.0.1, localhost and ``hosts``
        (IP addresses become IP SANs, anything else DNS SANs)."""
        names = _host_names(["127.0.0.1", "localhost", *hosts])
        unique = list(dict.fromkeys(names))
        subject = _subject(common_name or "localhost", None)
        return self._issue(name, subject, unique, ExtendedKeyUsageOID.SERVER_AUTH, days, reuse)

    def issue_client(
        self,
        name: str,
        *,
        common_name: str,
        organization: str | None = None,
        uris: Sequence[str] = (),
        dns: Sequence[str] = (),
        emails: Sequence[str] = (),
        days: int = LEAF_DAYS,
        reuse: bool = True,
    ) -> Issued:
        """A TLS client certificate (``clientAuth``): subject ``O=organization, CN=common_name``
        and, when given, SANs (URIs such as ``spiffe://…``, DNS names, e-mail addresses)."""
        sans: list[x509.GeneralName] = [
            *(x509.UniformResourceIdentifier(u) for u in uris),
            *(x509.DNSName(d) for d in dns),
            *(x509.RFC822Name(e) for e in emails),
        ]
        subject = _subject(common_name, organization)
        return self._issue(name, subject, sans, ExtendedKeyUsageOID.CLIENT_AUTH, days, reuse)

    def _issue(
        self,
        name: str,
        subject: x509.Name,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        days: int,
        reuse: bool,
    ) -> Issued:
        files = self.files(name)
        if days < 1:
            raise PkiError(f"{name}: days must be at least 1, got {days}")
        with self._locked(self.directory):
            if reuse and self._reusable(files, subject, sans, usage):
                return files
            key = ec.generate_private_key(ec.SECP256R1())
            now = _now()
            builder = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(self.ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE)
                .not_valid_after(
                    min(now + dt.timedelta(days=days), self.ca_cert.not_valid_after_utc)
                )
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        # ECDHE key exchange only needs signatures from an EC key.
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=False,
                        crl_sign=False,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
                )
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                    critical=False,
                )
            )
            if sans:
                builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            cert = builder.sign(self._key, hashes.SHA256())
            key_pem, cert_pem = _key_pem(key), _cert_pem(cert)
            write_bytes_atomically(files.key, key_pem, 0o600)
            write_bytes_atomically(files.cert, cert_pem, 0o644)
            write_bytes_atomically(
                files.bundle, key_pem + cert_pem + _cert_pem(self.ca_cert), 0o600
            )
            return files

    def _reusable(
        self,
        files: Issued,
        subject: x509.Name,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> bool:
        """The files exist, were issued by this CA for the same subject, SANs and usage, and
        have more than a day left (revoked or not: revoking is the caller's statement)."""
        if not (files.key.is_file() and files.cert.is_file() and files.bundle.is_file()):
            return False
        try:
            cert = files.certificate()
            cert.verify_directly_issued_by(self.ca_cert)
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
            return False
        return (
            cert.subject == subject
            and set(_sans(cert)) == set(sans)
            and list(eku) == [usage]
            and cert.not_valid_after_utc - _now() > RENEW_BEFORE
        )

    # -- revocation -------------------------------------------------------------------------------

    def _revoked(self) -> dict[int, str]:
        """Revoked serial numbers and when (ISO 8601)."""
        if not self._revoked_path.is_file():
            return {}
        raw = json.loads(self._revoked_path.read_text())
        return {int(serial): str(when) for serial, when in raw.items()}

    def revoke(self, cert: Path | x509.Certificate) -> Path:
        """Add a certificate of this CA to the revocation list; returns the rewritten
        ``crl.pem``. Revoking one twice keeps its first revocation time."""
        if isinstance(cert, Path):
            cert = x509.load_pem_x509_certificate(cert.read_bytes())
        try:
            cert.verify_directly_issued_by(self.ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise PkiError(f"{cert.subject.rfc4514_string()} was not issued by this CA") from None
        with self._locked(self.directory):
            revoked = self._revoked()
            revoked.setdefault(cert.serial_number, _now().isoformat())
            write_bytes_atomically(
                self._revoked_path,
                (json.dumps({str(s): w for s, w in revoked.items()}, indent=1) + "\n").encode(),
                0o644,
            )
            return self._write_crl()

    def renew_crl(self) -> Path:
        """Re-sign ``crl.pem`` now (the same revocations, a full :data:`CRL_DAYS` ahead);
        returns it. Cheap: a reader that loads the list at start (nginx) then holds one that
        outlives any run of it shorter than a year."""
        with self._locked(self.directory):
            return self._write_crl()

    def is_revoked(self, cert: x509.Certificate) -> bool:
        return cert.serial_number in self._revoked()

    def _load_crl(self) -> x509.CertificateRevocationList | None:
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError):
            return None
        return crl if crl.is_signature_valid(self._key.public_key()) else None

    def _write_crl(self) -> Path:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca_cert.subject)
            .last_update(now - BACKDATE)
            .next_update(now + dt.timedelta(days=CRL_DAYS))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        )
        for serial, when in sorted(self._revoked().items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(dt.datetime.fromisoformat(when))
                .build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        write_bytes_atomically(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        return self.crl_path
