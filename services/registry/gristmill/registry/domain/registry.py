"""The registry's rules: what each operation checks, in which order, and what it changes.

Every method takes the ``Caller`` (organisation and actor) and validated or validatable plain values, and
works through one store transaction, so a refused request changes nothing. Registration is the one
operation in two steps: the version is recorded PENDING in one transaction, its artifacts are verified
and copied outside any transaction, and the outcome (READY/FAILED, the card, the event) is recorded in a
second one that only succeeds while the version is still PENDING.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gristmill.core.errors import (
    AbortedError,
    AlreadyExistsError,
    FailedPreconditionError,
    GristmillError,
    InvalidArgumentError,
    NotFoundError,
)
from gristmill.core.ids import new_id, validate_id
from gristmill.core.licensing import License, load_license
from gristmill.core.storage import ObjectStore, object_key, validate_key
from gristmill.core.storage.base import sha256_file
from gristmill.registry.domain import basemodels, cards, names, paging
from gristmill.registry.domain.model import (
    DEFAULT_ORGANIZATION,
    SPLITS,
    AliasCause,
    AliasChange,
    BaseModel,
    Caller,
    CardText,
    FileRef,
    Metric,
    ModelCard,
    ModelQuery,
    ModelVersion,
    Page,
    PendingPromotion,
    PromotionDecision,
    PromotionMode,
    PromotionPolicy,
    PromotionState,
    RegisteredModel,
    VerificationOutcome,
    VersionDraft,
    VersionQuery,
    VersionStatus,
)
from gristmill.registry.domain.policy import evaluate
from gristmill.registry.domain.verification import ArtifactVerifier, validate_signature
from gristmill.registry.store.base import RegistryStore, RegistryTransaction

log = logging.getLogger(__name__)

POLICY_ACTOR = "policy"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PREFIX_CHARS = re.compile(r"^[a-z0-9._-]{0,128}$")
_MAX_JOB_ID = 255


def utc_now() -> datetime:
    return datetime.now(UTC)


def artifact_prefix(org: str, model_name: str, version: int) -> str:
    """models/<model>/<version>/ for the default organisation; other organisations get their own subtree."""
    parts: tuple[str, ...] = ("models", model_name, str(version))
    if org != DEFAULT_ORGANIZATION:
        parts = ("orgs", org, *parts)
    return object_key(*parts) + "/"


def base_model_prefix(org: str, name: str) -> str:
    parts: tuple[str, ...] = ("base-models", name)
    if org != DEFAULT_ORGANIZATION:
        parts = ("orgs", org, *parts)
    return object_key(*parts) + "/"


@dataclass(frozen=True)
class Registration:
    """A request to register a version (from the RPC or from a training job's success event)."""

    model_name: str
    create_model_if_missing: bool
    draft: VersionDraft


class Registry:
    def __init__(
        self,
        store: RegistryStore,
        objects: ObjectStore,
        *,
        clock: Callable[[], datetime] = utc_now,
        allow_local_paths: bool = False,
        license_: License | None = None,
    ) -> None:
        self.store = store
        # Enterprise licence limits (max_registered_models); the community edition's without one.
        self.license = license_ or load_license(None, "")
        self.objects = objects
        self.clock = clock
        self.allow_local_paths = allow_local_paths
        self.verifier = ArtifactVerifier(objects, clock)

    # ------------------------------------------------------------------------------------ registered models

    def create_model(
        self,
        caller: Caller,
        *,
        name: str,
        description: str,
        task: str,
        label_map: tuple[str, ...],
        tags: dict[str, str],
    ) -> RegisteredModel:
        names.validate_model_name(name)
        names.validate_text(description, what="description")
        names.validate_task(task)
        names.validate_label_map(label_map)
        names.validate_tags(tags)
        with self.store.transaction() as tx:
            self._check_model_limit(tx)
            return tx.insert_model(
                caller.organization_id,
                name,
                description=description,
                task=task,
                label_map=label_map,
                tags=tags,
                created_by=caller.actor,
                now=self.clock(),
            )

    def get_model(self, caller: Caller, name: str) -> RegisteredModel:
        names.validate_model_name(name)
        with self.store.transaction() as tx:
            return self._require_model(tx, caller.organization_id, name)

    def search_models(
        self, caller: Caller, query: ModelQuery, page_size: int, page_token: str
    ) -> tuple[list[RegisteredModel], str]:
        if not _PREFIX_CHARS.fullmatch(query.name_prefix):
            raise InvalidArgumentError(
                f"name_prefix {query.name_prefix[:64]!r} can never match: model names use only lower-case letters, "
                "digits, '.', '-' and '_'"
            )
        if query.has_alias:
            names.validate_alias(query.has_alias)
        names.validate_task(query.task or names.TASK_UNSPECIFIED)
        names.validate_tags(query.tags)
        fingerprint = paging.fingerprint(
            "models", [query.name_prefix, sorted(query.tags.items()), query.has_alias, query.task]
        )
        page = paging.page_request(page_size, page_token, fingerprint)
        with self.store.transaction() as tx:
            items, after = tx.search_models(caller.organization_id, query, page)
        return items, paging.next_page_token(after, fingerprint) if after else ""

    def update_model(
        self,
        caller: Caller,
        name: str,
        paths: list[str],
        *,
        description: str,
        tags: dict[str, str],
        label_map: tuple[str, ...],
    ) -> RegisteredModel:
        names.validate_model_name(name)
        _check_mask(paths, ("description", "tags", "label_map"), what="registered model")
        if "description" in paths:
            names.validate_text(description, what="description")
        if "tags" in paths:
            names.validate_tags(tags)
        if "label_map" in paths:
            names.validate_label_map(label_map)
        with self.store.transaction() as tx:
            self._require_model(tx, caller.organization_id, name)
            return tx.update_model(
                caller.organization_id,
                name,
                now=self.clock(),
                description=description if "description" in paths else None,
                tags=tags if "tags" in paths else None,
                label_map=label_map if "label_map" in paths else None,
            )

    # ------------------------------------------------------------------------------------ registration

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
                        self._check_model_limit(tx)
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
            model = self._require_model(tx, version.organization_id, version.model_name)
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

    def _check_model_limit(self, tx: RegistryTransaction) -> None:
        """FAILED_PRECONDITION naming the licence when one more registered model would exceed it."""
        if self.license.limit("max_registered_models") is None:
            return
        # Without the lock two creators could both count N and both insert.
        tx.lock_model_count()
        self.license.check_limit("max_registered_models", tx.count_models() + 1)

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

    # ------------------------------------------------------------------------------------ versions

    def resolve_version(
        self, tx: RegistryTransaction, org: str, name: str, *, version: int | None, alias: str | None
    ) -> ModelVersion:
        """A version by number, by alias, or (neither) the latest READY one; NOT_FOUND naming what is missing."""
        self._require_model(tx, org, name)
        if alias is not None:
            names.validate_alias(alias)
            number = tx.get_alias(org, name, alias)
            if number is None:
                raise NotFoundError(f"alias {alias!r} of {name!r} does not exist")
            version = number
        if version is not None:
            names.validate_version_number(version)
            found = tx.get_version(org, name, version)
            if found is None:
                raise NotFoundError(f"version {version} of {name!r} does not exist")
            return found
        latest = tx.latest_ready_version(org, name)
        if latest is None:
            raise NotFoundError(f"registered model {name!r} has no READY version yet")
        return latest

    def get_version(self, caller: Caller, name: str, *, version: int | None, alias: str | None) -> ModelVersion:
        names.validate_model_name(name)
        with self.store.transaction() as tx:
            return self.resolve_version(tx, caller.organization_id, name, version=version, alias=alias)

    def list_versions(
        self, caller: Caller, name: str, query: VersionQuery, page_size: int, page_token: str
    ) -> tuple[list[ModelVersion], str]:
        names.validate_model_name(name)
        if query.alias:
            names.validate_alias(query.alias)
        names.validate_tags(query.tags)
        for f in query.metric_filters:
            if not f.metric_name:
                raise InvalidArgumentError("metric filter needs a metric_name")
        fingerprint = paging.fingerprint(
            "versions",
            [
                name,
                sorted(s.value for s in query.statuses),
                sorted(query.tags.items()),
                query.alias,
                [(f.metric_name, f.split, f.comparison.value, f.value) for f in query.metric_filters],
            ],
        )
        page = _numeric_page(paging.page_request(page_size, page_token, fingerprint))
        with self.store.transaction() as tx:
            self._require_model(tx, caller.organization_id, name)
            items, after = tx.list_versions(caller.organization_id, name, query, page)
        return items, paging.next_page_token(after, fingerprint) if after else ""

    def update_version(
        self, caller: Caller, name: str, version: int, paths: list[str], *, description: str, tags: dict[str, str]
    ) -> ModelVersion:
        names.validate_model_name(name)
        names.validate_version_number(version)
        _check_mask(paths, ("description", "tags"), what="model version")
        if "description" in paths:
            names.validate_text(description, what="description")
        if "tags" in paths:
            names.validate_tags(tags)
        with self.store.transaction() as tx:
            self.resolve_version(tx, caller.organization_id, name, version=version, alias=None)
            return tx.update_version(
                caller.organization_id,
                name,
                version,
                now=self.clock(),
                description=description if "description" in paths else None,
                tags=tags if "tags" in paths else None,
            )

    # ------------------------------------------------------------------------------------ aliases

    def set_alias(
        self, caller: Caller, name: str, alias: str, version: int, *, reason: str, expected: int | None
    ) -> tuple[AliasChange | None, bool]:
        """Point ``alias`` at ``version``. ``expected``: None = unconditional, 0 = only if unset, N = only if at N."""
        names.validate_model_name(name)
        names.validate_alias(alias)
        names.validate_version_number(version)
        names.validate_text(reason, what="reason", limit=2000)
        _validate_expected(expected)
        with self.store.transaction() as tx:
            return self._move_alias(
                tx,
                caller.organization_id,
                name,
                alias,
                version,
                expected=expected,
                actor=caller.actor,
                reason=reason,
                cause=AliasCause.MANUAL,
                decision=None,
            )

    def delete_alias(self, caller: Caller, name: str, alias: str, *, reason: str, expected: int | None) -> AliasChange:
        names.validate_model_name(name)
        names.validate_alias(alias)
        names.validate_text(reason, what="reason", limit=2000)
        _validate_expected(expected)
        with self.store.transaction() as tx:
            change, _ = self._move_alias(
                tx,
                caller.organization_id,
                name,
                alias,
                None,
                expected=expected,
                actor=caller.actor,
                reason=reason,
                cause=AliasCause.MANUAL,
                decision=None,
            )
        assert change is not None
        return change

    def _move_alias(
        self,
        tx: RegistryTransaction,
        org: str,
        name: str,
        alias: str,
        to_version: int | None,
        *,
        expected: int | None,
        actor: str,
        reason: str,
        cause: AliasCause,
        decision: PromotionDecision | None,
    ) -> tuple[AliasChange | None, bool]:
        """The one place an alias changes: lock the model, compare, check the target, write history + event."""
        if not tx.lock_model(org, name):
            raise NotFoundError(f"registered model {name!r} does not exist")
        current = tx.get_alias(org, name, alias)
        if expected is not None and current != (expected or None):
            now_at = f"version {current}" if current is not None else "nothing (it is not set)"
            wanted = f"version {expected}" if expected else "nothing"
            raise AbortedError(
                f"alias {alias!r} of {name!r} points to {now_at}, not {wanted}: it moved meanwhile; "
                "read it again and retry"
            )
        if to_version is None:
            if current is None:
                raise NotFoundError(f"alias {alias!r} of {name!r} does not exist")
        else:
            target = tx.get_version(org, name, to_version)
            if target is None:
                raise NotFoundError(f"version {to_version} of {name!r} does not exist")
            if target.status is not VersionStatus.READY:
                why = f": {target.status_reason}" if target.status_reason else ""
                raise FailedPreconditionError(
                    f"version {to_version} of {name!r} is {target.status.value}{why}; "
                    "only READY versions can be aliased"
                )
            if current == to_version:
                return tx.latest_alias_change(org, name, alias), False
        change = tx.write_alias(
            org,
            name,
            alias,
            to_version=to_version,
            actor=actor,
            reason=reason,
            cause=cause,
            decision=decision,
            now=self.clock(),
        )
        tx.emit_alias_changed(change)
        # Whatever moved the alias makes the promotions still waiting for it moot.
        tx.supersede_pending_promotions(
            org,
            name,
            alias=alias,
            reason=f"alias moved by {actor} (history sequence {change.sequence})",
            now=self.clock(),
        )
        return change, True

    def alias_history(
        self, caller: Caller, name: str, alias: str, page_size: int, page_token: str
    ) -> tuple[list[AliasChange], str]:
        names.validate_model_name(name)
        if alias:
            names.validate_alias(alias)
        fingerprint = paging.fingerprint("alias-history", [name, alias])
        page = _numeric_page(paging.page_request(page_size, page_token, fingerprint))
        with self.store.transaction() as tx:
            self._require_model(tx, caller.organization_id, name)
            items, after = tx.alias_history(caller.organization_id, name, alias, page)
        return items, paging.next_page_token(after, fingerprint) if after else ""

    # ------------------------------------------------------------------------------------ promotion policies

    def set_policy(self, caller: Caller, policy: PromotionPolicy) -> PromotionPolicy:
        names.validate_model_name(policy.model_name)
        if not policy.target_alias:
            raise InvalidArgumentError("policy.target_alias is required: the alias to move, e.g. 'production'")
        names.validate_alias(policy.target_alias)
        if policy.baseline_alias:
            names.validate_alias(policy.baseline_alias)
        if not policy.metric_name:
            raise InvalidArgumentError("policy.metric_name is required: the metric compared, e.g. 'accuracy'")
        if len(policy.metric_name) > 128:
            raise InvalidArgumentError("policy.metric_name is longer than 128 characters")
        if not policy.min_improvement >= 0:
            raise InvalidArgumentError(
                f"policy.min_improvement must be zero or positive (got {policy.min_improvement}); it is the margin "
                "a candidate must win by"
            )
        with self.store.transaction() as tx:
            if not tx.lock_model(caller.organization_id, policy.model_name):
                raise NotFoundError(f"registered model {policy.model_name!r} does not exist")
            now = self.clock()
            stored = tx.put_policy(caller.organization_id, replace(policy, update_time=now))
            tx.supersede_pending_promotions(
                caller.organization_id, policy.model_name, alias=None, reason="the promotion policy changed", now=now
            )
            return stored

    def get_policy(self, caller: Caller, name: str) -> PromotionPolicy:
        names.validate_model_name(name)
        with self.store.transaction() as tx:
            self._require_model(tx, caller.organization_id, name)
            policy = tx.get_policy(caller.organization_id, name)
        if policy is None:
            raise NotFoundError(f"registered model {name!r} has no promotion policy")
        return policy

    def delete_policy(self, caller: Caller, name: str) -> None:
        names.validate_model_name(name)
        with self.store.transaction() as tx:
            if not tx.lock_model(caller.organization_id, name):
                raise NotFoundError(f"registered model {name!r} does not exist")
            if not tx.delete_policy(caller.organization_id, name):
                raise NotFoundError(f"registered model {name!r} has no promotion policy")
            tx.supersede_pending_promotions(
                caller.organization_id, name, alias=None, reason="the promotion policy was deleted", now=self.clock()
            )

    def evaluate_policy(
        self, tx: RegistryTransaction, org: str, name: str, version_number: int
    ) -> PromotionDecision | None:
        """Apply the model's policy to a version that finished verification (the policy consumer calls this).

        Returns the decision, or None when no enabled policy applies (no policy, version not READY, set
        after the policy... or already the target). A passing AUTOMATIC gate moves the alias (history cause
        POLICY, actor "policy", the decision recorded); MANUAL_APPROVAL records a pending promotion instead.
        """
        policy = tx.get_policy(org, name)
        if policy is None or not policy.enabled:
            return None
        if not tx.lock_model(org, name):
            return None
        candidate = tx.get_version(org, name, version_number)
        if candidate is None or candidate.status is not VersionStatus.READY:
            return None
        if policy.update_time is not None and candidate.update_time < policy.update_time:
            return None  # became READY before this policy existed
        current = tx.get_alias(org, name, policy.target_alias)
        if current == candidate.version:
            return None
        baseline_number = tx.get_alias(org, name, policy.effective_baseline_alias)
        baseline = tx.get_version(org, name, baseline_number) if baseline_number is not None else None
        decision = evaluate(policy, candidate, baseline)
        log.info(
            "promotion policy of %s for version %d: %s (%s)",
            name,
            candidate.version,
            "passed" if decision.passed else "not passed",
            decision.explanation,
        )
        if not decision.passed:
            return decision
        if policy.mode is PromotionMode.AUTOMATIC:
            self._move_alias(
                tx,
                org,
                name,
                policy.target_alias,
                candidate.version,
                expected=None,
                actor=POLICY_ACTOR,
                reason=decision.explanation,
                cause=AliasCause.POLICY,
                decision=decision,
            )
            return decision
        now = self.clock()
        tx.supersede_pending_promotions(
            org, name, alias=policy.target_alias, reason=f"version {candidate.version} is a newer candidate", now=now
        )
        tx.add_pending_promotion(
            PendingPromotion(
                promotion_id=new_id(),
                organization_id=org,
                model_name=name,
                target_alias=policy.target_alias,
                version=candidate.version,
                from_version=current,
                decision=decision,
                state=PromotionState.PENDING,
                decided_by="",
                decision_reason="",
                create_time=now,
                decide_time=None,
            )
        )
        return decision

    def list_pending(
        self, caller: Caller, name: str, include_decided: bool, page_size: int, page_token: str
    ) -> tuple[list[PendingPromotion], str]:
        if name:
            names.validate_model_name(name)
        fingerprint = paging.fingerprint("promotions", [name, include_decided])
        page = _numeric_page(paging.page_request(page_size, page_token, fingerprint))
        with self.store.transaction() as tx:
            if name:
                self._require_model(tx, caller.organization_id, name)
            items, after = tx.list_pending_promotions(caller.organization_id, name, include_decided, page)
        return items, paging.next_page_token(after, fingerprint) if after else ""

    def approve(self, caller: Caller, promotion_id: str, reason: str) -> PendingPromotion:
        validate_id(promotion_id, what="promotion_id")
        names.validate_text(reason, what="reason", limit=2000)
        org = caller.organization_id
        superseded: str | None = None
        with self.store.transaction() as tx:
            promotion = self._pending_for_decision(tx, org, promotion_id)
            current = tx.get_alias(org, promotion.model_name, promotion.target_alias)
            if current != promotion.from_version:
                tx.decide_pending_promotion(
                    org,
                    promotion_id,
                    state=PromotionState.SUPERSEDED,
                    decided_by=caller.actor,
                    reason="the alias moved after the promotion was proposed",
                    now=self.clock(),
                )
                superseded = (
                    f"alias {promotion.target_alias!r} moved to {current} since the promotion was proposed "
                    f"(from {promotion.from_version}); it is SUPERSEDED"
                )
            else:
                decided = tx.decide_pending_promotion(
                    org,
                    promotion_id,
                    state=PromotionState.APPROVED,
                    decided_by=caller.actor,
                    reason=reason,
                    now=self.clock(),
                )
                self._move_alias(
                    tx,
                    org,
                    promotion.model_name,
                    promotion.target_alias,
                    promotion.version,
                    expected=None,
                    actor=caller.actor,
                    reason=reason or promotion.decision.explanation,
                    cause=AliasCause.APPROVAL,
                    decision=promotion.decision,
                )
                return decided
        # Raised after the commit, so the SUPERSEDED state is kept.
        raise FailedPreconditionError(superseded)

    def reject(self, caller: Caller, promotion_id: str, reason: str) -> PendingPromotion:
        validate_id(promotion_id, what="promotion_id")
        names.validate_text(reason, what="reason", limit=2000)
        with self.store.transaction() as tx:
            self._pending_for_decision(tx, caller.organization_id, promotion_id)
            return tx.decide_pending_promotion(
                caller.organization_id,
                promotion_id,
                state=PromotionState.REJECTED,
                decided_by=caller.actor,
                reason=reason,
                now=self.clock(),
            )

    @staticmethod
    def _pending_for_decision(tx: RegistryTransaction, org: str, promotion_id: str) -> PendingPromotion:
        promotion = tx.get_pending_promotion(org, promotion_id)
        if promotion is None:
            raise NotFoundError(f"promotion {promotion_id!r} does not exist")
        tx.lock_model(org, promotion.model_name)
        promotion = tx.get_pending_promotion(org, promotion_id)  # re-read under the lock
        assert promotion is not None
        if promotion.state is not PromotionState.PENDING:
            raise FailedPreconditionError(
                f"promotion {promotion_id!r} is {promotion.state.value}, no longer PENDING"
                + (f" (decided by {promotion.decided_by})" if promotion.decided_by else "")
            )
        return promotion

    # ------------------------------------------------------------------------------------ model cards

    def get_card(self, caller: Caller, name: str, *, version: int | None, alias: str | None) -> ModelCard:
        names.validate_model_name(name)
        with self.store.transaction() as tx:
            found = self.resolve_version(tx, caller.organization_id, name, version=version, alias=alias)
            card = tx.latest_card(caller.organization_id, name, found.version)
        if card is None:
            raise FailedPreconditionError(
                f"version {found.version} of {name!r} is {found.status.value}; its card is written once it is READY"
            )
        return card

    def update_card(self, caller: Caller, name: str, version: int, paths: list[str], text: CardText) -> ModelCard:
        names.validate_model_name(name)
        names.validate_version_number(version)
        _check_mask(
            paths, cards.EDITABLE_FIELDS, what="model card", read_only=("training_summary", "metrics", "markdown")
        )
        for path in paths:
            names.validate_text(getattr(text, path), what=path, limit=20_000)
        org = caller.organization_id
        with self.store.transaction() as tx:
            if not tx.lock_model(org, name):
                raise NotFoundError(f"registered model {name!r} does not exist")
            found = self.resolve_version(tx, org, name, version=version, alias=None)
            latest = tx.latest_card(org, name, version)
            if latest is None:
                raise FailedPreconditionError(
                    f"version {version} of {name!r} is {found.status.value}; its card is written once it is READY"
                )
            new_text = replace(latest.text, **{path: getattr(text, path) for path in paths})
            revision = latest.revision + 1
            markdown = cards.render(name, version, found.task, new_text, latest.training_summary, latest.metrics)
            # Written under the model lock: a leftover object of a crashed attempt at this revision is ours.
            info = self.objects.put_bytes(
                object_key(found.artifact_prefix.rstrip("/"), cards.card_key_name(revision)),
                markdown.encode(),
                content_type="text/markdown",
                overwrite=True,
            )
            card = replace(
                latest,
                revision=revision,
                text=new_text,
                markdown=markdown,
                object=FileRef(info.key, info.sha256, info.size),
                updated_by=caller.actor,
                update_time=self.clock(),
            )
            return tx.add_card(org, card)

    # ------------------------------------------------------------------------------------ base models

    def import_base_model(
        self,
        caller: Caller,
        name: str,
        *,
        local_path: str | None,
        object_prefix: str | None,
        license: str,
        description: str,
        tasks: tuple[str, ...],
    ) -> BaseModel:
        names.validate_base_model_name(name)
        names.validate_text(license, what="license", limit=1000)
        names.validate_text(description, what="description")
        for task in tasks:
            if task == names.TASK_UNSPECIFIED:
                raise InvalidArgumentError("tasks must not contain TASK_TYPE_UNSPECIFIED")
        if (local_path is None) == (object_prefix is None):
            raise InvalidArgumentError("set exactly one source: local_path or object_prefix")
        org = caller.organization_id
        with self.store.transaction() as tx:
            if tx.get_base_model(org, name) is not None:
                raise AlreadyExistsError(f"base model {name!r} already exists; choose another name")
        with tempfile.TemporaryDirectory(prefix="registry-base-model-") as tmp:
            if local_path is not None:
                root, files = self._local_source(local_path)
            else:
                assert object_prefix is not None
                root, files = self._download_prefix(object_prefix, Path(tmp))
            facts = basemodels.inspect_directory(root, files)
            prefix = base_model_prefix(org, name)
            refs: list[FileRef] = []
            checksums: dict[str, str] = {}
            for rel in files:
                sha = sha256_file(root / rel)
                key = object_key(prefix.rstrip("/"), rel)
                try:
                    existing = self.objects.stat(key)
                except NotFoundError:
                    existing = None
                if existing is None or existing.sha256 != sha:
                    info = self.objects.put_file(key, root / rel, overwrite=existing is not None)
                    sha = info.sha256
                refs.append(FileRef(key, sha, (root / rel).stat().st_size))
                checksums[rel] = sha
        base = BaseModel(
            organization_id=org,
            name=name,
            model_type=facts.model_type,
            architectures=facts.architectures,
            tasks=tasks or facts.tasks,
            parameter_count=facts.parameter_count,
            license=license,
            description=description,
            artifact_prefix=prefix,
            files=tuple(refs),
            content_sha256=basemodels.content_sha256(checksums),
            create_time=self.clock(),
        )
        with self.store.transaction() as tx:
            return tx.insert_base_model(base)

    def _local_source(self, local_path: str) -> tuple[Path, list[str]]:
        if not self.allow_local_paths:
            raise FailedPreconditionError(
                "importing from a local path is disabled in this installation "
                "(GRISTMILL_REGISTRY_ALLOW_LOCAL_PATHS); upload the directory and use object_prefix"
            )
        root = Path(local_path)
        if not root.is_absolute():
            raise InvalidArgumentError(f"local_path {local_path[:200]!r} must be an absolute path")
        if not root.is_dir():
            raise NotFoundError(f"local_path {local_path[:200]!r} is not a directory on the registry's host")
        files: list[str] = []
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            # Hidden files and folders (.git, .cache, .gitattributes) are not part of a model.
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            try:
                validate_key(rel.as_posix())
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"file {rel.as_posix()!r} cannot be stored: {exc}") from None
            files.append(rel.as_posix())
        return root, files

    def _download_prefix(self, object_prefix: str, dest: Path) -> tuple[Path, list[str]]:
        try:
            prefix = validate_key(object_prefix.rstrip("/")) + "/"
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"object_prefix is not valid: {exc}") from None
        files: list[str] = []
        for info in self.objects.list(prefix):
            rel = info.key[len(prefix) :]
            self.objects.get_file(info.key, dest / rel, expected_sha256=info.sha256 or None)
            files.append(rel)
        if not files:
            raise NotFoundError(f"object_prefix {prefix!r} holds no objects")
        return dest, files

    def get_base_model(self, caller: Caller, name: str) -> BaseModel:
        names.validate_base_model_name(name)
        with self.store.transaction() as tx:
            found = tx.get_base_model(caller.organization_id, name)
        if found is None:
            raise NotFoundError(f"base model {name!r} does not exist")
        return found

    def list_base_models(
        self, caller: Caller, task: str, page_size: int, page_token: str
    ) -> tuple[list[BaseModel], str]:
        fingerprint = paging.fingerprint("base-models", [task])
        page = paging.page_request(page_size, page_token, fingerprint)
        with self.store.transaction() as tx:
            items, after = tx.list_base_models(
                caller.organization_id, "" if task == names.TASK_UNSPECIFIED else task, page
            )
        return items, paging.next_page_token(after, fingerprint) if after else ""

    # ------------------------------------------------------------------------------------ download manifest

    def download_manifest(self, caller: Caller, name: str, *, version: int | None, alias: str | None) -> ModelVersion:
        names.validate_model_name(name)
        with self.store.transaction() as tx:
            found = self.resolve_version(tx, caller.organization_id, name, version=version, alias=alias)
        if found.status is not VersionStatus.READY:
            why = f": {found.status_reason}" if found.status_reason else ""
            raise FailedPreconditionError(
                f"version {found.version} of {name!r} is {found.status.value}{why}; only READY versions can be loaded"
            )
        return found

    # ------------------------------------------------------------------------------------ helpers

    @staticmethod
    def _require_model(tx: RegistryTransaction, org: str, name: str) -> RegisteredModel:
        model = tx.get_model(org, name)
        if model is None:
            raise NotFoundError(f"registered model {name!r} does not exist")
        return model


def _check_mask(paths: list[str], allowed: tuple[str, ...], *, what: str, read_only: tuple[str, ...] = ()) -> None:
    if not paths:
        raise InvalidArgumentError(f"update_mask is empty: name the {what} fields to change ({', '.join(allowed)})")
    for path in paths:
        if path in read_only:
            raise InvalidArgumentError(
                f"update_mask path {path!r} is generated (read-only); editable: {', '.join(allowed)}"
            )
        if path not in allowed:
            raise InvalidArgumentError(
                f"update_mask path {path!r} cannot be changed on a {what}; allowed: {', '.join(allowed)}"
            )


def _validate_expected(expected: int | None) -> None:
    if expected is not None and expected < 0:
        raise InvalidArgumentError(
            f"expected_current_version must be 0 (alias not set) or a version number, got {expected}"
        )


def _validate_metric(metric: Metric) -> None:
    if not metric.name:
        raise InvalidArgumentError("every metric needs a name")
    if metric.split and metric.split not in SPLITS:
        raise InvalidArgumentError(f"metric {metric.name!r} has an unknown split {metric.split!r}")
    if metric.value != metric.value:  # NaN compares unequal to itself
        raise InvalidArgumentError(f"metric {metric.name!r} is NaN; report a number")


def _numeric_page(page: Page) -> Page:
    """Positions of version numbers and sequences are integers; anything else is a forged token."""
    if page.after is not None and not page.after.isdigit():
        raise InvalidArgumentError(
            "page_token is malformed: pass the next_page_token of the previous response unchanged"
        )
    return page
