"""Deployments at run time: loaded versions, routing, hot-swap, canary split, draining.

All state lives on the event loop (mutated only from it), so routing a request and swapping a version are
atomic with respect to each other: a request is routed to exactly one ``LoadedVersion`` (and counted in its
``inflight``) before it awaits anything, and a swap replaces ``primary`` in one assignment. A replaced
version drains: it finishes what was routed to it, then frees its model. Loads (download, verify, load,
warm up) run on a thread, one at a time, beside the versions that keep serving; a failed load leaves the
current routing untouched and is reported in the status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TypeVar

from gristmill.core.chat import ChatMessage
from gristmill.core.drift import PredictionProfile
from gristmill.core.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    GristmillError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from gristmill.serving.domain.batcher import DynamicBatcher
from gristmill.serving.domain.drift import DriftObserver, DriftWindow, read_profile
from gristmill.serving.domain.explanations import Explanation
from gristmill.serving.domain.generation import (
    DEFAULT_SAMPLING,
    Generation,
    GenerationRequest,
    GenerativeModel,
    ResponseFormat,
    SamplingParams,
    fit_context,
    validate_max_new_tokens,
)
from gristmill.serving.domain.model import (
    DeploymentSpec,
    OverLengthAction,
    Quantization,
    VersionSelector,
)
from gristmill.serving.domain.predictions import PredictionResult, average_probabilities, to_prediction
from gristmill.serving.domain.sources import (
    TASK_MULTI_LABEL,
    Classifier,
    Encoded,
    LoadOptions,
    ModelLoader,
    ModelSource,
    ResolvedVersion,
)
from gristmill.serving.domain.stats import ERROR, OK, REJECTED, Observer
from gristmill.serving.domain.versions import (
    DeploymentState,
    DeploymentView,
    LoadedVersion,
    VersionState,
    VersionStatus,
    batch_policy,
    version_status,
)

log = logging.getLogger(__name__)

# Requests with more texts than this are tokenized on a thread instead of on the event loop.
INLINE_ENCODE_TEXTS = 16
_LOAD_RETRIES = 3

V = TypeVar("V")


@dataclass(frozen=True)
class _Failure:
    """The last change that failed to load (version 0 when it failed before a version was known)."""

    version: int
    error: str


class _Deployment:
    def __init__(self, spec: DeploymentSpec) -> None:
        self.spec = spec
        self.primary: LoadedVersion | None = None
        self.canary: LoadedVersion | None = None
        # An ensemble's other versions by number (spec.ensemble), each READY once loaded.
        self.members: dict[int, LoadedVersion] = {}
        self.loading: list[LoadedVersion] = []
        self.draining: list[LoadedVersion] = []
        self.failed: _Failure | None = None
        self.message = "loading"
        # Changes (loads, swaps) of one deployment apply one after another, in the order they were asked.
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()
        self.removed = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.spec.organization_id, self.spec.name)


class DeploymentManager:
    """The deployments this process serves. Use from the event loop; ``*_threadsafe`` from other threads."""

    def __init__(
        self,
        source: ModelSource,
        loader: ModelLoader,
        *,
        observer: Observer | None = None,
        drift_observer: DriftObserver | None = None,
        on_queue_depth: Callable[[str, int], None] | None = None,
        rng: random.Random | None = None,
        retry_delay_s: float = 1.0,
        batch_workers: int = 1,
        light_load_every_core: bool = False,
    ) -> None:
        self._source = source
        self._batch_workers = batch_workers
        # A classifier batch that runs alone gets every slot's cores (``DynamicBatcher``), where the model can use them.
        self._light_load_every_core = light_load_every_core
        self._loader = loader
        self._observer = observer
        self._drift_observer = drift_observer
        self._on_queue_depth = on_queue_depth
        self._rng = rng or random.Random()
        self._retry_delay_s = retry_delay_s
        self._deployments: dict[tuple[str, str], _Deployment] = {}
        self._load_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drains: set[asyncio.Task[None]] = set()
        self._closed = False
        # One explanation at a time: each is a few hundred forward and backward passes, which would otherwise
        # take every core from the batches that serve predictions.
        self._explaining = asyncio.Semaphore(1)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # One load at a time: bounds peak memory and keeps CPU for the versions that serve meanwhile.
        self._load_lock = asyncio.Lock()

    # -- lifecycle of deployments ------------------------------------------------------------------------

    def add(
        self, spec: DeploymentSpec, *, primary: ResolvedVersion | None = None, canary: ResolvedVersion | None = None
    ) -> None:
        """Start serving ``spec``: load its primary (and canary) version in the background."""
        dep = _Deployment(spec)
        self._deployments[dep.key] = dep
        self._spawn(dep, self._load_primary(dep, primary))
        if spec.canary is not None:
            self._spawn(dep, self._load_canary(dep, canary))
        if spec.ensemble:
            self._spawn(dep, self._load_members(dep))

    async def update(
        self,
        spec: DeploymentSpec,
        *,
        primary: ResolvedVersion | None = None,
        canary: ResolvedVersion | None = None,
    ) -> None:
        """Apply a changed spec: new batching and policies at once; a new target, canary or quantisation loads
        beside the current versions and takes traffic once ready (``primary``/``canary``: already resolved)."""
        dep = self._get(spec.organization_id, spec.name)
        old, dep.spec = dep.spec, spec
        if spec.batching != old.batching:
            policy = batch_policy(spec.batching)
            for version in (dep.primary, dep.canary, *dep.members.values()):
                if version is not None and version.batcher is not None:
                    version.batcher.policy = policy
        reload = spec.quantization != old.quantization
        if reload or spec.target != old.target or primary is not None:
            self._spawn(dep, self._load_primary(dep, primary, force=reload))
        if spec.canary is None:
            if dep.canary is not None:
                retired, dep.canary = dep.canary, None
                self._retire(dep, retired)
        elif reload or old.canary is None or spec.canary.target != old.canary.target or canary is not None:
            self._spawn(dep, self._load_canary(dep, canary, force=reload))
        if reload or spec.ensemble != old.ensemble:
            self._spawn(dep, self._load_members(dep, force=reload))

    async def remove(self, organization_id: str, name: str) -> None:
        """Stop routing to the deployment, let in-flight requests finish, free its versions."""
        dep = self._deployments.pop((organization_id, name), None)
        if dep is None:
            raise NotFoundError(f"deployment {name!r} does not exist")
        dep.removed = True
        for task in list(dep.tasks):
            task.cancel()
        versions = [v for v in (dep.primary, dep.canary, *dep.members.values()) if v is not None]
        dep.primary = dep.canary = None
        dep.members = {}
        for version in versions:
            self._retire(dep, version)

    def alias_changed_threadsafe(self, organization_id: str, model: str, alias: str, to_version: int | None) -> None:
        """``alias_changed`` from another thread (the event consumer); returns at once."""
        if self._loop is None or self._closed:
            log.warning("alias change of %s/%s ignored: the deployment manager is not running", model, alias)
            return
        self._loop.call_soon_threadsafe(self.alias_changed, organization_id, model, alias, to_version)

    def alias_changed(self, organization_id: str, model: str, alias: str, to_version: int | None) -> None:
        """Follow an alias move: every deployment routing ``model``'s ``alias`` loads ``to_version``, then swaps."""
        for dep in list(self._deployments.values()):
            spec = dep.spec
            if spec.organization_id != organization_id or spec.registered_model_name != model:
                continue
            if spec.target.alias == alias:
                self._follow(dep, alias, to_version, canary=False)
            if spec.canary is not None and spec.canary.target.alias == alias:
                self._follow(dep, alias, to_version, canary=True)

    def _follow(self, dep: _Deployment, alias: str, to_version: int | None, *, canary: bool) -> None:
        current = dep.canary if canary else dep.primary
        if to_version is None:
            serving = f"; still serving version {current.version}" if current is not None else ""
            dep.message = f"alias {alias!r} was deleted in the registry{serving}"
            return
        selector = VersionSelector.of_version(to_version)
        if canary:
            self._spawn(dep, self._load_canary(dep, None, selector=selector, alias=alias))
        else:
            self._spawn(dep, self._load_primary(dep, None, selector=selector, alias=alias))

    async def wait_settled(self, organization_id: str, name: str, timeout_s: float | None) -> None:
        """Wait until no load of the deployment is pending (or ``timeout_s`` passed)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            dep = self._deployments.get((organization_id, name))
            if dep is None or not dep.tasks:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            await asyncio.wait(list(dep.tasks), timeout=remaining)

    async def close(self) -> None:
        """Cancel pending loads and free every version. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for dep in list(self._deployments.values()):
            with contextlib.suppress(NotFoundError):
                await self.remove(*dep.key)
            for task in list(dep.tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._drains:
            # In-flight calls were drained by the server first, so these finish at once.
            await asyncio.wait(list(self._drains), timeout=30)

    # -- loading and swapping ----------------------------------------------------------------------------

    def _spawn(self, dep: _Deployment, coro: object) -> None:
        assert asyncio.iscoroutine(coro)
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        dep.tasks.add(task)
        task.add_done_callback(dep.tasks.discard)

    async def _resolve(self, dep: _Deployment, selector: VersionSelector) -> ResolvedVersion:
        spec = dep.spec
        return await asyncio.to_thread(self._source.resolve, spec.organization_id, spec.registered_model_name, selector)

    async def _load_primary(
        self,
        dep: _Deployment,
        resolved: ResolvedVersion | None,
        *,
        selector: VersionSelector | None = None,
        alias: str = "",
        force: bool = False,
    ) -> None:
        async with dep.lock:
            if dep.removed:
                return
            new = await self._prepare(dep, resolved, selector or dep.spec.target, dep.primary, alias, force)
            if new is None or dep.removed:
                return
            old, dep.primary = dep.primary, new
            dep.failed = None
            dep.message = f"serving version {new.version}"
            log.info("deployment %s now serves version %d", dep.spec.name, new.version)
            if old is not None:
                self._retire(dep, old)

    async def _load_canary(
        self,
        dep: _Deployment,
        resolved: ResolvedVersion | None,
        *,
        selector: VersionSelector | None = None,
        alias: str = "",
        force: bool = False,
    ) -> None:
        async with dep.lock:
            route = dep.spec.canary
            if dep.removed or route is None:
                return
            new = await self._prepare(dep, resolved, selector or route.target, dep.canary, alias, force)
            if new is None or dep.removed or dep.spec.canary is None:
                if new is not None:
                    await new.free()
                return
            old, dep.canary = dep.canary, new
            dep.failed = None
            dep.message = f"canary version {new.version} takes {dep.spec.canary.weight:.0%} of requests"
            if old is not None:
                self._retire(dep, old)

    async def _load_members(self, dep: _Deployment, *, force: bool = False) -> None:
        """Load the ensemble's versions that are not loaded yet (all of them with ``force``), free the ones no
        longer listed. A member that fails to load is reported; requests wait (UNAVAILABLE) until it loads."""
        async with dep.lock:
            if dep.removed:
                return
            for number in [n for n in dep.members if n not in dep.spec.ensemble]:
                self._retire(dep, dep.members.pop(number))
            for number in dep.spec.ensemble:
                current = dep.members.get(number)
                new = await self._prepare(dep, None, VersionSelector.of_version(number), current, "", force)
                if new is None:
                    continue
                if dep.removed or number not in dep.spec.ensemble:
                    await new.free()
                    continue
                if new.generator is not None:
                    await new.free()
                    dep.failed = _Failure(number, "a generative model; an ensemble averages classifiers' probabilities")
                    dep.message = f"ensemble version {number} is a generative model; list classifiers only"
                    continue
                dep.members[number] = new
                if current is not None:
                    self._retire(dep, current)

    async def _prepare(
        self,
        dep: _Deployment,
        resolved: ResolvedVersion | None,
        selector: VersionSelector,
        current: LoadedVersion | None,
        alias: str,
        force: bool,
    ) -> LoadedVersion | None:
        """Resolve and load a version beside ``current``; None when nothing changes or the load failed."""
        options = LoadOptions(quantization=dep.spec.quantization)
        try:
            if resolved is None:
                resolved = await self._with_retries(lambda: self._resolve(dep, selector))
        except NotFoundError as exc:
            if selector.alias is not None and current is None:
                # Nothing to serve until the alias is set: the `alias changed` event will load it.
                dep.message = (
                    f"waiting for alias {selector.alias!r} of {dep.spec.registered_model_name!r} to be set in the "
                    f"registry ({exc.message})"
                )
                return None
            self._record_failure(dep, None, selector.describe(), exc, current)
            return None
        except GristmillError as exc:
            self._record_failure(dep, None, selector.describe(), exc, current)
            return None
        if alias and not resolved.resolved_alias:
            resolved = replace(resolved, resolved_alias=alias)
        if not force and current is not None and current.version == resolved.version and current.options == options:
            return None
        loaded = LoadedVersion(dep.spec.name, resolved, options, self._observer)
        dep.loading.append(loaded)
        try:
            assert self._load_lock is not None, "DeploymentManager.start() was not called"
            async with self._load_lock:
                classifier, profile = await self._with_retries(
                    lambda: asyncio.to_thread(self._fetch_and_load, resolved, options)
                )
        except Exception as exc:
            loaded.state = VersionState.FAILED
            loaded.error = _describe(exc)
            self._record_failure(dep, loaded, f"version {resolved.version}", exc, current)
            return None
        finally:
            dep.loading.remove(loaded)
        loaded.memory_bytes = int(getattr(classifier, "memory_bytes", 0))
        if isinstance(classifier, GenerativeModel):
            # A causal LM batches continuously on its own thread: no dynamic batcher in front of it.
            loaded.generator = classifier
            loaded.state = VersionState.READY
            loaded.ready_time = datetime.now(UTC)
            return loaded
        loaded.classifier = classifier
        if profile is not None:
            loaded.drift = DriftWindow(dep.spec.name, resolved.version, profile, observer=self._drift_observer)
        name = f"{dep.spec.name}/v{resolved.version}"
        depth = self._on_queue_depth
        loaded.batcher = DynamicBatcher(
            classifier.predict,
            batch_policy(dep.spec.batching),
            name=name,
            workers=self._batch_workers,
            alone_thread_setup=(
                classifier.light_load_thread_setup(self._batch_workers) if self._light_load_every_core else None
            ),
            on_queue_depth=(lambda n: depth(name, n)) if depth is not None else None,
        )
        loaded.state = VersionState.READY
        loaded.ready_time = datetime.now(UTC)
        return loaded

    async def _with_retries(self, attempt: Callable[[], Awaitable[V]]) -> V:
        """Retry ``attempt`` while the registry or object store is unavailable (a restart, a blip)."""
        for number in range(1, _LOAD_RETRIES + 1):
            try:
                return await attempt()
            except UnavailableError:
                if number == _LOAD_RETRIES:
                    raise
                await asyncio.sleep(self._retry_delay_s * number)
        raise AssertionError("unreachable")

    def _fetch_and_load(
        self, resolved: ResolvedVersion, options: LoadOptions
    ) -> tuple[Classifier | GenerativeModel, PredictionProfile | None]:
        """The loaded model, and the prediction profile published with it (the drift reference), if any."""
        directory = self._source.fetch(resolved)
        return self._loader(directory, resolved, options), read_profile(directory)

    def _record_failure(
        self,
        dep: _Deployment,
        loaded: LoadedVersion | None,
        what: str,
        exc: BaseException,
        current: LoadedVersion | None,
    ) -> None:
        reason = _describe(exc)
        dep.failed = _Failure(loaded.version if loaded is not None else 0, reason)
        serving = f"; still serving version {current.version}" if current is not None else ""
        dep.message = f"loading {what} of {dep.spec.registered_model_name} failed: {reason}{serving}"
        log.warning("deployment %s: %s", dep.spec.name, dep.message)

    def _retire(self, dep: _Deployment, version: LoadedVersion) -> None:
        """Stop routing to ``version`` (the caller already did), let its requests finish, then free it."""
        version.state = VersionState.DRAINING
        dep.draining.append(version)

        async def drain() -> None:
            try:
                await version.wait_idle()
                if version.batcher is not None:
                    await version.batcher.drain()
            finally:
                await version.free()
                dep.draining.remove(version)
                log.info("deployment %s freed version %d", dep.spec.name, version.version)

        task = asyncio.get_running_loop().create_task(drain())
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    # -- requests ----------------------------------------------------------------------------------------

    def _get(self, organization_id: str, name: str) -> _Deployment:
        dep = self._deployments.get((organization_id, name))
        if dep is None:
            raise NotFoundError(f"deployment {name!r} does not exist; create it with CreateDeployment")
        return dep

    def has(self, organization_id: str, name: str) -> bool:
        return (organization_id, name) in self._deployments

    def count(self) -> int:
        return len(self._deployments)

    def served(self) -> list[tuple[str, str]]:
        """(organisation, name) of every deployment served here."""
        return list(self._deployments)

    def spec(self, organization_id: str, name: str) -> DeploymentSpec:
        return self._get(organization_id, name).spec

    def route(self, organization_id: str, name: str, pin: VersionSelector | None = None) -> LoadedVersion:
        """The READY version that answers the next request (canary split, or the pinned version)."""
        dep = self._get(organization_id, name)
        if pin is not None:
            return self._pinned(dep, pin)
        primary = dep.primary
        if primary is None:
            raise UnavailableError(
                f"deployment {name!r} has no ready version yet ({self._state(dep).value}: {dep.message}); retry later"
            )
        canary, route = dep.canary, dep.spec.canary
        if canary is not None and route is not None and self._rng.random() < route.weight:
            return canary
        return primary

    def _pinned(self, dep: _Deployment, pin: VersionSelector) -> LoadedVersion:
        if pin.version is not None and pin.version in dep.members:
            return dep.members[pin.version]  # one model of an ensemble, alone
        loaded = [v for v in (dep.primary, dep.canary, *dep.members.values()) if v is not None]
        for version, target in (
            (dep.primary, dep.spec.target),
            (dep.canary, dep.spec.canary and dep.spec.canary.target),
        ):
            if version is None:
                continue
            if pin.version is not None and version.version == pin.version:
                return version
            if pin.alias is not None and (target == pin or version.resolved.resolved_alias == pin.alias):
                return version
        if not loaded:
            raise UnavailableError(f"deployment {dep.spec.name!r} has no ready version yet; retry later")
        names = ", ".join(str(v.version) for v in loaded)
        raise NotFoundError(
            f"{pin.describe()} is not loaded in deployment {dep.spec.name!r} (loaded versions: {names}); "
            "leave the version empty to use the deployment's routing"
        )

    def _members(self, dep: _Deployment, pin: VersionSelector | None) -> list[LoadedVersion]:
        """The ensemble's other versions for a request routed by the deployment (none for a pinned one)."""
        if pin is not None or not dep.spec.ensemble:
            return []
        missing = [n for n in dep.spec.ensemble if n not in dep.members]
        if missing:
            raise UnavailableError(
                f"deployment {dep.spec.name!r} averages versions {list(dep.spec.ensemble)} with its target, and "
                f"version(s) {missing} are not loaded yet ({dep.message}); retry later, or pin a version"
            )
        return [dep.members[n] for n in dep.spec.ensemble]

    async def _rows(
        self, dep: _Deployment, version: LoadedVersion, texts: Sequence[str], deadline: float | None
    ) -> tuple[list[Encoded], Sequence[Sequence[float]]]:
        """One version's probabilities for ``texts`` (through its batcher), with the encodings it read."""
        classifier, batcher = version.classifier, version.batcher
        if classifier is None or batcher is None:
            raise UnavailableError(f"version {version.version} of {dep.spec.name!r} was just unloaded; retry")
        limit = self._max_tokens(dep, version, classifier)
        if len(texts) > INLINE_ENCODE_TEXTS:
            encoded = await asyncio.to_thread(classifier.encode, texts, limit)
        else:
            encoded = classifier.encode(texts, limit)
        if dep.spec.length_policy.over_length_action is OverLengthAction.REJECT:
            for index, item in enumerate(encoded):
                if item.full_length > limit:
                    raise InvalidArgumentError(
                        f"text {index} has {item.full_length} tokens; deployment {dep.spec.name!r} accepts at most "
                        f"{limit} (length_policy.over_length_action is REJECT): shorten it or split it",
                        details={"text-index": str(index)},
                    )
        rows = await batcher.submit(encoded, [e.length for e in encoded], deadline=deadline)
        return encoded, rows

    async def _ensemble_rows(
        self, dep: _Deployment, versions: list[LoadedVersion], texts: Sequence[str], deadline: float | None
    ) -> tuple[list[Encoded], Sequence[Sequence[float]]]:
        """The models' batches side by side; their probabilities averaged (the first model's encodings)."""
        answers = await asyncio.gather(*(self._rows(dep, v, texts, deadline) for v in versions), return_exceptions=True)
        results: list[tuple[list[Encoded], Sequence[Sequence[float]]]] = []
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
            results.append(answer)
        return results[0][0], average_probabilities([rows for _, rows in results])

    @staticmethod
    def _max_tokens(dep: _Deployment, version: LoadedVersion, classifier: Classifier) -> int:
        """Tokens allowed per text: the length policy, else the training length, within the model's limit."""
        limit = classifier.max_tokens
        wanted = dep.spec.length_policy.max_tokens or version.resolved.max_sequence_length or limit
        return min(wanted, limit)

    async def predict(
        self,
        organization_id: str,
        name: str,
        texts: Sequence[str],
        *,
        pin: VersionSelector | None = None,
        request_id: str,
        deadline: float | None = None,
        explain_steps: int = 0,
    ) -> tuple[PredictionResult, LoadedVersion]:
        """Classify ``texts`` with one version of the deployment (``deadline`` on ``time.monotonic``); with
        ``explain_steps``, explain each prediction too (``domain.explanations``)."""
        dep = self._get(organization_id, name)
        version = self.route(organization_id, name, pin)
        members = self._members(dep, pin)
        started = time.monotonic()
        for entered in (version, *members):
            entered.enter()
        outcome = ERROR
        try:
            classifier = version.classifier
            if version.generator is not None:
                raise InvalidArgumentError(
                    f"deployment {name!r} serves a generative model ({version.resolved.task}); use Generate or the "
                    "OpenAI-compatible endpoint, not Predict or ModelInfer"
                )
            if classifier is None or version.batcher is None:
                raise UnavailableError(f"version {version.version} of {name!r} was just unloaded; retry")
            if explain_steps and version.options.quantization is Quantization.DYNAMIC_INT8:
                raise FailedPreconditionError(
                    f"deployment {name!r} serves version {version.version} quantised to dynamic int8, which has no "
                    "gradients to explain it with; explain with a deployment whose quantization is NONE or BF16"
                )
            if explain_steps and members:
                raise FailedPreconditionError(
                    f"deployment {name!r} is an ensemble and explanations are of one model: pin the request to one "
                    f"of its versions ({', '.join(str(v.version) for v in (version, *members))}) to explain it"
                )
            for member in members:
                if member.labels != version.labels:
                    raise FailedPreconditionError(
                        f"ensemble version {member.version} of {name!r} has labels {list(member.labels)}, the target "
                        f"version {version.version} has {list(version.labels)}; an ensemble averages models with "
                        "the same labels: change ensemble_versions"
                    )
            if members:
                encoded, rows = await self._ensemble_rows(dep, [version, *members], texts, deadline)
            else:  # the hot path: no task per request
                encoded, rows = await self._rows(dep, version, texts, deadline)
            limit = self._max_tokens(dep, version, classifier)
            labels = version.labels
            multi = version.resolved.task == TASK_MULTI_LABEL or classifier.multi_label
            threshold = dep.spec.prediction_logging.uncertainty_threshold
            predictions = tuple(
                to_prediction(row, labels, multi_label=multi, uncertainty_threshold=threshold) for row in rows
            )
            explanations: tuple[Explanation, ...] = ()
            if explain_steps:
                # The most probable label of each text (for a multi-label model, even one under the threshold).
                targets = [max(range(len(row)), key=row.__getitem__) for row in rows]
                explanations = await self._explain(classifier, texts, limit, targets, explain_steps, deadline)
            outcome = OK
            result = PredictionResult(
                deployment=name,
                registered_model_name=version.resolved.registered_model_name,
                version=version.version,
                request_id=request_id,
                label_names=labels,
                predictions=predictions,
                input_tokens=sum(e.length for e in encoded),
                input_lengths=tuple(e.length for e in encoded),
                explanations=explanations,
            )
            return result, version
        except (
            InvalidArgumentError,
            FailedPreconditionError,
            DeadlineExceededError,
            ResourceExhaustedError,
            asyncio.CancelledError,
        ):
            outcome = REJECTED
            raise
        finally:
            for entered in (version, *members):
                entered.leave()
            version.stats.record(outcome, time.monotonic() - started, len(texts))

    async def _explain(
        self,
        classifier: Classifier,
        texts: Sequence[str],
        max_tokens: int,
        targets: Sequence[int],
        steps: int,
        deadline: float | None,
    ) -> tuple[Explanation, ...]:
        """Explanations on a thread, one request's at a time; a request whose deadline passes while it waits for
        its turn is dropped (DEADLINE_EXCEEDED), as a prediction is."""
        try:
            async with asyncio.timeout(None if deadline is None else deadline - time.monotonic()):
                await self._explaining.acquire()
        except TimeoutError:
            raise DeadlineExceededError("the deadline passed while the request waited to be explained") from None
        work = asyncio.get_running_loop().run_in_executor(None, classifier.explain, texts, max_tokens, targets, steps)
        # The turn ends when the thread does, even if the caller goes away first (a thread cannot be stopped).
        work.add_done_callback(lambda _: self._explaining.release())
        return tuple(await asyncio.shield(work))

    def generate(
        self,
        organization_id: str,
        name: str,
        *,
        messages: Sequence[ChatMessage] = (),
        prompt: str = "",
        max_new_tokens: int | None = None,
        sampling: SamplingParams = DEFAULT_SAMPLING,
        stop: tuple[str, ...] = (),
        pin: VersionSelector | None = None,
        request_id: str,
        deadline: float | None = None,
        response_format: ResponseFormat | None = None,
    ) -> Generation:
        """Start a reply from one version of the deployment (inputs already validated, except what needs the
        model: the template, the context). The version counts it in flight until the reply ends or is closed."""
        version = self.route(organization_id, name, pin)
        generator = version.generator
        if generator is None:
            if version.classifier is not None:
                raise InvalidArgumentError(
                    f"deployment {name!r} serves a classifier ({version.resolved.task}); use Predict or ModelInfer, "
                    "not Generate, ModelStreamInfer or the OpenAI-compatible API"
                )
            raise UnavailableError(f"version {version.version} of {name!r} was just unloaded; retry")
        ids = generator.render_chat(messages) if messages else generator.encode_prompt(prompt)
        budget = fit_context(
            len(ids),
            validate_max_new_tokens(max_new_tokens),
            generator.context_length,
            explicit=max_new_tokens is not None,
        )
        if sampling.min_tokens > budget:
            raise InvalidArgumentError(
                f"min_tokens ({sampling.min_tokens}) is more than the reply may have ({budget} tokens: max_tokens, "
                "or what the context leaves)"
            )
        request = GenerationRequest(
            request_id, tuple(ids), budget, sampling, stop, deadline, response_format=response_format
        )
        started = time.monotonic()
        version.enter()

        def done(ok: bool) -> None:
            version.leave()
            version.stats.record(OK if ok else REJECTED, time.monotonic() - started, 1)

        try:
            stream = generator.submit(request)
        except BaseException:
            done(False)
            raise
        return Generation(
            stream,
            registered_model_name=version.resolved.registered_model_name,
            version=version.version,
            on_done=done,
            labeling_project_id=version.resolved.labeling_project_id,
        )

    # -- status ------------------------------------------------------------------------------------------

    def _state(self, dep: _Deployment) -> DeploymentState:
        if dep.primary is not None and self._members_loaded(dep):
            return DeploymentState.DEGRADED if dep.failed is not None else DeploymentState.READY
        if dep.primary is not None:  # an ensemble waiting for (or failing to load) some of its versions
            return DeploymentState.DEGRADED if dep.failed is not None and not dep.loading else DeploymentState.LOADING
        if dep.failed is not None and not dep.loading:
            return DeploymentState.FAILED
        return DeploymentState.LOADING

    def view(self, spec: DeploymentSpec) -> DeploymentView:
        """The status of ``spec``'s deployment (LOADING with no versions if this process does not serve it)."""
        dep = self._deployments.get((spec.organization_id, spec.name))
        if dep is None:
            return DeploymentView(spec, DeploymentState.LOADING, "not loaded in this process yet", ())
        canary_weight = spec.canary.weight if spec.canary is not None and dep.canary is not None else 0.0
        rows: list[tuple[LoadedVersion, float]] = []
        if dep.primary is not None:
            rows.append((dep.primary, 1.0 - canary_weight))
        if dep.canary is not None:
            rows.append((dep.canary, canary_weight))
        # Every request of an ensemble runs on each of its versions.
        rows += [(dep.members[n], 1.0) for n in spec.ensemble if n in dep.members]
        rows += [(v, 0.0) for v in dep.loading + dep.draining]
        statuses = [version_status(v, w) for v, w in rows]
        if dep.failed is not None:
            statuses.append(
                VersionStatus(dep.failed.version, VersionState.FAILED, 0.0, dep.failed.error, None, 0, 0, 0.0, 0.0, 0)
            )
        return DeploymentView(spec, self._state(dep), dep.message, tuple(statuses))

    @staticmethod
    def _members_loaded(dep: _Deployment) -> bool:
        return all(n in dep.members for n in dep.spec.ensemble)

    def is_ready(self, organization_id: str, name: str, version: int | None = None) -> bool:
        dep = self._get(organization_id, name)
        versions = (dep.primary, dep.canary, *dep.members.values())
        ready = [v for v in versions if v is not None and v.state is VersionState.READY]
        if version is None:
            return dep.primary is not None and dep.primary.state is VersionState.READY and self._members_loaded(dep)
        return any(v.version == version for v in ready)

    def all_ready(self) -> bool:
        return all(dep.primary is not None and self._members_loaded(dep) for dep in self._deployments.values())

    def loaded_versions(self, organization_id: str, name: str) -> list[LoadedVersion]:
        dep = self._get(organization_id, name)
        return [v for v in (dep.primary, dep.canary, *dep.members.values()) if v is not None]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, GristmillError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
