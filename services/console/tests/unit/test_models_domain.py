"""The registry and serving pages' domain over fake services: every page of a listing read, versions newest first
with their aliases (from the model's alias map and the version's own list), the charted metric, the alias history
newest first and capped, a model card that is missing, error rates computed only where there were requests, and
a version in a URL checked before any call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as rpb
from gristmill.api.serving.v1 import serving_pb2 as spb
from gristmill.console.domain import models as domain
from gristmill.console.domain.models import (
    DeploymentView,
    ExplanationView,
    LoadedVersionView,
    Registry,
    aliases_by_version,
    explanation_segments,
    human_bytes,
    main_metric,
    metric_chart,
)
from gristmill.console.domain.sessions import Session
from gristmill.core.errors import InvalidArgumentError, NotFoundError

SESSION = Session("gmk_k.s", "ann", "acme", "k1", ("registry:read", "serving:predict"), auth_disabled=False)
TEST, VALIDATION = common_pb2.DATASET_SPLIT_TEST, common_pb2.DATASET_SPLIT_VALIDATION


def metric(name: str, value: float, split: int = TEST, step: int | None = None) -> common_pb2.Metric:
    m = common_pb2.Metric(name=name, value=value, split=split)  # type: ignore[arg-type]
    if step is not None:
        m.step = step
    return m


def paged(items: list[Any], request: Any, size: int) -> tuple[list[Any], str]:
    """One page of ``items`` from the request's token (an offset here), ``size`` at most, and the next token."""
    start = int(request.page.page_token or 0)
    end = start + size
    return items[start:end], str(end) if end < len(items) else ""


class FakeRegistry:
    """Models, versions and history in memory, served ``page`` at a time whatever the page size asked."""

    def __init__(self, page: int = 2) -> None:
        self.page = page
        self.models: dict[str, rpb.RegisteredModel] = {}
        self.versions: dict[str, list[rpb.ModelVersion]] = {}
        self.history: dict[str, list[rpb.AliasChange]] = {}
        self.cards: dict[tuple[str, int], rpb.ModelCard] = {}

    async def SearchRegisteredModels(
        self, request: rpb.SearchRegisteredModelsRequest
    ) -> rpb.SearchRegisteredModelsResponse:
        items, token = paged(list(self.models.values()), request, self.page)
        return rpb.SearchRegisteredModelsResponse(registered_models=items, next_page_token=token)

    async def GetRegisteredModel(self, request: rpb.GetRegisteredModelRequest) -> rpb.RegisteredModel:
        if request.name not in self.models:
            raise NotFoundError(f"no registered model {request.name!r}")
        return self.models[request.name]

    async def ListModelVersions(self, request: rpb.ListModelVersionsRequest) -> rpb.ListModelVersionsResponse:
        items, token = paged(self.versions[request.registered_model_name], request, self.page)
        return rpb.ListModelVersionsResponse(model_versions=items, next_page_token=token)

    async def GetAliasHistory(self, request: rpb.GetAliasHistoryRequest) -> rpb.GetAliasHistoryResponse:
        items, token = paged(self.history.get(request.registered_model_name, []), request, self.page)
        return rpb.GetAliasHistoryResponse(changes=items, next_page_token=token)

    async def GetModelVersion(self, request: rpb.GetModelVersionRequest) -> rpb.ModelVersion:
        for v in self.versions.get(request.registered_model_name, []):
            if v.version == request.selector.version:
                return v
        raise NotFoundError("no such version")

    async def GetModelCard(self, request: rpb.GetModelCardRequest) -> rpb.ModelCard:
        key = (request.registered_model_name, request.selector.version)
        if key not in self.cards:
            raise NotFoundError("no model card")
        return self.cards[key]


class FakeServing:
    def __init__(self, deployments: list[spb.Deployment], page: int = 1) -> None:
        self.deployments, self.page = deployments, page

    async def ListDeployments(self, request: spb.ListDeploymentsRequest) -> spb.ListDeploymentsResponse:
        items, token = paged(self.deployments, request, self.page)
        return spb.ListDeploymentsResponse(deployments=items, next_page_token=token)


class FakeCalls:
    def __init__(self, registry: FakeRegistry, serving: FakeServing | None = None) -> None:
        self.registry = registry
        self.serving = serving or FakeServing([])
        self.calls: list[tuple[str, str, str]] = []

    async def call(self, service: str, method: Callable[..., Awaitable[Any]], request: Any, api_key: str) -> Any:
        self.calls.append((service, method.__name__, api_key))
        return await method(request)


def version(number: int, *metrics: common_pb2.Metric, aliases: tuple[str, ...] = ()) -> rpb.ModelVersion:
    return rpb.ModelVersion(
        registered_model_name="reviews",
        version=number,
        status=rpb.MODEL_VERSION_STATUS_READY,
        metrics=list(metrics),
        aliases=list(aliases),
        lineage=common_pb2.Lineage(
            training_job_id=f"job-{number}",
            dataset_version=common_pb2.DatasetVersionRef(project_id="phones", dataset_version_id=f"dv-{number}"),
            base_model=common_pb2.BaseModelRef(base_model_name="minilm"),
            hyper_parameters={"lr": "2e-05", "epochs": "3"},
        ),
    )


def change(sequence: int, alias: str, to: int | None, frm: int | None = None) -> rpb.AliasChange:
    c = rpb.AliasChange(registered_model_name="reviews", alias=alias, sequence=sequence, actor="k1", reason="why")
    if to is not None:
        c.to_version = to
    if frm is not None:
        c.from_version = frm
    return c


@pytest.fixture
def registry() -> FakeRegistry:
    fake = FakeRegistry(page=2)
    fake.models = {
        name: rpb.RegisteredModel(name=name, task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION, latest_version=3)
        for name in ("zeta", "alpha", "reviews", "mid", "beta")
    }
    fake.models["reviews"].aliases.update({"production": 2, "staging": 3, "candidate": 3})
    # The service lists versions in any order here: the page sorts them.
    fake.versions["reviews"] = [
        version(2, metric("accuracy", 0.91), metric("loss", 0.3, common_pb2.DATASET_SPLIT_UNSPECIFIED)),
        version(1, metric("accuracy", 0.85)),
        version(3, metric("accuracy", 0.5, step=10), metric("accuracy", 0.93), metric("accuracy", 0.7, step=20)),
        version(4, metric("f1", 0.8), aliases=("shadow",)),
    ]
    fake.history["reviews"] = [change(1, "production", 1), change(3, "staging", 3), change(2, "production", 2, 1)]
    return fake


async def test_every_page_of_models_is_read_and_sorted_by_name(registry: FakeRegistry) -> None:
    calls = FakeCalls(registry)
    models = await Registry(calls).models(SESSION)
    assert [m.name for m in models] == ["alpha", "beta", "mid", "reviews", "zeta"]
    # Five models two at a time: three calls, each with the user's key.
    assert calls.calls == [("registry", "SearchRegisteredModels", "gmk_k.s")] * 3
    reviews = next(m for m in models if m.name == "reviews")
    assert reviews.task == "text classification" and reviews.latest_version == 3
    assert reviews.aliases == [("candidate", 3), ("production", 2), ("staging", 3)]


async def test_a_models_versions_are_newest_first_with_their_aliases_metrics_and_lineage(
    registry: FakeRegistry,
) -> None:
    page = await Registry(FakeCalls(registry)).model(SESSION, "reviews")
    assert [v.number for v in page.versions] == [4, 3, 2, 1]
    aliases = {v.number: v.aliases for v in page.versions}
    # From the model's alias map, and the version's own list (v4's "shadow").
    assert aliases == {4: ["shadow"], 3: ["candidate", "staging"], 2: ["production"], 1: []}
    v3 = page.versions[1]
    # The final accuracy (no step), not a step's.
    assert [(r.label, r.value) for r in v3.metrics] == [("test accuracy", 0.93)]
    # By metric name, then split.
    assert [(r.label, r.value) for r in page.versions[2].metrics] == [("test accuracy", 0.91), ("loss", 0.3)]
    lineage = v3.lineage
    assert (lineage.training_job_id, lineage.project_id, lineage.dataset_version_id) == ("job-3", "phones", "dv-3")
    assert lineage.base_model == "minilm" and lineage.hyper_parameters == [("epochs", "3"), ("lr", "2e-05")]
    assert v3.status == "ready"


async def test_the_chart_draws_the_main_metric_oldest_version_first(registry: FakeRegistry) -> None:
    page = await Registry(FakeCalls(registry)).model(SESSION, "reviews")
    assert page.chart is not None
    assert page.chart.data() == {
        "metric": "test accuracy",
        "labels": ["v1", "v2", "v3", "v4"],
        "values": [0.85, 0.91, 0.93, None],  # v4 has no accuracy: a gap, not a zero
    }


def test_the_main_metric_prefers_known_metrics_and_held_out_splits_then_the_most_common() -> None:
    assert main_metric([version(1, metric("accuracy", 0.9, VALIDATION), metric("accuracy", 0.8))]) == (
        "accuracy",
        TEST,
    )
    assert main_metric([version(1, metric("f1", 0.9, VALIDATION)), version(2, metric("loss", 0.1))]) == (
        "f1",
        VALIDATION,
    )
    unknown = [version(1, metric("bleu", 1.0), metric("rouge", 2.0)), version(2, metric("rouge", 3.0))]
    assert main_metric(unknown) == ("rouge", TEST)
    assert main_metric([version(1)]) is None and metric_chart([version(1)]) is None


async def test_the_alias_history_is_newest_first_and_capped(
    registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = await Registry(FakeCalls(registry)).model(SESSION, "reviews")
    assert [(c.change.sequence, c.from_version, c.to_version) for c in page.history] == [
        (3, None, 3),
        (2, 1, 2),
        (1, None, 1),
    ]
    assert not page.history_truncated

    registry.history["reviews"] = [change(n, "production", n) for n in range(10, 0, -1)]
    registry.history["reviews"].append(change(0, "production", None, 1))  # the alias deleted
    monkeypatch.setattr(domain, "HISTORY_LIMIT", 3)
    calls = FakeCalls(registry)
    capped = await Registry(calls).model(SESSION, "reviews")
    assert [c.change.sequence for c in capped.history] == [10, 9, 8] and capped.history_truncated
    # Reading stopped at the cap: two pages of history, not six.
    assert [name for _, name, _ in calls.calls].count("GetAliasHistory") == 2


async def test_an_unknown_model_is_not_found(registry: FakeRegistry) -> None:
    with pytest.raises(NotFoundError):
        await Registry(FakeCalls(registry)).model(SESSION, "nope")


async def test_a_version_with_its_card_or_without_one(registry: FakeRegistry) -> None:
    registry.cards[("reviews", 2)] = rpb.ModelCard(registered_model_name="reviews", version=2, markdown="# reviews")
    calls = FakeCalls(registry)
    page = await Registry(calls).version(SESSION, "reviews", "2")
    assert page.version.number == 2 and page.card is not None and page.card.markdown == "# reviews"
    assert page.version.aliases == []  # the version's own list: the fake sets none on v2
    missing = await Registry(calls).version(SESSION, "reviews", "3")
    assert missing.card is None
    with pytest.raises(NotFoundError):
        await Registry(calls).version(SESSION, "reviews", "9")


@pytest.mark.parametrize("text", ["0", "-1", "abc", "1.5", "", "latest"])
async def test_a_version_in_the_url_must_be_a_number_before_any_call(registry: FakeRegistry, text: str) -> None:
    calls = FakeCalls(registry)
    with pytest.raises(InvalidArgumentError):
        await Registry(calls).version(SESSION, "reviews", text)
    assert calls.calls == []


def loaded(version: int, weight: float, requests: int, errors: int) -> spb.LoadedVersion:
    return spb.LoadedVersion(
        version=version,
        state=spb.LOADED_VERSION_STATE_READY,
        traffic_weight=weight,
        request_count=requests,
        error_count=errors,
        latency_p50_ms=3.5,
        latency_p99_ms=20.0,
        memory_bytes=3 * 1024 * 1024,
    )


async def test_deployments_every_page_by_name_with_targets_canaries_and_error_rates() -> None:
    canaried = spb.Deployment(
        name="sentiment",
        registered_model_name="reviews",
        target=common_pb2.ModelVersionSelector(alias="production"),
        canary=spb.CanaryRoute(target=common_pb2.ModelVersionSelector(version=3), weight=0.1),
        status=spb.DeploymentStatus(
            state=spb.DEPLOYMENT_STATE_READY, versions=[loaded(2, 0.9, 200, 5), loaded(3, 0.1, 0, 0)]
        ),
    )
    plain = spb.Deployment(name="alpha", registered_model_name="reviews")
    calls = FakeCalls(FakeRegistry(), FakeServing([canaried, plain], page=1))
    views = await Registry(calls).deployments(SESSION)
    assert [d.name for d in views] == ["alpha", "sentiment"]
    assert calls.calls == [("serving", "ListDeployments", "gmk_k.s")] * 2

    alpha, sentiment = views
    # No target: serving routes to the "production" alias; no canary, no state yet.
    assert (alpha.target, alpha.canary, alpha.canary_percent, alpha.state) == ("alias production", "", 0.0, "unknown")
    assert (sentiment.target, sentiment.canary, sentiment.state) == ("alias production", "version 3", "ready")
    assert sentiment.canary_percent == pytest.approx(10.0)
    v3, v2 = sentiment.versions  # newest first
    assert (v2.version, v2.state, v2.error_rate, v2.memory) == (2, "ready", 0.025, "3.0 MiB")
    assert v2.traffic_percent == pytest.approx(90.0)
    assert v3.error_rate is None  # no request yet: unknown, not 0%
    assert sentiment.traffic() == {"metric": "traffic %", "labels": ["v2", "v3"], "values": [90.0, 10.0]}


def test_error_rate_and_memory_edges() -> None:
    assert LoadedVersionView(loaded(1, 1.0, 4, 4)).error_rate == 1.0
    assert LoadedVersionView(loaded(1, 1.0, 3, 1)).error_rate == pytest.approx(1 / 3)
    assert [human_bytes(n) for n in (0, 512, 1536, 5 * 1024**3, 3000 * 1024**3)] == [
        "",
        "512 B",
        "1.5 KiB",
        "5.0 GiB",
        "3000.0 GiB",
    ]
    assert DeploymentView(spb.Deployment(target=common_pb2.ModelVersionSelector(version=7))).target == "version 7"


def test_aliases_by_version() -> None:
    assert aliases_by_version({"b": 2, "a": 2, "prod": 1}) == {1: ["prod"], 2: ["a", "b"]}
    assert aliases_by_version({}) == {}


def test_an_explained_text_is_cut_at_its_tokens_and_shaded_by_strength() -> None:
    text = "great battery, awful screen"
    attributions = [
        spb.TokenAttribution(token="great", start=0, end=5, score=0.6),
        spb.TokenAttribution(token="battery", start=6, end=13, score=0.1),
        spb.TokenAttribution(token=",", start=13, end=14, score=0.0),
        spb.TokenAttribution(token="awful", start=15, end=20, score=-0.3),
        spb.TokenAttribution(token="screen", start=21, end=27, score=-0.01),
        # Overlapping or past the end: never shown twice or out of the text.
        spb.TokenAttribution(token="bat", start=6, end=9, score=0.5),
        spb.TokenAttribution(token="x", start=26, end=40, score=0.5),
    ]
    segments = explanation_segments(text, attributions)
    assert "".join(s.text for s in segments) == text
    shaded = [(s.text, s.shade) for s in segments if s.score is not None]
    assert shaded == [
        ("great", "attr-pos-4"),
        ("battery", "attr-pos-1"),
        (",", "attr-0"),
        ("awful", "attr-neg-2"),
        ("screen", "attr-0"),
    ]
    assert [s.text for s in segments if s.score is None] == [" ", " ", " "]
    view = ExplanationView("d", text, "positive", 0.9, 1, 0.0, segments)
    assert [s.text for s in view.strongest] == ["great", "awful", "battery", "screen"]
    assert explanation_segments("", []) == ()
