"""mTLS between services (the internal service mesh), switched on by settings.

With ``GRISTMILL_TLS_CERT_FILE`` / ``_KEY_FILE`` / ``_CA_FILE`` set, a service serves gRPC over TLS and
(by default) requires every client to present a certificate signed by that CA; clients of other services
present their own certificate the same way. ``deploy/local/certs.sh`` makes a local CA and one
certificate per service for the local stack.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from pydantic_settings import BaseSettings, SettingsConfigDict

from gristmill.core.errors import ConfigurationError


class TlsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRISTMILL_TLS_", extra="ignore", frozen=True)

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    # Mutual TLS: refuse clients without a certificate signed by ca_file.
    require_client_cert: bool = True

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


def _read(path: Path | None, variable: str) -> bytes:
    if path is None:
        raise ConfigurationError(f"{variable} is not set; TLS needs a certificate, its key and the CA")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{variable}={path} cannot be read: {exc.strerror}") from None


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials | None:
    """Credentials for a service's server (None when TLS is off)."""
    if not settings.enabled:
        return None
    cert = _read(settings.cert_file, "GRISTMILL_TLS_CERT_FILE")
    key = _read(settings.key_file, "GRISTMILL_TLS_KEY_FILE")
    ca = _read(settings.ca_file, "GRISTMILL_TLS_CA_FILE") if settings.require_client_cert else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=settings.require_client_cert
    )


def channel_credentials(settings: TlsSettings) -> grpc.ChannelCredentials | None:
    """Credentials for calling another service (None when TLS is off): trust the CA, present our cert."""
    if not settings.enabled:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.ca_file, "GRISTMILL_TLS_CA_FILE"),
        private_key=_read(settings.key_file, "GRISTMILL_TLS_KEY_FILE"),
        certificate_chain=_read(settings.cert_file, "GRISTMILL_TLS_CERT_FILE"),
    )
