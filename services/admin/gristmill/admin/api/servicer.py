"""AdminService and MeteringService: validate → proto→domain → domain (in a thread) → domain→proto.

The caller is ``current_principal()`` (set by the auth hook); every rule lives in the domain.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gristmill.admin.api import convert
from gristmill.admin.domain.admin import Admin
from gristmill.admin.domain.metering import Metering
from gristmill.api.admin.v1 import admin_pb2 as pb
from gristmill.api.admin.v1 import admin_pb2_grpc as pb_grpc
from gristmill.core.auth import ADMIN, AUTHENTICATED, current_principal
from gristmill.core.auth_quota import Plan, plan_from_proto
from gristmill.core.grpcserver import ServiceRegistration
from gristmill.core.license_service import LICENSE_METHOD_SCOPES

ADMIN_SERVICE = "/gristmill.api.admin.v1.AdminService"
METERING_SERVICE = "/gristmill.api.admin.v1.MeteringService"
# The scope each RPC needs (see admin.proto); the domain adds the organisation rules.
METHOD_SCOPES = {
    f"{ADMIN_SERVICE}/*": ADMIN,
    f"{ADMIN_SERVICE}/WhoAmI": AUTHENTICATED,
    # Own organisation with any scope; others need a root admin key (checked in the domain).
    f"{METERING_SERVICE}/*": AUTHENTICATED,
    **LICENSE_METHOD_SCOPES,
}


def _plan(request: Any) -> Plan:
    return plan_from_proto(request.plan) if request.HasField("plan") else Plan()


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    async def CreateOrganization(self, request: pb.CreateOrganizationRequest, context: Any) -> pb.Organization:
        org = await asyncio.to_thread(
            self.admin.create_organization,
            current_principal(),
            request.organization_id,
            request.display_name,
            _plan(request),
        )
        return convert.organization_to_proto(org)

    async def GetOrganization(self, request: pb.GetOrganizationRequest, context: Any) -> pb.Organization:
        org = await asyncio.to_thread(self.admin.get_organization, current_principal(), request.organization_id)
        return convert.organization_to_proto(org)

    async def ListOrganizations(
        self, request: pb.ListOrganizationsRequest, context: Any
    ) -> pb.ListOrganizationsResponse:
        items, token = await asyncio.to_thread(
            self.admin.list_organizations, current_principal(), request.page.page_size, request.page.page_token
        )
        return pb.ListOrganizationsResponse(
            organizations=[convert.organization_to_proto(o) for o in items], next_page_token=token
        )

    async def SetOrganizationPlan(self, request: pb.SetOrganizationPlanRequest, context: Any) -> pb.Organization:
        org = await asyncio.to_thread(self.admin.set_plan, current_principal(), request.organization_id, _plan(request))
        return convert.organization_to_proto(org)

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: Any) -> pb.CreateApiKeyResponse:
        expire = (
            convert.time_from_proto(request.expire_time, "expire_time") if request.HasField("expire_time") else None
        )
        created = await asyncio.to_thread(
            self.admin.create_key,
            current_principal(),
            request.organization_id,
            request.display_name,
            list(request.scopes),
            expire,
        )
        return pb.CreateApiKeyResponse(api_key=convert.key_to_proto(created.key), secret=created.secret)

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: Any) -> pb.ListApiKeysResponse:
        items, token = await asyncio.to_thread(
            self.admin.list_keys,
            current_principal(),
            request.organization_id,
            request.include_revoked,
            request.page.page_size,
            request.page.page_token,
        )
        return pb.ListApiKeysResponse(api_keys=[convert.key_to_proto(k) for k in items], next_page_token=token)

    async def RotateApiKey(self, request: pb.RotateApiKeyRequest, context: Any) -> pb.CreateApiKeyResponse:
        grace = convert.duration_from_proto(request.grace_period, "grace_period")
        created = await asyncio.to_thread(self.admin.rotate_key, current_principal(), request.api_key_id, grace)
        return pb.CreateApiKeyResponse(api_key=convert.key_to_proto(created.key), secret=created.secret)

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: Any) -> pb.ApiKey:
        key = await asyncio.to_thread(self.admin.revoke_key, current_principal(), request.api_key_id)
        return convert.key_to_proto(key)

    async def WhoAmI(self, request: pb.WhoAmIRequest, context: Any) -> pb.WhoAmIResponse:
        caller = current_principal()
        return pb.WhoAmIResponse(
            organization_id=caller.organization_id,
            api_key_id=caller.api_key_id,
            scopes=sorted(caller.scopes),
            auth_disabled=caller.auth_disabled,
        )


class MeteringServicer(pb_grpc.MeteringServiceServicer):
    def __init__(self, metering: Metering) -> None:
        self.metering = metering

    async def GetUsage(self, request: pb.GetUsageRequest, context: Any) -> pb.GetUsageResponse:
        query = convert.usage_query_from_proto(request)
        totals = await asyncio.to_thread(self.metering.usage, current_principal(), query)
        return pb.GetUsageResponse(totals=[convert.usage_total_to_proto(t) for t in totals])

    async def GetQuotaStatus(self, request: pb.GetQuotaStatusRequest, context: Any) -> pb.GetQuotaStatusResponse:
        org, statuses = await asyncio.to_thread(
            self.metering.quota_status, current_principal(), request.organization_id
        )
        return pb.GetQuotaStatusResponse(
            organization_id=org.organization_id,
            plan_name=org.plan.name,
            quotas=[convert.quota_status_to_proto(s) for s in statuses],
        )


def registrations(admin: Admin, metering: Metering) -> list[ServiceRegistration]:
    admin_servicer = AdminServicer(admin)
    metering_servicer = MeteringServicer(metering)
    return [
        ServiceRegistration(
            pb.DESCRIPTOR.services_by_name["AdminService"],
            lambda server: pb_grpc.add_AdminServiceServicer_to_server(admin_servicer, server),
        ),
        ServiceRegistration(
            pb.DESCRIPTOR.services_by_name["MeteringService"],
            lambda server: pb_grpc.add_MeteringServiceServicer_to_server(metering_servicer, server),
        ),
    ]
