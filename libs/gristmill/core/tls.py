"""mTLS between services (the internal service mesh), switched on by settings.

With ``GRISTMILL_TLS_CERT_FILE`` / ``_KEY_FILE`` / ``_CA_FILE`` set, a service serves gRPC over TLS and
(by default) requires every client to present a certificate signed by that CA; clients of other services
present their own certificate the same way. ``deploy/local/certs.sh`` makes a local CA and one
certificate per service (admin included) and a ``client`` certificate for the CLI and the SDK;
``gristmill up --tls`` runs it and gives each service its own.

Three more things live here:

- **Reload.** ``server_credentials`` gives a server credentials that re-read their files after
  ``reload_certificates()`` (a service's SIGHUP handler calls it): new connections then get the renewed
  certificate, open ones keep theirs, and a file that cannot be used keeps the old certificate (logged). The
  same reload re-reads the files of every ``ReloadingChannel`` (a service's channels to other services): the
  next calls go over a new channel presenting the renewed certificate, calls running finish on the old one.
- **The client side.** ``client_tls_from_environment`` is what the CLI and the SDK use when nothing else is
  given: the ``GRISTMILL_TLS_*`` variables, or None (plaintext) when ``GRISTMILL_TLS_CERT_FILE`` is unset.
- **Diagnosis.** gRPC reports a refused handshake as ``UNAVAILABLE: Socket closed`` or "failed to connect";
  ``diagnose_handshake`` repeats the handshake with Python's ``ssl`` module and says in one line which side
  refused and why (the SDK puts that line in its ``UnavailableError``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import grpc
from pydantic_settings import BaseSettings, SettingsConfigDict

from gristmill.core.addresses import channel_target
from gristmill.core.errors import ConfigurationError

log = logging.getLogger(__name__)

TLS_VARIABLES = ("GRISTMILL_TLS_CERT_FILE", "GRISTMILL_TLS_KEY_FILE", "GRISTMILL_TLS_CA_FILE")
_SET_TLS = "set GRISTMILL_TLS_CERT_FILE/KEY_FILE/CA_FILE"


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


def tls_files(directory: Path, name: str) -> dict[str, str]:
    """The ``GRISTMILL_TLS_*`` variables for certificate ``name`` (a service, or ``client``) made by
    ``deploy/local/certs.sh`` in ``directory``."""
    return {
        "GRISTMILL_TLS_CERT_FILE": str(directory / f"{name}.pem"),
        "GRISTMILL_TLS_KEY_FILE": str(directory / f"{name}.key"),
        "GRISTMILL_TLS_CA_FILE": str(directory / "ca.pem"),
    }


def client_tls_from_environment() -> TlsSettings | None:
    """The client's TLS from ``GRISTMILL_TLS_*`` (the CLI's and the SDK's default): None (plaintext) when
    ``GRISTMILL_TLS_CERT_FILE`` is not set."""
    if not os.environ.get("GRISTMILL_TLS_CERT_FILE"):
        return None
    return TlsSettings()


def _read(path: Path | None, variable: str) -> bytes:
    if path is None:
        raise ConfigurationError(f"{variable} is not set; TLS needs a certificate, its key and the CA")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{variable}={path} cannot be read: {exc.strerror}") from None


def _check_pair(settings: TlsSettings) -> None:
    """Raise ``ConfigurationError`` unless the files make a usable certificate, key and CA (parsed by ``ssl``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(
            f"GRISTMILL_TLS_CERT_FILE={settings.cert_file} and GRISTMILL_TLS_KEY_FILE={settings.key_file} are not a "
            f"certificate and its key ({getattr(exc, 'reason', None) or exc})"
        ) from None
    if settings.ca_file is not None:
        try:
            context.load_verify_locations(str(settings.ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"GRISTMILL_TLS_CA_FILE={settings.ca_file} is not a CA certificate "
                f"({getattr(exc, 'reason', None) or exc})"
            ) from None


class ReloadableServerCertificate:
    """A server's certificate, key and CA, read again by ``reload``; gRPC asks ``fetch`` at each new handshake.

    ``reload`` reads and checks the files at once (so a bad file is reported where the reload was asked for)
    and keeps the running certificate when they cannot be used.
    """

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.initial = self._configuration()

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        s = self.settings
        cert = _read(s.cert_file, "GRISTMILL_TLS_CERT_FILE")
        key = _read(s.key_file, "GRISTMILL_TLS_KEY_FILE")
        ca = _read(s.ca_file, "GRISTMILL_TLS_CA_FILE") if s.require_client_cert else None
        _check_pair(s)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def reload(self) -> bool:
        """Read the files again; True when new connections will get them, False (logged) when they cannot be
        used (the running certificate stays)."""
        try:
            configuration = self._configuration()
        except ConfigurationError as exc:
            log.error("TLS certificate not reloaded, keeping the running one: %s", exc)
            return False
        with self._lock:
            self._pending = configuration
        log.info("reloaded TLS certificate from %s", self.settings.cert_file)
        return True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: the configuration read by the last ``reload`` once, else None (no change)."""
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration


# Every reloadable certificate of this process (the embedded platform runs several servers in one).
_CERTIFICATES: weakref.WeakSet[ReloadableServerCertificate] = weakref.WeakSet()


def reload_certificates() -> int:
    """Re-read the TLS files of this process (SIGHUP): every TLS server's, and every ``ReloadingChannel``'s to
    another service; returns how many took new files."""
    servers = sum(certificate.reload() for certificate in list(_CERTIFICATES))
    return servers + sum(channel.reload() for channel in list(_CHANNELS))


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials | None:
    """Credentials for a service's server (None when TLS is off), reloadable with ``reload_certificates``."""
    if not settings.enabled:
        return None
    certificate = ReloadableServerCertificate(settings)
    _CERTIFICATES.add(certificate)
    credentials = grpc.dynamic_ssl_server_credentials(
        certificate.initial,
        certificate.fetch,  # type: ignore[arg-type]  # None means "no change" (grpc's docs; the stub says otherwise)
        require_client_authentication=settings.require_client_cert,
    )
    # The credentials keep the fetcher (and so the certificate) alive as long as the server uses them.
    credentials._gristmill_certificate = certificate  # type: ignore[attr-defined]
    return credentials


def channel_credentials(settings: TlsSettings) -> grpc.ChannelCredentials | None:
    """Credentials for calling another service (None when TLS is off): trust the CA, present our cert.

    The files are read each time: a channel opened after a renewal uses the renewed certificate."""
    if not settings.enabled:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.ca_file, "GRISTMILL_TLS_CA_FILE"),
        private_key=_read(settings.key_file, "GRISTMILL_TLS_KEY_FILE"),
        certificate_chain=_read(settings.cert_file, "GRISTMILL_TLS_CERT_FILE"),
    )


class ReloadingChannel:
    """A blocking channel to another service that presents renewed certificate files after a reload (SIGHUP).

    ``reload`` (run by ``reload_certificates``) reads and checks the files at once; when they can be used
    it advances ``generation`` and opens a new channel with them, which ``use`` hands out from then on. A call
    already running on the old channel finishes there: the old channel is closed when its last call returns
    (gRPC's ``close`` would cancel them). Files that cannot be used keep the running channel (logged). With TLS
    off (``tls`` None or not enabled) it is one plaintext channel, never re-created.

    Build stubs from ``use``'s channel per call (they are cheap), so that a new channel gets new stubs.
    """

    def __init__(self, address: str, tls: TlsSettings | None = None) -> None:
        self.address = address
        self.tls = tls if tls is not None and tls.enabled else None
        # Advanced by each ``reload`` that took new files.
        self.generation = 0
        self._lock = threading.Lock()
        self._current = self._open(channel_credentials(self.tls) if self.tls is not None else None)
        # Calls running on each open channel: the current one, and those a reload replaced that still have calls.
        self._calls: dict[grpc.Channel, int] = {self._current: 0}
        self._closed = False
        if self.tls is not None:
            _CHANNELS.add(self)

    def _open(self, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
        # ``address`` may list a service's replicas (gristmill.core.addresses): one round-robin channel over them.
        target, options = channel_target(self.address)
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    @property
    def open_channels(self) -> int:
        """How many channels are open: the current one and replaced ones with calls still running."""
        with self._lock:
            return len(self._calls)

    @contextlib.contextmanager
    def use(self) -> Iterator[grpc.Channel]:
        """The current channel, for the calls made inside; a reload meanwhile does not close it under them."""
        with self._lock:
            if self._closed:
                raise ValueError(f"cannot call {self.address} on a closed channel")
            channel = self._current
            self._calls[channel] += 1
        try:
            yield channel
        finally:
            finished = False
            with self._lock:
                if channel in self._calls:  # else ``close`` closed it meanwhile
                    self._calls[channel] -= 1
                    finished = channel is not self._current and self._calls[channel] == 0
                    if finished:
                        del self._calls[channel]
            if finished:
                channel.close()

    def reload(self) -> bool:
        """Read the files again; True when the next calls will present them (a new channel), False (logged) when
        they cannot be used or TLS is off (the running channel stays)."""
        if self.tls is None:
            return False
        try:
            _check_pair(self.tls)
            credentials = channel_credentials(self.tls)
        except ConfigurationError as exc:
            log.error("TLS certificate for calls to %s not reloaded, keeping the running one: %s", self.address, exc)
            return False
        assert credentials is not None
        channel = self._open(credentials)
        with self._lock:
            if self._closed:
                retired: grpc.Channel | None = channel
            else:
                retired, self._current = self._current, channel
                self._calls[channel] = 0
                self.generation += 1
                if self._calls[retired] == 0:
                    del self._calls[retired]
                else:
                    retired = None  # closed by ``use`` when its last call returns
        if retired is channel:
            channel.close()
            return False
        if retired is not None:
            retired.close()
        log.info("reloaded TLS certificate for calls to %s from %s", self.address, self.tls.cert_file)
        return True

    def close(self) -> None:
        """Close every channel this made (at shutdown; calls still running are cancelled). Safe to call twice."""
        with self._lock:
            self._closed = True
            channels, self._calls = list(self._calls), {}
        _CHANNELS.discard(self)
        for channel in channels:
            channel.close()


# Every reloading channel of this process with TLS on.
_CHANNELS: weakref.WeakSet[ReloadingChannel] = weakref.WeakSet()


# --------------------------------------------------------------------------- diagnosing a refused handshake

# OpenSSL's names of the alerts a server sends when it refuses a client's certificate → why, in words.
_REFUSED_OUR_CERTIFICATE = {
    "TLSV1_ALERT_UNKNOWN_CA": "unknown CA: it was not signed by the server's CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it is revoked",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsupported certificate: check its key usage (clientAuth)",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
    "TLSV1_ALERT_DECRYPT_ERROR": "its signature does not verify",
}
_NEEDS_A_CERTIFICATE = ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE")
# What OpenSSL says when the peer answers a ClientHello with something other than TLS (a plaintext gRPC server
# answers with HTTP/2 or closes the connection).
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNEXPECTED_EOF_WHILE_READING", "PACKET_LENGTH_TOO_LONG",
            "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "UNEXPECTED_MESSAGE")  # fmt: skip
# HTTP/2's connection preface and an empty SETTINGS frame: after TLS 1.3's handshake a server's refusal of our
# certificate arrives as an alert on the first read.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"

_CACHE_TTL_S = 10.0
_cache: dict[tuple[str, str, str, str, str], tuple[float, str | None]] = {}
_cache_lock = threading.Lock()


def _split(address: str) -> tuple[str, int] | None:
    target = address.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _reason(exc: ssl.SSLError) -> str:
    return str(getattr(exc, "reason", None) or exc).upper()


def _verify_reason(exc: ssl.SSLCertVerificationError) -> str:
    message = str(exc.verify_message or exc.reason or exc)
    code = exc.verify_code
    if code in (2, 19, 20, 21):  # issuer unknown / self-signed / local issuer / leaf signature
        return f"unknown CA: it was not signed by our CA ({message})"
    if code == 10:
        return "it has expired"
    if code == 9:
        return "it is not valid yet"
    return message.rstrip(".")


def diagnose_handshake(
    address: str, tls: TlsSettings | None, *, service: str = "", timeout_s: float = 2.0
) -> str | None:
    """Why a TLS handshake with ``address`` fails, in one line, or None (it succeeds, or the server is not
    reachable at all, or neither side speaks TLS). ``tls`` is the client's (None: a plaintext client).

    The handshake is repeated with Python's ``ssl`` module with the same files, since gRPC keeps the reason to
    itself. Results are cached per address and files for a few seconds.
    """
    enabled = tls is not None and tls.enabled
    key = (
        address,
        service,
        str(tls.cert_file) if enabled and tls else "",
        str(tls.key_file) if enabled and tls else "",
        str(tls.ca_file) if enabled and tls else "",
    )
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and now - hit[0] < _CACHE_TTL_S:
            return hit[1]
    result = _diagnose(address, tls if enabled else None, service=service, timeout_s=timeout_s)
    with _cache_lock:
        _cache[key] = (time.monotonic(), result)
    return result


def _diagnose(address: str, tls: TlsSettings | None, *, service: str, timeout_s: float) -> str | None:
    where = _split(address)
    if where is None:
        return None
    host, port = where
    who = f"the {service} service at {address}" if service else f"the server at {address}"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2"])
    if tls is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context.load_verify_locations(str(tls.ca_file))
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (ssl.SSLError, OSError, TypeError) as exc:
            return (
                f"TLS: our certificate files cannot be used ({getattr(exc, 'reason', None) or exc}): check "
                f"GRISTMILL_TLS_CERT_FILE={tls.cert_file}, GRISTMILL_TLS_KEY_FILE={tls.key_file}, "
                f"GRISTMILL_TLS_CA_FILE={tls.ca_file}"
            )
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return None  # not listening (or not reachable): not a TLS problem
    try:
        with context.wrap_socket(raw, server_hostname=host) as conn:
            conn.sendall(_H2_PREFACE)
            answer = conn.recv(1)
    except ssl.SSLCertVerificationError as exc:
        reason = _verify_reason(exc)
        if reason.startswith("unknown CA"):
            reason = f"unknown CA: it was not signed by our CA, GRISTMILL_TLS_CA_FILE={tls.ca_file if tls else ''}"
        return f"TLS: we refused the certificate of {who} ({reason})"
    except ssl.SSLError as exc:
        reason = _reason(exc)
        if any(marker in reason for marker in _NOT_TLS) or isinstance(exc, ssl.SSLEOFError):
            if tls is None:
                return None  # plaintext on both sides
            return (
                f"TLS: {who} does not speak TLS (a plaintext server) but GRISTMILL_TLS_* is set: unset "
                "GRISTMILL_TLS_CERT_FILE/KEY_FILE/CA_FILE or start the server with TLS"
            )
        if tls is None:
            return f"TLS: {who} speaks TLS but this client is plaintext; {_SET_TLS} (a client certificate)"
        if any(marker in reason for marker in _NEEDS_A_CERTIFICATE):
            return f"TLS: {who} requires a client certificate; {_SET_TLS}"
        for marker, why in _REFUSED_OUR_CERTIFICATE.items():
            if marker in reason:
                return f"TLS: {who} refused our certificate {tls.cert_file} ({why})"
        return f"TLS: the handshake with {who} failed ({getattr(exc, 'reason', None) or exc})"
    except (ConnectionResetError, BrokenPipeError):
        if tls is None:
            return None
        return f"TLS: {who} closed the connection during the handshake (it may refuse our certificate {tls.cert_file})"
    except OSError:
        return None  # a timeout or a reset that says nothing about TLS
    if tls is None:
        return f"TLS: {who} speaks TLS but this client is plaintext; {_SET_TLS} (a client certificate)"
    if not answer:
        # BoringSSL (gRPC's TLS) closes without an alert when it refuses a client certificate: say whether ours
        # is one our own CA signed (if not, the server's CA, which signed the server's certificate, did not either).
        problem = _own_certificate_problem(tls)
        if problem is not None:
            return f"TLS: {who} refused our certificate {tls.cert_file} ({problem})"
        return f"TLS: {who} closed the connection after the handshake (it did not accept {tls.cert_file})"
    return None


def _own_certificate_problem(tls: TlsSettings) -> str | None:
    """Why our CA does not accept our own certificate (unknown CA, expired, ...), or None: a TLS handshake with
    ourselves in memory, the server side trusting our CA and requiring our certificate."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        server.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        server.load_verify_locations(str(tls.ca_file))
        client.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (ssl.SSLError, OSError):
        return None
    server.verify_mode = ssl.CERT_REQUIRED
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, side in (("c", c), ("s", s)):
            if done[name]:
                continue
            try:
                side.do_handshake()
                done[name] = True
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except ssl.SSLCertVerificationError as exc:
                if name == "s":
                    reason = _verify_reason(exc).replace("by our CA", "by the server's CA")
                    return reason.split(" (")[0] if reason.startswith("unknown CA") else reason
                return None
            except ssl.SSLError:
                return None
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done["s"]:
            return None
    return None
