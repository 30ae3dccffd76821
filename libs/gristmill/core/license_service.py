"""The ``LicenseService`` every service registers: it reports the licence that process verified at start.

    registrations = [my_service, license_registration(license_, SERVICE_NAME)]
    method_scopes = {**MY_SCOPES, **LICENSE_METHOD_SCOPES}

GetLicense needs an authenticated caller but no scope, and never fails: a missing licence reports the
community state, an expired one its grace or expired state. The signature is not part of ``License``
once verified, so it can never be returned. ``development_key`` is set whenever the process trusts a
development licence key, so that a development install can always be told from a production one.
"""

from __future__ import annotations

from typing import Any

from gristmill.api.admin.v1 import admin_pb2, admin_pb2_grpc
from gristmill.core.auth import AUTHENTICATED
from gristmill.core.auth_remote import to_timestamp
from gristmill.core.grpcserver import ServiceRegistration
from gristmill.core.licensing import COMMUNITY_LIMITS, License, LicenseState

LICENSE_SERVICE = "/gristmill.api.admin.v1.LicenseService"
LICENSE_METHOD_SCOPES = {f"{LICENSE_SERVICE}/GetLicense": AUTHENTICATED}

_STATES = {
    LicenseState.COMMUNITY: admin_pb2.LICENSE_STATE_COMMUNITY,
    LicenseState.VALID: admin_pb2.LICENSE_STATE_VALID,
    LicenseState.GRACE: admin_pb2.LICENSE_STATE_GRACE,
    LicenseState.EXPIRED: admin_pb2.LICENSE_STATE_EXPIRED,
}


def license_info(license_: License, service: str) -> admin_pb2.LicenseInfo:
    """What GetLicense answers for ``license_`` as of now (its clock)."""
    info = admin_pb2.LicenseInfo(
        state=_STATES[license_.state()],
        service=service,
        message=license_.describe(),
        development_key=license_.development_key,
    )
    claims = license_.claims
    if claims is None:
        # The community edition: no features, and the limits it runs under.
        info.limits.update(dict(COMMUNITY_LIMITS))
        return info
    info.license_id = claims.license_id
    info.key_id = claims.key_id
    info.customer = claims.customer
    info.issue_time.CopyFrom(to_timestamp(claims.issued_at))
    info.expire_time.CopyFrom(to_timestamp(claims.expires_at))
    if license_.grace_end is not None:
        info.grace_end_time.CopyFrom(to_timestamp(license_.grace_end))
    info.features.extend(sorted(claims.features))
    info.limits.update(dict(claims.limits))
    return info


class LicenseServicer(admin_pb2_grpc.LicenseServiceServicer):
    def __init__(self, license_: License, service: str) -> None:
        self._license = license_
        self._service = service

    async def GetLicense(self, request: admin_pb2.GetLicenseRequest, context: Any) -> admin_pb2.LicenseInfo:
        return license_info(self._license, self._service)


def license_registration(license_: License, service: str) -> ServiceRegistration:
    """The LicenseService of ``service``, ready for ``ServiceHost(registrations=[...])``."""
    servicer = LicenseServicer(license_, service)
    return ServiceRegistration(
        admin_pb2.DESCRIPTOR.services_by_name["LicenseService"],
        lambda server: admin_pb2_grpc.add_LicenseServiceServicer_to_server(servicer, server),
    )
