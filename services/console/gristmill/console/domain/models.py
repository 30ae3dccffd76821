"""What the registry and serving pages show: the organisation's registered models, one model's versions (metrics,
aliases, lineage) and alias history, one version with its model card, and the deployments with the numbers of each
loaded version, from the registry's and serving's APIs and the signed-in session.

Read only: nothing here changes a model, an alias or a deployment (the CLI and the services' APIs do). No HTML and
no gRPC: ``ModelCalls`` is what this needs of the services (``gristmill.console.gateway`` gives it), so the rules
are tested with a fake.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as rpb
from gristmill.api.serving.v1 import serving_pb2 as spb
from gristmill.console.domain.jobs import enum_name, metric_name
from gristmill.console.domain.sessions import Session
from gristmill.core.errors import InvalidArgumentError, NotFoundError
from gristmill.core.paging import MAX_PAGE_SIZE

R = TypeVar("R")

# Alias changes shown on a model's page (newest first): a model whose policy moves aliases daily has years of them.
HISTORY_LIMIT = 200
# The metric a model page charts per version: the first of these any version has, measured on the first split
# (held-out numbers before training ones); else the metric most versions have.
MAIN_METRICS = ("accuracy", "f1", "exact_match", "json_valid", "loss", "perplexity")
SPLIT_PREFERENCE = (
    common_pb2.DATASET_SPLIT_TEST,
    common_pb2.DATASET_SPLIT_VALIDATION,
    common_pb2.DATASET_SPLIT_UNSPECIFIED,
    common_pb2.DATASET_SPLIT_TRAIN,
)
# Where a deployment names no target, serving routes to this alias (serving.proto, Deployment.target).
DEFAULT_ALIAS = "production"


class ModelCalls(Protocol):
    registry: Any
    serving: Any

    def call(self, service: str, method: Callable[..., Awaitable[R]], request: Any, api_key: str) -> Awaitable[R]: ...


def task_name(task: int) -> str:
    """``TASK_TYPE_TEXT_CLASSIFICATION`` -> ``text classification``; "" when unspecified."""
    return enum_name(common_pb2.TaskType, task, "TASK_TYPE_").replace("_", " ")


def aliases_by_version(aliases: Mapping[str, int]) -> dict[int, list[str]]:
    """A model's alias -> version map turned around: each version's aliases, by name."""
    out: dict[int, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        out.setdefault(int(version), []).append(alias)
    return out


def final_metrics(metrics: Iterable[common_pb2.Metric]) -> dict[tuple[str, int], float]:
    """Each (name, split)'s value: the final one (no step) when there is one, else the one at the latest step."""
    best: dict[tuple[str, int], tuple[int, float]] = {}
    for m in metrics:
        # A final metric ranks above any step.
        rank = m.step if m.HasField("step") else 2**63
        key = (m.name, int(m.split))
        if key not in best or rank >= best[key][0]:
            best[key] = (rank, m.value)
    return {key: value for key, (_, value) in best.items()}


def metric_label(name: str, split: int) -> str:
    return metric_name(common_pb2.Metric(name=name, split=split))  # type: ignore[arg-type]


@dataclass(frozen=True)
class MetricRow:
    label: str  # "test accuracy", "loss"
    value: float


@dataclass(frozen=True)
class ModelSummary:
    """A row of the models page."""

    name: str
    task: str
    latest_version: int
    aliases: list[tuple[str, int]]  # by alias name
    update_time: Timestamp
    description: str = ""

    @classmethod
    def of(cls, model: rpb.RegisteredModel) -> ModelSummary:
        return cls(
            name=model.name,
            task=task_name(model.task),
            latest_version=int(model.latest_version),
            aliases=sorted((alias, int(version)) for alias, version in model.aliases.items()),
            update_time=model.update_time,
            description=model.description,
        )


@dataclass(frozen=True)
class VersionView:
    version: rpb.ModelVersion
    aliases: list[str]

    @classmethod
    def of(cls, version: rpb.ModelVersion, aliases: Iterable[str] = ()) -> VersionView:
        # The model's alias map (read with the versions) and the version's own output-only list agree; either alone
        # is enough, so both are merged rather than trusting one.
        return cls(version, sorted(set(aliases) | set(version.aliases)))

    @property
    def number(self) -> int:
        return int(self.version.version)

    @property
    def status(self) -> str:
        return enum_name(rpb.ModelVersionStatus, self.version.status, "MODEL_VERSION_STATUS_") or "unknown"

    @property
    def metrics(self) -> list[MetricRow]:
        values = final_metrics(self.version.metrics)
        return [MetricRow(metric_label(name, split), values[(name, split)]) for name, split in sorted(values)]

    @property
    def lineage(self) -> Lineage:
        return Lineage.of(self.version.lineage)


@dataclass(frozen=True)
class Lineage:
    """Where a version came from, as the pages name it."""

    training_job_id: str
    project_id: str
    dataset_version_id: str
    base_model: str
    code_version: str
    hyper_parameters: list[tuple[str, str]]

    @classmethod
    def of(cls, lineage: common_pb2.Lineage) -> Lineage:
        base = lineage.base_model
        source = base.WhichOneof("source")
        return cls(
            training_job_id=lineage.training_job_id,
            project_id=lineage.dataset_version.project_id,
            dataset_version_id=lineage.dataset_version.dataset_version_id,
            base_model=str(getattr(base, source)) if source else "",
            code_version=lineage.code_version,
            hyper_parameters=sorted(lineage.hyper_parameters.items()),
        )

    @property
    def empty(self) -> bool:
        return not (self.training_job_id or self.project_id or self.dataset_version_id or self.base_model)


@dataclass(frozen=True)
class AliasChangeView:
    change: rpb.AliasChange

    @property
    def alias(self) -> str:
        return self.change.alias

    @property
    def from_version(self) -> int | None:
        return int(self.change.from_version) if self.change.HasField("from_version") else None

    @property
    def to_version(self) -> int | None:
        return int(self.change.to_version) if self.change.HasField("to_version") else None

    @property
    def cause(self) -> str:
        return enum_name(rpb.AliasChangeCause, self.change.cause, "ALIAS_CHANGE_CAUSE_").replace("_", " ")

    @property
    def decision(self) -> str:
        """The policy decision's one line (policy, approval and online gate changes), "" for a manual move."""
        return self.change.decision.explanation if self.change.HasField("decision") else ""


@dataclass(frozen=True)
class MetricChart:
    """The model page's bar chart: one metric per version, oldest version first (None: the version lacks it)."""

    metric: str
    versions: list[int]
    values: list[float | None]

    def data(self) -> dict[str, Any]:
        return {"metric": self.metric, "labels": [f"v{v}" for v in self.versions], "values": self.values}


def main_metric(versions: Iterable[rpb.ModelVersion]) -> tuple[str, int] | None:
    """The (name, split) a model page charts: the first of ``MAIN_METRICS`` any version has, on the first split of
    ``SPLIT_PREFERENCE`` it has; else the (name, split) most versions have (ties by name); None without metrics."""
    counts: dict[tuple[str, int], int] = {}
    for v in versions:
        for key in final_metrics(v.metrics):
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None
    for name in MAIN_METRICS:
        for split in SPLIT_PREFERENCE:
            if (name, split) in counts:
                return name, split
    return min(counts, key=lambda key: (-counts[key], key))


def metric_chart(versions: Iterable[rpb.ModelVersion]) -> MetricChart | None:
    ordered = sorted(versions, key=lambda v: v.version)
    key = main_metric(ordered)
    if key is None:
        return None
    return MetricChart(
        metric_label(*key), [int(v.version) for v in ordered], [final_metrics(v.metrics).get(key) for v in ordered]
    )


@dataclass(frozen=True)
class ModelPage:
    model: ModelSummary
    versions: list[VersionView]  # newest first
    history: list[AliasChangeView]  # newest first, at most HISTORY_LIMIT
    chart: MetricChart | None
    history_truncated: bool = False


@dataclass(frozen=True)
class VersionPage:
    version: VersionView
    card: rpb.ModelCard | None  # None: the registry has no card for it (e.g. a version whose registration failed)


def selector_target(selector: common_pb2.ModelVersionSelector, default: str = "") -> str:
    """``alias production`` / ``version 3``; ``default`` when the selector names neither."""
    which = selector.WhichOneof("selector")
    if which == "alias":
        return f"alias {selector.alias}"
    if which == "version":
        return f"version {selector.version}"
    return default


@dataclass(frozen=True)
class LoadedVersionView:
    loaded: spb.LoadedVersion

    @property
    def version(self) -> int:
        return int(self.loaded.version)

    @property
    def state(self) -> str:
        return enum_name(spb.LoadedVersionState, self.loaded.state, "LOADED_VERSION_STATE_") or "unknown"

    @property
    def traffic_percent(self) -> float:
        return 100.0 * self.loaded.traffic_weight

    @property
    def error_rate(self) -> float | None:
        """Errors over requests since the version loaded; None before its first request (not 0: nothing is known)."""
        if self.loaded.request_count <= 0:
            return None
        return self.loaded.error_count / self.loaded.request_count

    @property
    def memory(self) -> str:
        return human_bytes(self.loaded.memory_bytes)


@dataclass(frozen=True)
class DeploymentView:
    deployment: spb.Deployment

    @property
    def name(self) -> str:
        return self.deployment.name

    @property
    def target(self) -> str:
        return selector_target(self.deployment.target, f"alias {DEFAULT_ALIAS}")

    @property
    def canary(self) -> str:
        """The canary's target, "" when there is none."""
        if not self.deployment.HasField("canary"):
            return ""
        return selector_target(self.deployment.canary.target)

    @property
    def ensemble(self) -> str:
        """The ensemble's other versions ("v2, v3"), "" when the deployment is not an ensemble."""
        return ", ".join(f"v{number}" for number in self.deployment.ensemble_versions)

    @property
    def canary_percent(self) -> float:
        return 100.0 * self.deployment.canary.weight if self.canary else 0.0

    @property
    def state(self) -> str:
        return enum_name(spb.DeploymentState, self.deployment.status.state, "DEPLOYMENT_STATE_") or "unknown"

    @property
    def versions(self) -> list[LoadedVersionView]:
        return [LoadedVersionView(v) for v in sorted(self.deployment.status.versions, key=lambda v: -v.version)]

    def traffic(self) -> dict[str, Any]:
        """What the page's traffic chart draws: each loaded version's share, in percent, oldest version first."""
        loaded = sorted(self.deployment.status.versions, key=lambda v: v.version)
        return {
            "metric": "traffic %",
            "labels": [f"v{v.version}" for v in loaded],
            "values": [round(100.0 * v.traffic_weight, 2) for v in loaded],
        }


def human_bytes(size: int) -> str:
    """``1536`` -> ``1.5 KiB``; "" for 0 (not measured)."""
    if size <= 0:
        return ""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def version_number(text: str) -> int:
    """A version from a URL: a positive number (INVALID_ARGUMENT otherwise, before any call)."""
    if not text.isdigit() or int(text) < 1:
        raise InvalidArgumentError(f"a model version is a number (1, 2, ...), not {text!r}")
    return int(text)


# Shades of an attribution's strength (its share of the text's strongest one), 1 (faint) to 4 (strong).
SHADES = 4
MAX_EXPLAINED_CHARS = 2000


@dataclass(frozen=True)
class Segment:
    """A stretch of the explained text: a token with its score and shade class, or the text between tokens."""

    text: str
    score: float | None = None
    shade: str = ""


@dataclass(frozen=True)
class ExplanationView:
    """One text explained by a deployment: its answer and the text cut into shaded token segments."""

    deployment: str
    text: str
    label: str
    probability: float
    version: int
    delta: float
    segments: tuple[Segment, ...]

    @property
    def strongest(self) -> list[Segment]:
        """The tokens that moved the answer most, strongest first (five at most)."""
        tokens = [s for s in self.segments if s.score is not None and s.score != 0.0]
        return sorted(tokens, key=lambda s: -abs(s.score or 0.0))[:5]


def explanation_segments(text: str, attributions: Iterable[spb.TokenAttribution]) -> tuple[Segment, ...]:
    """``text`` cut at its tokens' offsets; each token shaded by the sign and strength of its score (CSS classes
    ``attr-pos-N`` / ``attr-neg-N``: the page's style policy allows no inline styles)."""
    tokens = sorted(attributions, key=lambda a: a.start)
    strongest = max((abs(a.score) for a in tokens), default=0.0)
    segments: list[Segment] = []
    at = 0
    for token in tokens:
        if token.start < at or token.end > len(text):
            continue  # overlapping or out of the text: never shown twice or past the end
        if token.start > at:
            segments.append(Segment(text[at : token.start]))
        level = round(SHADES * abs(token.score) / strongest) if strongest > 0 else 0
        shade = f"attr-{'pos' if token.score > 0 else 'neg'}-{level}" if level else "attr-0"
        segments.append(Segment(text[token.start : token.end], token.score, shade))
        at = token.end
    if at < len(text):
        segments.append(Segment(text[at:]))
    return tuple(segments)


class Registry:
    """The registry and serving pages' reads for one signed-in user."""

    def __init__(self, calls: ModelCalls) -> None:
        self.calls = calls

    async def _registry(self, session: Session, method: str, request: Any) -> Any:
        return await self.calls.call("registry", getattr(self.calls.registry, method), request, session.api_key)

    async def models(self, session: Session) -> list[ModelSummary]:
        """Every registered model of the organisation, by name (all pages)."""
        out: list[ModelSummary] = []
        token = ""
        while True:
            request = rpb.SearchRegisteredModelsRequest(
                page=common_pb2.PageRequest(page_size=MAX_PAGE_SIZE, page_token=token)
            )
            response = await self._registry(session, "SearchRegisteredModels", request)
            out += [ModelSummary.of(m) for m in response.registered_models]
            token = response.next_page_token
            if not token:
                return sorted(out, key=lambda m: m.name)

    async def model(self, session: Session, name: str) -> ModelPage:
        """A model with its versions (newest first, all pages), their aliases and the alias history."""
        model = await self._registry(session, "GetRegisteredModel", rpb.GetRegisteredModelRequest(name=name))
        versions: list[rpb.ModelVersion] = []
        token = ""
        while True:
            request = rpb.ListModelVersionsRequest(
                registered_model_name=name, page=common_pb2.PageRequest(page_size=MAX_PAGE_SIZE, page_token=token)
            )
            response = await self._registry(session, "ListModelVersions", request)
            versions += response.model_versions
            token = response.next_page_token
            if not token:
                break
        history, truncated = await self._history(session, name)
        by_version = aliases_by_version(model.aliases)
        newest_first = sorted(versions, key=lambda v: -v.version)
        return ModelPage(
            model=ModelSummary.of(model),
            versions=[VersionView.of(v, by_version.get(v.version, ())) for v in newest_first],
            history=history,
            chart=metric_chart(versions),
            history_truncated=truncated,
        )

    async def _history(self, session: Session, name: str) -> tuple[list[AliasChangeView], bool]:
        out: list[AliasChangeView] = []
        token = ""
        while True:
            request = rpb.GetAliasHistoryRequest(
                registered_model_name=name,
                page=common_pb2.PageRequest(page_size=min(MAX_PAGE_SIZE, HISTORY_LIMIT), page_token=token),
            )
            response = await self._registry(session, "GetAliasHistory", request)
            out += [AliasChangeView(c) for c in response.changes]
            token = response.next_page_token
            if not token or len(out) >= HISTORY_LIMIT:
                # Newest first whatever the order within a page (the sequence orders a model's history).
                out.sort(key=lambda c: -c.change.sequence)
                return out[:HISTORY_LIMIT], bool(token) or len(out) > HISTORY_LIMIT

    async def version(self, session: Session, name: str, version: str) -> VersionPage:
        """One version (by number) with its model card."""
        number = version_number(version)
        selector = common_pb2.ModelVersionSelector(version=number)
        found = await self._registry(
            session, "GetModelVersion", rpb.GetModelVersionRequest(registered_model_name=name, selector=selector)
        )
        try:
            card = await self._registry(
                session, "GetModelCard", rpb.GetModelCardRequest(registered_model_name=name, selector=selector)
            )
        except NotFoundError:
            # The version exists (read just above): what is missing is its card, which the page says.
            card = None
        return VersionPage(VersionView.of(found), card)

    async def deployments(self, session: Session) -> list[DeploymentView]:
        """The organisation's deployments by name (all pages), each with its loaded versions."""
        out: list[DeploymentView] = []
        token = ""
        while True:
            request = spb.ListDeploymentsRequest(page=common_pb2.PageRequest(page_size=MAX_PAGE_SIZE, page_token=token))
            response = await self.calls.call("serving", self.calls.serving.ListDeployments, request, session.api_key)
            out += [DeploymentView(d) for d in response.deployments]
            token = response.next_page_token
            if not token:
                return sorted(out, key=lambda d: d.name)

    async def explain(self, session: Session, deployment: str, text: str) -> ExplanationView:
        """``text`` classified by ``deployment`` with per-token attributions (serving's Predict with explain)."""
        if not text.strip():
            raise InvalidArgumentError("enter a text to explain")
        if len(text) > MAX_EXPLAINED_CHARS:
            raise InvalidArgumentError(
                f"the text has {len(text)} characters; the console explains at most {MAX_EXPLAINED_CHARS}"
            )
        request = spb.PredictRequest(model=deployment, texts=[text], explain=True)
        response = await self.calls.call("serving", self.calls.serving.Predict, request, session.api_key)
        [prediction] = response.predictions
        return ExplanationView(
            deployment=deployment,
            text=text,
            label=prediction.explained_label or prediction.label,
            probability=prediction.probabilities.get(prediction.explained_label, prediction.top_probability),
            version=response.model_version,
            delta=prediction.attribution_delta,
            segments=explanation_segments(text, prediction.attributions),
        )
