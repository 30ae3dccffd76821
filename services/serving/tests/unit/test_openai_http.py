"""The OpenAI-compatible HTTP API, called with OpenAI's own Python client over a real port, on a tiny Llama served
by the real app wiring: chat and text completions (whole and streamed, with usage), the model list, OpenAI error
bodies for bad requests, API keys, and a client that leaves mid-reply freeing its sequence."""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select

from gristmill.api.events.v1 import events_pb2
from gristmill.core.auth import REGISTRY_READ, SERVING_PREDICT
from gristmill.core.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError
from gristmill.core.events.outbox import OutboxEvent
from gristmill.core.events.topics import FEEDBACK_RECORDED, GENERATION_OUTCOMES
from gristmill.core.host import Infrastructure
from gristmill.core.ports import SERVING_OPENAI_PORT, SERVING_PORT
from gristmill.core.security import embedded_security
from gristmill.core.settings import KafkaSettings
from gristmill.core.tasks import CHAT
from gristmill.core.values import DEFAULT_ORGANIZATION
from gristmill.serving.api.openai_http import (
    ChatCompletionRequest,
    OpenAIServer,
    error_response,
    openai_app,
    parse_request,
)
from gristmill.serving.app import METHOD_SCOPES, PUBLIC_METHODS, ServingApp, build_app
from gristmill.serving.domain.generation import GenerativeModel
from gristmill.serving.domain.model import DeploymentSpec, VersionSelector
from gristmill.serving.domain.sources import Classifier, LoadOptions, ResolvedVersion
from gristmill.serving.runtime.generation import TransformersGenerator
from gristmill.serving.settings import ServingSettings
from gristmill.serving.tasks import TaskRuntimeLoader
from services.serving.tests.support import ENTERPRISE, FakeLoader, FakeSource, decoding_paused, wait_for
from tests.contracts.auth import InMemoryKeyVerifier, api_key_security
from tests.support.tiny_model import make_tiny_llama

# The served app is built once for the module, so its tests share the module's event loop.
on_module_loop = pytest.mark.asyncio(loop_scope="module")

TEXTS = [
    "the service was quick and the staff were friendly",
    "the parcel arrived broken and nobody answered my mail",
    "great value for the money, would buy again",
    "the battery died after two days of light use",
]
CHAT_MODEL = "assistant"
CLASSIFIER = "sentiment"
ORG = DEFAULT_ORGANIZATION
QUESTION = [{"role": "user", "content": TEXTS[0]}]


@dataclass
class ChatSource(FakeSource):
    """The fake registry, with one chat model (``assistant``) whose files are a tiny Llama."""

    llama: Path = Path()

    def resolve(self, organization_id: str, registered_model_name: str, selector: VersionSelector) -> ResolvedVersion:
        resolved = super().resolve(organization_id, registered_model_name, selector)
        return replace(resolved, task=CHAT) if registered_model_name == CHAT_MODEL else resolved

    def fetch(self, resolved: ResolvedVersion) -> Path:
        return self.llama if resolved.registered_model_name == CHAT_MODEL else super().fetch(resolved)


def split_loader() -> Callable[[Path, ResolvedVersion, LoadOptions], Classifier | GenerativeModel]:
    """The service's own loader for the chat model, the fake classifier for the rest (no BERT to build)."""
    real, fake = TaskRuntimeLoader(trace=False), FakeLoader()

    def load(directory: Path, resolved: ResolvedVersion, options: LoadOptions) -> Classifier | GenerativeModel:
        return real(directory, resolved, options) if resolved.task == CHAT else fake(directory, resolved, options)

    return load


@dataclass
class Served:
    app: ServingApp
    keys: InMemoryKeyVerifier
    # A key of ORG with serving:predict.
    key: str
    spans: InMemorySpanExporter

    @property
    def port(self) -> int:
        assert self.app.openai is not None
        return self.app.openai.port

    def client(self, api_key: str | None = None, **options: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key=api_key or self.key, max_retries=0, **options
        )

    def generator(self) -> GenerativeModel:
        (version,) = self.app.service.manager.loaded_versions(ORG, CHAT_MODEL)
        assert version.generator is not None
        return version.generator

    def closed_early(self) -> int:
        """Replies of the chat deployment that ended without finishing (closed: the client went away)."""
        (version,) = self.app.service.manager.loaded_versions(ORG, CHAT_MODEL)
        return version.stats.rejected_count


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Random weights of a larger scale: greedy replies differ with the prompt and run to max_tokens.
    return make_tiny_llama(tmp_path_factory.mktemp("llama"), TEXTS * 4, initializer_range=0.2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> AsyncIterator[Served]:
    source = ChatSource(llama=llama_dir)
    source.add(CHAT_MODEL, 1)
    source.add(CLASSIFIER, 1)
    keys = InMemoryKeyVerifier()
    security = api_key_security(keys, METHOD_SCOPES, public=PUBLIC_METHODS, license_=ENTERPRISE)
    # gRPC on a free port: the HTTP API then takes a free port too.
    settings = ServingSettings(data_dir=tmp_path_factory.mktemp("serving"), grpc_port=0, shutdown_grace_s=1.0)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    app = build_app(
        settings,
        Infrastructure(kafka=KafkaSettings(bootstrap_servers=""), tracer_provider=provider),
        security,
        source=source,
        loader=split_loader(),
        rng=random.Random(3),
    )
    await app.host.start()
    try:
        for name in (CHAT_MODEL, CLASSIFIER):
            spec = DeploymentSpec(ORG, name, name, target=VersionSelector(version=1))
            await app.service.create(spec, wait_until_ready=True, timeout_s=120)
        yield Served(app, keys, keys.issue(ORG, {SERVING_PREDICT}), spans)
    finally:
        await app.host.stop()


def _raw_post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


# --------------------------------------------------------------------------- tracing


@on_module_loop
async def test_a_request_continues_the_callers_trace_into_its_feedback_event(served: Served) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    async with served.client(default_headers={"traceparent": traceparent}) as client:
        completion = await client.chat.completions.create(
            model=CHAT_MODEL, messages=QUESTION, max_tokens=4, temperature=0, stream=False
        )
    headers = {"Authorization": f"Bearer {served.key}", "Content-Type": "application/json", "traceparent": traceparent}
    body = json.dumps({"id": completion.id, "kind": "thumbs_up"}).encode()
    status, answer = await asyncio.to_thread(_raw_post, served.port, "/v1/feedback", body, headers)
    assert status == 200, answer
    spans = {s.name: s for s in served.spans.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id}
    chat = spans["POST /v1/chat/completions"]
    assert chat.parent is not None and format(chat.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert chat.attributes is not None and chat.attributes["http.response.status_code"] == 200
    assert "POST /v1/feedback" in spans
    request_id = completion.id.removeprefix("chatcmpl-")
    with served.app.host.platform.database.transaction() as session:
        rows = session.execute(select(OutboxEvent).where(OutboxEvent.topic == FEEDBACK_RECORDED)).scalars()
        events = [row.to_event() for row in rows]
    (event,) = [e for e in events if request_id.encode() in e.payload]
    assert dict(event.trace_headers)["traceparent"].decode().split("-")[1] == trace_id


@on_module_loop
async def test_reply_outcomes_are_flushed_as_events_for_the_online_gate(served: Served) -> None:
    await asyncio.to_thread(served.app.service.flush_outcomes)  # what earlier tests left
    async with served.client() as client:
        for _ in range(2):
            await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=3, temperature=0)
    await asyncio.to_thread(served.app.service.flush_outcomes)
    catalog = served.app.host.platform.catalog
    with served.app.host.platform.database.transaction() as session:
        rows = session.execute(select(OutboxEvent).where(OutboxEvent.topic == GENERATION_OUTCOMES)).scalars()
        events = [catalog.decode(row.to_event(), events_pb2.GenerationOutcomes) for row in rows]
    last = events[-1]
    assert (last.registered_model_name, last.model_version, last.deployment_name) == (CHAT_MODEL, 1, CHAT_MODEL)
    assert (last.succeeded, last.failed) == (2, 0)


# --------------------------------------------------------------------------- replies


@on_module_loop
async def test_chat_completion_has_usage_and_names_the_model_version(served: Served) -> None:
    async with served.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=QUESTION, max_tokens=12, temperature=0
        )
    completion = raw.parse()
    assert raw.headers["x-gristmill-model-version"] == f"{CHAT_MODEL}/1"
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == CHAT_MODEL
    (choice,) = completion.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 12 and completion.usage.prompt_tokens > len(TEXTS[0].split())
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


@on_module_loop
async def test_feedback_on_a_completion_is_recorded_and_bad_feedback_is_400(served: Served) -> None:
    async with served.client() as client:
        completion = await client.chat.completions.create(
            model=CHAT_MODEL, messages=QUESTION, max_tokens=6, temperature=0
        )
    headers = {"Authorization": f"Bearer {served.key}", "Content-Type": "application/json"}
    body = {"id": completion.id, "kind": "edit", "edited_reply": "A better reply."}
    status, answer = await asyncio.to_thread(_raw_post, served.port, "/v1/feedback", json.dumps(body).encode(), headers)
    assert status == 200, answer
    assert answer["request_id"] == completion.id.removeprefix("chatcmpl-")
    assert answer["model"] == CHAT_MODEL and answer["model_version"] == f"{CHAT_MODEL}/1"
    for bad, expected in (
        ({"id": completion.id, "kind": "rating", "rating": 9}, 400),
        ({"id": completion.id, "kind": "applause"}, 400),
        ({"request_id": "never-answered", "kind": "thumbs_up"}, 404),
    ):
        status, answer = await asyncio.to_thread(
            _raw_post, served.port, "/v1/feedback", json.dumps(bad).encode(), headers
        )
        assert status == expected, answer
        assert answer["error"]["message"]
    status, _ = await asyncio.to_thread(
        _raw_post, served.port, "/v1/feedback", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    assert status == 401


@on_module_loop
async def test_json_schema_response_format_always_parses(served: Served) -> None:
    schema = {
        "type": "object",
        "properties": {"sentiment": {"enum": ["positive", "negative"]}, "ok": {"type": "boolean"}},
        "required": ["sentiment", "ok"],
        "additionalProperties": False,
    }
    async with served.client() as client:
        completion = await client.chat.completions.create(
            model=CHAT_MODEL,
            messages=QUESTION,
            max_tokens=96,
            seed=3,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "review", "schema": schema, "strict": True},
            },
        )
        value = json.loads(completion.choices[0].message.content or "")
        assert set(value) == {"sentiment", "ok"} and completion.choices[0].finish_reason == "stop"
        with pytest.raises(openai.BadRequestError, match="json_schema"):
            await client.chat.completions.create(
                model=CHAT_MODEL,
                messages=QUESTION,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
            )


@on_module_loop
async def test_the_cli_streams_a_reply_over_grpc(served: Served) -> None:
    from typer.testing import CliRunner

    from gristmill.cli.main import app as cli

    base = ["--serving", f"127.0.0.1:{served.app.host.server.port}", "--api-key", served.key, "generate", CHAT_MODEL]
    runner = CliRunner()
    result = await asyncio.to_thread(
        runner.invoke, cli, [*base, TEXTS[0], "--temperature", "0", "--max-tokens", "5", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["finish_reason"] in ("stop", "length") and 0 < reply["completion_tokens"] <= 5
    assert reply["model_version"] == f"{CHAT_MODEL}/1"
    streamed = await asyncio.to_thread(runner.invoke, cli, [*base, TEXTS[0], "--temperature", "0", "--max-tokens", "5"])
    assert streamed.exit_code == 0 and streamed.stdout.strip() == reply["text"].strip()
    assert "completion tokens" in streamed.stderr
    bad = await asyncio.to_thread(runner.invoke, cli, [*base, TEXTS[0], "--top-p", "0"])
    assert bad.exit_code == 1 and bad.stderr.strip().startswith("gristmill: invalid argument") and "top_p" in bad.stderr


@on_module_loop
async def test_streamed_chat_is_the_same_reply_with_a_usage_event(served: Served) -> None:
    async with served.client() as client:
        whole = await client.chat.completions.create(
            model=CHAT_MODEL, messages=QUESTION, max_completion_tokens=20, temperature=0
        )
        stream = await client.chat.completions.create(
            model=CHAT_MODEL,
            messages=QUESTION,
            max_completion_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        plain = await client.chat.completions.create(
            model=CHAT_MODEL, messages=QUESTION, max_tokens=3, temperature=0, stream=True
        )
        plain_chunks = [chunk async for chunk in plain]
    *replies, last = chunks
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == CHAT_MODEL for chunk in chunks)
    assert replies[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in replies) == whole.choices[0].message.content
    assert [chunk.choices[0].finish_reason for chunk in replies if chunk.choices[0].finish_reason] == ["length"]
    assert replies[-1].choices[0].finish_reason == "length"
    assert all(chunk.usage is None for chunk in replies)
    assert last.choices == [] and last.usage == whole.usage
    # Without include_usage no usage event comes.
    assert plain_chunks[-1].choices[0].finish_reason == "length"
    assert all(chunk.usage is None and chunk.choices for chunk in plain_chunks)


@on_module_loop
async def test_completions_whole_streamed_and_cut_at_a_stop_sequence(served: Served) -> None:
    async with served.client() as client:
        whole = await client.completions.create(model=CHAT_MODEL, prompt=TEXTS[2], max_tokens=24, temperature=0)
        stream = await client.completions.create(
            model=CHAT_MODEL,
            prompt=[TEXTS[2]],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = whole.choices[0].text
        stop = text[4:7]
        cut = await client.completions.create(
            model=CHAT_MODEL, prompt=TEXTS[2], max_tokens=24, temperature=0, stop=stop
        )
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 24
    *replies, last = chunks
    assert "".join(chunk.choices[0].text for chunk in replies) == text
    assert replies[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage == whole.usage
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]


@on_module_loop
async def test_unknown_fields_are_ignored(served: Served) -> None:
    async with served.client() as client:
        completion = await client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "developer", "content": "answer briefly"}, *QUESTION],
            max_tokens=2,
            temperature=0,
            user="someone",
            seed=5,
            top_p=0.9,
            extra_body={"logit_bias": {"1": 2}, "gristmill_unknown": True},
        )
    assert completion.choices[0].finish_reason == "length"


@on_module_loop
async def test_models_lists_the_text_generating_deployments(served: Served) -> None:
    async with served.client() as client:
        models = [model async for model in client.models.list()]
        one = await client.models.retrieve(CHAT_MODEL)
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("no-such-deployment")
    assert [model.id for model in models] == [CHAT_MODEL]
    assert one.id == CHAT_MODEL and one.object == "model" and one.owned_by == ORG and one.created > 0


# --------------------------------------------------------------------------- errors


BAD_CHATS: list[tuple[str, dict[str, Any], str]] = [
    ("temperature", {"temperature": -1}, "temperature must be between 0"),
    ("top_p", {"top_p": 0}, "top_p must be in (0, 1]"),
    ("max_tokens", {"max_tokens": 0}, "max_tokens must be between 1"),
    ("n", {"n": 2}, "n must be 1"),
    ("no messages", {"messages": []}, "exactly one of messages"),
    ("messages and prompt", {"extra_body": {"prompt": "hello"}}, "exactly one of messages and prompt"),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    ("too many stops", {"stop": [str(i) for i in range(9)]}, "at most 8 are allowed"),
    ("classifier", {"model": CLASSIFIER}, "serves a classifier"),
]


@on_module_loop
@pytest.mark.parametrize(("fields", "message"), [case[1:] for case in BAD_CHATS], ids=[case[0] for case in BAD_CHATS])
async def test_bad_chat_requests_are_400_with_an_openai_error_body(
    served: Served, fields: dict[str, Any], message: str
) -> None:
    request: dict[str, Any] = {"model": CHAT_MODEL, "messages": QUESTION, "max_tokens": 4} | fields
    async with served.client() as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(**request)
    error = refused.value
    assert error.status_code == 400 and message in error.message
    assert isinstance(error.body, dict) and set(error.body) == {"message", "type", "param", "code"}
    assert error.type == "invalid_request_error" and error.code == "invalid_argument"
    if "n" in fields:
        assert error.param == "n"


@on_module_loop
async def test_bad_completion_requests_are_400(served: Served) -> None:
    async with served.client() as client:
        with pytest.raises(openai.BadRequestError, match="exactly one of messages"):
            await client.completions.create(model=CHAT_MODEL, prompt="", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="one prompt per request"):
            await client.completions.create(model=CHAT_MODEL, prompt=["one", "two"], max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="exactly one of messages and prompt"):
            await client.completions.create(model=CHAT_MODEL, prompt="hi", max_tokens=2, extra_body={"messages": []})


@on_module_loop
async def test_unknown_deployment_is_404(served: Served) -> None:
    async with served.client() as client:
        with pytest.raises(openai.NotFoundError) as refused:
            await client.chat.completions.create(model="no-such-deployment", messages=QUESTION)
    assert refused.value.code == "not_found" and "no-such-deployment" in refused.value.message


@on_module_loop
@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        (b'{"model": "assistant", "messages": [', "not valid JSON", None),
        (b"", "not valid JSON", None),
        (b'["a list"]', "invalid request body", None),
        (b'{"model": "assistant"}', "messages: Field required", "messages"),
        (b'{"model": "assistant", "messages": [], "temperature": "warm"}', "temperature", "temperature"),
        (b'{"model": "assistant", "messages": "hello"}', "messages", "messages"),
        (b'{"model": "assistant", "messages": [], "seed": 18446744073709551616}', "seed", "seed"),
    ],
)
async def test_malformed_bodies_are_400_never_422_or_500(
    served: Served, body: bytes, message: str, param: str | None
) -> None:
    headers = {"authorization": f"Bearer {served.key}", "content-type": "application/json"}
    status, answer = await asyncio.to_thread(_raw_post, served.port, "/v1/chat/completions", body, headers)
    assert status == 400
    assert answer["error"]["type"] == "invalid_request_error" and message in answer["error"]["message"]
    assert answer["error"]["param"] == param


@on_module_loop
async def test_unknown_route_has_an_openai_error_body(served: Served) -> None:
    headers = {"authorization": f"Bearer {served.key}"}
    status, answer = await asyncio.to_thread(_raw_post, served.port, "/v1/embeddings", b"{}", headers)
    assert status == 404 and "/v1/embeddings" in answer["error"]["message"]


def test_resource_exhausted_is_429_with_retry_after() -> None:
    response = error_response(ResourceExhaustedError("queue full", details={"retry-after-ms": "1500"}))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2" and response.headers["retry-after-ms"] == "1500"
    assert json.loads(response.body)["error"]["type"] == "rate_limit_error"
    assert error_response(ResourceExhaustedError("quota", retry_after_s=30)).headers["retry-after"] == "30"
    assert error_response(UnavailableError("loading")).status_code == 503


def test_parse_request_names_the_field() -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        parse_request(ChatCompletionRequest, b'{"model": "m", "messages": [], "max_tokens": "many"}')
    assert refused.value.details == {"param": "max_tokens"}


# --------------------------------------------------------------------------- API keys


@on_module_loop
async def test_a_missing_or_wrong_key_is_401_and_a_key_without_the_scope_403(served: Served) -> None:
    unknown = InMemoryKeyVerifier().issue(ORG, {SERVING_PREDICT})  # well formed, but not this service's
    reader = served.keys.issue(ORG, {REGISTRY_READ})
    for key in ("not-a-gristmill-key", unknown):
        async with served.client(key) as client:
            with pytest.raises(openai.AuthenticationError) as refused:
                await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION)
            assert refused.value.type == "authentication_error" and refused.value.code == "unauthenticated"
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
    headers = {"content-type": "application/json"}
    status, answer = await asyncio.to_thread(_raw_post, served.port, "/v1/chat/completions", b"{}", headers)
    assert status == 401 and "missing API key" in answer["error"]["message"]
    async with served.client(reader) as client:
        with pytest.raises(openai.PermissionDeniedError, match="serving:predict"):
            await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION)


@on_module_loop
async def test_another_organisations_deployment_is_not_found(served: Served) -> None:
    async with served.client(served.keys.issue("globex", {SERVING_PREDICT})) as client:
        assert [model async for model in client.models.list()] == []
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=2)


@on_module_loop
async def test_with_auth_disabled_any_caller_acts_for_the_default_organisation(served: Served) -> None:
    server = OpenAIServer(
        openai_app(served.app.service, embedded_security("serving", ENTERPRISE)), host="127.0.0.1", port=0
    )
    await server.open()
    try:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="anything", max_retries=0) as client:
            completion = await client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=2)
        assert completion.usage is not None and completion.usage.completion_tokens == 2
    finally:
        await server.close()
        await server.close()


# --------------------------------------------------------------------------- clients that leave


@on_module_loop
async def test_a_client_leaving_mid_stream_frees_the_sequence(served: Served) -> None:
    generator = served.generator()
    assert isinstance(generator, TransformersGenerator)
    before = served.closed_early()
    async with served.client() as client:
        # Each decoding step waits 50 ms, so the reply's 480 tokens take 24 s and it is still running when the client
        # leaves (unpaused, a tiny model decodes them in a fraction of a second). The first text may take a few steps.
        with decoding_paused(generator, step_s=0.05):
            stream = await client.completions.create(model=CHAT_MODEL, prompt=TEXTS[1], max_tokens=480, stream=True)
            async for _ in stream:
                break
            assert generator.stats().running == 1
            await stream.close()
    await wait_for(lambda: generator.stats().running == 0 and served.closed_early() == before + 1)
    assert generator.stats().reserved_tokens == 0


@on_module_loop
async def test_a_client_giving_up_on_a_whole_reply_frees_the_sequence(served: Served) -> None:
    generator = served.generator()
    assert isinstance(generator, TransformersGenerator)
    before = served.closed_early()
    async with served.client(timeout=0.1) as client:
        started = time.monotonic()
        # The model's thread waits at its next step while the test holds the lock, so the reply cannot finish before
        # the client gives up (the tiny model samples 480 tokens in less than the client's 0.1 s).
        with generator._batcher.model_lock, pytest.raises(openai.APITimeoutError):
            await client.completions.create(model=CHAT_MODEL, prompt=TEXTS[3], max_tokens=480)
    assert time.monotonic() - started < 5
    await wait_for(lambda: generator.stats().running == 0 and served.closed_early() == before + 1)


# --------------------------------------------------------------------------- settings


def test_the_http_port_follows_the_grpc_port() -> None:
    assert ServingSettings().resolved_openai_port() == SERVING_OPENAI_PORT == SERVING_PORT + 2
    assert ServingSettings(grpc_port=50154).resolved_openai_port() == 50156  # serving replica 1
    assert ServingSettings(grpc_port=0).resolved_openai_port() == 0
    assert ServingSettings(openai_port=8000).resolved_openai_port() == 8000
    assert ServingSettings(openai_port=-1).resolved_openai_port() is None
    with pytest.raises(ValueError, match="beyond 65535"):
        ServingSettings(grpc_port=65535)
