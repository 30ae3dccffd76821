"""The serving use cases, behind both gRPC APIs: deployments (create, update, get, list, delete), predictions
(with prediction logging) and following alias moves.

Each write validates everything first, checks the registry knows the target (NOT_FOUND /
FAILED_PRECONDITION before anything is stored), stores the spec, and only then changes what runs.

Several replicas (processes sharing one deployment store) serve the same deployments: a write changes what
runs in the replica that took it, and ``sync`` (run every ``deployment_sync_s`` by the app) brings every other
replica in line with the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from gristmill.core.auth import Principal
from gristmill.core.auth_quota import QuotaGuard, Reservation, UsageKind
from gristmill.core.chat import USER, ChatMessage, check_turns
from gristmill.core.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from gristmill.core.licensing import License, load_license
from gristmill.core.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from gristmill.serving.domain.deployments import DeploymentManager
from gristmill.serving.domain.explanations import validate_explain
from gristmill.serving.domain.feedback import (
    FeedbackInput,
    FeedbackPublisher,
    GenerationRecord,
    RecentGenerations,
    validate_feedback,
)
from gristmill.serving.domain.generation import (
    DEFAULT_SAMPLING,
    Generation,
    ResponseFormat,
    SamplingParams,
    validate_max_new_tokens,
    validate_response_format,
    validate_sampling,
    validate_stop,
)
from gristmill.serving.domain.model import (
    MAX_TEXTS_PER_REQUEST,
    DeploymentSpec,
    VersionSelector,
    validate_selector,
    validate_spec,
)
from gristmill.serving.domain.outcomes import OutcomeCounter, OutcomeKey, OutcomePublisher
from gristmill.serving.domain.ports import DeploymentStore
from gristmill.serving.domain.predictions import PredictionResult, PredictionSink, records_to_log
from gristmill.serving.domain.sources import ModelSource, ResolvedVersion
from gristmill.serving.domain.versions import DeploymentView, LoadedVersion
from gristmill.serving.tasks import serving_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncResult:
    """What one ``sync`` changed: deployments added, changed and removed (by name)."""

    added: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeploymentPage:
    deployments: tuple[DeploymentView, ...]
    # The last name of this page when more may follow, else "".
    next_after: str


def validate_texts(texts: Sequence[str]) -> None:
    if not texts:
        raise InvalidArgumentError("no texts: send at least one text to classify")
    if len(texts) > MAX_TEXTS_PER_REQUEST:
        raise InvalidArgumentError(
            f"{len(texts)} texts in one request; the limit is {MAX_TEXTS_PER_REQUEST}: split it into several requests"
        )
    for index, text in enumerate(texts):
        if not text:
            raise InvalidArgumentError(f"text {index} is empty; every text needs at least one character")


class DeploymentService:
    """What the servicers call. Use from the event loop; blocking store and registry calls go to threads."""

    def __init__(
        self,
        store: DeploymentStore,
        manager: DeploymentManager,
        source: ModelSource,
        *,
        sink: PredictionSink | None = None,
        rng: random.Random | None = None,
        license_: License | None = None,
        quota: QuotaGuard | None = None,
        feedback: FeedbackPublisher | None = None,
        generations: RecentGenerations | None = None,
        outcomes: OutcomePublisher | None = None,
    ) -> None:
        self.store = store
        # How replies ended per version, flushed as events for the registry's online gate (None: not published).
        self.outcomes = outcomes
        self.outcome_counts = OutcomeCounter()
        # Where RecordFeedback writes its events (None: feedback is refused, FAILED_PRECONDITION).
        self.feedback = feedback
        # Finished replies, so that feedback can carry its generation in full.
        self.generations = generations or RecentGenerations()
        # Enterprise licence: max_serving_models, serving.canary (the community edition's without one).
        self.license = license_ or load_license(None, "")
        # Metering and quotas per organisation (None: not metered, the embedded dev mode).
        self.quota = quota
        self.manager = manager
        self.source = source
        self.sink = sink
        self._rng = rng or random.Random()
        # Held while a write stores a spec and changes the manager, and while ``sync`` reads the store and applies
        # it: a sync never sees a spec stored by this process but not yet served (or the reverse) and undoes it.
        self._writes = asyncio.Lock()
        # Quota commits and generation logs of finished replies, kept referenced until they ran.
        self._settling: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Serve the stored deployments again (each resolves and loads in the background)."""
        await self.manager.start()
        for spec in await asyncio.to_thread(self.store.list_all):
            self.manager.add(spec)
        log.info("serving: restored %d deployments", self.manager.count())

    async def sync(self) -> SyncResult:
        """Bring what this process serves in line with the store, which other replicas write too: serve the
        deployments stored meanwhile, apply the changed ones (their ``update_time`` or any field differs), stop
        serving the deleted ones.

        Applied as this process's own writes are: a new deployment resolves and loads in the background; a
        changed one takes new batching and policies at once and keeps serving while a new target, canary or
        quantisation resolves and loads beside it (a target that fails to resolve or load is reported in the
        deployment's status, and the current version serves on); a deleted one stops routing and drains. The
        replica that took the write checked it (registry, licence) before storing it; like ``start``, a sync
        trusts what is stored. Use from the event loop (the app runs it every ``deployment_sync_s``).
        """
        added: list[str] = []
        updated: list[str] = []
        removed: list[str] = []
        async with self._writes:
            stored = {(s.organization_id, s.name): s for s in await asyncio.to_thread(self.store.list_all)}
            for key, spec in stored.items():
                if not self.manager.has(*key):
                    self.manager.add(spec)
                    added.append(spec.name)
                elif (served := self.manager.spec(*key)) != spec:
                    # The manager resolves a changed target (or canary) and loads it beside the serving version, as
                    # it does for ``update`` with targets it was not given.
                    await self.manager.update(spec)
                    log.info(
                        "deployment %s changed in the store (updated %s, served %s): applied",
                        spec.name,
                        spec.update_time.isoformat(),
                        served.update_time.isoformat(),
                    )
                    updated.append(spec.name)
            for organization_id, name in self.manager.served():
                if (organization_id, name) not in stored:
                    with contextlib.suppress(NotFoundError):
                        await self.manager.remove(organization_id, name)
                    removed.append(name)
        result = SyncResult(tuple(added), tuple(updated), tuple(removed))
        if result.added or result.removed:
            log.info("deployment store sync: added %s, removed %s", list(result.added), list(result.removed))
        return result

    async def close(self) -> None:
        await self.manager.close()
        # Usage and generation logs of the replies that just ended: written before the outbox's last flush.
        await asyncio.gather(*self._settling, return_exceptions=True)
        try:
            await asyncio.to_thread(self.flush_outcomes)
        except Exception:
            log.exception("could not write the last reply outcomes")

    def flush_outcomes(self, first: bool = False) -> None:
        """Publish the reply outcomes counted since the last flush (a worker thread; a periodic task and close)."""
        if self.outcomes is not None:
            self.outcome_counts.flush(self.outcomes)

    # -- deployments -------------------------------------------------------------------------------------

    async def _resolve_targets(self, spec: DeploymentSpec) -> tuple[ResolvedVersion, ResolvedVersion | None]:
        """Ask the source for the target (and canary): unknown or not-ready versions, and versions of a task type
        this service has no runtime for (FAILED_PRECONDITION), fail here, before any write."""
        org, model = spec.organization_id, spec.registered_model_name
        primary = await asyncio.to_thread(self.source.resolve, org, model, spec.target)
        serving_task(primary)
        canary = None
        if spec.canary is not None:
            canary = await asyncio.to_thread(self.source.resolve, org, model, spec.canary.target)
            serving_task(canary)
            # A canary alias may rest on the primary's version (a canary analysis promoted or rolled it back):
            # the deployment follows it when it moves. A pinned version equal to the primary is no canary.
            if canary.version == primary.version and spec.canary.target.alias is None:
                raise InvalidArgumentError(
                    f"canary.target ({spec.canary.target.describe()}) resolves to version {canary.version}, "
                    f"the same version as the primary target ({spec.target.describe()}); choose another version"
                )
        return primary, canary

    def _check_licensed(self, spec: DeploymentSpec, *, new: bool) -> None:
        """FAILED_PRECONDITION naming the licence: one deployment more than licensed, or an unlicensed canary."""
        if new:
            self.license.check_limit("max_serving_models", self.manager.count() + 1)
        if spec.canary is not None:
            self.license.require_feature("serving.canary")

    async def create(self, spec: DeploymentSpec, *, wait_until_ready: bool, timeout_s: float | None) -> DeploymentView:
        validate_spec(spec)
        if self.manager.has(spec.organization_id, spec.name):
            raise AlreadyExistsError(
                f"deployment {spec.name!r} already exists; choose another name or update it with UpdateDeployment"
            )
        self._check_licensed(spec, new=True)
        primary: ResolvedVersion | None
        canary: ResolvedVersion | None
        try:
            primary, canary = await self._resolve_targets(spec)
        except NotFoundError:
            # A deployment may follow an alias that its (existing) model has not set yet: it is stored and
            # waits (LOADING), and the first `alias changed` event loads the version, as for any later move.
            if not await self._may_wait_for_alias(spec):
                raise
            primary = canary = None
            log.info("deployment %s waits for alias %r of %s", spec.name, spec.target.alias, spec.registered_model_name)
        async with self._writes:
            await asyncio.to_thread(self.store.create, spec)
            self.manager.add(spec, primary=primary, canary=canary)
        if wait_until_ready:
            await self.manager.wait_settled(spec.organization_id, spec.name, timeout_s)
        return self.manager.view(spec)

    async def _may_wait_for_alias(self, spec: DeploymentSpec) -> bool:
        if spec.target.alias is None or spec.canary is not None:
            return False
        return await asyncio.to_thread(self.source.model_exists, spec.organization_id, spec.registered_model_name)

    async def current(self, organization_id: str, name: str) -> DeploymentSpec:
        return await asyncio.to_thread(self.store.get, organization_id, name)

    async def update(
        self, spec: DeploymentSpec, *, previous: DeploymentSpec, wait_until_ready: bool, timeout_s: float | None
    ) -> DeploymentView:
        """Store and apply ``spec`` (``previous`` is what it replaces, as read by ``current``)."""
        validate_spec(spec)
        self._check_licensed(spec, new=False)
        primary = canary = None
        if spec.target != previous.target or spec.canary != previous.canary:
            primary, canary = await self._resolve_targets(spec)
            if spec.target == previous.target:
                primary = None  # unchanged: do not reload it
            if spec.canary is not None and previous.canary is not None and spec.canary.target == previous.canary.target:
                canary = None
        spec = spec.touched()
        async with self._writes:
            await asyncio.to_thread(self.store.update, spec)
            if not self.manager.has(spec.organization_id, spec.name):
                self.manager.add(spec)
            else:
                await self.manager.update(spec, primary=primary, canary=canary)
        if wait_until_ready:
            await self.manager.wait_settled(spec.organization_id, spec.name, timeout_s)
        return self.manager.view(spec)

    async def get(self, organization_id: str, name: str) -> DeploymentView:
        spec = await asyncio.to_thread(self.store.get, organization_id, name)
        return self.manager.view(spec)

    async def list(self, organization_id: str, *, page_size: int, after: str) -> DeploymentPage:
        if page_size < 0:
            raise InvalidArgumentError(f"page.page_size must not be negative, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        specs = await asyncio.to_thread(self.store.list_page, organization_id, after=after, limit=size + 1)
        more = len(specs) > size
        specs = specs[:size]
        views = tuple(self.manager.view(spec) for spec in specs)
        return DeploymentPage(views, specs[-1].name if more and specs else "")

    async def delete(self, organization_id: str, name: str) -> None:
        async with self._writes:
            await asyncio.to_thread(self.store.delete, organization_id, name)
            with contextlib.suppress(NotFoundError):  # stored but not served by this process (yet)
                await self.manager.remove(organization_id, name)

    # -- predictions -------------------------------------------------------------------------------------

    def require(self, organization_id: str, name: str) -> None:
        """``NotFoundError`` unless the deployment is served here."""
        self.manager.spec(organization_id, name)

    async def predict(
        self,
        organization_id: str,
        name: str,
        texts: Sequence[str],
        *,
        pin: VersionSelector | None = None,
        request_id: str = "",
        timeout_s: float | None = None,
        caller: Principal | None = None,
        explain: bool = False,
        explain_steps: int = 0,
    ) -> tuple[PredictionResult, LoadedVersion]:
        """Classify ``texts``; ``timeout_s`` is the time left until the caller's deadline. With ``explain``, each
        prediction comes with per-token attributions (``explain_steps`` integration steps, 0 for the default).

        With a quota guard, ``caller``'s organisation must have predictions (and input tokens) left in its plan
        (RESOURCE_EXHAUSTED with a retry-after otherwise); a successful call publishes its usage, a failed one
        none.
        """
        validate_texts(texts)
        steps = validate_explain(texts, explain=explain, steps=explain_steps)
        if pin is not None:
            validate_selector(pin, what="target")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        spec = self.manager.spec(organization_id, name)
        reservation = None
        if self.quota is not None and caller is not None and not caller.auth_disabled:
            reservation = await self.quota.reserve_async(
                caller,
                {UsageKind.PREDICTIONS: len(texts), UsageKind.INPUT_TOKENS: 0},
                resource=f"deployment/{name}",
            )
        try:
            result, version = await self.manager.predict(
                organization_id,
                name,
                texts,
                pin=pin,
                request_id=request_id or uuid.uuid4().hex,
                deadline=deadline,
                explain_steps=steps,
            )
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise
        if reservation is not None:
            await reservation.commit_async(measured={UsageKind.INPUT_TOKENS: result.input_tokens})
        if version.drift is not None:
            version.drift.observe(result.predictions, result.input_lengths)
        if self.sink is not None:
            records = records_to_log(
                result,
                texts,
                spec.prediction_logging,
                organization_id=spec.organization_id,
                labeling_project_id=version.resolved.labeling_project_id,
                rng=self._rng,
            )
            if records:
                self.sink.log(records)
        return result, version

    async def generate(
        self,
        organization_id: str,
        name: str,
        *,
        messages: Sequence[ChatMessage] = (),
        prompt: str = "",
        max_new_tokens: int | None = None,
        sampling: SamplingParams = DEFAULT_SAMPLING,
        stop: Sequence[str] = (),
        pin: VersionSelector | None = None,
        request_id: str = "",
        timeout_s: float | None = None,
        caller: Principal | None = None,
        response_format: ResponseFormat | None = None,
    ) -> Generation:
        """Start a reply (iterate the returned ``Generation``; ``close()`` it if the caller goes away).

        Exactly one of ``messages`` (rendered with the model's chat template) and ``prompt``. With a quota guard,
        the caller's organisation must have a prediction left; the usage (one prediction, the prompt's tokens) is
        published when the reply finished, and nothing when it failed or was cancelled.
        """
        if bool(messages) == bool(prompt):
            raise InvalidArgumentError(
                "send exactly one of messages (a conversation, rendered with the model's chat template) and prompt"
            )
        if messages:
            check_turns(messages, "messages")
        validate_sampling(sampling)
        validate_response_format(response_format)
        stops = validate_stop(stop)
        validate_max_new_tokens(max_new_tokens)
        if pin is not None:
            validate_selector(pin, what="target")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.manager.spec(organization_id, name)  # NOT_FOUND before a quota is touched
        reservation = None
        if self.quota is not None and caller is not None and not caller.auth_disabled:
            reservation = await self.quota.reserve_async(
                caller,
                {UsageKind.PREDICTIONS: 1, UsageKind.INPUT_TOKENS: 0, UsageKind.OUTPUT_TOKENS: 0},
                resource=f"deployment/{name}",
            )
        try:
            generation = self.manager.generate(
                organization_id,
                name,
                messages=messages,
                prompt=prompt,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                stop=stops,
                pin=pin,
                request_id=request_id or uuid.uuid4().hex,
                deadline=deadline,
                response_format=response_format,
            )
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise
        if reservation is not None:
            held = reservation
            # The reply's end settles the reservation: its tokens for a reply that produced any (also one whose
            # client went away: they were computed), nothing for one that failed before its first token.
            generation.add_done_hook(lambda ok: self._settle(held, generation))
        conversation = tuple(messages) or (ChatMessage(USER, prompt),)
        sampled = {
            "temperature": repr(sampling.temperature),
            "top_p": repr(sampling.top_p),
            "top_k": str(sampling.top_k),
            **({"seed": str(sampling.seed)} if sampling.seed is not None else {}),
            **({"max_tokens": str(max_new_tokens)} if max_new_tokens is not None else {}),
            **({"stop": json.dumps(list(stops))} if stops else {}),
            **({"response_format": response_format.kind.value} if response_format is not None else {}),
        }

        sample_rate = self.manager.spec(organization_id, name).prediction_logging.sample_rate

        def remember(ok: bool) -> None:
            if not ok:
                return
            record = GenerationRecord(
                organization_id=organization_id,
                request_id=generation.request_id,
                registered_model_name=generation.registered_model_name,
                version=generation.version,
                deployment=name,
                messages=conversation,
                reply=generation.text,
                sampling=sampled,
                labeling_project_id=generation.labeling_project_id,
            )
            self.generations.remember(record)
            if self.feedback is not None and sample_rate and self._rng.random() < sample_rate:
                self._in_background(asyncio.to_thread(self.feedback.log_generation, record), "generation log")

        generation.add_done_hook(remember)
        key = OutcomeKey(organization_id, generation.registered_model_name, generation.version, name)

        def count_outcome(ok: bool) -> None:
            # A reply its client closed early says nothing about the version.
            if ok or generation.error is not None:
                self.outcome_counts.count(key, failed=not ok)

        generation.add_done_hook(count_outcome)
        return generation

    async def record_feedback(self, organization_id: str, feedback: FeedbackInput) -> GenerationRecord:
        """Publish ``feedback`` on one of the organisation's recent replies (in the outbox before this returns)."""
        validate_feedback(feedback)
        record = self.generations.get(organization_id, feedback.request_id)
        if self.feedback is None:
            raise FailedPreconditionError("feedback is not recorded by this server (no event outbox configured)")
        await asyncio.to_thread(self.feedback.publish, organization_id, record, feedback)
        return record

    def _settle(self, reservation: Reservation, generation: Generation) -> None:
        if not generation.completion_tokens:
            reservation.release()
            return
        measured = {
            UsageKind.INPUT_TOKENS: generation.prompt_tokens,
            UsageKind.OUTPUT_TOKENS: generation.completion_tokens,
        }
        self._in_background(reservation.commit_async(measured=measured), "usage")

    def _in_background(self, work: Coroutine[Any, Any, None], what: str) -> None:
        """Run ``work`` after the reply, kept referenced until done; a failure is logged, never raised."""

        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("could not write the %s of a finished reply", what)

        task = asyncio.get_running_loop().create_task(run())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    # -- events ------------------------------------------------------------------------------------------

    def alias_changed_threadsafe(self, organization_id: str, model: str, alias: str, to_version: int | None) -> None:
        self.manager.alias_changed_threadsafe(organization_id, model, alias, to_version)
