"""What a TLS server presents, seen from a client with a certificate (renewal tests compare it with the file)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from gristmill.core.tls import TlsSettings


def served_certificate(address: str, tls: TlsSettings) -> bytes:
    """The DER certificate the server at ``address`` presents on a new connection (``tls``: our client side)."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(tls.ca_file))
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(pem: Path) -> bytes:
    """The DER bytes of the certificate in ``pem``."""
    return ssl.PEM_cert_to_DER_cert(pem.read_text())
