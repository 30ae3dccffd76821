"""Registration: artifacts verified against the manifest and copied, READY or FAILED (never READY on bad
artifacts), idempotent per training job, ``model version registered`` emitted exactly once."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from gristmill.api.events.v1 import events_pb2
from gristmill.api.registry.v1 import registry_pb2
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from gristmill.core.manifests import DatasetManifest, FileEntry, ModelManifest, SplitFile
from gristmill.registry.domain.model import FileRef, Metric, ModelVersion, VersionStatus
from gristmill.registry.domain.registration import Registration
from services.registry.tests.support import CALLER, Env, draft, sha256, upload_model


def _register(env: Env, name: str, prefix: str, manifest: FileRef, **kwargs: Any) -> tuple[ModelVersion, bool]:
    return env.registry.registrations.register_version(
        CALLER, Registration(name, True, draft(manifest, prefix, **kwargs)), wait=True
    )


def test_ready_version_has_verified_copies_manifest_card_and_one_event(env: Env) -> None:
    dataset = DatasetManifest(
        project_id="reviews",
        dataset_version_id="dv1",
        version_number=1,
        task_type="TASK_TYPE_TEXT_CLASSIFICATION",
        label_map=["negative", "positive"],
        schema_version=1,
        seed=0,
        ratios={"train": 1.0},
        created_at="now",
        splits={
            "test": SplitFile(
                FileEntry("datasets/reviews/1/test.jsonl", "0" * 64, 1), 40, {"negative": 15, "positive": 25}
            )
        },
    )
    dataset_info = env.objects.put_bytes("datasets/reviews/1/manifest.json", dataset.to_json())
    manifest = upload_model(env.objects, "jobs/j1", metrics={"accuracy/test": 0.91, "loss": 0.3})
    base = draft(manifest, "jobs/j1", job_id="j1", metrics=())
    lineage = base.lineage.__class__(
        training_job_id="j1",
        project_id="reviews",
        dataset_version_id="dv1",
        dataset_manifest=FileRef(dataset_info.key, dataset_info.sha256, dataset_info.size),
    )
    version, needs = env.registry.registrations.register_version(
        CALLER, Registration("sentiment", True, base.__class__(**{**base.__dict__, "lineage": lineage})), wait=True
    )
    assert needs is False
    assert version.status is VersionStatus.READY, version.status_reason
    assert version.artifact_prefix == "models/sentiment/1/"
    assert [f.key for f in version.files] == ["models/sentiment/1/config.json", "models/sentiment/1/model.safetensors"]
    # The copies are byte-identical and carry the manifest's checksums.
    for ref in version.files:
        assert sha256(env.objects.get_bytes(ref.key, expected_sha256=ref.sha256)) == ref.sha256
    # Metrics came from the manifest ("accuracy/test" → accuracy on test) since the registration had none.
    assert version.metric("accuracy", "test") == 0.91 and version.metric("loss", "") == 0.3
    assert version.manifest is not None and version.manifest.key == "models/sentiment/1/manifest.json"
    new_manifest = ModelManifest.from_json(
        env.objects.get_bytes(version.manifest.key, expected_sha256=version.manifest.sha256)
    )
    assert {n: e.key for n, e in new_manifest.files.items()} == {
        "config.json": "models/sentiment/1/config.json",
        "model.safetensors": "models/sentiment/1/model.safetensors",
    }
    card = env.registry.cards.get_card(CALLER, "sentiment", version=1, alias=None)
    assert card.revision == 1 and card.object is not None and card.object.key == "models/sentiment/1/model-card.md"
    assert env.objects.get_bytes(card.object.key).decode() == card.markdown
    assert (
        "| test | 40 | negative: 15, positive: 25 |" in card.markdown and "| accuracy/test | 0.9100 |" in card.markdown
    )
    events = env.events(events_pb2.ModelVersionRegistered)
    assert len(events) == 1
    event, payload = events[0]
    assert event.key == "sentiment"
    assert (payload.version, payload.status, payload.training_job_id) == (
        1,
        registry_pb2.MODEL_VERSION_STATUS_READY,
        "j1",
    )
    assert payload.dataset_version.manifest.sha256 == dataset_info.sha256


def test_same_training_job_never_makes_two_versions(env: Env) -> None:
    manifest = upload_model(env.objects, "jobs/j2")
    first, _ = _register(env, "m", "jobs/j2", manifest, job_id="job-2")
    again, needs = _register(env, "m", "jobs/j2", manifest, job_id="job-2")
    assert again.version == first.version == 1 and needs is False
    assert env.registry.catalog.get_model(CALLER, "m").latest_version == 1
    assert len(env.events(events_pb2.ModelVersionRegistered)) == 1
    with pytest.raises(FailedPreconditionError, match="already registered as version 1 of 'm'"):
        _register(env, "other", "jobs/j2", manifest, job_id="job-2")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("tamper", r"model\.safetensors: sha256 mismatch"),
        ("delete", r"model\.safetensors: missing"),
        ("manifest", r"manifest\.json: sha256 mismatch"),
        ("no-manifest", r"manifest\.json: missing"),
        ("outside", r"outside the source prefix"),
        ("size", r"model\.safetensors: size mismatch"),
        ("no-signature", r"no signature"),
    ],
)
def test_bad_artifacts_end_failed_with_the_reason_and_leave_nothing(env: Env, damage: str, reason: str) -> None:
    prefix = "jobs/bad"
    manifest = upload_model(env.objects, prefix)
    signature = draft(manifest, prefix).signature
    if damage == "tamper":
        env.objects.put_bytes(f"{prefix}/model.safetensors", b"tampered weights", overwrite=True)
    elif damage == "delete":
        env.objects.delete(f"{prefix}/model.safetensors")
    elif damage == "manifest":
        manifest = FileRef(manifest.key, "f" * 64, manifest.size_bytes)
    elif damage == "no-manifest":
        env.objects.delete(manifest.key)
    elif damage in ("outside", "size"):
        raw = json.loads(env.objects.get_bytes(manifest.key))
        if damage == "outside":
            other = env.objects.put_bytes("elsewhere/model.safetensors", b"x")
            raw["files"]["model.safetensors"] = {"key": other.key, "sha256": other.sha256, "size_bytes": other.size}
        else:
            raw["files"]["model.safetensors"]["size_bytes"] += 1
        info = env.objects.put_bytes(manifest.key, json.dumps(raw).encode(), overwrite=True)
        manifest = FileRef(info.key, info.sha256, info.size)
    elif damage == "no-signature":
        raw = json.loads(env.objects.get_bytes(manifest.key))
        raw["signature"] = {}
        info = env.objects.put_bytes(manifest.key, json.dumps(raw).encode(), overwrite=True)
        manifest = FileRef(info.key, info.sha256, info.size)
        signature = None
    version, _ = _register(env, "m", prefix, manifest, signature=signature)
    assert version.status is VersionStatus.FAILED
    assert re.search(reason, version.status_reason), version.status_reason
    # Nothing partial under the registry's prefix, and the failure is announced once, with its reason.
    assert list(env.objects.list("models/")) == []
    [(_, payload)] = env.events(events_pb2.ModelVersionRegistered)
    assert payload.status == registry_pb2.MODEL_VERSION_STATUS_FAILED and re.search(reason, payload.status_reason)
    with pytest.raises(FailedPreconditionError, match="only READY versions can be aliased"):
        env.registry.promotions.set_alias(CALLER, "m", "production", 1, reason="", expected=None)
    with pytest.raises(FailedPreconditionError, match="only READY versions can be loaded"):
        env.registry.catalog.download_manifest(CALLER, "m", version=1, alias=None)


def test_pending_version_is_resumed_once(env: Env) -> None:
    manifest = upload_model(env.objects, "jobs/j3")
    version, needs = env.registry.registrations.register_version(
        CALLER, Registration("m", True, draft(manifest, "jobs/j3", job_id="j3")), wait=False
    )
    assert needs and version.status is VersionStatus.PENDING
    assert env.registry.registrations.resume_pending() == 1
    assert env.registry.registrations.resume_pending() == 0
    assert env.registry.catalog.get_version(CALLER, "m", version=1, alias=None).status is VersionStatus.READY
    # A second finish of the same version (a resume racing a redelivery) changes nothing and emits nothing.
    again = env.registry.registrations.verify_and_finish(version)
    assert again.status is VersionStatus.READY
    assert len(env.events(events_pb2.ModelVersionRegistered)) == 1


def test_registration_bad_input_writes_nothing(env: Env) -> None:
    manifest = upload_model(env.objects, "jobs/j4")
    good = draft(manifest, "jobs/j4")
    cases = [
        (Registration("Bad Name", True, good), InvalidArgumentError, "registered model name"),
        (
            Registration("m", True, good.__class__(**{**good.__dict__, "source_prefix": ""})),
            InvalidArgumentError,
            "source_prefix is required",
        ),
        (
            Registration("m", True, good.__class__(**{**good.__dict__, "source_prefix": "../etc"})),
            InvalidArgumentError,
            "source_prefix is not valid",
        ),
        (
            Registration("m", True, good.__class__(**{**good.__dict__, "source_manifest": FileRef("", "", 0)})),
            InvalidArgumentError,
            "manifest.key is required",
        ),
        (
            Registration(
                "m", True, good.__class__(**{**good.__dict__, "source_manifest": FileRef(manifest.key, "abc", 0)})
            ),
            InvalidArgumentError,
            "manifest.sha256",
        ),
        (
            Registration("m", True, good.__class__(**{**good.__dict__, "metrics": (Metric("", 1.0),)})),
            InvalidArgumentError,
            "metric needs a name",
        ),
        (Registration("m", False, good), NotFoundError, "set create_model_if_missing"),
    ]
    for registration, error, message in cases:
        with pytest.raises(error, match=message):
            env.registry.registrations.register_version(CALLER, registration, wait=True)
    with pytest.raises(NotFoundError):
        env.registry.catalog.get_model(CALLER, "m")
    assert env.events(events_pb2.ModelVersionRegistered) == []
