"""Secrets hygiene: after a session that creates, rotates, uses, misuses and revokes keys, meters usage and
reports a signed licence, none of the key secrets nor the licence signature appear in the captured logs (at
DEBUG, every logger), the spans (in-memory exporter), the events (outbox rows and bus records) or any answer
other than CreateApiKey / RotateApiKey."""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select

from gristmill.api.admin.v1 import admin_pb2 as pb
from gristmill.api.admin.v1 import admin_pb2_grpc as pb_grpc
from gristmill.core.auth import ADMIN, SERVING_PREDICT, Principal
from gristmill.core.auth_quota import Plan, PlanSource, QuotaGuard, UsageKind, UsageRecorder, UsageSource
from gristmill.core.errors import ResourceExhaustedError
from gristmill.core.events import OutboxEvent
from gristmill.core.licensing import LicenseClaims, load_license
from services.admin.tests.support import RunningAdmin, bearer, running_admin
from tests.support.licences import TEST_KEY_ID, TEST_RING, signed_license_file

pytestmark = pytest.mark.integration


def _licence(tmp_path: Path) -> tuple[Path, str]:
    now = datetime.now(UTC).replace(microsecond=0)
    claims = LicenseClaims("lic-h", "Acme", now - timedelta(days=1), now + timedelta(days=9), frozenset({"x.y"}))
    path = signed_license_file(tmp_path / "acme.license", claims, key_id=TEST_KEY_ID)
    signature = json.loads(path.read_text())["signature"]
    return path, signature


async def test_no_secret_reaches_logs_spans_events_or_answers(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = tracing
    caplog.set_level(logging.DEBUG)
    licence_path, signature = _licence(tmp_path)
    license_ = load_license(licence_path, ring=TEST_RING)
    secrets: list[str] = []
    answers: list[str] = []

    async with running_admin(tmp_path, tracer_provider=provider, license_=license_) as svc:
        secrets.append(svc.root_secret)
        root = bearer(svc.root_secret)
        plan = pb.Plan(quotas=[pb.Quota(kind=pb.USAGE_KIND_PREDICTIONS, period=pb.QUOTA_PERIOD_DAY, limit=2)])
        answers.append(str(await svc.create_org("acme", plan)))
        created = await svc.admin.CreateApiKey(
            pb.CreateApiKeyRequest(organization_id="acme", scopes=[SERVING_PREDICT]), metadata=root
        )
        secrets.append(created.secret)
        rotated = await svc.admin.RotateApiKey(
            pb.RotateApiKeyRequest(api_key_id=created.api_key.api_key_id, grace_period=Duration(seconds=60)),
            metadata=root,
        )
        secrets.append(rotated.secret)
        admin_key = await svc.create_key("acme", ADMIN)
        secrets.append(admin_key)
        # Uses, and misuses that log refusals: wrong scope, revoked, secrets in malformed headers.
        for secret in (created.secret, rotated.secret, admin_key):
            answers.append(str(await svc.admin.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(secret))))
        await svc.admin.RevokeApiKey(pb.RevokeApiKeyRequest(api_key_id=created.api_key.api_key_id), metadata=root)
        bad_calls = [
            svc.admin.ListApiKeys(pb.ListApiKeysRequest(), metadata=bearer(rotated.secret)),
            svc.admin.WhoAmI(pb.WhoAmIRequest(), metadata=bearer(created.secret)),
            svc.admin.WhoAmI(pb.WhoAmIRequest(), metadata=(("authorization", f"Basic {admin_key}"),)),
            svc.admin.WhoAmI(pb.WhoAmIRequest(), metadata=(("authorization", f"Bearer {admin_key}x"),)),
            svc.admin.WhoAmI(pb.WhoAmIRequest(), metadata=(("authorization", admin_key),)),
        ]
        for call in bad_calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            answers.append(f"{err.value.code()} {err.value.details()} {err.value.trailing_metadata()}")
        answers.append(str(await svc.admin.ListApiKeys(pb.ListApiKeysRequest(include_revoked=True), metadata=root)))
        answers.append(
            str(await pb_grpc.LicenseServiceStub(svc.channel).GetLicense(pb.GetLicenseRequest(), metadata=root))
        )
        # Usage through the admin service's own outbox and bus, as a metered service would publish it.
        platform = svc.app.host.platform
        guard = QuotaGuard(_LocalPlans(svc), _NoUsage(), UsageRecorder(platform.database, platform.catalog, "serving"))
        caller = Principal("acme", rotated.api_key.api_key_id, frozenset({SERVING_PREDICT}))
        for _ in range(2):
            guard.reserve(caller, {UsageKind.PREDICTIONS: 1}, resource="deployment/d").commit()
        with pytest.raises(ResourceExhaustedError) as exhausted:
            guard.reserve(caller, {UsageKind.PREDICTIONS: 1}, resource="deployment/d")
        answers.append(str(exhausted.value) + str(exhausted.value.trailing_metadata()))
        svc.app.host.relay.drain()
        with platform.database.transaction() as session:
            rows = session.execute(select(OutboxEvent)).scalars().all()
            events = [repr((r.topic, r.key, r.payload, r.headers)) for r in rows]
        assert len(events) == 2, "the test must have produced events to scan"

    spans = exporter.get_finished_spans()
    assert spans, "the test must have produced spans to scan"
    span_text = "\n".join(
        repr((s.name, dict(s.attributes or {}), [(e.name, dict(e.attributes or {})) for e in s.events], s.status))
        for s in spans
    )
    log_text = caplog.text + "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert any("revoked" in a for a in answers), "the refusals were captured"

    needles = {"licence signature": signature, "licence signature bytes": base64.b64decode(signature).hex()}
    for i, secret in enumerate(secrets):
        needles[f"key {i}"] = secret
        needles[f"key {i} secret part"] = secret.split("_", 2)[2]
    haystacks = {"logs": log_text, "spans": span_text, "events": "\n".join(events), "answers": "\n".join(answers)}
    leaks = [(what, where) for what, needle in needles.items() for where, hay in haystacks.items() if needle in hay]
    assert leaks == []
    # The scan looks at real material: key ids do appear, so the haystacks are not empty or redacted wholesale.
    assert rotated.api_key.api_key_id in log_text and rotated.api_key.api_key_id in "\n".join(events)


class _LocalPlans(PlanSource):
    """Plans read straight from the admin store (the remote source is tested with Kafka)."""

    def __init__(self, svc: RunningAdmin) -> None:
        self._svc = svc

    def plan_for(self, organization_id: str) -> Plan:
        org = self._svc.app.store.get_organization(organization_id)
        assert org is not None
        return org.plan


class _NoUsage(UsageSource):
    def used(self, organization_id: str, kind: UsageKind, start: datetime, end: datetime) -> float:
        return 0.0
