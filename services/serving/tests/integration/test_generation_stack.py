"""Generation on the real stack: two tiny Llama chat versions uploaded to S3 and registered in the real registry,
a deployment following ``production`` loads them through the download manifest, and the typed, server-streaming
``Generate`` answers over a real gRPC port. Greedy replies equal transformers' ``generate``; a cancelled stream
frees its sequence; an alias move under streaming load fails no stream; bad input is refused with the status the
proto names and changes nothing. (Fixtures: ``test_serving_stack``.)"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import torch
from google.protobuf import field_mask_pb2
from transformers import AutoModelForCausalLM, AutoTokenizer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.events.v1 import events_pb2
from gristmill.api.registry.v1 import registry_pb2
from gristmill.api.serving.v1 import serving_pb2
from gristmill.core.events.topics import FEEDBACK_RECORDED, GENERATION_LOGGED
from gristmill.core.storage import ObjectStore
from gristmill.serving.runtime.generation import TransformersGenerator
from services.serving.tests.integration.test_serving_stack import Stack
from services.serving.tests.support import decoding_paused
from tests.support.job_output import upload_job_output
from tests.support.tiny_model import make_tiny_llama, make_tiny_lora_adapter

pytestmark = pytest.mark.integration

TEXTS = [
    "the service was quick and the staff were friendly",
    "the parcel arrived broken and nobody answered my mail",
    "great value for the money, would buy again",
]
CHAT_SIGNATURE = common_pb2.ModelSignature(
    inputs=[common_pb2.TensorSpec(name="messages", datatype="BYTES", shape=[-1])],
    outputs=[common_pb2.TensorSpec(name="text_output", datatype="BYTES", shape=[-1])],
)


async def register_chat(
    stack: Stack, objects: ObjectStore, model_dir: Path, job: str, *, base_model: common_pb2.BaseModelRef | None = None
) -> int:
    manifest = upload_job_output(objects, model_dir, f"jobs/{job}", task_type="TASK_TYPE_CHAT", label_map=[])
    version = await stack.registry.RegisterModelVersion(
        registry_pb2.RegisterModelVersionRequest(
            registered_model_name=stack.model,
            create_model_if_missing=True,
            source_prefix=f"jobs/{job}",
            manifest=manifest,
            task=common_pb2.TASK_TYPE_CHAT,
            signature=CHAT_SIGNATURE,
            lineage=common_pb2.Lineage(training_job_id=job, base_model=base_model),
            wait_for_verification=True,
        ),
        timeout=60,
    )
    assert version.status == registry_pb2.MODEL_VERSION_STATUS_READY, version.status_reason
    return version.version


def reference_reply(model_dir: Path, text: str, max_new_tokens: int) -> str:
    """transformers' own greedy ``generate`` for the same conversation."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    eos = tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos, eos_token_id=eos
        )
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


def next_feedback(stack: Stack, tmp_path: Path) -> events_pb2.FeedbackRecorded:
    return next_event(stack, tmp_path, FEEDBACK_RECORDED, events_pb2.FeedbackRecorded)


M = TypeVar("M", events_pb2.FeedbackRecorded, events_pb2.GenerationLogged)


def next_event(stack: Stack, tmp_path: Path, topic: str, kind: type[M]) -> M:
    """The first event on ``topic`` of this run's model on Kafka (a consumer group of its own)."""
    from sqlalchemy.orm import Session

    from gristmill.core.events import Event, KafkaEventBus
    from gristmill.core.sql import Database

    found: list[M] = []
    arrived = threading.Event()
    database = Database(f"sqlite:///{tmp_path / f'{topic}-watch.db'}")
    database.create_all()
    bus = KafkaEventBus(stack.kafka, database=database)

    def watch(event: Event, session: Session) -> None:
        if event.key == stack.model:
            found.append(kind.FromString(event.payload))
            arrived.set()

    consumer = bus.subscribe([topic], f"watch-{topic}-{stack.model}", watch).run_in_background()
    try:
        assert arrived.wait(60), f"no event on {topic} reached Kafka within 60 s"
        return found[0]
    finally:
        consumer.stop()
        bus.close()
        database.dispose()


def chat(model: str, text: str, **fields: object) -> serving_pb2.GenerateRequest:
    return serving_pb2.GenerateRequest(
        model=model,
        messages=[common_pb2.ChatMessage(role="user", content=text)],
        **fields,  # type: ignore[arg-type]
    )


async def reply(stack: Stack, request: serving_pb2.GenerateRequest) -> tuple[str, list[serving_pb2.GenerateResponse]]:
    responses = [r async for r in stack.serving.Generate(request, timeout=60)]
    return "".join(r.text for r in responses), responses


async def test_generate_streams_from_the_registry_with_hot_swap_and_cancellation(stack: Stack, tmp_path: Path) -> None:
    objects = stack.serving_host.platform.objects
    first = make_tiny_llama(tmp_path / "v1", TEXTS * 4, initializer_range=0.2, seed=1)
    second = make_tiny_llama(tmp_path / "v2", TEXTS * 4, initializer_range=0.2, seed=2)
    v1 = await register_chat(stack, objects, first, f"{stack.model}-sft-1")
    await stack.registry.SetAlias(
        registry_pb2.SetAliasRequest(registered_model_name=stack.model, alias="production", version=v1), timeout=30
    )
    await stack.serving.CreateDeployment(
        serving_pb2.CreateDeploymentRequest(
            deployment=serving_pb2.Deployment(name=stack.model, registered_model_name=stack.model),
            wait_until_ready=True,
        ),
        timeout=120,
    )

    # Typed streaming, greedy: the same reply as transformers' generate, in several chunks, usage on the last.
    text, responses = await reply(stack, chat(stack.model, TEXTS[0], max_tokens=16, temperature=0.0))
    assert text == reference_reply(first, TEXTS[0], 16)
    assert len(responses) > 1
    last = responses[-1]
    assert last.finish_reason in (serving_pb2.FINISH_REASON_STOP, serving_pb2.FINISH_REASON_LENGTH)
    assert last.usage.prompt_tokens > 0 and last.usage.completion_tokens == sum(len(r.token_ids) for r in responses)
    assert {(r.registered_model_name, r.model_version) for r in responses} == {(stack.model, v1)}
    assert all(r.finish_reason == serving_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])

    # Feedback on that reply reaches Kafka with the generation in full, PII-masked.
    await stack.serving.RecordFeedback(
        serving_pb2.RecordFeedbackRequest(
            request_id=last.request_id,
            kind=serving_pb2.FEEDBACK_KIND_EDIT,
            edited_reply="Thanks! Write to jane.doe@example.com for a refund.",
        ),
        timeout=30,
    )
    event = await asyncio.to_thread(next_feedback, stack, tmp_path)
    assert event.kind == events_pb2.FEEDBACK_KIND_EDIT and event.request_id == last.request_id
    assert "jane.doe@example.com" not in event.edited_reply and "Write to" in event.edited_reply
    assert event.generation.reply == text and event.generation.model_version == v1
    assert [(m.role, m.content) for m in event.generation.messages] == [("user", TEXTS[0])]
    assert event.generation.sampling_parameters["temperature"] == "0.0"
    for bad_feedback, code in (
        (
            serving_pb2.RecordFeedbackRequest(
                request_id=last.request_id, kind=serving_pb2.FEEDBACK_KIND_RATING, rating=7
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (serving_pb2.RecordFeedbackRequest(request_id=last.request_id), grpc.StatusCode.INVALID_ARGUMENT),
        (
            serving_pb2.RecordFeedbackRequest(request_id="never-answered", kind=serving_pb2.FEEDBACK_KIND_THUMBS_UP),
            grpc.StatusCode.NOT_FOUND,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.serving.RecordFeedback(bad_feedback, timeout=30)
        assert caught.value.code() == code, caught.value.details()

    # A raw prompt, a stop sequence, a seed.
    sampled = chat(stack.model, TEXTS[1], max_tokens=12, temperature=1.2, seed=5)
    assert (await reply(stack, sampled))[0] == (await reply(stack, sampled))[0]
    raw, _ = await reply(
        stack, serving_pb2.GenerateRequest(model=stack.model, prompt=TEXTS[2], max_tokens=8, temperature=0.0)
    )
    assert isinstance(raw, str)

    # Structured output: the reply parses and follows the schema.
    schema = {
        "type": "object",
        "properties": {"sentiment": {"enum": ["positive", "negative"]}},
        "required": ["sentiment"],
        "additionalProperties": False,
    }
    structured = chat(
        stack.model,
        TEXTS[1],
        max_tokens=64,
        seed=2,
        response_format=serving_pb2.ResponseFormat(json_schema=json.dumps(schema)),
    )
    text, responses = await reply(stack, structured)
    assert json.loads(text)["sentiment"] in ("positive", "negative")
    assert responses[-1].finish_reason == serving_pb2.FINISH_REASON_STOP

    # Bad input: refused with INVALID_ARGUMENT / NOT_FOUND, nothing left running.
    bad = [
        (chat(stack.model, TEXTS[0], temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (chat(stack.model, TEXTS[0], top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (chat(stack.model, TEXTS[0], max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (chat(stack.model, TEXTS[0], max_tokens=600), grpc.StatusCode.INVALID_ARGUMENT, "context"),
        (serving_pb2.GenerateRequest(model=stack.model), grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
        (chat(stack.model, TEXTS[0], stop=["x" * 65]), grpc.StatusCode.INVALID_ARGUMENT, "stop sequence"),
        (chat("no-such-deployment", TEXTS[0]), grpc.StatusCode.NOT_FOUND, "does not exist"),
        (
            chat(stack.model, TEXTS[0], response_format=serving_pb2.ResponseFormat(json_schema="[1, 2]")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "JSON object",
        ),
    ]
    for request, code, words in bad:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await reply(stack, request)
        assert caught.value.code() == code, caught.value.details()
        assert words in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.serving.Predict(serving_pb2.PredictRequest(model=stack.model, texts=["hello"]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "generative model" in (caught.value.details() or "")

    # A client that cancels mid-stream frees its sequence and its cache.
    service = stack.serving_app.service
    generator = service.manager.loaded_versions("default", stack.model)[0].generator
    assert generator is not None
    assert isinstance(generator, TransformersGenerator)
    # Each decoding step waits 50 ms, and the greedy reply does not end by a sampled end token: the 400-token reply
    # is still running when the test looks, however loaded the machine.
    with decoding_paused(generator, step_s=0.05):
        call = stack.serving.Generate(chat(stack.model, TEXTS[0], max_tokens=400, temperature=0.0), timeout=60)
        await call.read()
        assert generator.stats().running == 1
        call.cancel()
    deadline = time.monotonic() + 10
    while generator.stats().running and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    stats = generator.stats()
    assert (stats.running, stats.cached_tokens, stats.reserved_tokens) == (0, 0, 0)

    # The alias moves while streams run: every stream finishes, each from one version; new ones get version 2.
    v2 = await register_chat(stack, objects, second, f"{stack.model}-sft-2")
    failures: list[BaseException] = []
    versions: set[int] = set()
    stop = asyncio.Event()

    async def client(index: int) -> None:
        while not stop.is_set():
            try:
                _, responses = await reply(stack, chat(stack.model, TEXTS[index % 3], max_tokens=24, temperature=0.7))
                assert len({r.model_version for r in responses}) == 1
                assert responses[-1].finish_reason != serving_pb2.FINISH_REASON_UNSPECIFIED
                versions.add(responses[-1].model_version)
            except BaseException as exc:  # counted, then reported by the assertion below
                failures.append(exc)
                return

    clients = [asyncio.create_task(client(i)) for i in range(4)]
    await asyncio.sleep(0.5)
    await stack.registry.SetAlias(
        registry_pb2.SetAliasRequest(registered_model_name=stack.model, alias="production", version=v2), timeout=30
    )
    deadline = time.monotonic() + 120
    while v2 not in versions and time.monotonic() < deadline and not failures:
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*clients)
    assert failures == []
    assert versions == {v1, v2}
    text, responses = await reply(stack, chat(stack.model, TEXTS[0], max_tokens=16, temperature=0.0))
    assert responses[-1].model_version == v2
    assert text == reference_reply(second, TEXTS[0], 16)


def merged_reply(base: Path, adapter: Path, text: str, max_new_tokens: int) -> str:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    merged.merge_and_unload().save_pretrained(adapter.parent / f"{adapter.name}-merged")
    AutoTokenizer.from_pretrained(adapter).save_pretrained(adapter.parent / f"{adapter.name}-merged")
    return reference_reply(adapter.parent / f"{adapter.name}-merged", text, max_new_tokens)


async def test_lora_adapters_of_one_registry_base_model_share_it(stack: Stack, tmp_path: Path) -> None:
    objects = stack.serving_host.platform.objects
    run = stack.model.rsplit("-", 1)[-1]
    base_dir = make_tiny_llama(tmp_path / "base", TEXTS * 4, initializer_range=0.2, seed=3)
    for path in sorted(p for p in base_dir.rglob("*") if p.is_file()):
        objects.put_file(f"uploads/base-{run}/{path.relative_to(base_dir).as_posix()}", path)
    base = await stack.registry.ImportBaseModel(
        registry_pb2.ImportBaseModelRequest(name=f"tiny-llama-{run}", object_prefix=f"uploads/base-{run}"), timeout=60
    )
    lineage_base = common_pb2.BaseModelRef(base_model_name=base.name, content_sha256=base.content_sha256)
    adapters = [make_tiny_lora_adapter(base_dir, tmp_path / f"adapter{n}", seed=n) for n in (1, 2)]
    versions = [
        await register_chat(stack, objects, adapter, f"{stack.model}-lora-{number}", base_model=lineage_base)
        for number, adapter in enumerate(adapters, start=1)
    ]
    await stack.registry.SetAlias(
        registry_pb2.SetAliasRequest(registered_model_name=stack.model, alias="production", version=versions[0]),
        timeout=30,
    )
    # Version 1 takes the traffic and version 2 is the canary: two adapters, one copy of the base.
    await stack.serving.CreateDeployment(
        serving_pb2.CreateDeploymentRequest(
            deployment=serving_pb2.Deployment(
                name=stack.model,
                registered_model_name=stack.model,
                canary=serving_pb2.CanaryRoute(target=common_pb2.ModelVersionSelector(version=versions[1]), weight=0.5),
                # Every reply is logged (a sample of 100 %), PII-masked.
                prediction_logging=serving_pb2.PredictionLoggingConfig(sample_rate=1.0),
            ),
            wait_until_ready=True,
        ),
        timeout=120,
    )
    loaded = stack.serving_app.service.manager.loaded_versions("default", stack.model)
    generators = [v.generator for v in loaded]
    assert len(generators) == 2 and all(g is not None for g in generators)
    assert getattr(generators[0], "shared", None) is getattr(generators[1], "shared", None) is not None

    shared = getattr(generators[0], "shared", None)
    mailed = "Answer me at jane.doe@example.com please"
    text, responses = await reply(stack, chat(stack.model, mailed, max_tokens=6, temperature=0.0))
    logged = await asyncio.to_thread(next_event, stack, tmp_path, GENERATION_LOGGED, events_pb2.GenerationLogged)
    assert logged.request_id == responses[-1].request_id and logged.reply == text
    assert [m.content for m in logged.messages] == ["Answer me at [EMAIL] please"]
    for version, adapter in zip(versions, adapters, strict=True):
        pin = common_pb2.ModelVersionSelector(version=version)
        text, responses = await reply(stack, chat(stack.model, TEXTS[0], max_tokens=12, temperature=0.0, target=pin))
        assert responses[-1].model_version == version
        assert text == merged_reply(base_dir, adapter, TEXTS[0], 12)

    # Without the canary, the alias moves to version 2 under streaming load: no stream fails, and the new
    # adapter is loaded on the base already in memory (never loaded again).
    await stack.serving.UpdateDeployment(
        serving_pb2.UpdateDeploymentRequest(
            name=stack.model,
            deployment=serving_pb2.Deployment(),
            update_mask=field_mask_pb2.FieldMask(paths=["canary"]),
            wait_until_ready=True,
        ),
        timeout=60,
    )
    failures: list[BaseException] = []
    seen: set[int] = set()
    stop = asyncio.Event()

    async def client(index: int) -> None:
        while not stop.is_set():
            try:
                _, responses = await reply(stack, chat(stack.model, TEXTS[index % 3], max_tokens=16, temperature=0.7))
                seen.add(responses[-1].model_version)
            except BaseException as exc:  # counted, then reported by the assertion below
                failures.append(exc)
                return

    clients = [asyncio.create_task(client(i)) for i in range(3)]
    await asyncio.sleep(0.3)
    await stack.registry.SetAlias(
        registry_pb2.SetAliasRequest(registered_model_name=stack.model, alias="production", version=versions[1]),
        timeout=30,
    )
    deadline = time.monotonic() + 60
    while versions[1] not in seen and time.monotonic() < deadline and not failures:
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*clients)
    assert failures == [] and versions[1] in seen
    (now,) = [v.generator for v in stack.serving_app.service.manager.loaded_versions("default", stack.model)]
    assert getattr(now, "shared", None) is shared

    # The online gate's rollback: version 1 is the canary by alias ("candidate"), then the alias moves back to
    # production's version under streaming load. No stream fails, and the canary then answers as production.
    await stack.registry.SetAlias(
        registry_pb2.SetAliasRequest(registered_model_name=stack.model, alias="candidate", version=versions[0]),
        timeout=30,
    )
    await stack.serving.UpdateDeployment(
        serving_pb2.UpdateDeploymentRequest(
            name=stack.model,
            deployment=serving_pb2.Deployment(
                canary=serving_pb2.CanaryRoute(target=common_pb2.ModelVersionSelector(alias="candidate"), weight=0.5)
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["canary"]),
            wait_until_ready=True,
        ),
        timeout=60,
    )
    seen.clear()
    stop.clear()
    clients = [asyncio.create_task(client(i)) for i in range(3)]
    deadline = time.monotonic() + 60
    while versions[0] not in seen and time.monotonic() < deadline and not failures:
        await asyncio.sleep(0.1)
    assert versions[0] in seen, "the canary never answered"
    await stack.registry.SetAlias(
        registry_pb2.SetAliasRequest(registered_model_name=stack.model, alias="candidate", version=versions[1]),
        timeout=30,
    )

    def canary_rolled_back() -> bool:
        loaded = stack.serving_app.service.manager.loaded_versions("default", stack.model)
        return sorted(v.version for v in loaded) == [versions[1], versions[1]]

    deadline = time.monotonic() + 60
    while not canary_rolled_back() and time.monotonic() < deadline and not failures:
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # streams admitted before the swap finish on the old canary
    seen.clear()
    deadline = time.monotonic() + 30
    while len(seen) < 1 and time.monotonic() < deadline and not failures:
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*clients)
    assert failures == [] and canary_rolled_back()
    assert seen == {versions[1]}
