"""Deployments with a fake model: create/update/delete, routing, hot-swap, canary, length policy, logging."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from gristmill.core.errors import (
    AlreadyExistsError,
    DataIntegrityError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from gristmill.serving.domain.model import (
    DEFAULT_ORGANIZATION,
    BatchingConfig,
    CanaryRoute,
    DeploymentSpec,
    LengthPolicy,
    OverLengthAction,
    PredictionLoggingConfig,
    Quantization,
    VersionSelector,
)
from gristmill.serving.domain.versions import DeploymentState, VersionState
from services.serving.tests.support import Env, make_service, wait_for

ORG = DEFAULT_ORGANIZATION


def spec(name: str = "sentiment", **kwargs: object) -> DeploymentSpec:
    return DeploymentSpec(organization_id=ORG, name=name, registered_model_name="sentiment", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def env(tmp_path: Path) -> Env:
    built = make_service(tmp_path)
    built.source.add("sentiment", 1)
    built.source.add("sentiment", 2)
    built.source.aliases[("sentiment", "production")] = 1
    await built.service.start()
    yield built  # type: ignore[misc]
    await built.service.close()
    built.database.dispose()


async def ready(env: Env, deployment: DeploymentSpec | None = None) -> DeploymentSpec:
    deployment = deployment or spec()
    view = await env.service.create(deployment, wait_until_ready=True, timeout_s=5)
    assert view.state is DeploymentState.READY, view.message
    return deployment


async def test_a_created_deployment_loads_then_classifies(env: Env) -> None:
    view = await env.service.create(spec(), wait_until_ready=True, timeout_s=5)
    assert view.state is DeploymentState.READY
    assert [(v.version, v.state, v.traffic_weight) for v in view.versions] == [(1, VersionState.READY, 1.0)]
    result, _ = await env.service.predict(ORG, "sentiment", ["good food", "awful service", "meh"])
    assert result.version == 1 and result.registered_model_name == "sentiment"
    assert [p.label for p in result.predictions] == ["positive", "negative", "positive"]
    assert [p.uncertain for p in result.predictions] == [False, False, True]
    assert result.predictions[0].probabilities[1] == pytest.approx(0.9)
    assert len(result.request_id) == 32


async def test_create_refuses_what_the_registry_does_not_know_and_stores_nothing(env: Env) -> None:
    ghost = DeploymentSpec(organization_id=ORG, name="ghost", registered_model_name="ghost")
    with pytest.raises(NotFoundError, match="no alias"):
        await env.service.create(ghost, wait_until_ready=False, timeout_s=1)
    with_canary = spec(
        target=VersionSelector.of_alias("staging"), canary=CanaryRoute(VersionSelector.of_version(2), 0.1)
    )
    with pytest.raises(NotFoundError, match="no alias"):
        await env.service.create(with_canary, wait_until_ready=False, timeout_s=1)
    with pytest.raises(NotFoundError, match="no version 9"):
        await env.service.create(spec(target=VersionSelector.of_version(9)), wait_until_ready=False, timeout_s=1)
    env.source.not_ready.add(("sentiment", 2))
    with pytest.raises(FailedPreconditionError, match="not READY"):
        await env.service.create(spec(target=VersionSelector.of_version(2)), wait_until_ready=False, timeout_s=1)
    assert env.store.list_all() == []
    assert env.manager.count() == 0


async def test_a_deployment_waits_for_an_alias_not_set_yet_and_loads_when_it_is_set(env: Env) -> None:
    # Declared before the first model version is promoted: it serves from the first `alias changed` event.
    waiting = spec(name="waiting", target=VersionSelector.of_alias("staging"))
    view = await env.service.create(waiting, wait_until_ready=True, timeout_s=5)
    assert view.state is DeploymentState.LOADING and view.versions == ()
    assert "waiting for alias 'staging'" in view.message
    assert [s.name for s in env.store.list_all()] == ["waiting"]
    with pytest.raises(UnavailableError):
        await env.service.predict(ORG, "waiting", ["good"])
    env.source.aliases[("sentiment", "staging")] = 2
    env.manager.alias_changed(ORG, "sentiment", "staging", 2)
    await wait_for(lambda: env.manager.view(waiting).state is DeploymentState.READY)
    result, _ = await env.service.predict(ORG, "waiting", ["good"])
    assert result.version == 2


async def test_create_refuses_invalid_specs_and_taken_names(env: Env) -> None:
    bad = [
        (spec(name="Bad Name"), "deployment name"),
        (spec(canary=CanaryRoute(VersionSelector.of_version(2), 1.5)), "canary.weight"),
        (spec(canary=CanaryRoute(VersionSelector.of_alias("production"), 0.1)), "same as the primary"),
        (spec(batching=BatchingConfig(max_batch_size=0)), "max_batch_size"),
        (spec(batching=BatchingConfig(max_delay_ms=-1)), "max_delay_ms"),
        (spec(batching=BatchingConfig(max_batch_size=64, max_queue_size=10)), "max_queue_size"),
        (spec(length_policy=LengthPolicy(max_tokens=-3)), "max_tokens"),
        (spec(prediction_logging=PredictionLoggingConfig(sample_rate=2.0)), "sample_rate"),
        (spec(prediction_logging=PredictionLoggingConfig(uncertainty_threshold=float("nan"))), "uncertainty"),
        (spec(target=VersionSelector.of_version(0)), "version must be 1 or more"),
    ]
    for deployment, message in bad:
        with pytest.raises(InvalidArgumentError, match=message):
            await env.service.create(deployment, wait_until_ready=False, timeout_s=1)
    # A pinned canary version that is the primary's is no canary either (an alias may rest there: see below).
    with pytest.raises(InvalidArgumentError, match="same version"):
        await env.service.create(
            spec(canary=CanaryRoute(VersionSelector.of_version(1), 0.1)), wait_until_ready=False, timeout_s=1
        )
    assert env.store.list_all() == []
    await ready(env)
    with pytest.raises(AlreadyExistsError):
        await env.service.create(spec(), wait_until_ready=False, timeout_s=1)


async def test_predict_refuses_bad_input_unknown_deployments_and_unready_ones(env: Env) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        await env.service.predict(ORG, "nope", ["good"])
    hold = threading.Event()
    env.source.versions[("sentiment", 1)].hold = hold
    await env.service.create(spec(), wait_until_ready=False, timeout_s=1)
    with pytest.raises(UnavailableError, match="no ready version"):
        await env.service.predict(ORG, "sentiment", ["good"])
    hold.set()
    await env.manager.wait_settled(ORG, "sentiment", 5)
    for texts, message in (([], "no texts"), (["good", ""], "text 1 is empty"), (["x"] * 1025, "limit is 1024")):
        with pytest.raises(InvalidArgumentError, match=message):
            await env.service.predict(ORG, "sentiment", texts)
    with pytest.raises(NotFoundError, match="version 2 is not loaded"):
        await env.service.predict(ORG, "sentiment", ["good"], pin=VersionSelector.of_version(2))
    result, _ = await env.service.predict(ORG, "sentiment", ["good"], pin=VersionSelector.of_alias("production"))
    assert result.version == 1


async def test_alias_move_swaps_versions_with_in_flight_requests_finishing_on_the_old_one(env: Env) -> None:
    await ready(env)
    old = env.loader.of_version(1)
    # A request runs on version 1 (held inside the model) while version 2 loads (held in its download).
    old.gate = threading.Event()
    in_flight = asyncio.create_task(env.service.predict(ORG, "sentiment", ["good"]))
    await wait_for(lambda: len(old.batches) == 1)
    load = threading.Event()
    env.source.versions[("sentiment", 2)].hold = load
    env.source.aliases[("sentiment", "production")] = 2
    env.manager.alias_changed(ORG, "sentiment", "production", 2)
    await wait_for(lambda: any(v.state is VersionState.LOADING for v in env.manager.view(spec()).versions))
    view = env.manager.view(spec())
    assert [(v.version, v.state) for v in view.versions] == [(1, VersionState.READY), (2, VersionState.LOADING)]
    load.set()
    await wait_for(lambda: env.manager.view(spec()).versions[0].version == 2)
    # New requests go to version 2 at once; version 1 drains and is not freed while its request runs.
    result, _ = await env.service.predict(ORG, "sentiment", ["good"])
    assert result.version == 2
    assert (1, VersionState.DRAINING) in [(v.version, v.state) for v in env.manager.view(spec()).versions]
    assert not old.closed
    old.gate.set()
    answered, _ = await in_flight
    assert answered.version == 1
    await wait_for(lambda: old.closed)
    assert [v.version for v in env.manager.view(spec()).versions] == [2]


async def test_a_failing_load_keeps_the_old_version_serving_and_reports_why(env: Env) -> None:
    await ready(env)
    env.source.add("sentiment", 3, fail=DataIntegrityError("model.safetensors: sha256 mismatch"))
    env.manager.alias_changed(ORG, "sentiment", "production", 3)
    await env.manager.wait_settled(ORG, "sentiment", 5)
    view = env.manager.view(spec())
    assert view.state is DeploymentState.DEGRADED
    assert "sha256 mismatch" in view.message and "still serving version 1" in view.message
    assert [(v.version, v.state) for v in view.versions] == [(1, VersionState.READY), (3, VersionState.FAILED)]
    result, _ = await env.service.predict(ORG, "sentiment", ["good"])
    assert result.version == 1
    # A later successful move clears the degradation.
    env.manager.alias_changed(ORG, "sentiment", "production", 2)
    await env.manager.wait_settled(ORG, "sentiment", 5)
    assert env.manager.view(spec()).state is DeploymentState.READY


async def test_a_deleted_alias_keeps_the_deployment_serving(env: Env) -> None:
    await ready(env)
    env.manager.alias_changed(ORG, "sentiment", "production", None)
    view = env.manager.view(spec())
    assert view.state is DeploymentState.READY and "was deleted" in view.message
    assert (await env.service.predict(ORG, "sentiment", ["good"]))[0].version == 1


async def test_the_first_load_failing_leaves_the_deployment_failed(env: Env) -> None:
    env.source.versions[("sentiment", 1)].fail = DataIntegrityError("config.json: sha256 mismatch")
    view = await env.service.create(spec(), wait_until_ready=True, timeout_s=5)
    assert view.state is DeploymentState.FAILED
    assert "sha256 mismatch" in view.message
    with pytest.raises(UnavailableError):
        await env.service.predict(ORG, "sentiment", ["good"])


async def test_canary_splits_requests_by_weight_and_counts_per_version(env: Env) -> None:
    # No batching delay: the requests here come one at a time.
    deployment = spec(canary=CanaryRoute(VersionSelector.of_version(2), 0.25), batching=BatchingConfig(max_delay_ms=0))
    await ready(env, deployment)
    answered = {1: 0, 2: 0}
    for _ in range(2000):
        result, _ = await env.service.predict(ORG, "sentiment", ["good"])
        answered[result.version] += 1
    assert answered[2] / 2000 == pytest.approx(0.25, abs=0.03)
    view = env.manager.view(deployment)
    weights = {v.version: v.traffic_weight for v in view.versions}
    assert weights == {1: pytest.approx(0.75), 2: pytest.approx(0.25)}
    counts = {v.version: v.request_count for v in view.versions}
    assert counts == answered
    assert all(v.latency_p50_ms > 0 for v in view.versions)
    # Errors are counted for the version that failed.
    env.loader.of_version(2).fail_with = RuntimeError("boom")
    for _ in range(40):
        with contextlib.suppress(RuntimeError):
            await env.service.predict(ORG, "sentiment", ["good"])
    errors = {v.version: v.error_count for v in env.manager.view(deployment).versions}
    assert errors[1] == 0 and errors[2] > 0


async def test_a_canary_alias_may_rest_on_the_primarys_version_and_is_followed_when_it_moves(env: Env) -> None:
    # An online gate leaves "candidate" on production's version after a promotion or a rollback.
    env.source.aliases[("sentiment", "candidate")] = 1
    deployment = spec(
        canary=CanaryRoute(VersionSelector.of_alias("candidate"), 0.5), batching=BatchingConfig(max_delay_ms=0)
    )
    await ready(env, deployment)
    answered = {(await env.service.predict(ORG, "sentiment", ["good"]))[0].version for _ in range(20)}
    assert answered == {1}
    env.source.aliases[("sentiment", "candidate")] = 2
    env.manager.alias_changed_threadsafe(ORG, "sentiment", "candidate", 2)
    await wait_for(lambda: {v.version for v in env.manager.view(deployment).versions} == {1, 2})
    answered = {(await env.service.predict(ORG, "sentiment", ["good"]))[0].version for _ in range(60)}
    assert answered == {1, 2}


async def test_length_policy_truncates_or_rejects_long_texts(env: Env) -> None:
    long_text = " ".join(["word"] * 40)
    await ready(env, spec(name="cut", length_policy=LengthPolicy(max_tokens=10)))
    await env.service.predict(ORG, "cut", [long_text])
    assert [len(item.ids) for item in env.loader.loaded[-1].batches[-1]] == [10]
    await ready(env, spec(name="strict", length_policy=LengthPolicy(10, OverLengthAction.REJECT)))
    with pytest.raises(InvalidArgumentError, match=r"text 1 has 42 tokens.*at most 10"):
        await env.service.predict(ORG, "strict", ["good", long_text])
    # Nothing of the refused request reached the model.
    assert env.loader.loaded[-1].batches == []


async def test_updates_apply_batching_at_once_and_reload_for_quantization_and_targets(env: Env) -> None:
    deployment = await ready(env)
    await env.service.update(
        replace(deployment, batching=BatchingConfig(max_batch_size=4, max_delay_ms=0, max_queue_size=8)),
        previous=deployment,
        wait_until_ready=True,
        timeout_s=5,
    )
    assert len(env.loader.loaded) == 1, "a batching change must not reload the model"
    version = env.manager.loaded_versions(ORG, "sentiment")[0]
    assert version.batcher is not None and version.batcher.policy.max_batch_size == 4
    current = await env.service.current(ORG, "sentiment")
    view = await env.service.update(
        replace(current, quantization=Quantization.DYNAMIC_INT8), previous=current, wait_until_ready=True, timeout_s=5
    )
    assert view.state is DeploymentState.READY
    assert env.loader.options[-1].quantization is Quantization.DYNAMIC_INT8
    current = await env.service.current(ORG, "sentiment")
    await env.service.update(
        replace(current, target=VersionSelector.of_version(2)), previous=current, wait_until_ready=True, timeout_s=5
    )
    assert (await env.service.predict(ORG, "sentiment", ["good"]))[0].version == 2
    stored = env.store.get(ORG, "sentiment")
    assert stored.target == VersionSelector.of_version(2) and stored.quantization is Quantization.DYNAMIC_INT8
    assert stored.update_time > stored.create_time
    current = await env.service.current(ORG, "sentiment")
    with pytest.raises(NotFoundError):
        await env.service.update(
            replace(current, target=VersionSelector.of_version(7)), previous=current, wait_until_ready=True, timeout_s=5
        )
    assert env.store.get(ORG, "sentiment").target == VersionSelector.of_version(2)


async def test_canary_can_be_added_and_removed(env: Env) -> None:
    deployment = await ready(env)
    with_canary = replace(deployment, canary=CanaryRoute(VersionSelector.of_version(2), 0.5))
    await env.service.update(with_canary, previous=deployment, wait_until_ready=True, timeout_s=5)
    assert {v.version for v in env.manager.loaded_versions(ORG, "sentiment")} == {1, 2}
    await env.service.update(deployment, previous=with_canary, wait_until_ready=True, timeout_s=5)
    await wait_for(lambda: env.loader.of_version(2).closed)
    assert [v.version for v in env.manager.loaded_versions(ORG, "sentiment")] == [1]


async def test_delete_stops_routing_and_frees_the_model(env: Env) -> None:
    await ready(env)
    await env.service.delete(ORG, "sentiment")
    with pytest.raises(NotFoundError):
        await env.service.predict(ORG, "sentiment", ["good"])
    with pytest.raises(NotFoundError):
        await env.service.get(ORG, "sentiment")
    await wait_for(lambda: env.loader.of_version(1).closed)
    with pytest.raises(NotFoundError):
        await env.service.delete(ORG, "sentiment")


async def test_list_pages_by_name(env: Env) -> None:
    for name in ("c", "a", "b"):
        await env.service.create(spec(name=name), wait_until_ready=False, timeout_s=1)
    first = await env.service.list(ORG, page_size=2, after="")
    assert [v.spec.name for v in first.deployments] == ["a", "b"] and first.next_after == "b"
    second = await env.service.list(ORG, page_size=2, after=first.next_after)
    assert [v.spec.name for v in second.deployments] == ["c"] and second.next_after == ""
    with pytest.raises(InvalidArgumentError):
        await env.service.list(ORG, page_size=-1, after="")


async def test_a_restart_serves_the_stored_deployments_again(tmp_path: Path) -> None:
    first = make_service(tmp_path)
    first.source.add("sentiment", 1)
    first.source.aliases[("sentiment", "production")] = 1
    await first.service.start()
    await first.service.create(spec(), wait_until_ready=True, timeout_s=5)
    await first.service.close()
    first.database.dispose()

    second = make_service(tmp_path)
    second.source.add("sentiment", 1)
    second.source.aliases[("sentiment", "production")] = 1
    await second.service.start()
    await second.manager.wait_settled(ORG, "sentiment", 5)
    assert (await second.service.predict(ORG, "sentiment", ["good"]))[0].version == 1
    await second.service.close()
    second.database.dispose()


async def test_uncertain_and_sampled_predictions_are_logged(env: Env) -> None:
    await ready(env)
    await env.service.predict(ORG, "sentiment", ["good", "meh", "bad"], request_id="r1")
    assert [(r.index_in_request, r.text, r.sampled, r.prediction.uncertain) for r in env.sink.records] == [
        (1, "meh", False, True)
    ]
    record = env.sink.records[0]
    assert (record.request_id, record.version, record.labeling_project_id) == ("r1", 1, "sentiment-project")
    current = await env.service.current(ORG, "sentiment")
    logging_all = replace(current, prediction_logging=PredictionLoggingConfig(1.0, 0.0))
    await env.service.update(logging_all, previous=current, wait_until_ready=True, timeout_s=5)
    env.sink.records.clear()
    await env.service.predict(ORG, "sentiment", ["good", "meh"])
    assert [(r.sampled, r.prediction.uncertain) for r in env.sink.records] == [(True, False), (True, False)]


@pytest.mark.parametrize("every_core", [True, False])
async def test_a_classifier_batch_alone_runs_on_the_thread_its_model_sets_up(tmp_path: Path, every_core: bool) -> None:
    """LIGHT_LOAD_EVERY_CORE: the deployment's batcher asks the model for the alone thread's setup (with the number
    of batch slots it holds); off, it never asks."""
    env = make_service(tmp_path, batch_workers=2, light_load_every_core=every_core)
    env.loader.light_load = True  # the model offers a setup either way
    env.source.add("sentiment", 1)
    env.source.aliases[("sentiment", "production")] = 1
    await env.service.start()
    try:
        deployment = await ready(env)
        result, _ = await env.service.predict(ORG, deployment.name, ["good phone"])
        assert result.predictions[0].label == "positive"
        classifier = env.loader.of_version(1)
        if every_core:
            (thread, share), *_ = classifier.light_load_threads
            assert thread.startswith("infer-sentiment/v1-alone") and share == 2
        else:
            assert classifier.light_load_threads == []
    finally:
        await env.service.close()
        env.database.dispose()
