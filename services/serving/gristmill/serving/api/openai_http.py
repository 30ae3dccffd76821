"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``
and ``GET /v1/models/{model}``, so that OpenAI's clients and SDKs talk to a deployment unchanged (``model`` is
the deployment's name).

Thin like the gRPC servicers: parse the body, convert, ``DeploymentService.generate``, convert back. The domain
validates, so both protocols refuse the same inputs with the same messages; an error leaves as OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` with the HTTP status of its gRPC code. API keys
(``Authorization: Bearer <key>``) are checked by the service's own auth hook, the one its gRPC interceptor runs,
with each route named in the scope table like an RPC (``OPENAI_SCOPES``, part of the service's
``METHOD_SCOPES``).

``OpenAIServer`` is the host component that serves the app (``gristmill.core.httpserver``) on the service's event
loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from gristmill.core.auth import SERVING_PREDICT, Principal
from gristmill.core.chat import SYSTEM, ChatMessage, FeedbackKind, message_from_json
from gristmill.core.errors import GristmillError, InvalidArgumentError, UnauthenticatedError
from gristmill.core.grpcserver import NOT_INLINE, InlineAuthHook
from gristmill.core.httpserver import HttpServer, http_status
from gristmill.core.ids import validate_id
from gristmill.core.paging import MAX_PAGE_SIZE
from gristmill.core.security import Security
from gristmill.core.tls import TlsSettings
from gristmill.serving.domain.feedback import FeedbackInput
from gristmill.serving.domain.generation import (
    DEFAULT_SAMPLING,
    FormatKind,
    Generation,
    GenerationChunk,
    ResponseFormat,
    SamplingParams,
    Usage,
)
from gristmill.serving.domain.service import DeploymentService
from gristmill.serving.domain.versions import DeploymentView

log = logging.getLogger(__name__)

# The routes as the auth hook sees them: like RPCs of one service, so that the service's scope table covers them
# (and a refusal names the operation, as OpenAI's API reference does).
OPENAI_SERVICE = "/openai.v1.OpenAI"
CREATE_CHAT_COMPLETION = f"{OPENAI_SERVICE}/CreateChatCompletion"
CREATE_COMPLETION = f"{OPENAI_SERVICE}/CreateCompletion"
LIST_MODELS = f"{OPENAI_SERVICE}/ListModels"
RETRIEVE_MODEL = f"{OPENAI_SERVICE}/RetrieveModel"
RECORD_FEEDBACK = f"{OPENAI_SERVICE}/RecordFeedback"
OPENAI_SCOPES: Mapping[str, str] = {f"{OPENAI_SERVICE}/*": SERVING_PREDICT}

MODEL_VERSION_HEADER = "x-gristmill-model-version"
# OpenAI's name for the system turn in its newer models' requests.
_DEVELOPER = "developer"

_ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


# --------------------------------------------------------------------------- errors


def error_status(error: GristmillError) -> int:
    return http_status(error)


def error_body(message: str, status: int, *, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def retry_after_ms(error: GristmillError) -> int | None:
    """How long to wait before retrying, from the error's details (``retry-after-ms``, or ``retry-after`` in
    seconds); None when they say nothing."""
    for key, scale in (("retry-after-ms", 1), ("retry-after", 1000)):
        raw = error.details.get(key)
        if raw is None:
            continue
        try:
            return max(1, math.ceil(float(raw) * scale))
        except (ValueError, OverflowError):
            continue
    return None


def error_response(error: GristmillError) -> JSONResponse:
    status = error_status(error)
    headers = {}
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    wait_ms = retry_after_ms(error)
    if status == 429 and wait_ms is not None:
        # OpenAI's clients honour both, the precise one first; HTTP's own is in whole seconds.
        headers |= {"retry-after": str(math.ceil(wait_ms / 1000)), "retry-after-ms": str(wait_ms)}
    param = error.details.get("param") if isinstance(error, InvalidArgumentError) else None
    body = error_body(error.message, status, code=error.grpc_code.name.lower(), param=param)
    return JSONResponse(body, status_code=status, headers=headers)


def invalid(message: str, *, param: str | None) -> InvalidArgumentError:
    """An INVALID_ARGUMENT naming the request field at fault (OpenAI's ``param``)."""
    return InvalidArgumentError(message, details={"param": param} if param else None)


# --------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # One more event before ``[DONE]``, with the usage and no choices.
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = ""
    # OpenAI's field name is "schema", which pydantic's BaseModel reserves.
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def domain(self) -> ResponseFormat | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ResponseFormat(FormatKind.JSON_OBJECT)
        if self.json_schema is None:
            raise invalid(
                "response_format.json_schema is required when its type is json_schema", param="response_format"
            )
        return ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(self.json_schema.schema_))


class _GenerationRequest(BaseModel):
    # Fields this API does not know (logit_bias, tools, ...) are ignored, as OpenAI's own API ignores unknown ones.
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    # Not OpenAI's (vLLM's, and the gRPC API's): 0 means no top-k filtering.
    top_k: int | None = None
    # vLLM's: no end-of-sequence before this many tokens.
    min_tokens: int | None = None
    # An int64, as over gRPC (the sampler's generator takes no more).
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormatBody | None = None

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=DEFAULT_SAMPLING.temperature if self.temperature is None else self.temperature,
            top_p=DEFAULT_SAMPLING.top_p if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            min_tokens=self.min_tokens or 0,
        )

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def check_transport(self) -> None:
        """What the domain cannot check: the fields that only this protocol has."""
        if not self.model:
            raise invalid("model is required: the name of the deployment to generate with", param="model")
        if self.n is not None and self.n != 1:
            raise invalid(f"n must be 1 (one reply per request), got {self.n}", param="n")


class ChatCompletionRequest(_GenerationRequest):
    messages: list[Any]
    # OpenAI's newer name for max_tokens; it wins when both are sent.
    max_completion_tokens: int | None = None
    # Completions' field: refused here rather than ignored, since a caller sending it meant a raw prompt.
    prompt: Any = None

    def check_transport(self) -> None:
        super().check_transport()
        if self.prompt is not None:
            raise invalid(
                "send exactly one of messages and prompt: messages to /v1/chat/completions, a prompt to "
                "/v1/completions",
                param="prompt",
            )

    def chat_messages(self) -> list[ChatMessage]:
        out = []
        for index, message in enumerate(self.messages):
            if isinstance(message, dict) and message.get("role") == _DEVELOPER:
                message = {**message, "role": SYSTEM}
            out.append(message_from_json(message, f"messages[{index}]"))
        return out


class CompletionRequest(_GenerationRequest):
    # One prompt; OpenAI's list form is accepted with one element.
    prompt: str | list[str]
    # Chat's field: refused here rather than ignored (see ChatCompletionRequest.prompt).
    messages: Any = None

    def check_transport(self) -> None:
        super().check_transport()
        if self.messages is not None:
            raise invalid(
                "send exactly one of messages and prompt: a prompt to /v1/completions, messages to "
                "/v1/chat/completions",
                param="messages",
            )
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise invalid(f"prompt: send one prompt per request, got a list of {len(self.prompt)}", param="prompt")

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


R = TypeVar("R", bound=BaseModel)


class FeedbackBody(BaseModel):
    """``POST /v1/feedback`` (Gristmill's, beside OpenAI's routes): what a user said about a reply, named by the
    completion's ``id`` (``chatcmpl-…``/``cmpl-…``) or its bare ``request_id``."""

    model_config = ConfigDict(extra="ignore")

    id: str = ""
    request_id: str = ""
    kind: Literal["thumbs_up", "thumbs_down", "rating", "regenerate", "edit", "text"]
    rating: int = 0
    edited_reply: str = ""
    kept_reply: str = ""
    discarded_reply: str = ""
    text: str = ""

    def feedback(self) -> FeedbackInput:
        request_id = self.request_id or self.id.removeprefix("chatcmpl-").removeprefix("cmpl-")
        return FeedbackInput(
            request_id=request_id,
            kind=FeedbackKind(self.kind),
            rating=self.rating,
            edited_reply=self.edited_reply,
            kept_reply=self.kept_reply,
            discarded_reply=self.discarded_reply,
            text=self.text,
        )


def parse_request(model: type[R], body: bytes) -> R:
    """``body`` as ``model``; INVALID_ARGUMENT (never a 422 or a 500) when it is not JSON or not that shape."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"])
        if first["type"] == "json_invalid":
            raise InvalidArgumentError(f"the request body is not valid JSON: {first['msg']}") from None
        where = f"{param}: " if param else ""
        raise invalid(f"invalid request body: {where}{first['msg']}", param=param or None) from None


def _max_new_tokens(request: _GenerationRequest) -> int | None:
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return request.max_completion_tokens
    return request.max_tokens


# --------------------------------------------------------------------------- replies


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


@dataclass(frozen=True)
class _Reply:
    """What every object of one reply repeats, and its shapes for chat (``chat``) or text completions."""

    chat: bool
    id: str
    created: int
    model: str
    fingerprint: str

    @classmethod
    def of(cls, generation: Generation, model: str, *, chat: bool) -> _Reply:
        prefix = "chatcmpl" if chat else "cmpl"
        fingerprint = f"{generation.registered_model_name}/{generation.version}"
        return cls(chat, f"{prefix}-{generation.request_id}", int(time.time()), model, fingerprint)

    def _head(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def whole(self, text: str, finish: str, usage: Usage) -> dict[str, Any]:
        """The non-streaming answer."""
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": finish}
        kind = "chat.completion" if self.chat else "text_completion"
        return self._head(kind) | {"choices": [choice], "usage": _usage(usage)}

    def chunk(self, text: str | None, finish: str | None, *, role: bool = False) -> dict[str, Any]:
        """One streamed event with one choice; ``text`` None (chat) is the empty delta of the finishing event."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice |= {"logprobs": None, "finish_reason": finish}
        return self._head("chat.completion.chunk" if self.chat else "text_completion") | {"choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._head(kind) | {"choices": [], "usage": _usage(usage)}

    def headers(self, generation: Generation) -> dict[str, str]:
        return {MODEL_VERSION_HEADER: self.fingerprint, "x-request-id": generation.request_id}


def _final_usage(generation: Generation, last: GenerationChunk, completion_tokens: int) -> Usage:
    return last.usage or Usage(generation.prompt_tokens, completion_tokens)


async def _sse(reply: _Reply, generation: Generation, *, include_usage: bool) -> AsyncIterator[str]:
    """The reply as server-sent events, in OpenAI's order: (chat) the role, the text, the finish reason, the
    usage when asked for, ``[DONE]``. A failure once streaming started is an ``error`` event (OpenAI's clients
    raise it); the status line has gone already."""

    def event(value: Mapping[str, Any]) -> str:
        if include_usage and "usage" not in value and "error" not in value:
            value = {**value, "usage": None}
        return f"data: {_json(value)}\n\n"

    if reply.chat:
        yield event(reply.chunk("", None, role=True))
    tokens = 0
    try:
        async for chunk in generation:
            tokens += len(chunk.token_ids)
            if chunk.finish_reason is None:
                if chunk.text:
                    yield event(reply.chunk(chunk.text, None))
                continue
            finish = chunk.finish_reason.value
            if reply.chat:
                if chunk.text:
                    yield event(reply.chunk(chunk.text, None))
                yield event(reply.chunk(None, finish))
            else:
                yield event(reply.chunk(chunk.text, finish))
            if include_usage:
                yield event(reply.usage_chunk(_final_usage(generation, chunk, tokens)))
            break
    except GristmillError as exc:
        status = error_status(exc)
        yield event(error_body(exc.message, status, code=exc.grpc_code.name.lower()))
        return
    except Exception:
        log.exception("OpenAI HTTP: reply %s failed while streaming", reply.id)
        yield event(error_body("internal error while generating; see the service's log", 500, code="internal"))
        return
    yield "data: [DONE]\n\n"


class GenerationResponse(StreamingResponse):
    """A streamed reply that frees its sequence however the response ends: finished, failed, or the client gone
    (Starlette cancels the body on a disconnect, or its send fails; either way ``close`` runs here)."""

    def __init__(self, generation: Generation, body: AsyncIterator[str], headers: Mapping[str, str]) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


async def _client_gone(request: Request) -> None:
    """Returns when the client has disconnected (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, generation: Generation) -> tuple[str, GenerationChunk] | None:
    """The whole reply, or None when the client went away first (the sequence is freed then, not finished)."""
    collecting = asyncio.ensure_future(generation.collect())
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait((collecting, gone), return_when=asyncio.FIRST_COMPLETED)
        if collecting.done():
            return collecting.result()
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
        return None
    finally:
        collecting.cancel()
        gone.cancel()
        generation.close()


# --------------------------------------------------------------------------- the app


def _model_entry(view: DeploymentView) -> dict[str, Any]:
    spec = view.spec
    return {
        "id": spec.name,
        "object": "model",
        "created": int(spec.create_time.timestamp()),
        "owned_by": spec.organization_id,
    }


def _serves_text(service: DeploymentService, view: DeploymentView) -> bool:
    """Whether the deployment generates text, as far as this process knows: one still loading (or not loaded
    here yet) is listed, since its task is not known until a version is in memory."""
    try:
        versions = service.manager.loaded_versions(view.spec.organization_id, view.spec.name)
    except GristmillError:
        return True
    return not versions or any(version.generator is not None for version in versions)


class _OpenAIApi:
    """The routes' work, over one deployment service and the service's security."""

    def __init__(self, service: DeploymentService, security: Security) -> None:
        self._service = service
        self._security = security

    async def authenticate(self, request: Request, method: str) -> Principal:
        """The caller, as the gRPC interceptor decides it: the hook on the event loop when it can answer from
        its cache, else on a worker thread (it may ask the admin service)."""
        hook = self._security.auth_hook
        if hook is None:
            raise UnauthenticatedError("this service checks no API keys on its HTTP API")
        metadata = tuple(request.headers.items())
        identity = hook.inline(method, metadata) if isinstance(hook, InlineAuthHook) else NOT_INLINE
        if identity is NOT_INLINE:
            identity = await asyncio.to_thread(hook, method, metadata)
        if not isinstance(identity, Principal):
            raise UnauthenticatedError("this call carries no authenticated caller: send 'Authorization: Bearer <key>'")
        return identity

    async def generate(self, request: Request, method: str, shape: type[_GenerationRequest]) -> Response:
        # The key first, as for an RPC: a caller without one learns nothing about what its request lacks.
        caller = await self.authenticate(request, method)
        parsed = parse_request(shape, await request.body())
        parsed.check_transport()
        chat = isinstance(parsed, ChatCompletionRequest)
        generation = await self._service.generate(
            caller.organization_id,
            parsed.model,
            messages=parsed.chat_messages() if isinstance(parsed, ChatCompletionRequest) else (),
            prompt=parsed.prompt_text() if isinstance(parsed, CompletionRequest) else "",
            max_new_tokens=_max_new_tokens(parsed),
            sampling=parsed.sampling(),
            stop=parsed.stops(),
            caller=caller,
            response_format=parsed.response_format.domain() if parsed.response_format is not None else None,
        )
        reply = _Reply.of(generation, parsed.model, chat=chat)
        if parsed.stream:
            include_usage = parsed.stream_options is not None and parsed.stream_options.include_usage
            body = _sse(reply, generation, include_usage=include_usage)
            return GenerationResponse(generation, body, reply.headers(generation))
        collected = await _collect(request, generation)
        if collected is None:
            # Nobody is left to read it; 499 is what proxies log for that.
            return Response(status_code=499)
        text, last = collected
        assert last.finish_reason is not None
        usage = _final_usage(generation, last, 0)
        return JSONResponse(reply.whole(text, last.finish_reason.value, usage), headers=reply.headers(generation))

    async def list_models(self, request: Request) -> dict[str, Any]:
        caller = await self.authenticate(request, LIST_MODELS)
        data: list[dict[str, Any]] = []
        after = ""
        while True:
            page = await self._service.list(caller.organization_id, page_size=MAX_PAGE_SIZE, after=after)
            data += [_model_entry(view) for view in page.deployments if _serves_text(self._service, view)]
            if not page.next_after:
                return {"object": "list", "data": data}
            after = page.next_after

    async def record_feedback(self, request: Request) -> dict[str, Any]:
        caller = await self.authenticate(request, RECORD_FEEDBACK)
        body = parse_request(FeedbackBody, await request.body())
        record = await self._service.record_feedback(caller.organization_id, body.feedback())
        return {
            "object": "feedback",
            "request_id": record.request_id,
            "model": record.deployment,
            "model_version": f"{record.registered_model_name}/{record.version}",
        }

    async def retrieve_model(self, request: Request, model: str) -> dict[str, Any]:
        caller = await self.authenticate(request, RETRIEVE_MODEL)
        validate_id(model, what="model")
        return _model_entry(await self._service.get(caller.organization_id, model))


class _Tracing:
    """One SERVER span per HTTP request, continuing the caller's W3C ``traceparent`` (as the gRPC server's
    interceptor does), so that a generation, its feedback and the events they publish share the caller's trace.
    Pure ASGI rather than a ``BaseHTTPMiddleware``: the span covers a streamed body to its end, and the route
    runs in the span's context."""

    def __init__(self, app: Any, provider: TracerProvider) -> None:
        self.app = app
        self.tracer = provider.get_tracer("gristmill.serving.openai_http")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope.get("headers", ())}
        path: str = scope.get("path", "")
        # Span names stay few: the model named in a path is an attribute, not a new name.
        route = "/v1/models/{model}" if path.startswith("/v1/models/") else path
        method: str = scope.get("method", "")
        status: dict[str, int] = {}

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        with self.tracer.start_as_current_span(
            f"{method} {route}",
            context=propagate.extract(headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route, "url.path": path},
        ) as span:
            await self.app(scope, receive, send_status)
            code = status.get("code", 0)
            span.set_attribute("http.response.status_code", code)
            if code >= 500:
                span.set_status(StatusCode.ERROR)


def openai_app(service: DeploymentService, security: Security, *, tracer_provider: TracerProvider | None = None) -> Any:
    """The OpenAI-compatible HTTP API over ``service``, checking API keys with ``security``'s auth hook; with
    ``tracer_provider``, each request is a span in the caller's trace."""
    app = _routes(service, security)
    return app if tracer_provider is None else _Tracing(app, tracer_provider)


def _routes(service: DeploymentService, security: Security) -> FastAPI:
    api = _OpenAIApi(service, security)
    # No interactive docs: they would be routes open without a key, and OpenAI's own reference documents these.
    app = FastAPI(title="Gristmill serving (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await api.generate(request, CREATE_CHAT_COMPLETION, ChatCompletionRequest)

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        return await api.generate(request, CREATE_COMPLETION, CompletionRequest)

    @app.post("/v1/feedback")
    async def record_feedback(request: Request) -> dict[str, Any]:
        return await api.record_feedback(request)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        return await api.list_models(request)

    @app.get("/v1/models/{model}")
    async def retrieve_model(request: Request, model: str) -> dict[str, Any]:
        return await api.retrieve_model(request, model)

    @app.exception_handler(GristmillError)
    async def gristmill_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GristmillError)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(part) for part in first["loc"] if part not in ("body", "path", "query"))
        return error_response(invalid(f"invalid request: {first['msg']}", param=param or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        body = error_body(message, exc.status_code, code=None)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("OpenAI HTTP: %s %s failed", request.method, request.url.path, exc_info=exc)
        body = error_body("internal error; see the service's log", 500, code="internal")
        return JSONResponse(body, status_code=500)

    return app


# --------------------------------------------------------------------------- the host component


class OpenAIServer(HttpServer):
    """Serving's OpenAI-compatible HTTP API as a host component (``HttpServer``)."""

    def __init__(
        self, app: Any, *, host: str, port: int, grace_s: float = 10.0, tls: TlsSettings | None = None
    ) -> None:
        super().__init__(
            app, name="openai-http", what="the OpenAI HTTP API", host=host, port=port, grace_s=grace_s, tls=tls
        )

    @property
    def base_url(self) -> str:
        """What OpenAI's clients take as ``base_url``."""
        return f"{self.url}/v1"
