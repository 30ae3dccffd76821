"""The admin service over real gRPC (port 0): every RPC, its bad input, and the auth conformance suites."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from gristmill.api.admin.v1 import admin_pb2 as pb
from gristmill.api.common.v1 import common_pb2
from gristmill.core.auth import ADMIN, REGISTRY_READ, SERVING_PREDICT, new_api_key
from gristmill.core.auth_quota import UsageKind
from gristmill.core.licensing import License, LicenseClaims
from services.admin.tests.support import ROOT, RunningAdmin, bearer, running_admin
from tests.contracts.auth import AuthContract, AuthSubject, CrossOrgContract, CrossOrgSubject, Metadata

pytestmark = pytest.mark.integration

PLAN = pb.Plan(
    name="team",
    quotas=[pb.Quota(kind=pb.USAGE_KIND_PREDICTIONS, period=pb.QUOTA_PERIOD_DAY, limit=100)],
    prediction_rate_limit=pb.RateLimit(requests_per_second=5, burst=10),
)


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[RunningAdmin]:
    async with running_admin(tmp_path) as running:
        yield running


async def _refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


class TestAdminServiceAuth(AuthContract):
    @pytest.fixture
    async def auth_subject(self, svc: RunningAdmin) -> AuthSubject:
        await svc.create_org("acme")

        async def issue(org: str, scopes: frozenset[str]) -> str:
            return await svc.create_key(org, *scopes)

        async def revoke(secret: str) -> None:
            key_id = secret.split("_")[1]
            await svc.admin.RevokeApiKey(pb.RevokeApiKeyRequest(api_key_id=key_id), metadata=bearer(svc.root_secret))

        async def call(channel: grpc.aio.Channel, metadata: Metadata) -> object:
            return await svc.admin.ListApiKeys(pb.ListApiKeysRequest(), metadata=metadata)

        return AuthSubject(svc.address, call, ADMIN, SERVING_PREDICT, "acme", issue, revoke)


class TestAdminServiceCrossOrg(CrossOrgContract):
    @pytest.fixture
    async def cross_org_subject(self, svc: RunningAdmin) -> CrossOrgSubject:
        for org in ("acme", "globex"):
            await svc.create_org(org)

        async def issue(org: str) -> str:
            return await svc.create_key(org, ADMIN)

        async def read(channel: grpc.aio.Channel, metadata: Metadata, name: str) -> object:
            return await svc.admin.GetOrganization(pb.GetOrganizationRequest(organization_id=name), metadata=metadata)

        return CrossOrgSubject(svc.address, "acme", "globex", read, "acme", "nowhere", issue)


async def test_who_am_i_describes_the_calling_key(svc: RunningAdmin) -> None:
    await svc.create_org("acme")
    secret = await svc.create_key("acme", REGISTRY_READ, SERVING_PREDICT)
    reply = await svc.admin.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(secret))
    assert (reply.organization_id, list(reply.scopes), reply.auth_disabled) == (
        "acme",
        [REGISTRY_READ, SERVING_PREDICT],
        False,
    )
    assert reply.api_key_id == secret.split("_")[1]


async def test_key_lifecycle_over_grpc(svc: RunningAdmin) -> None:
    root = bearer(svc.root_secret)
    await svc.create_org("acme", PLAN)
    created = await svc.admin.CreateApiKey(
        pb.CreateApiKeyRequest(organization_id="acme", display_name="ci", scopes=[REGISTRY_READ]), metadata=root
    )
    assert created.secret.startswith(f"gmk_{created.api_key.api_key_id}_")
    listed = await svc.admin.ListApiKeys(pb.ListApiKeysRequest(organization_id="acme"), metadata=root)
    assert [k.api_key_id for k in listed.api_keys] == [created.api_key.api_key_id]
    assert created.secret not in str(listed), "listings never carry secrets"
    assert listed.api_keys[0].secret_prefix == created.secret[:12]
    rotated = await svc.admin.RotateApiKey(
        pb.RotateApiKeyRequest(api_key_id=created.api_key.api_key_id, grace_period=Duration(seconds=3600)),
        metadata=root,
    )
    assert rotated.api_key.rotated_from_api_key_id == created.api_key.api_key_id
    assert rotated.secret != created.secret
    both = await svc.admin.ListApiKeys(pb.ListApiKeysRequest(organization_id="acme"), metadata=root)
    assert [k.api_key_id for k in both.api_keys] == [rotated.api_key.api_key_id, created.api_key.api_key_id]
    assert both.api_keys[1].HasField("revoke_time"), "the old key's revocation is scheduled"
    # The old key still works during the grace period; revoking it ends that at once.
    await svc.admin.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(created.secret))
    revoked = await svc.admin.RevokeApiKey(pb.RevokeApiKeyRequest(api_key_id=created.api_key.api_key_id), metadata=root)
    assert revoked.HasField("revoke_time")
    err = await _refused(svc.admin.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(created.secret)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    active = await svc.admin.ListApiKeys(pb.ListApiKeysRequest(organization_id="acme"), metadata=root)
    assert [k.api_key_id for k in active.api_keys] == [rotated.api_key.api_key_id]
    again = await svc.admin.RevokeApiKey(pb.RevokeApiKeyRequest(api_key_id=created.api_key.api_key_id), metadata=root)
    assert again == revoked
    err = await _refused(
        svc.admin.RotateApiKey(pb.RotateApiKeyRequest(api_key_id=created.api_key.api_key_id), metadata=root)
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_organisations_over_grpc(svc: RunningAdmin) -> None:
    root = bearer(svc.root_secret)
    created = await svc.create_org("acme", PLAN)
    assert created.plan == PLAN and created.display_name == "Acme"
    assert (
        await svc.admin.GetOrganization(pb.GetOrganizationRequest(organization_id="acme"), metadata=root)
    ) == created
    own = await svc.admin.GetOrganization(pb.GetOrganizationRequest(), metadata=root)
    assert own.organization_id == ROOT
    free = pb.Plan(name="free")
    updated = await svc.admin.SetOrganizationPlan(
        pb.SetOrganizationPlanRequest(organization_id="acme", plan=free), metadata=root
    )
    assert updated.plan == free
    page = await svc.admin.ListOrganizations(
        pb.ListOrganizationsRequest(page=common_pb2.PageRequest(page_size=1)), metadata=root
    )
    assert [o.organization_id for o in page.organizations] == ["acme"] and page.next_page_token
    rest = await svc.admin.ListOrganizations(
        pb.ListOrganizationsRequest(page=common_pb2.PageRequest(page_size=1, page_token=page.next_page_token)),
        metadata=root,
    )
    assert [o.organization_id for o in rest.organizations] == [ROOT] and not rest.next_page_token


def _ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def test_bad_input_gets_an_actionable_status_and_writes_nothing(svc: RunningAdmin) -> None:
    root = bearer(svc.root_secret)
    await svc.create_org("acme")
    acme_admin = bearer(await svc.create_key("acme", ADMIN))
    past = _ts(datetime.now(UTC) - timedelta(days=1))
    bad_quota = pb.Plan(quotas=[pb.Quota(kind=pb.USAGE_KIND_PREDICTIONS, period=pb.QUOTA_PERIOD_DAY, limit=-1)])
    no_period = pb.Plan(quotas=[pb.Quota(kind=pb.USAGE_KIND_PREDICTIONS)])
    new_org, set_plan = pb.CreateOrganizationRequest, pb.SetOrganizationPlanRequest
    page = common_pb2.PageRequest
    cases = [
        (svc.admin.CreateOrganization(pb.CreateOrganizationRequest(organization_id="Bad Id"), metadata=root),
         grpc.StatusCode.INVALID_ARGUMENT, "organization_id"),
        (svc.admin.CreateOrganization(pb.CreateOrganizationRequest(organization_id="acme"), metadata=root),
         grpc.StatusCode.ALREADY_EXISTS, "already exists"),
        (svc.admin.CreateOrganization(new_org(organization_id="x1", plan=bad_quota), metadata=root),
         grpc.StatusCode.INVALID_ARGUMENT, "zero or more"),
        (svc.admin.CreateOrganization(new_org(organization_id="x2", plan=no_period), metadata=root),
         grpc.StatusCode.INVALID_ARGUMENT, "unknown quota period"),
        (svc.admin.CreateOrganization(pb.CreateOrganizationRequest(organization_id="x3"), metadata=acme_admin),
         grpc.StatusCode.PERMISSION_DENIED, "root organization"),
        (svc.admin.GetOrganization(pb.GetOrganizationRequest(organization_id="nowhere"), metadata=root),
         grpc.StatusCode.NOT_FOUND, "organization 'nowhere' not found"),
        (svc.admin.SetOrganizationPlan(pb.SetOrganizationPlanRequest(organization_id="nowhere"), metadata=root),
         grpc.StatusCode.NOT_FOUND, "not found"),
        (svc.admin.SetOrganizationPlan(set_plan(organization_id="acme", plan=bad_quota), metadata=root),
         grpc.StatusCode.INVALID_ARGUMENT, "zero or more"),
        (svc.admin.SetOrganizationPlan(pb.SetOrganizationPlanRequest(organization_id="acme"), metadata=acme_admin),
         grpc.StatusCode.PERMISSION_DENIED, "set plans"),
        (svc.admin.ListOrganizations(pb.ListOrganizationsRequest(page=page(page_size=-1)), metadata=root),
         grpc.StatusCode.INVALID_ARGUMENT, "page_size"),
        (svc.admin.CreateApiKey(pb.CreateApiKeyRequest(scopes=["everything"]), metadata=root),
         grpc.StatusCode.INVALID_ARGUMENT, "unknown scope"),
        (svc.admin.CreateApiKey(pb.CreateApiKeyRequest(), metadata=root),
         grpc.StatusCode.INVALID_ARGUMENT, "at least one scope"),
        (svc.admin.CreateApiKey(pb.CreateApiKeyRequest(scopes=[ADMIN], expire_time=past), metadata=root),
         grpc.StatusCode.INVALID_ARGUMENT, "in the past"),
        (svc.admin.CreateApiKey(pb.CreateApiKeyRequest(organization_id="nowhere", scopes=[ADMIN]), metadata=root),
         grpc.StatusCode.NOT_FOUND, "not found"),
        (svc.admin.ListApiKeys(pb.ListApiKeysRequest(page=page(page_token="garbage")), metadata=root),
         grpc.StatusCode.INVALID_ARGUMENT, "page_token"),
        (svc.admin.RotateApiKey(pb.RotateApiKeyRequest(api_key_id="0123456789abcdef"), metadata=root),
         grpc.StatusCode.NOT_FOUND, "not found"),
        (svc.admin.RotateApiKey(pb.RotateApiKeyRequest(api_key_id=""), metadata=root),
         grpc.StatusCode.INVALID_ARGUMENT, "api_key_id"),
        (svc.admin.RotateApiKey(
            pb.RotateApiKeyRequest(api_key_id="0123456789abcdef", grace_period=Duration(seconds=-5)), metadata=root),
         grpc.StatusCode.INVALID_ARGUMENT, "grace_period"),
        (svc.admin.RevokeApiKey(pb.RevokeApiKeyRequest(api_key_id="0123456789abcdef"), metadata=root),
         grpc.StatusCode.NOT_FOUND, "not found"),
        (svc.metering.GetUsage(pb.GetUsageRequest(start_time=_ts(datetime(2026, 2, 1, tzinfo=UTC)),
                                                  end_time=_ts(datetime(2026, 1, 1, tzinfo=UTC))), metadata=root),
         grpc.StatusCode.INVALID_ARGUMENT, "end_time is before start_time"),
        (svc.metering.GetUsage(pb.GetUsageRequest(kinds=[77]), metadata=root),  # type: ignore[list-item]
         grpc.StatusCode.INVALID_ARGUMENT, "unknown usage kind"),
        (svc.metering.GetUsage(pb.GetUsageRequest(organization_id="nowhere"), metadata=root),
         grpc.StatusCode.NOT_FOUND, "not found"),
        (svc.metering.GetUsage(pb.GetUsageRequest(api_key_id="0123456789abcdef"), metadata=root),
         grpc.StatusCode.NOT_FOUND, "not found"),
        (svc.metering.GetQuotaStatus(pb.GetQuotaStatusRequest(organization_id="nowhere"), metadata=root),
         grpc.StatusCode.NOT_FOUND, "not found"),
    ]  # fmt: skip
    for call, code, message in cases:
        err = await _refused(call)
        assert (err.code(), message in (err.details() or "")) == (code, True), err.details()
    orgs = await svc.admin.ListOrganizations(pb.ListOrganizationsRequest(), metadata=root)
    assert sorted(o.organization_id for o in orgs.organizations) == ["acme", ROOT]
    keys = await svc.admin.ListApiKeys(pb.ListApiKeysRequest(include_revoked=True), metadata=root)
    assert len(keys.api_keys) == 1, "only the bootstrap key in the root organisation"
    acme = await svc.admin.GetOrganization(pb.GetOrganizationRequest(organization_id="acme"), metadata=root)
    assert acme.plan == pb.Plan()


async def test_metering_answers_for_the_callers_organisation(svc: RunningAdmin) -> None:
    await svc.create_org("acme", PLAN)
    reader = bearer(await svc.create_key("acme", REGISTRY_READ))
    usage = await svc.metering.GetUsage(pb.GetUsageRequest(), metadata=reader)
    assert sorted(t.kind for t in usage.totals) == sorted(k.value for k in UsageKind) and all(
        t.quantity == 0 for t in usage.totals
    )
    status = await svc.metering.GetQuotaStatus(pb.GetQuotaStatusRequest(), metadata=reader)
    assert (status.organization_id, status.plan_name) == ("acme", "team")
    assert [(q.used, q.remaining) for q in status.quotas] == [(0.0, 100.0)]
    err = await _refused(svc.metering.GetUsage(pb.GetUsageRequest(organization_id=ROOT), metadata=reader))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_license_service_reports_the_licence_without_its_signature(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    claims = LicenseClaims(
        "lic-7",
        "Acme",
        now - timedelta(days=1),
        now + timedelta(days=30),
        frozenset({"serving.canary"}),
        {"max_serving_models": 4},
    )
    async with running_admin(tmp_path, license_=License(claims)) as svc:
        reader = bearer(await svc.create_key(ROOT, REGISTRY_READ))
        info = await _license(svc, reader)
        assert (info.state, info.license_id, info.customer, info.service) == (
            pb.LICENSE_STATE_VALID,
            "lic-7",
            "Acme",
            "admin",
        )
        assert list(info.features) == ["serving.canary"] and dict(info.limits) == {"max_serving_models": 4}
        assert info.grace_end_time.ToDatetime(tzinfo=UTC) == claims.expires_at + timedelta(days=14)
        err = await _refused(_license(svc, ()))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = await _refused(_license(svc, bearer(new_api_key().secret)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def _license(svc: RunningAdmin, metadata: Metadata) -> pb.LicenseInfo:
    from gristmill.api.admin.v1 import admin_pb2_grpc

    reply: pb.LicenseInfo = await admin_pb2_grpc.LicenseServiceStub(svc.channel).GetLicense(
        pb.GetLicenseRequest(), metadata=metadata
    )
    return reply
