"""The files a pod of the chart would see, written the way the kubelet would write them.

Each item of a rendered pod's projected secret volume names a Secret, a key and a path. The
chart's own Secret is the rendered one (base64-decoded). The Secrets a values file only names
(``existingSecret``) are made up here from what the values say they hold: a JWT key of
``auth.jwt.keyType`` (an HS256 secret, an ES256 public key PEM or a JWKS), a password, a CA
certificate, a client certificate or its key, all real (made with ``cryptography``). So a
file the chart names under the wrong setting, or projects from the wrong key, reaches the
process with the wrong content, and the process, or the check after it, fails.
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm

from .support import FULLNAME, Doc, container, env_of, of_kind

JWKS_KID = "chart-test-1"


@dataclass(frozen=True)
class Keys:
    """Key material for the Secrets a values file names."""

    hs256_secret: str
    signing_key: ec.EllipticCurvePrivateKey
    public_pem: str
    jwks: str
    ca_pem: str
    client_cert_pem: str
    client_key_pem: str


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool,
) -> str:
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@functools.cache
def keys() -> Keys:
    signing = ec.generate_private_key(ec.SECP256R1())
    public_pem = (
        signing.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    jwk = json.loads(ECAlgorithm.to_jwk(signing.public_key()))
    jwk.update(kid=JWKS_KID, alg="ES256", use="sig")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    return Keys(
        hs256_secret="an-hs256-secret-of-an-existing-secret-48-bytes!!",
        signing_key=signing,
        public_pem=public_pem,
        jwks=json.dumps({"keys": [jwk]}),
        ca_pem=_certificate("chart-test-ca", ca_key, "chart-test-ca", ca_key, ca=True),
        client_cert_pem=_certificate("crm-events", client_key, "chart-test-ca", ca_key, ca=False),
        client_key_pem=_pem_key(client_key),
    )


def _tls_secret(secrets: dict[tuple[str, str], str], tls: Doc) -> None:
    name = tls.get("existingSecret")
    if not name:
        return
    k = keys()
    for key_field, content in (
        ("caKey", k.ca_pem),
        ("certKey", k.client_cert_pem),
        ("keyKey", k.client_key_pem),
    ):
        if tls.get(key_field):
            secrets[(name, tls[key_field])] = content


def user_secrets(values: Doc) -> dict[tuple[str, str], str]:
    """(Secret, key) -> content of every Secret the values name but the chart does not make."""
    k = keys()
    secrets: dict[tuple[str, str], str] = {}
    jwt_values = values["auth"]["jwt"]
    if jwt_values.get("existingSecret"):
        content = {"hs256": k.hs256_secret, "publicKey": k.public_pem, "jwks": k.jwks}
        secrets[(jwt_values["existingSecret"], jwt_values["existingSecretKey"])] = content[
            jwt_values["keyType"]
        ]
    for owner, what in (
        (values["redis"], "redis"),
        (values["redis"]["sentinel"], "sentinel"),
        (values["kafka"]["sasl"], "kafka"),
    ):
        if owner.get("existingSecret"):
            secrets[(owner["existingSecret"], owner["existingSecretKey"])] = (
                f"{what}-password-from-an-existing-secret"
            )
    _tls_secret(secrets, values["redis"]["tls"])
    _tls_secret(secrets, values["kafka"]["tls"])
    return secrets


def chart_secret(docs: list[Doc]) -> dict[tuple[str, str], str]:
    """(Secret, key) -> content of the chart's own Secret, as rendered."""
    found: dict[tuple[str, str], str] = {}
    for secret in of_kind(docs, "Secret"):
        if secret["metadata"]["name"] != FULLNAME:
            continue
        for key, value in secret.get("data", {}).items():
            found[(FULLNAME, key)] = base64.b64decode(value).decode()
    return found


def projected(deployment: Doc) -> dict[str, tuple[str, str, str]]:
    """Container path -> (Secret, key, mounted path) of every projected secret file."""
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    files: dict[str, tuple[str, str, str]] = {}
    for mount in container(deployment).get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "projected" not in volume:
            continue
        for source in volume["projected"]["sources"]:
            secret = source["secret"]
            for item in secret["items"]:
                path = f"{mount['mountPath'].rstrip('/')}/{item['path']}"
                files[path] = (secret["name"], item["key"], path)
    return files


def pod_env(docs: list[Doc], deployment: Doc, values: Doc, root: Path) -> dict[str, str]:
    """The Deployment's environment, with its secret files written under ``root`` from the
    Secrets it projects and every *_FILE setting pointing there."""
    secrets = {**user_secrets(values), **chart_secret(docs)}
    for path, (name, key, _) in projected(deployment).items():
        assert (name, key) in secrets, (
            f"{path} is projected from {name}/{key}, which no Secret holds"
        )
        local = root / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(secrets[(name, key)], encoding="utf-8")
    env = env_of(deployment)
    for name, value in env.items():
        if name.endswith("_FILE"):
            local = root / value.lstrip("/")
            assert local.is_file(), f"{name}={value} is no projected file"
            env[name] = str(local)
    return env
