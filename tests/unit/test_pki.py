"""devtools/pki.py: the local CA's certificates, checked by `openssl verify` (an independent
implementation) as well as by reading them back."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devtools.pki import CRL_DAYS, Issued, LocalCA, PkiError

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


def openssl_verify(
    ca: LocalCA, cert: Path, *options: str, crl: bool = False
) -> subprocess.CompletedProcess[str]:
    """`openssl verify` of ``cert`` against ``ca`` with extra ``options`` (and its CRL)."""
    args = [str(OPENSSL), "verify", "-CAfile", str(ca.cert_path), *options]
    if crl:
        args += ["-crl_check", "-CRLfile", str(ca.crl_path)]
    return subprocess.run([*args, str(cert)], capture_output=True, text=True, check=False)


def sans(issued: Issued) -> x509.SubjectAlternativeName:
    return (
        issued.certificate().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )


def eku(issued: Issued) -> list[x509.ObjectIdentifier]:
    ext = issued.certificate().extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    return list(ext.value)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@needs_openssl
def test_server_certificate_verifies_and_names_its_hosts(tmp_path: Path) -> None:
    ca = LocalCA.open(tmp_path)
    server = ca.issue_server("kafka", hosts=["kafka.internal", "10.1.2.3"])

    result = openssl_verify(ca, server.cert, crl=True)
    assert result.returncode == 0, result.stdout + result.stderr
    names = sans(server)
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
    ]
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "kafka.internal"]
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = server.certificate().extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    # The same check a TLS client makes: openssl's own hostname/IP matching.
    for check in (
        ["-verify_ip", "127.0.0.1"],
        ["-verify_hostname", "kafka.internal"],
        ["-purpose", "sslserver"],
    ):
        ok = openssl_verify(ca, server.cert, *check)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = openssl_verify(ca, server.cert, "-verify_hostname", "evil.test")
    assert wrong.returncode != 0


@needs_openssl
def test_client_certificate_carries_subject_and_sans(tmp_path: Path) -> None:
    ca = LocalCA.open(tmp_path)
    client = ca.issue_client(
        "device-7",
        common_name="device-7",
        organization="tenant-a",
        uris=["spiffe://crm-events/device/7"],
        dns=["device-7.tenant-a.test"],
        emails=["ops@tenant-a.test"],
    )
    result = openssl_verify(ca, client.cert, crl=True)
    assert result.returncode == 0, result.stdout + result.stderr
    cert = client.certificate()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "device-7"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "tenant-a"
    names = sans(client)
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://crm-events/device/7"
    ]
    assert names.get_values_for_type(x509.DNSName) == ["device-7.tenant-a.test"]
    assert names.get_values_for_type(x509.RFC822Name) == ["ops@tenant-a.test"]
    assert eku(client) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # A client certificate must not serve as a server's, nor the other way round.
    assert openssl_verify(ca, client.cert, "-purpose", "sslclient").returncode == 0
    purpose = openssl_verify(ca, client.cert, "-purpose", "sslserver")
    assert purpose.returncode != 0


@needs_openssl
def test_revoked_certificate_fails_the_crl_check(tmp_path: Path) -> None:
    ca = LocalCA.open(tmp_path)
    kept = ca.issue_client("kept", common_name="kept")
    gone = ca.issue_client("gone", common_name="gone")
    assert openssl_verify(ca, gone.cert, crl=True).returncode == 0

    ca.revoke(gone.cert)

    result = openssl_verify(ca, gone.cert, crl=True)
    assert result.returncode != 0
    assert "certificate revoked" in result.stdout + result.stderr
    assert openssl_verify(ca, kept.cert, crl=True).returncode == 0
    # Without the CRL the signature alone is still good: revocation is the CRL's job.
    assert openssl_verify(ca, gone.cert).returncode == 0
    assert ca.is_revoked(gone.certificate()) and not ca.is_revoked(kept.certificate())
    # A CA opened again later still lists it.
    assert LocalCA.open(tmp_path).is_revoked(gone.certificate())


@needs_openssl
def test_the_crl_lasts_a_year_and_renewing_keeps_its_revocations(tmp_path: Path) -> None:
    """A CRL past its next update makes OpenSSL refuse every certificate: the local one lasts a
    year, and ``renew_crl`` re-signs it (a year from now, the same revocations)."""
    ca = LocalCA.open(tmp_path)
    kept = ca.issue_client("kept", common_name="kept")
    gone = ca.issue_client("gone", common_name="gone")
    ca.revoke(gone.cert)
    before = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert CRL_DAYS >= 365

    assert ca.renew_crl() == ca.crl_path

    after = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert after.next_update_utc is not None and before.next_update_utc is not None
    left = after.next_update_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=CRL_DAYS - 1) < left <= dt.timedelta(days=CRL_DAYS)
    number = x509.CRLNumber
    assert (
        after.extensions.get_extension_for_class(number).value.crl_number
        >= before.extensions.get_extension_for_class(number).value.crl_number
    )
    assert [r.serial_number for r in after] == [gone.certificate().serial_number]
    assert openssl_verify(ca, gone.cert, crl=True).returncode != 0
    assert openssl_verify(ca, kept.cert, crl=True).returncode == 0
    assert mode(ca.crl_path) == 0o644


@needs_openssl
def test_certificate_of_another_ca_does_not_verify(tmp_path: Path) -> None:
    ours = LocalCA.open(tmp_path / "ours")
    theirs = LocalCA.open(tmp_path / "theirs")
    foreign = theirs.issue_client("intruder", common_name="ingest")
    assert openssl_verify(ours, foreign.cert).returncode != 0
    with pytest.raises(PkiError, match="not issued by this CA"):
        ours.revoke(foreign.cert)


def test_existing_ca_and_certificates_are_reused(tmp_path: Path) -> None:
    first = LocalCA.open(tmp_path)
    issued = first.issue_server("redis").certificate()
    again = LocalCA.open(tmp_path)
    assert again.ca_cert == first.ca_cert
    assert again.issue_server("redis").certificate() == issued
    # Another request under the same name is a new certificate, not the stale one.
    other = again.issue_server("redis", hosts=["redis.internal"]).certificate()
    assert other != issued
    assert again.issue_server("redis", hosts=["redis.internal"]).certificate() == other
    assert again.issue_server("redis", hosts=["redis.internal"], reuse=False).certificate() != (
        other
    )


def test_keys_are_private_and_files_load_as_tls_material(tmp_path: Path) -> None:
    ca = LocalCA.open(tmp_path)
    client = ca.issue_client("ingest", common_name="ingest")
    assert mode(tmp_path / "ca.key") == 0o600
    assert mode(client.key) == 0o600
    assert mode(client.bundle) == 0o600
    assert mode(client.cert) == 0o644
    assert mode(ca.crl_path) == 0o644
    # What Python's ssl (aiokafka, redis-py) does with the files.
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    ctx.load_cert_chain(str(client.bundle))
    bundle = client.bundle.read_text()
    assert bundle.startswith("-----BEGIN PRIVATE KEY-----")
    assert bundle.count("BEGIN CERTIFICATE") == 2


def test_bad_names_and_a_half_ca_are_refused(tmp_path: Path) -> None:
    ca = LocalCA.open(tmp_path / "ok")
    for bad in ("../x", "ca", "", "a b"):
        with pytest.raises(PkiError, match="bad certificate name"):
            ca.issue_client(bad, common_name="x")
    half = tmp_path / "half"
    half.mkdir()
    (half / "ca.crt").write_text("")
    with pytest.raises(PkiError, match=r"only one of ca\.key and ca\.crt"):
        LocalCA.open(half)
