"""Registering a version: the one operation in two steps.

The version is recorded PENDING in one transaction, its artifacts are verified and copied outside any
transaction (``ArtifactVerifier``), and the outcome (READY/FAILED, the card, the event) is recorded in a
second one that only succeeds while the version is still PENDING.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from gristmill.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    GristmillError,
    InvalidArgumentError,
    NotFoundError,
)
from gristmill.core.licensing import License
from gristmill.core.storage import ObjectStore, validate_key
from gristmill.registry.domain import names
from gristmill.registry.domain.common import artifact_prefix, check_model_limit, require_model
from gristmill.registry.domain.model import (
    SPLITS,
    Caller,
    Metric,
    ModelVersion,
    VerificationOutcome,
    VersionDraft,
    VersionStatus,
)
from gristmill.registry.domain.ports import RegistryStore, RegistryTransaction
from gristmill.registry.domain.verification import ArtifactVerifier, validate_signature

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_JOB_ID = 255


@dataclass(frozen=True)
class Registration:
    """A request to register a version (from the RPC or from a training job's success event)."""

    model_name: str
    create_model_if_missing: bool
    draft: VersionDraft


class Registrations:
    """The verification aggregate: versions from PENDING to READY or FAILED, exactly once each."""

    def __init__(
        self,
        store: RegistryStore,
        objects: ObjectStore,
        *,
        clock: Callable[[], datetime],
        license_: License,
    ) -> None:
        self.store = store
        self.clock = clock
        self.license = license_
        self.verifier = ArtifactVerifier(objects, clock)

    def validate_registration(self, registration: Registration) -> Registration:
        """Check everything that can be checked before the artifacts are read; normalise the source prefix."""
        names.validate_model_name(registration.model_name)
        draft = registration.draft
        if not draft.source_prefix:
            raise InvalidArgumentError("source_prefix is required: the object-store prefix the artifacts are under")
        try:
            validate_key(draft.source_prefix.rstrip("/"))
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"source_prefix is not valid: {exc}") from None
        source_prefix = draft.source_prefix.rstrip("/") + "/"
        ref = draft.source_manifest
        if not ref.key:
            raise InvalidArgumentError("manifest.key is required: the manifest.json that lists the artifacts")
        try:
            validate_key(ref.key)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"manifest.key is not valid: {exc}") from None
        if not _SHA256.fullmatch(ref.sha256):
            raise InvalidArgumentError("manifest.sha256 must be the manifest's SHA-256 as 64 lower-case hex digits")
        if draft.signature is not None:
            validate_signature(draft.signature)
        names.validate_task(draft.task)
        names.validate_label_map(draft.label_map)
        names.validate_tags(draft.tags)
        names.validate_text(draft.description, what="description")
        for metric in draft.metrics:
            _validate_metric(metric)
        if len(draft.lineage.training_job_id) > _MAX_JOB_ID:
            raise InvalidArgumentError(f"lineage.training_job_id is longer than {_MAX_JOB_ID} characters")
        return replace(registration, draft=replace(draft, source_prefix=source_prefix))

    def begin_registration(self, caller: Caller, registration: Registration) -> tuple[ModelVersion, bool]:
        """Record the version PENDING (creating the model if asked); returns (version, needs verification).

        Idempotent per training job: a job that already made a version gets that version back, needing
        verification only while it is still PENDING (an earlier attempt stopped half-way).
        """
        registration = self.validate_registration(registration)
        org = caller.organization_id
        job_id = registration.draft.lineage.training_job_id
        # Two attempts: a concurrent registration may create the model, or register the same job, first.
        for attempt in range(2):
            try:
                with self.store.transaction() as tx:
                    if job_id:
                        existing = tx.find_version_by_job(org, job_id)
                        if existing is not None:
                            if existing.model_name != registration.model_name:
                                raise FailedPreconditionError(
                                    f"training job {job_id!r} is already registered as version {existing.version} "
                                    f"of {existing.model_name!r}; a job makes one version"
                                )
                            return existing, existing.status is VersionStatus.PENDING
                    if tx.get_model(org, registration.model_name) is None:
                        if not registration.create_model_if_missing:
                            raise NotFoundError(
                                f"registered model {registration.model_name!r} does not exist; create it first "
                                "or set create_model_if_missing"
                            )
                        draft = registration.draft
                        check_model_limit(tx, self.license)
                        tx.insert_model(
                            org,
                            registration.model_name,
                            description="",
                            task=draft.task,
                            label_map=draft.label_map,
                            tags={},
                            created_by=caller.actor,
                            now=self.clock(),
                        )
                    version = tx.add_version(
                        org,
                        registration.model_name,
                        registration.draft,
                        artifact_prefix_for=artifact_prefix,
                        created_by=caller.actor,
                        now=self.clock(),
                    )
                    return version, True
            except AlreadyExistsError:
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def verify(self, version: ModelVersion) -> VerificationOutcome:
        """Check and copy the artifacts (no transaction held). Raises only on outages: then it stays PENDING."""
        with self.store.transaction() as tx:
            model = require_model(tx, version.organization_id, version.model_name)
        return self.verifier.verify(version, model_task=model.task, model_label_map=model.label_map)

    def finish_registration(
        self, tx: RegistryTransaction, version: ModelVersion, outcome: VerificationOutcome
    ) -> ModelVersion:
        """Record the outcome and emit ``model version registered`` (once: only a PENDING version changes)."""
        done = tx.complete_version(
            version.organization_id,
            version.model_name,
            version.version,
            status=outcome.status,
            reason=outcome.reason,
            files=outcome.files,
            manifest=outcome.manifest,
            signature=outcome.signature or version.signature,
            task=outcome.task or version.task,
            label_map=outcome.label_map or version.label_map,
            metrics=outcome.metrics or version.metrics,
            now=self.clock(),
        )
        if done is None:
            current = tx.get_version(version.organization_id, version.model_name, version.version)
            assert current is not None
            return current
        if outcome.card is not None:
            tx.add_card(version.organization_id, outcome.card)
        tx.emit_version_registered(done)
        return done

    def verify_and_finish(self, version: ModelVersion) -> ModelVersion:
        outcome = self.verify(version)
        with self.store.transaction() as tx:
            return self.finish_registration(tx, version, outcome)

    def register_version(self, caller: Caller, registration: Registration, *, wait: bool) -> tuple[ModelVersion, bool]:
        """The RPC: begin, and verify now when ``wait``; returns (version, still needs verification)."""
        version, needs = self.begin_registration(caller, registration)
        if needs and wait:
            return self.verify_and_finish(version), False
        return version, needs

    def resume_pending(self, *, min_age_s: float = 0.0) -> int:
        """Finish the verification of versions left PENDING (by a restart or an object-store outage) that
        have not changed for ``min_age_s`` (so an in-flight verification is left alone); returns how many
        were finished."""
        cutoff = self.clock() - timedelta(seconds=min_age_s)
        with self.store.transaction() as tx:
            pending = [v for v in tx.pending_versions() if v.update_time <= cutoff]
        finished = 0
        for version in pending:
            try:
                self.verify_and_finish(version)
                finished += 1
            except GristmillError as exc:
                log.warning("could not resume verification of %s v%d: %s", version.model_name, version.version, exc)
        return finished


def _validate_metric(metric: Metric) -> None:
    if not metric.name:
        raise InvalidArgumentError("every metric needs a name")
    if metric.split and metric.split not in SPLITS:
        raise InvalidArgumentError(f"metric {metric.name!r} has an unknown split {metric.split!r}")
    if metric.value != metric.value:  # NaN compares unequal to itself
        raise InvalidArgumentError(f"metric {metric.name!r} is NaN; report a number")
