"""aiokafka client options from the security settings (SASL and TLS passed through).

With ``SSL``/``SASL_SSL``, the broker's certificate is checked against the CA file (the
system's CAs without one) and its host name or IP; a client certificate and key, when set, are
offered to listeners that require one (``ssl.client.auth=required``: mutual TLS).
"""

from __future__ import annotations

from typing import Any

from aiokafka.helpers import create_ssl_context

from shared.security_settings import KafkaSecurity


def client_options(security: KafkaSecurity) -> dict[str, Any]:
    options: dict[str, Any] = {"security_protocol": security.protocol}
    if security.protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=security.ca_file, certfile=security.cert_file, keyfile=security.key_file
        )
    if security.sasl_mechanism is not None:
        options["sasl_mechanism"] = security.sasl_mechanism
        options["sasl_plain_username"] = security.sasl_username
        options["sasl_plain_password"] = security.sasl_password
    return options
