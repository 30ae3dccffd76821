"""What makes one service process secure, built once at start: the API-key hook, the licence, mTLS, its own key.

A service's ``__main__`` calls ``load_security`` (the only place these settings are read); its ``build_app``
takes the result and wires it: ``auth_hook`` and ``server_credentials`` into its ``ServiceHost``, the
``LicenseService`` registration, ``license`` checks in its domain, ``tls`` (for a ``ReloadingChannel``) and
``call_metadata()`` on calls it makes to other services. ``embedded_security`` is the embedded dev mode (one
process, in-process bus): no API keys, and it says so loudly.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import grpc

from gristmill.core.auth import ACT_FOR_ORGANIZATION, ApiKeyAuthHook, ApiKeyVerifier, AuthSettings, DisabledAuthHook
from gristmill.core.auth_quota import QuotaGuard, UsageRecorder
from gristmill.core.auth_remote import RemoteKeyVerifier, RemotePlanSource, RemoteUsageSource
from gristmill.core.errors import ConfigurationError
from gristmill.core.events import EventCatalog
from gristmill.core.grpcserver import AuthHook, ServiceRegistration
from gristmill.core.host import PeriodicTask
from gristmill.core.license_service import LICENSE_METHOD_SCOPES, license_registration
from gristmill.core.licensing import License, load_license, reload_license
from gristmill.core.settings import LicenseSettings, load_settings
from gristmill.core.sql import Database
from gristmill.core.tls import TlsSettings, channel_credentials, server_credentials

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Security:
    # None where the service checks API keys itself (the admin service: ``load_security(local_keys=True)``).
    auth_hook: AuthHook | None
    license: License
    server_credentials: grpc.ServerCredentials | None = None
    # mTLS on calls to other services (None: plaintext): a ``ReloadingChannel`` re-reads the files on SIGHUP.
    tls: TlsSettings | None = None
    # This service's own API key, sent on its calls to other services (GRISTMILL_AUTH_SERVICE_KEY).
    service_key: str = ""
    # The admin service (plans and usage for quotas) and how long a plan is trusted.
    admin_address: str = ""
    cache_ttl_s: float = 30.0
    quota_refresh_s: float = 1.0
    # Where the licence came from, read again by ``reload`` (SIGHUP: a renewed licence file).
    license_settings: LicenseSettings | None = None
    # The auth settings it was built from (the admin service builds its own hook from them).
    auth: AuthSettings | None = None
    # The quota guards built by ``quota_guard``, closed by ``close``.
    _guards: list[QuotaGuard] = field(default_factory=list, init=False, repr=False, compare=False)

    def reload(self) -> bool:
        """Adopt the licence file again if it verifies (a renewal); a bad one keeps the running licence."""
        if self.license_settings is None:
            return False
        return reload_license(self.license, self.license_settings.file, self.license_settings.development_key)

    def quota_guard(self, database: Database, catalog: EventCatalog, service: str) -> QuotaGuard | None:
        """The guard that meters and limits this service's work per organisation, publishing usage through the
        service's outbox; None without an admin service and a service key (the embedded dev mode). ``close``
        closes it. The service runs ``quota_refresh(guard)`` among its host components."""
        if not (self.admin_address and self.service_key):
            return None
        guard = QuotaGuard(
            RemotePlanSource(self.admin_address, self.service_key, ttl_s=self.cache_ttl_s, tls=self.tls),
            RemoteUsageSource(self.admin_address, self.service_key, tls=self.tls),
            UsageRecorder(database, catalog, service),
            refresh_s=self.quota_refresh_s,
        )
        self._guards.append(guard)
        return guard

    def close(self) -> None:
        """Close the channels to the admin service (the key verifier's, the quota guards'): at shutdown."""
        for guard in self._guards:
            guard.close()
        self._guards.clear()
        close = getattr(self.auth_hook, "close", None)
        if close is not None:
            close()

    def call_metadata(self, organization_id: str = "") -> tuple[tuple[str, str], ...]:
        """Metadata for a call this service makes to another one: its own key, when it has one, acting for
        ``organization_id`` when given (the key must be a root-organisation admin key)."""
        if not self.service_key:
            return ()
        metadata = [("authorization", f"Bearer {self.service_key}")]
        if organization_id:
            metadata.append((ACT_FOR_ORGANIZATION, organization_id))
        return tuple(metadata)

    def license_registration(self, service: str) -> ServiceRegistration:
        """``LicenseService.GetLicense`` on this service's server: the licence this process verified."""
        return license_registration(self.license, service)


def quota_refresh(guard: QuotaGuard) -> PeriodicTask:
    """The host component that keeps ``guard``'s plans and usage totals current (``QuotaGuard.refresh``)."""
    return PeriodicTask("quota-refresh", guard.refresh, guard.refresh_s)


def embedded_security(service: str, license_: License | None = None) -> Security:
    """The embedded dev mode: every call allowed without a key (logged at WARNING), no TLS.

    ``license_`` defaults to the community edition.
    """
    log.warning(
        "AUTH IS DISABLED for %s (embedded dev mode): every call is allowed without an API key. "
        "Never expose this process to a network.",
        service,
    )
    return Security(DisabledAuthHook(), license_ or load_license(None, ""))


def configured_license(settings: LicenseSettings) -> License:
    """The licence ``GRISTMILL_LICENSE_*`` names, verified (the community edition without a file); raises
    ``ConfigurationError`` for one that is not genuine, not signed by a trusted key, or the retired
    ``GRISTMILL_LICENSE_PUBLIC_KEY``."""
    if settings.public_key:
        raise ConfigurationError(
            "GRISTMILL_LICENSE_PUBLIC_KEY is no longer read: licences are verified with the vendor keys this "
            "release ships with; remove it (to trust a key of your own for development, set "
            "GRISTMILL_LICENSE_DEVELOPMENT_KEY instead, which every service reports loudly)"
        )
    return load_license(settings.file, settings.development_key)


def load_security(
    service: str,
    method_scopes: Mapping[str, str],
    *,
    embedded: bool,
    public: Collection[str] = (),
    local_keys: bool = False,
) -> Security:
    """Read ``GRISTMILL_AUTH_*``, ``GRISTMILL_LICENSE_*`` and ``GRISTMILL_TLS_*`` and build the service's security.

    ``method_scopes`` is the service's own table (``LicenseService`` is added here); ``public`` methods need
    no key. ``local_keys``: the service verifies keys against its own store (the admin service) and builds its
    hook from ``Security.auth``; ``auth_hook`` is then None. Raises
    ``ConfigurationError`` (one line naming the variable) for a setting that cannot work: auth switched off
    outside the embedded mode, no admin address, a licence that is not genuine or signed with a key this release
    does not trust, the retired ``GRISTMILL_LICENSE_PUBLIC_KEY``, unreadable certificates.
    """
    auth = load_settings(AuthSettings)
    licence = load_settings(LicenseSettings)
    tls = load_settings(TlsSettings)
    license_ = configured_license(licence)
    channel_credentials(tls)  # unreadable files fail here, at start
    channel_tls = tls if tls.enabled else None
    hook = (
        None
        if local_keys
        else build_auth_hook(
            auth,
            method_scopes={**method_scopes, **LICENSE_METHOD_SCOPES},
            embedded=embedded,
            public=public,
            service=service,
            tls=channel_tls,
        )
    )
    return Security(
        auth_hook=hook,
        license=license_,
        server_credentials=server_credentials(tls),
        tls=channel_tls,
        service_key=auth.service_key.get_secret_value(),
        admin_address=auth.admin_address,
        cache_ttl_s=auth.cache_ttl_s,
        quota_refresh_s=auth.quota_refresh_s,
        license_settings=licence,
        auth=auth,
    )


def build_auth_hook(
    settings: AuthSettings,
    *,
    method_scopes: Mapping[str, str],
    embedded: bool,
    verifier: ApiKeyVerifier | None = None,
    public: Collection[str] = (),
    service: str = "",
    tls: TlsSettings | None = None,
) -> AuthHook:
    """The auth hook a service runs with: API keys checked by ``verifier`` (default: the admin service at
    ``settings.admin_address``, over mTLS with ``tls``), or, in the embedded dev mode with
    ``settings.disabled``, none (logged loudly)."""
    if settings.disabled:
        if not embedded:
            raise ConfigurationError(
                "GRISTMILL_AUTH_DISABLED=true is allowed only in the embedded dev mode (no "
                "GRISTMILL_KAFKA_BOOTSTRAP_SERVERS): remove it and give callers API keys"
            )
        log.warning(
            "AUTH IS DISABLED%s (GRISTMILL_AUTH_DISABLED=true, embedded dev mode): every call is allowed "
            "without an API key. Never expose this process to a network.",
            f" for {service}" if service else "",
        )
        return DisabledAuthHook()
    if verifier is None:
        if not settings.admin_address:
            raise ConfigurationError(
                "GRISTMILL_AUTH_ADMIN_ADDRESS is empty: set it to the admin service (host:port) that verifies API "
                "keys, or GRISTMILL_AUTH_DISABLED=true in the embedded dev mode"
            )
        verifier = RemoteKeyVerifier(settings.admin_address, ttl_s=settings.cache_ttl_s, tls=tls)
    return ApiKeyAuthHook(verifier, method_scopes, public=public, root_organization_id=settings.root_organization_id)
