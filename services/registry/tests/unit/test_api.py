"""Every RPC over real gRPC (in-process platform, port 0): what it answers, and the status and message it
gives bad input — never INTERNAL, never a partial write."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as pb
from services.registry.tests.api import SIG, TEST, Api, fails
from services.registry.tests.support import sha256


async def test_models_versions_and_download_manifest(api: Api) -> None:
    s = api.stub
    created = await s.CreateRegisteredModel(
        pb.CreateRegisteredModelRequest(
            name="sentiment",
            description="reviews",
            task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
            label_map=common_pb2.LabelMap(labels=["negative", "positive"]),
            tags={"team": "nlp"},
        )
    )
    assert (created.name, created.organization_id, created.created_by) == ("sentiment", "default", "anonymous")
    v1 = await api.register("sentiment", "jobs/a", accuracy=0.8, job="job-a")
    assert v1.status == pb.MODEL_VERSION_STATUS_READY and v1.manifest.key == "models/sentiment/1/manifest.json"
    v2 = await api.register("sentiment", "jobs/b", accuracy=0.9, wait=False)
    assert v2.status == pb.MODEL_VERSION_STATUS_PENDING
    await api.app.servicer.drain()
    again = await api.register("sentiment", "jobs/a", job="job-a")  # same training job: the same version
    assert again.version == 1

    got = await s.GetModelVersion(pb.GetModelVersionRequest(registered_model_name="sentiment"))
    assert got.version == 2 and got.status == pb.MODEL_VERSION_STATUS_READY  # latest READY
    await s.SetAlias(pb.SetAliasRequest(registered_model_name="sentiment", alias="production", version=1))
    manifest = await s.GetDownloadManifest(
        pb.GetDownloadManifestRequest(
            registered_model_name="sentiment", selector=common_pb2.ModelVersionSelector(alias="production")
        )
    )
    assert (manifest.version, manifest.resolved_alias, manifest.artifact_prefix) == (
        1,
        "production",
        v1.artifact_prefix,
    )
    assert [f.key for f in manifest.files] == [f.key for f in v1.files] and manifest.signature == SIG
    assert list(manifest.label_map.labels) == ["negative", "positive"] and manifest.lineage.training_job_id == "job-a"
    objects = api.app.host.platform.objects
    for ref in manifest.files:  # what serving downloads verifies against what the manifest says
        assert sha256(objects.get_bytes(ref.key, expected_sha256=ref.sha256)) == ref.sha256

    model = await s.GetRegisteredModel(pb.GetRegisteredModelRequest(name="sentiment"))
    assert dict(model.aliases) == {"production": 1} and model.latest_version == 2
    updated = await s.UpdateRegisteredModel(
        pb.UpdateRegisteredModelRequest(
            name="sentiment",
            registered_model=pb.RegisteredModel(description="new", tags={"a": "b"}),
            update_mask=FieldMask(paths=["description"]),
        )
    )
    assert updated.description == "new" and dict(updated.tags) == {"team": "nlp"}
    listed = await s.ListModelVersions(
        pb.ListModelVersionsRequest(
            registered_model_name="sentiment",
            metric_filters=[
                pb.MetricFilter(metric_name="accuracy", split=TEST, comparison=pb.COMPARISON_GREATER, value=0.85)
            ],
        )
    )
    assert [v.version for v in listed.model_versions] == [2]
    by_alias = await s.ListModelVersions(
        pb.ListModelVersionsRequest(registered_model_name="sentiment", alias="production")
    )
    assert [v.version for v in by_alias.model_versions] == [1]
    edited = await s.UpdateModelVersion(
        pb.UpdateModelVersionRequest(
            registered_model_name="sentiment",
            version=2,
            model_version=pb.ModelVersion(tags={"x": "y"}),
            update_mask=FieldMask(paths=["tags"]),
        )
    )
    assert dict(edited.tags) == {"x": "y"}


async def test_search_paging_and_tokens(api: Api) -> None:
    for name in ("a1", "a2", "a3", "b1"):
        await api.stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=name, tags={"kind": name[0]}))
    page1 = await api.stub.SearchRegisteredModels(
        pb.SearchRegisteredModelsRequest(name_prefix="a", page=common_pb2.PageRequest(page_size=2))
    )
    assert [m.name for m in page1.registered_models] == ["a1", "a2"] and page1.next_page_token
    page2 = await api.stub.SearchRegisteredModels(
        pb.SearchRegisteredModelsRequest(
            name_prefix="a", page=common_pb2.PageRequest(page_size=2, page_token=page1.next_page_token)
        )
    )
    assert [m.name for m in page2.registered_models] == ["a3"] and page2.next_page_token == ""
    tagged = await api.stub.SearchRegisteredModels(pb.SearchRegisteredModelsRequest(tags={"kind": "b"}))
    assert [m.name for m in tagged.registered_models] == ["b1"]
    for token, message in [
        ("not-a-token", "page_token is malformed"),
        (page1.next_page_token[:-3], "page_token is malformed"),
    ]:
        await fails(
            api.stub.SearchRegisteredModels(
                pb.SearchRegisteredModelsRequest(name_prefix="a", page=common_pb2.PageRequest(page_token=token))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            message,
        )
    await fails(
        api.stub.SearchRegisteredModels(
            pb.SearchRegisteredModelsRequest(
                name_prefix="b", page=common_pb2.PageRequest(page_token=page1.next_page_token)
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "different query",
    )
    await fails(
        api.stub.SearchRegisteredModels(pb.SearchRegisteredModelsRequest(page=common_pb2.PageRequest(page_size=-1))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_size must not be negative",
    )


async def test_aliases_policies_and_cards(api: Api) -> None:
    s = api.stub
    await api.register("m", "jobs/p1", accuracy=0.80)
    await s.SetAlias(pb.SetAliasRequest(registered_model_name="m", alias="production", version=1, reason="baseline"))
    policy = await s.SetPromotionPolicy(
        pb.SetPromotionPolicyRequest(
            policy=pb.PromotionPolicy(
                registered_model_name="m",
                enabled=True,
                target_alias="production",
                metric_name="accuracy",
                min_improvement=0.005,
                mode=pb.PROMOTION_MODE_MANUAL_APPROVAL,
            )
        )
    )
    assert policy.split == TEST and policy.goal == common_pb2.METRIC_GOAL_MAXIMIZE  # defaults filled in
    assert (await s.GetPromotionPolicy(pb.GetPromotionPolicyRequest(registered_model_name="m"))) == policy
    await api.register("m", "jobs/p2", accuracy=0.85)
    pending = await _eventually_pending(api)
    approved = await s.ApprovePromotion(pb.ApprovePromotionRequest(promotion_id=pending.promotion_id, reason="ok"))
    assert approved.state == pb.PENDING_PROMOTION_STATE_APPROVED
    history = await s.GetAliasHistory(pb.GetAliasHistoryRequest(registered_model_name="m", alias="production"))
    latest = history.changes[0]
    assert (latest.from_version, latest.to_version, latest.cause) == (1, 2, pb.ALIAS_CHANGE_CAUSE_APPROVAL)
    assert latest.decision.baseline_value == pytest.approx(0.80) and latest.decision.passed
    await fails(
        s.RejectPromotion(pb.RejectPromotionRequest(promotion_id=pending.promotion_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "no longer PENDING",
    )
    unchanged = await s.SetAlias(pb.SetAliasRequest(registered_model_name="m", alias="production", version=2))
    assert not unchanged.changed and unchanged.change.sequence == latest.sequence
    deleted = await s.DeleteAlias(
        pb.DeleteAliasRequest(registered_model_name="m", alias="production", reason="bye", expected_current_version=2)
    )
    assert not deleted.HasField("to_version") and deleted.from_version == 2
    await s.DeletePromotionPolicy(pb.DeletePromotionPolicyRequest(registered_model_name="m"))

    card = await s.GetModelCard(pb.GetModelCardRequest(registered_model_name="m"))
    assert card.version == 2 and card.revision == 1 and "accuracy/test" in card.markdown
    edited = await s.UpdateModelCard(
        pb.UpdateModelCardRequest(
            registered_model_name="m",
            version=2,
            model_card=pb.ModelCard(limitations="English only"),
            update_mask=FieldMask(paths=["limitations"]),
        )
    )
    assert edited.revision == 2 and "English only" in edited.markdown
    assert edited.object.key == "models/m/2/model-card-r2.md"
    stored = api.app.host.platform.objects.get_bytes(edited.object.key, expected_sha256=edited.object.sha256)
    assert stored.decode() == edited.markdown
    await fails(
        s.UpdateModelCard(
            pb.UpdateModelCardRequest(registered_model_name="m", version=2, update_mask=FieldMask(paths=["markdown"]))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "read-only",
    )


async def _eventually_pending(api: Api) -> pb.PendingPromotion:
    for _ in range(100):  # the policy consumer runs in the host's background thread
        listed = await api.stub.ListPendingPromotions(pb.ListPendingPromotionsRequest(registered_model_name="m"))
        if listed.promotions:
            return listed.promotions[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no pending promotion appeared")


async def test_every_rpc_refuses_bad_input_with_a_clear_status(api: Api) -> None:
    """One READY version (1) and one FAILED version (2) of "m"; then every RPC gets garbage."""
    s = api.stub
    await api.register("m", "jobs/ok")
    broken = api.upload("jobs/broken")
    api.app.host.platform.objects.put_bytes("jobs/broken/model.safetensors", b"tampered", overwrite=True)
    failed = await s.RegisterModelVersion(
        pb.RegisterModelVersionRequest(
            registered_model_name="m",
            source_prefix="jobs/broken",
            manifest=broken,
            signature=SIG,
            wait_for_verification=True,
        )
    )
    assert failed.status == pb.MODEL_VERSION_STATUS_FAILED and "sha256 mismatch" in failed.status_reason
    bad_manifest = pb.RegisterModelVersionRequest(
        registered_model_name="m", source_prefix="jobs/x", manifest=common_pb2.ObjectRef(key="jobs/x/manifest.json")
    )
    too_long = "a" * 129
    invalid, missing, precondition, aborted = (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
    )
    # Each call is a lambda so the calls run one after another, not all at once.
    cases: list[tuple[Any, grpc.StatusCode, str]] = [
        (lambda: s.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name="")), invalid, "must not be empty"),
        (lambda: s.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=too_long)), invalid, "is not valid"),
        (lambda: s.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name="Upper")), invalid, "is not valid"),
        (lambda: s.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name="a..b")), invalid, "is not valid"),
        (
            lambda: s.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name="m")),
            grpc.StatusCode.ALREADY_EXISTS,
            "exists",
        ),
        (
            lambda: s.CreateRegisteredModel(
                pb.CreateRegisteredModelRequest(name="n", label_map=common_pb2.LabelMap(labels=["a", "a"]))
            ),
            invalid,
            "twice",
        ),
        (
            lambda: s.CreateRegisteredModel(
                pb.CreateRegisteredModelRequest(name="n", task=common_pb2.TASK_TYPE_CAUSAL_LM)
            ),
            invalid,
            "not supported",
        ),
        (
            lambda: s.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name="n", task=99)),
            invalid,
            "not a known TaskType",
        ),
        (lambda: s.GetRegisteredModel(pb.GetRegisteredModelRequest(name="nope")), missing, "'nope' does not exist"),
        (lambda: s.GetRegisteredModel(pb.GetRegisteredModelRequest(name="bad/name")), invalid, "is not valid"),
        (
            lambda: s.SearchRegisteredModels(pb.SearchRegisteredModelsRequest(name_prefix="A")),
            invalid,
            "can never match",
        ),
        (
            lambda: s.SearchRegisteredModels(pb.SearchRegisteredModelsRequest(has_alias="1x")),
            invalid,
            "start with a letter",
        ),
        (lambda: s.UpdateRegisteredModel(pb.UpdateRegisteredModelRequest(name="m")), invalid, "update_mask is empty"),
        (
            lambda: s.UpdateRegisteredModel(
                pb.UpdateRegisteredModelRequest(name="m", update_mask=FieldMask(paths=["name"]))
            ),
            invalid,
            "cannot be changed",
        ),
        (
            lambda: s.UpdateRegisteredModel(
                pb.UpdateRegisteredModelRequest(name="nope", update_mask=FieldMask(paths=["tags"]))
            ),
            missing,
            "does not exist",
        ),
        (
            lambda: s.RegisterModelVersion(pb.RegisterModelVersionRequest(registered_model_name="m")),
            invalid,
            "source_prefix",
        ),
        (lambda: s.RegisterModelVersion(bad_manifest), invalid, "manifest.sha256"),
        (
            lambda: s.RegisterModelVersion(
                pb.RegisterModelVersionRequest(
                    registered_model_name="m",
                    source_prefix="jobs/x",
                    manifest=common_pb2.ObjectRef(key="jobs/x/m", sha256="0" * 64),
                    signature=common_pb2.ModelSignature(
                        inputs=[common_pb2.TensorSpec(name="t", datatype="BYTES", shape=[-1])]
                    ),
                )
            ),
            invalid,
            "at least one input and one output",
        ),
        (
            lambda: s.RegisterModelVersion(
                pb.RegisterModelVersionRequest(
                    registered_model_name="nope",
                    source_prefix="jobs/x",
                    manifest=common_pb2.ObjectRef(key="jobs/x/m", sha256="0" * 64),
                )
            ),
            missing,
            "create_model_if_missing",
        ),
        (
            lambda: s.GetModelVersion(
                pb.GetModelVersionRequest(
                    registered_model_name="m", selector=common_pb2.ModelVersionSelector(version=9)
                )
            ),
            missing,
            "version 9",
        ),
        (
            lambda: s.GetModelVersion(
                pb.GetModelVersionRequest(
                    registered_model_name="m", selector=common_pb2.ModelVersionSelector(version=-1)
                )
            ),
            invalid,
            "positive",
        ),
        (
            lambda: s.GetModelVersion(
                pb.GetModelVersionRequest(
                    registered_model_name="m", selector=common_pb2.ModelVersionSelector(alias="x")
                )
            ),
            missing,
            "alias 'x'",
        ),
        (
            lambda: s.ListModelVersions(pb.ListModelVersionsRequest(registered_model_name="nope")),
            missing,
            "does not exist",
        ),
        (
            lambda: s.ListModelVersions(
                pb.ListModelVersionsRequest(
                    registered_model_name="m", metric_filters=[pb.MetricFilter(metric_name="a")]
                )
            ),
            invalid,
            "needs a comparison",
        ),
        (
            lambda: s.ListModelVersions(pb.ListModelVersionsRequest(registered_model_name="m", statuses=[0])),
            invalid,
            "UNSPECIFIED",
        ),
        (
            lambda: s.UpdateModelVersion(
                pb.UpdateModelVersionRequest(
                    registered_model_name="m", version=9, update_mask=FieldMask(paths=["tags"])
                )
            ),
            missing,
            "version 9",
        ),
        (
            lambda: s.UpdateModelVersion(
                pb.UpdateModelVersionRequest(
                    registered_model_name="m", version=1, update_mask=FieldMask(paths=["metrics"])
                )
            ),
            invalid,
            "cannot be changed",
        ),
        (
            lambda: s.SetAlias(pb.SetAliasRequest(registered_model_name="m", alias="production", version=2)),
            precondition,
            "is FAILED",
        ),
        (
            lambda: s.SetAlias(
                pb.SetAliasRequest(registered_model_name="m", alias="production", version=1, expected_current_version=1)
            ),
            aborted,
            "moved meanwhile",
        ),
        (
            lambda: s.SetAlias(pb.SetAliasRequest(registered_model_name="m", alias="", version=1)),
            invalid,
            "alias must not be empty",
        ),
        (
            lambda: s.DeleteAlias(pb.DeleteAliasRequest(registered_model_name="m", alias="production")),
            missing,
            "alias 'production'",
        ),
        (lambda: s.GetAliasHistory(pb.GetAliasHistoryRequest(registered_model_name="nope")), missing, "does not exist"),
        (
            lambda: s.GetAliasHistory(
                pb.GetAliasHistoryRequest(registered_model_name="m", page=common_pb2.PageRequest(page_token="%%%"))
            ),
            invalid,
            "page_token is malformed",
        ),
        (lambda: s.SetPromotionPolicy(pb.SetPromotionPolicyRequest()), invalid, "policy is required"),
        (
            lambda: s.SetPromotionPolicy(
                pb.SetPromotionPolicyRequest(policy=pb.PromotionPolicy(registered_model_name="m", metric_name="a"))
            ),
            invalid,
            "target_alias is required",
        ),
        (
            lambda: s.GetPromotionPolicy(pb.GetPromotionPolicyRequest(registered_model_name="m")),
            missing,
            "no promotion policy",
        ),
        (
            lambda: s.DeletePromotionPolicy(pb.DeletePromotionPolicyRequest(registered_model_name="nope")),
            missing,
            "does not exist",
        ),
        (
            lambda: s.ListPendingPromotions(pb.ListPendingPromotionsRequest(registered_model_name="nope")),
            missing,
            "does not exist",
        ),
        (
            lambda: s.ApprovePromotion(pb.ApprovePromotionRequest(promotion_id="")),
            invalid,
            "promotion_id must not be empty",
        ),
        (lambda: s.RejectPromotion(pb.RejectPromotionRequest(promotion_id="abc")), missing, "does not exist"),
        (
            lambda: s.GetModelCard(
                pb.GetModelCardRequest(registered_model_name="m", selector=common_pb2.ModelVersionSelector(version=2))
            ),
            precondition,
            "is FAILED",
        ),
        (lambda: s.GetModelCard(pb.GetModelCardRequest(registered_model_name="nope")), missing, "does not exist"),
        (
            lambda: s.UpdateModelCard(pb.UpdateModelCardRequest(registered_model_name="m", version=1)),
            invalid,
            "update_mask is empty",
        ),
        (
            lambda: s.UpdateModelCard(
                pb.UpdateModelCardRequest(
                    registered_model_name="m", version=7, update_mask=FieldMask(paths=["limitations"])
                )
            ),
            missing,
            "version 7",
        ),
        (lambda: s.ImportBaseModel(pb.ImportBaseModelRequest(name="", local_path="/x")), invalid, "must not be empty"),
        (
            lambda: s.ListBaseModels(pb.ListBaseModelsRequest(page=common_pb2.PageRequest(page_token="x"))),
            invalid,
            "page_token",
        ),
        (lambda: s.GetBaseModel(pb.GetBaseModelRequest(name="..")), invalid, "is not valid"),
        (
            lambda: s.GetDownloadManifest(
                pb.GetDownloadManifestRequest(
                    registered_model_name="m", selector=common_pb2.ModelVersionSelector(version=2)
                )
            ),
            precondition,
            "only READY versions can be loaded",
        ),
        (
            lambda: s.GetDownloadManifest(pb.GetDownloadManifestRequest(registered_model_name="nope")),
            missing,
            "does not exist",
        ),
    ]
    for call, code, message in cases:
        await fails(call(), code, message)
    # None of it wrote anything: still one model with two versions, no alias, no policy.
    model = await s.GetRegisteredModel(pb.GetRegisteredModelRequest(name="m"))
    assert (model.latest_version, dict(model.aliases)) == (2, {})
    models = await s.SearchRegisteredModels(pb.SearchRegisteredModelsRequest())
    assert [m.name for m in models.registered_models] == ["m"]
