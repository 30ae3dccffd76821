"""Text generation, as the domain sees it: what a caller asks for (``GenerationRequest``), what comes back
(``GenerationChunk`` after ``GenerationChunk``, the last with a finish reason and the usage), and what a loaded
generative model offers (``GenerativeModel``). The continuous-batching runtime (``runtime/generation.py``)
implements the model side; the gRPC and HTTP layers only convert.

Validation lives here, so that every protocol refuses the same inputs with the same messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from gristmill.core.chat import ChatMessage
from gristmill.core.errors import InvalidArgumentError

# Per request; a longer reply is a job for several calls. Also bounds what a caller can reserve in the cache.
MAX_NEW_TOKENS_LIMIT = 4096
DEFAULT_MAX_NEW_TOKENS = 256
MAX_STOP_SEQUENCES = 8
MAX_STOP_LENGTH = 64

DEFAULT_MAX_SEQUENCES = 32
DEFAULT_MAX_QUEUE = 256
# Prompt tokens prefilled in one step: a burst of long prompts is spread over steps so that the running
# sequences keep producing tokens in between.
DEFAULT_PREFILL_TOKENS = 2048
DEFAULT_CACHE_TOKENS = 32 * 1024
# SmolLM2 holds 46 KB of keys and values per token: 64 MiB is ~1,400 tokens.
DEFAULT_PREFIX_CACHE_MIB = 64


@dataclass(frozen=True)
class EngineLimits:
    """The continuous batcher's limits for one base model (``runtime/generation.py``); a service sets them from
    its settings (``ServingSettings.generation_limits``)."""

    # Sequences decoding together.
    max_sequences: int = DEFAULT_MAX_SEQUENCES
    # Tokens (prompt + max new tokens, reserved at admission) across running sequences: the KV cache budget.
    max_cache_tokens: int = DEFAULT_CACHE_TOKENS
    # Requests waiting for a place before submit answers RESOURCE_EXHAUSTED.
    max_queue: int = DEFAULT_MAX_QUEUE
    max_prefill_tokens: int = DEFAULT_PREFILL_TOKENS
    # Prompts prefilled together pad to the longest: a group closes when its padded size would exceed this many
    # times its real tokens (one forward pass per group).
    prefill_padding: float = 1.2
    # Bytes of keys and values of prompt prefixes kept for later prompts that start alike
    # (``runtime/prefix_cache.py``; 0: off).
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_MIB * 2**20
    # torch intra-op threads of the model's thread: one batched forward uses every core (0 keeps torch's
    # setting; a model under 10M parameters takes one, ``runtime/threads.py``). The classifiers' one-thread default
    # suits several small batches side by side, not this.
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)


class FinishReason(StrEnum):
    # An end-of-sequence token or a stop sequence.
    STOP = "stop"
    # max_new_tokens reached.
    LENGTH = "length"


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is picked. ``temperature`` 0 is greedy (deterministic); otherwise softmax sampling
    with top-k / top-p filtering, from a generator seeded by ``seed`` when given (same seed, same reply)."""

    temperature: float = 1.0
    top_p: float = 1.0
    # 0 means no top-k filtering.
    top_k: int = 0
    seed: int | None = None
    # The end-of-sequence token is not sampled before this many new tokens (vLLM's min_tokens; benchmarks
    # set it to max_tokens to generate fixed lengths). Ignored under a response format, whose grammar decides.
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


DEFAULT_SAMPLING = SamplingParams()


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, tokenized: what the runtime schedules."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    # time.monotonic() after which a request still queued is dropped (DEADLINE_EXCEEDED); None: no deadline.
    deadline: float | None = None
    # The LoRA adapter that answers, when several adapters share one base model in one batcher ("": the model).
    adapter: str = ""
    response_format: ResponseFormat | None = None


class FormatKind(StrEnum):
    # Any JSON object.
    JSON_OBJECT = "json_object"
    # A JSON value that validates against ``schema``.
    JSON_SCHEMA = "json_schema"


@dataclass(frozen=True)
class ResponseFormat:
    """Structured output: the reply is decoded so that it always parses (the sampler only offers tokens the
    grammar allows next, and the reply ends when the grammar is complete)."""

    kind: FormatKind
    # The JSON schema's text (JSON_SCHEMA only), checked to be a JSON object by ``validate_response_format``.
    schema: str = ""


def validate_response_format(response_format: ResponseFormat | None) -> ResponseFormat | None:
    """INVALID_ARGUMENT unless a JSON-schema format carries a JSON object (the runtime compiles it and refuses
    what it cannot compile, also INVALID_ARGUMENT)."""
    if response_format is None or response_format.kind is FormatKind.JSON_OBJECT:
        return response_format
    try:
        schema = json.loads(response_format.schema)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"response_format.json_schema is not valid JSON: {exc.msg}") from None
    if not isinstance(schema, dict):
        raise InvalidArgumentError("response_format.json_schema must be a JSON object (a JSON Schema)")
    return response_format


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class GenerationChunk:
    """New text of one reply. ``text`` is whole characters (never half a UTF-8 sequence, never the start of a
    stop sequence that may still complete); the last chunk has ``finish_reason`` and ``usage``."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class GenerationStream(AsyncIterator[GenerationChunk]):
    """The chunks of one reply, in order. Iterating raises the request's error (a ``GristmillError``) if it
    failed; ``cancel()`` (the client went away) frees its sequence at the next decoding step."""

    def __init__(self, request: GenerationRequest, cancel: CancelHook) -> None:
        self.request = request
        self._queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._cancel = cancel
        # Identifies this stream to the runtime: request ids come from callers and may repeat.
        self.key = next(_STREAM_KEYS)
        self._done = False

    # -- the runtime's side (any thread) --------------------------------------------------------------------

    def push(self, item: GenerationChunk | BaseException) -> None:
        # A closed loop has no reader left (the caller's process or test is shutting down): nothing to deliver.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    # -- the caller's side (the event loop) -----------------------------------------------------------------

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    def cancel(self) -> None:
        """Stop generating (no-op once finished)."""
        if not self._done:
            self._done = True
            self._cancel(self.key)


class CancelHook(Protocol):
    def __call__(self, key: int) -> None: ...


_STREAM_KEYS = itertools.count(1)


@dataclass(frozen=True)
class EngineStats:
    """What the continuous batcher holds now: sequences decoding, requests queued, cached tokens; and since it
    started, the prompt tokens it was given and those found in its prefix cache (not computed again)."""

    running: int
    queued: int
    cached_tokens: int
    reserved_tokens: int
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0


@runtime_checkable
class GenerativeModel(Protocol):
    """A loaded causal language model behind a continuous batcher. ``submit`` must run on the event loop."""

    @property
    def context_length(self) -> int:
        """Prompt plus reply tokens the model accepts."""
        ...

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt tokens of ``messages`` under the model's chat template, ending with the assistant's turn."""
        ...

    def encode_prompt(self, prompt: str) -> list[int]:
        """The tokens of a raw prompt (no template)."""
        ...

    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Queue ``request``. ``ResourceExhaustedError`` when the queue is full; ``InvalidArgumentError`` when the
        request could never fit the cache budget."""
        ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None:
        """Fail what is queued or running (UNAVAILABLE) and free the model."""
        ...


def validate_sampling(sampling: SamplingParams) -> SamplingParams:
    if not (math.isfinite(sampling.temperature) and 0.0 <= sampling.temperature <= 100.0):
        raise InvalidArgumentError(f"temperature must be between 0 (greedy) and 100, got {sampling.temperature}")
    if not (math.isfinite(sampling.top_p) and 0.0 < sampling.top_p <= 1.0):
        raise InvalidArgumentError(f"top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.top_k < 0:
        raise InvalidArgumentError(f"top_k must be 0 (no limit) or more, got {sampling.top_k}")
    if not 0 <= sampling.min_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise InvalidArgumentError(
            f"min_tokens must be between 0 and {MAX_NEW_TOKENS_LIMIT}, got {sampling.min_tokens}"
        )
    if sampling.seed is not None and not -(2**63) <= sampling.seed < 2**63:
        raise InvalidArgumentError(f"seed must be a 64-bit signed integer, got {sampling.seed}")
    return sampling


def validate_stop(stop: Sequence[str]) -> tuple[str, ...]:
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgumentError(f"{len(stop)} stop sequences; at most {MAX_STOP_SEQUENCES} are allowed")
    for index, text in enumerate(stop):
        if not text or len(text) > MAX_STOP_LENGTH:
            raise InvalidArgumentError(
                f"stop sequence {index} must have 1 to {MAX_STOP_LENGTH} characters, got {len(text)}"
            )
    return tuple(stop)


def validate_max_new_tokens(max_new_tokens: int | None) -> int:
    """The reply's token budget; None means the default."""
    if max_new_tokens is None:
        return DEFAULT_MAX_NEW_TOKENS
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise InvalidArgumentError(f"max_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens}")
    return max_new_tokens


def fit_context(prompt_tokens: int, max_new_tokens: int, context_length: int, *, explicit: bool) -> int:
    """``max_new_tokens`` within the model's context. A prompt that leaves no room is INVALID_ARGUMENT; an
    explicit budget that does not fit is too (the caller asked for it); the default shrinks to what fits."""
    room = context_length - prompt_tokens
    if room < 1:
        raise InvalidArgumentError(
            f"the prompt has {prompt_tokens} tokens and the model's context is {context_length}: "
            "shorten the messages or drop the oldest turns"
        )
    if max_new_tokens > room:
        if explicit:
            raise InvalidArgumentError(
                f"the prompt has {prompt_tokens} tokens, so at most {room} new tokens fit the model's context of "
                f"{context_length}; max_tokens was {max_new_tokens}"
            )
        return room
    return max_new_tokens


class Generation(AsyncIterator[GenerationChunk]):
    """A reply being generated by one version of a deployment: its chunks, and who answers.

    The done hooks run once, when the reply finished (``ok``), failed, or was closed early (the client went
    away): the deployment counts the request and lets the version drain; the service settles the quota."""

    def __init__(
        self,
        stream: GenerationStream,
        *,
        registered_model_name: str,
        version: int,
        on_done: Callable[[bool], None],
        labeling_project_id: str = "",
    ) -> None:
        self.stream = stream
        self.request_id = stream.request.request_id
        self.prompt_tokens = len(stream.request.prompt_ids)
        self.registered_model_name = registered_model_name
        self.version = version
        self.labeling_project_id = labeling_project_id
        # The reply so far (whole once the last chunk arrived) and its tokens (metered, also when cancelled).
        self.parts: list[str] = []
        self.completion_tokens = 0
        # What ended the reply when it failed (None: finished, or closed by its client).
        self.error: BaseException | None = None
        self._hooks: list[Callable[[bool], None]] | None = [on_done]

    def add_done_hook(self, hook: Callable[[bool], None]) -> None:
        assert self._hooks is not None, "the reply already ended"
        self._hooks.append(hook)

    def _done(self, ok: bool) -> None:
        hooks, self._hooks = self._hooks, None
        for hook in hooks or ():
            hook(ok)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> GenerationChunk:
        try:
            chunk = await self.stream.__anext__()
        except StopAsyncIteration:
            self._done(True)
            raise
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.error = exc
            self._done(False)
            raise
        self.parts.append(chunk.text)
        self.completion_tokens += len(chunk.token_ids)
        if chunk.finish_reason is not None:
            self._done(True)
        return chunk

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def close(self) -> None:
        """Stop generating (the client went away); no-op once finished."""
        self.stream.cancel()
        self._done(False)

    async def collect(self) -> tuple[str, GenerationChunk]:
        """The whole reply and its last chunk (non-streaming callers)."""
        try:
            async for chunk in self:
                if chunk.finish_reason is not None:
                    return self.text, chunk
        finally:
            self.close()
        raise AssertionError("the reply ended without a finish reason")
