"""A causal language model behind a continuous batcher: the ``GenerativeModel`` of the domain.

One thread owns the model and runs a loop of steps. A step either *prefills* the requests that arrived since
the last step (their prompts, left-padded in groups of similar length, give each its first token and its KV
cache) and merges them into the running batch, or *decodes* one token for every running sequence in one forward
pass.
A sequence that finishes (end-of-sequence token, stop sequence, max tokens) or whose client went away leaves the
batch at once and its rows of the cache are dropped; the cache is trimmed to the longest sequence still running.
A prompt that starts like one prefilled before starts from that prefix's keys and values and computes only the
rest (``runtime/prefix_cache.py``).
The model's thread uses every core (``EngineLimits.threads``; one for a tiny model) and warms the model up itself,
so that its torch thread pool is the process's only one (``runtime/threads.py``: a second pool slows every forward
pass ~1.5x).

Why not transformers' own continuous batching (``init_continuous_batching``)? ``benchmarks/generation_benchmark.py``
measures both on SmolLM2-135M, 2 CPU cores, 32 requests at once: its paged cache (tuned: 64-token pages,
2,048-token batches) gave 62 tokens/s, this batcher 108 (1.75x). It also has no per-request seed, no per-request
greedy/sampling choice (``do_sample`` is global) and no per-row LoRA adapter, all of which this service needs.

The cache is a transformers ``DynamicCache`` over the running batch, left-padded: each row's padding is masked
out by the attention mask and each row carries its own position ids, which is how ``generate`` batches prompts
of different lengths. Only full-attention layers are supported (Llama, Qwen2, GPT-2 shapes).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.utils import logging as hf_logging

from gristmill.core.chat import ChatMessage
from gristmill.core.chat_templates import TOKENIZER_CONFIG_FILE, chat_template_sha256, read_chat_template
from gristmill.core.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    GristmillError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from gristmill.core.hf_loading import model_loading
from gristmill.serving.domain.generation import (
    EngineLimits,
    EngineStats,
    FinishReason,
    FormatKind,
    GenerationChunk,
    GenerationRequest,
    GenerationStream,
    ResponseFormat,
    Usage,
)
from gristmill.serving.domain.model import Quantization
from gristmill.serving.domain.sources import ADAPTER_CONFIG, BASE_DIR, LoadOptions, ResolvedVersion
from gristmill.serving.runtime.lora import BASE_ADAPTER, BatchedLora
from gristmill.serving.runtime.memory import release_memory, resident_bytes
from gristmill.serving.runtime.prefix_cache import LayerKV, PrefixCache
from gristmill.serving.runtime.threads import threads_for_model, use_threads_here

log = logging.getLogger(__name__)

_NO_LIMIT = 1_000_000

DEFAULT_LIMITS = EngineLimits()

# Top-p looks for its nucleus among this many likeliest tokens first: sorting a 49,152-token vocabulary took
# 4.1 ms per row on the 2-core machine (66 ms a step at 16 rows, as long as the forward), the top 64 0.14 ms.
NUCLEUS_CANDIDATES = 64


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p of one row of probabilities: the smallest set of the likeliest tokens whose mass reaches ``top_p``
    (the likeliest always stays), as (their probabilities, their ids), likeliest first.

    Exactly the set a full sort finds: when the ``NUCLEUS_CANDIDATES`` likeliest tokens hold ``top_p`` the set
    ends among them; otherwise (a flat distribution) the whole row is sorted.
    """
    if probs.shape[-1] > NUCLEUS_CANDIDATES:
        ordered, ids = torch.topk(probs, NUCLEUS_CANDIDATES)
        # The same running sum the cut below uses, so that "the set ends among them" is decided consistently.
        if float(ordered.cumsum(-1)[-1]) < top_p:
            ordered, ids = torch.sort(probs, descending=True)
    else:
        ordered, ids = torch.sort(probs, descending=True)
    keep = ordered.cumsum(-1) - ordered < top_p
    return ordered[keep], ids[keep]


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to ``weights`` (1-D, not negative, not all zero).

    By the inverse of the cumulative sum (in float64): ``torch.multinomial`` took 1.3 ms over a 49,152-token row on
    the 2-core machine, this 0.05 ms. A zero weight is never drawn: its running sum equals the one before it, and
    the first running sum above the uniform draw is taken.
    """
    totals = weights.double().cumsum(-1)
    point = torch.rand(1, generator=generator, dtype=torch.float64) * totals[-1]
    index = int(torch.searchsorted(totals, point, right=True))
    if index >= totals.shape[-1]:  # the draw rounded up to the total: the last index with any weight
        index = int(torch.searchsorted(totals, totals[-1:], right=False))
    return index


_ANY_OBJECT = '{"type": "object"}'


class _Grammars:
    """Compiles response formats for one tokenizer (xgrammar: grammars over the token vocabulary, cached)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._vocab_size = info.vocab_size
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)

    def constraint(self, response_format: ResponseFormat) -> _Constraint:
        try:
            # Compact JSON (no free whitespace): a sampler cannot wander into endless spaces between values.
            schema = _ANY_OBJECT if response_format.kind is FormatKind.JSON_OBJECT else response_format.schema
            compiled = self._compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError for schemas it cannot compile
            raise InvalidArgumentError(f"response_format.json_schema cannot be used: {exc}") from None
        return _Constraint(self._xgr, self._xgr.GrammarMatcher(compiled), self._vocab_size)


class _Constraint:
    """One sequence's grammar state: which tokens may come next, advanced by each token sampled."""

    def __init__(self, xgr: Any, matcher: Any, vocab_size: int) -> None:
        self._xgr = xgr
        self._matcher = matcher
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def restrict(self, logits: torch.Tensor) -> None:
        """Set the scores of the tokens the grammar forbids next to -inf (``logits``: one row, in place)."""
        self._matcher.fill_next_token_bitmask(self._bitmask, 0)
        self._xgr.apply_token_bitmask_inplace(logits, self._bitmask)

    def accept(self, token: int) -> bool:
        """Advance by ``token``; True once the grammar is complete."""
        self._matcher.accept_token(token)
        return bool(self._matcher.is_terminated())


@dataclass
class _Sequence:
    request: GenerationRequest
    stream: GenerationStream
    generated: list[int] = field(default_factory=list)
    # Characters of the decoded reply already sent, and the tokens not yet sent with a chunk.
    sent: int = 0
    pending: list[int] = field(default_factory=list)
    # Position id of the next token fed to the model.
    position: int = 0
    generator: torch.Generator | None = None
    constraint: _Constraint | None = None
    # The prompt's first ``cached`` tokens found in the prefix cache (their keys and values, until prefilled).
    cached: int = 0
    prefix: LayerKV | None = None

    @property
    def reserved(self) -> int:
        return len(self.request.prompt_ids) + self.request.max_new_tokens


class ContinuousBatcher:
    """Owns ``model`` on one thread; ``submit`` and ``cancel`` may be called from any thread."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        *,
        eos_ids: Sequence[int],
        limits: EngineLimits = DEFAULT_LIMITS,
        name: str = "generator",
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        # Set once the model is wrapped with PEFT adapters (SharedBase).
        self.peft = False
        # Rows of several adapters in one forward pass: batched LoRA where the model's layers allow it
        # (``adapters_changed``), else PEFT's mixed-batch path.
        self._batched_lora = True
        self._lora = BatchedLora()
        self._lora_installed = False
        # The JSON grammar compiler for structured output, built at the first request that asks for it.
        self._grammars: _Grammars | None = None
        self._prefixes = PrefixCache(limits.prefix_cache_bytes)
        self._eos = frozenset(int(i) for i in eos_ids)
        vocab = int(getattr(model.config, "vocab_size", 0) or 0)
        eos_in_vocab = [i for i in sorted(self._eos) if 0 <= i < vocab]
        self._eos_index = torch.tensor(eos_in_vocab, dtype=torch.long) if eos_in_vocab else None
        self.limits = limits
        self._pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), 0))
        self._lock = threading.Condition()
        self._queue: deque[_Sequence] = deque()
        # Keys of the streams whose clients went away (GenerationStream.key).
        self._cancelled: set[int] = set()
        self._running: list[_Sequence] = []
        self._reserved = 0
        # The running batch's cache and attention mask ([rows, cached positions]); None when nothing runs.
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._closed = False
        # Held for each step's forward pass, and by whoever adds or removes an adapter of the model in between.
        self.model_lock = threading.Lock()
        # Set by the model's thread once it is warm (or failed to warm up: ``_start_error``).
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=f"{name}-batcher", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    # -- callers ----------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> GenerationStream:
        stream = GenerationStream(request, self.cancel)
        reserve = len(request.prompt_ids) + request.max_new_tokens
        if reserve > self.limits.max_cache_tokens:
            raise InvalidArgumentError(
                f"the prompt ({len(request.prompt_ids)} tokens) plus max_tokens ({request.max_new_tokens}) exceed "
                f"the deployment's cache budget of {self.limits.max_cache_tokens} tokens per request"
            )
        constraint = self._constraint(request.response_format) if request.response_format is not None else None
        with self._lock:
            if self._closed:
                raise UnavailableError("the model is being unloaded; retry")
            if len(self._queue) >= self.limits.max_queue:
                raise ResourceExhaustedError(
                    f"{len(self._queue)} generation requests are already waiting for this model; retry later",
                    details={"retry-after-ms": "1000"},
                )
            sequence = _Sequence(request, stream, constraint=constraint)
            if request.sampling.seed is not None:
                sequence.generator = torch.Generator().manual_seed(request.sampling.seed)
            self._queue.append(sequence)
            self._lock.notify()
        return stream

    @property
    def model(self) -> PreTrainedModel:
        return self._model

    def use_model(self, model: Any, *, peft: bool) -> None:
        """Swap in ``model`` (the same weights wrapped by PEFT); the caller holds ``model_lock``."""
        self._model = model
        self.peft = peft
        self.adapters_changed()

    def adapters_changed(self) -> None:
        """After adapters were added to or removed from the model; the caller holds ``model_lock``."""
        # An adapter's name may come back with other weights: no prefix computed before may be reused.
        self._prefixes.clear()
        if self.peft and self._batched_lora:
            self._lora_installed = self._lora.install(self._model)  # False: it left the layers to PEFT
        else:
            self._lora.uninstall()
            self._lora_installed = False

    def use_batched_lora(self, on: bool) -> None:
        """Batched LoRA (the default) or PEFT's mixed-batch path (``on=False``: the benchmark compares them)."""
        with self.model_lock:
            self._batched_lora = on
            self.adapters_changed()

    def use_prefix_cache(self, on: bool) -> None:
        """Prefix caching within the limits' budget (the default) or none (``on=False``: the benchmark compares)."""
        with self.model_lock:
            self._prefixes.clear()
            self._prefixes.max_bytes = self.limits.prefix_cache_bytes if on else 0

    def _constraint(self, response_format: ResponseFormat) -> _Constraint:
        if self._grammars is None:
            self._grammars = _Grammars(self._tokenizer, int(self._model.config.vocab_size))
        return self._grammars.constraint(response_format)

    def cancel(self, key: int) -> None:
        with self._lock:
            self._cancelled.add(key)
            self._lock.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            cached = int(self._mask.sum()) if self._mask is not None else 0
            return EngineStats(
                len(self._running),
                len(self._queue),
                cached,
                self._reserved,
                prompt_tokens=self._prefixes.looked_up_tokens,
                prefix_hit_tokens=self._prefixes.hit_tokens,
            )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=60)

    # -- the model's thread -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            if self.limits.threads > 0:
                # This thread's OpenMP pool is the process's only one (``runtime/threads.py``); a tiny model's
                # forward pass is not worth sharing.
                parameters = sum(p.numel() for p in self._model.parameters())
                use_threads_here(threads_for_model(parameters, self.limits.threads))
            # On this thread: the first forward passes allocate and pick kernels for its thread count.
            _warm_up(self._model, self._tokenizer)
        except Exception as exc:
            self._start_error = exc
            return
        finally:
            self._started.set()
        try:
            with torch.inference_mode():
                while True:
                    admitted = self._next_step()
                    if admitted is None:
                        return
                    try:
                        with self.model_lock:
                            if admitted:
                                self._prefill(admitted)
                            elif self._running:
                                self._decode()
                    except Exception as exc:  # a failed forward fails its batch, not the service
                        log.exception("generation step failed")
                        error = UnavailableError(f"generation failed: {type(exc).__name__}: {exc}")
                        for sequence in admitted + self._running:
                            sequence.stream.push(error)
                        with self._lock:
                            self._running = []
                            self._reserved = 0
                        self._cache, self._mask = None, None
        finally:
            self._fail_all(UnavailableError("the model was unloaded while the request waited; retry"))

    def _next_step(self) -> list[_Sequence] | None:
        """Apply cancellations, then admit queued requests within the budgets; None once closed."""
        with self._lock:
            while True:
                if self._closed:
                    return None
                self._drop_cancelled()
                admitted = self._admit()
                if admitted or self._running:
                    return admitted
                self._lock.wait()

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        cancelled, self._cancelled = self._cancelled, set()
        self._queue = deque(s for s in self._queue if s.stream.key not in cancelled)
        leaving = [i for i, s in enumerate(self._running) if s.stream.key in cancelled]
        if leaving:
            self._remove_rows(leaving)

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        prefill = 0
        now = time.monotonic()
        while self._queue:
            sequence = self._queue[0]
            request = sequence.request
            if request.deadline is not None and now > request.deadline:
                self._queue.popleft()
                sequence.stream.push(
                    DeadlineExceededError("the deadline passed while the request waited for a place; dropped")
                )
                continue
            running = len(self._running) + len(admitted)
            if running >= self.limits.max_sequences:
                break
            if self._reserved + sequence.reserved > self.limits.max_cache_tokens:
                break
            if admitted and prefill + len(request.prompt_ids) > self.limits.max_prefill_tokens:
                break
            self._queue.popleft()
            self._reserved += sequence.reserved
            prefill += len(request.prompt_ids)
            admitted.append(sequence)
        return admitted

    def _prefill(self, admitted: list[_Sequence]) -> None:
        """Prefill ``admitted`` in groups of one cached prefix length and similar lengths of the rest (little
        compute on padding), add them all to the running batch in one merge, then offer their prompts to the prefix
        cache."""
        for sequence in admitted:
            sequence.cached, sequence.prefix = self._prefixes.lookup(_namespace(sequence), sequence.request.prompt_ids)
        sequences: list[_Sequence] = []
        tokens: list[int] = []
        blocks: list[tuple[DynamicCache, torch.Tensor]] = []
        groups: list[list[_Sequence]] = []
        for cached in sorted({s.cached for s in admitted}):
            groups += _length_groups([s for s in admitted if s.cached == cached], self.limits.prefill_padding)
        for group in groups:
            cache, mask, first = self._prefill_group(group)
            sequences += group
            tokens += first
            blocks.append((cache, mask))
        offset = len(self._running)
        self._merge(sequences, blocks)
        self._advance(sequences, tokens, offset)
        # After the first tokens went out: keeping the prompts' blocks costs their time, not the clients'.
        for group, (cache, mask) in zip(groups, blocks, strict=True):
            for row, sequence in enumerate(group):
                self._keep_prefix(sequence, cache, mask, row)

    def _keep_prefix(self, sequence: _Sequence, cache: DynamicCache, mask: torch.Tensor, row: int) -> None:
        """Offer ``sequence``'s prompt (row ``row`` of a prefilled group's ``cache`` and ``mask``) to the prefix
        cache. The row's set mask columns are its prompt's tokens in order: after its left padding, and on both
        sides of the padding between a cached prefix and the rest."""
        columns = mask[row].nonzero().squeeze(1)

        def kv(start: int, end: int) -> LayerKV:
            index = columns[start:end]
            return [(k[row].index_select(1, index), v[row].index_select(1, index)) for k, v in map(_kv, cache.layers)]

        self._prefixes.store(_namespace(sequence), sequence.request.prompt_ids, kv)

    def _prefill_group(self, admitted: list[_Sequence]) -> tuple[DynamicCache, torch.Tensor, list[int]]:
        """One forward pass over the prompts of ``admitted`` (each with the same number of cached prefix tokens):
        the cache starts with their cached prefixes, and only the rest of each prompt is computed, left-padded."""
        cached = admitted[0].cached
        longest = max(len(s.request.prompt_ids) for s in admitted) - cached
        ids = torch.full((len(admitted), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(admitted), longest), dtype=torch.long)
        for row, sequence in enumerate(admitted):
            rest = sequence.request.prompt_ids[cached:]
            ids[row, longest - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            mask[row, longest - len(rest) :] = 1
            sequence.position = len(sequence.request.prompt_ids)
        positions = (cached + mask.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache(self._model.config)
        if cached:
            prefixes = [s.prefix for s in admitted]
            assert all(p is not None for p in prefixes), "a row with cached tokens has their keys and values"
            for index in range(len(cache.layers)):
                keys = torch.stack([p[index][0] for p in prefixes if p is not None])
                values = torch.stack([p[index][1] for p in prefixes if p is not None])
                cache.update(keys, values, index)
            mask = torch.cat([torch.ones((len(admitted), cached), dtype=torch.long), mask], dim=1)
        for sequence in admitted:
            sequence.prefix = None
        out = self._forward(admitted, input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache)
        return cache, mask, self._sample(out.logits[:, -1, :], admitted)

    def _decode(self) -> None:
        assert self._cache is not None and self._mask is not None
        ids = torch.tensor([[s.generated[-1]] for s in self._running], dtype=torch.long)
        positions = torch.tensor([[s.position] for s in self._running], dtype=torch.long)
        mask = torch.cat([self._mask, torch.ones((len(self._running), 1), dtype=torch.long)], dim=1)
        out = self._forward(
            self._running, input_ids=ids, attention_mask=mask, position_ids=positions, cache=self._cache
        )
        self._mask = mask
        for sequence in self._running:
            sequence.position += 1
        self._advance(self._running, self._sample(out.logits[:, -1, :], self._running), 0)

    def _forward(self, rows: Sequence[_Sequence], **inputs: Any) -> Any:
        """One forward pass over ``rows`` (the last position's logits), each row with its own LoRA adapter when the
        model has several (``__base__``: none), so that sequences of several adapters of one base run together."""
        inputs.update(use_cache=True, logits_to_keep=1)
        if not self.peft:
            return self._model(**inputs)
        names = [s.request.adapter or BASE_ADAPTER for s in rows]
        if not self._lora_installed:
            return self._model(**inputs, adapter_names=names)
        self._lora.select(names)
        try:
            return self._model(**inputs)
        finally:
            self._lora.clear()

    def _merge(self, admitted: list[_Sequence], blocks: list[tuple[DynamicCache, torch.Tensor]]) -> None:
        """Append the prefilled rows (``blocks`` of cache and mask, in ``admitted``'s order) to the running batch,
        left-padding every block to the widest: one copy of the running cache however many blocks join."""
        if self._cache is not None and self._mask is not None and self._running:
            blocks = [(self._cache, self._mask), *blocks]
        if len(blocks) == 1:
            self._cache, self._mask = blocks[0]
        else:
            width = max(mask.shape[1] for _, mask in blocks)
            merged = _new_cache(self._model.config)
            for index, layers in enumerate(zip(*(cache.layers for cache, _ in blocks), strict=True)):
                pairs = [_kv(layer) for layer in layers]
                keys = torch.cat([_left_pad(k, width) for k, _ in pairs], dim=0)
                values = torch.cat([_left_pad(v, width) for _, v in pairs], dim=0)
                merged.update(keys, values, index)
            self._mask = torch.cat([_left_pad(mask, width) for _, mask in blocks], dim=0)
            self._cache = merged
        with self._lock:
            self._running = self._running + admitted

    def _sample(self, logits: torch.Tensor, rows: Sequence[_Sequence]) -> list[int]:
        logits = logits.float()
        for row, sequence in enumerate(rows):
            if sequence.constraint is not None:
                # Structured output: only the tokens the grammar allows next keep their scores.
                sequence.constraint.restrict(logits[row : row + 1])
            elif len(sequence.generated) < sequence.request.sampling.min_tokens and self._eos_index is not None:
                logits[row, self._eos_index] = float("-inf")
        greedy = logits.argmax(dim=-1).tolist()
        tokens: list[int] = []
        for row, sequence in enumerate(rows):
            sampling = sequence.request.sampling
            if sampling.greedy:
                tokens.append(int(greedy[row]))
                continue
            scores = logits[row] / sampling.temperature
            if sampling.top_k > 0 and sampling.top_k < scores.shape[-1]:
                kth = torch.topk(scores, sampling.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            if sampling.top_p < 1.0:
                kept, ids = nucleus(probs, sampling.top_p)
                tokens.append(int(ids[draw(kept, sequence.generator)]))
            else:
                tokens.append(draw(probs, sequence.generator))
        return tokens

    def _advance(self, sequences: Sequence[_Sequence], tokens: list[int], offset: int) -> None:
        """Append each sequence's new token (``sequences`` are the running rows from ``offset`` on), stream its
        text, and remove the rows that finished."""
        finished: list[int] = []
        last_chunks: list[tuple[_Sequence, GenerationChunk]] = []
        for row, (sequence, token) in enumerate(zip(sequences, tokens, strict=True), start=offset):
            reason: FinishReason | None = None
            if token in self._eos:
                reason = FinishReason.STOP
            else:
                sequence.generated.append(token)
                sequence.pending.append(token)
                if sequence.constraint is not None and sequence.constraint.accept(token):
                    # The grammar is complete (the JSON value closed): nothing else may follow.
                    reason = FinishReason.STOP
                elif len(sequence.generated) >= sequence.request.max_new_tokens:
                    reason = FinishReason.LENGTH
            last = self._emit(sequence, reason)
            if last is not None:
                finished.append(row)
                last_chunks.append((sequence, last))
        if finished:
            with self._lock:
                self._remove_rows(finished)
        # The last chunk goes out only once the sequence has left the batch: a client that has its finish reason
        # sees the capacity (stats, the next admission) already freed.
        for sequence, chunk in last_chunks:
            sequence.stream.push(chunk)

    def _emit(self, sequence: _Sequence, reason: FinishReason | None) -> GenerationChunk | None:
        """Stream the text that is safe to send; a finished sequence's last chunk is returned, not pushed."""
        request = sequence.request
        text = self._tokenizer.decode(sequence.generated, skip_special_tokens=True)
        for stop in request.stop:
            found = text.find(stop, max(0, sequence.sent - len(stop) + 1))
            if found >= 0:
                text, reason = text[:found], FinishReason.STOP
        if reason is None:
            # Hold back half a character and the start of a stop sequence that may still complete.
            end = len(text)
            if text.endswith("\ufffd"):
                end -= 1
            hold = max((len(s) - 1 for s in request.stop), default=0)
            end = max(sequence.sent, end - hold)
            delta, sequence.sent = text[sequence.sent : end], end
            if delta:
                sequence.stream.push(GenerationChunk(delta, tuple(sequence.pending)))
                sequence.pending.clear()
            return None
        delta = text[sequence.sent :]
        sequence.sent = len(text)
        usage = Usage(len(request.prompt_ids), len(sequence.generated))
        return GenerationChunk(delta, tuple(sequence.pending), reason, usage)

    def _remove_rows(self, rows: Sequence[int]) -> None:
        """Drop ``rows`` from the running batch and its cache (caller holds the lock)."""
        leaving = set(rows)
        for row in leaving:
            self._reserved -= self._running[row].reserved
        keep = [i for i in range(len(self._running)) if i not in leaving]
        self._running = [self._running[i] for i in keep]
        if not keep or self._cache is None or self._mask is None:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long)
        mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row are dropped: the cache is as wide as its longest row.
        start = int((mask.sum(0) > 0).long().argmax())
        trimmed = _new_cache(self._model.config)
        for layer_index, layer in enumerate(self._cache.layers):
            keys, values = _kv(layer)
            trimmed.update(
                keys.index_select(0, index)[:, :, start:, :],
                values.index_select(0, index)[:, :, start:, :],
                layer_index,
            )
        self._cache, self._mask = trimmed, mask[:, start:]

    def _fail_all(self, error: GristmillError) -> None:
        with self._lock:
            waiting = list(self._queue) + self._running
            self._queue.clear()
            self._running = []
            self._reserved = 0
        self._cache, self._mask = None, None
        for sequence in waiting:
            sequence.stream.push(error)


class _SlackLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicLayer`` that appends in place: keys and values live in buffers with room for ``SLACK`` more
    positions, and ``keys``/``values`` are views of their filled part. The stock layer concatenates the whole
    cache at every decoding step (a copy of every row's keys and values per token); this copies only when the
    room runs out."""

    SLACK = 64

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._filled = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        added = key_states.shape[-2]
        needed = self._filled + added
        if self._key_buffer is None or self._value_buffer is None or needed > self._key_buffer.shape[-2]:
            rows, heads, _, dim = key_states.shape
            keys = key_states.new_empty((rows, heads, needed + self.SLACK, dim))
            values = value_states.new_empty((rows, heads, needed + self.SLACK, value_states.shape[-1]))
            if self._filled:
                keys[:, :, : self._filled] = self._key_buffer[:, :, : self._filled]  # type: ignore[index]
                values[:, :, : self._filled] = self._value_buffer[:, :, : self._filled]  # type: ignore[index]
            self._key_buffer, self._value_buffer = keys, values
        self._key_buffer[:, :, self._filled : needed] = key_states
        self._value_buffer[:, :, self._filled : needed] = value_states
        self._filled = needed
        self.keys = self._key_buffer[:, :, :needed]
        self.values = self._value_buffer[:, :, :needed]
        return self.keys, self.values


def _new_cache(config: Any) -> DynamicCache:
    """An empty cache of ``_SlackLayer`` s (one per layer of ``config``; full attention checked at load)."""
    cache = DynamicCache(config=config)
    cache.layers = [_SlackLayer() for _ in cache.layers]
    return cache


def _length_groups(sequences: list[_Sequence], padding: float) -> list[list[_Sequence]]:
    """``sequences`` by the length of their prompts' uncached rest, in groups whose padded size stays within
    ``padding`` times their tokens."""
    ordered = sorted(sequences, key=lambda s: len(s.request.prompt_ids) - s.cached)
    groups: list[list[_Sequence]] = []
    tokens = 0
    for sequence in ordered:
        length = len(sequence.request.prompt_ids) - sequence.cached
        group = groups[-1] if groups else None
        # Sorted ascending: this prompt is the group's longest, so the group pads every row to its length.
        if group is not None and length * (len(group) + 1) <= padding * (tokens + length):
            group.append(sequence)
            tokens += length
        else:
            groups.append([sequence])
            tokens = length
    return groups


def _namespace(sequence: _Sequence) -> str:
    """Whose keys and values a row's are: its adapter changes them."""
    return sequence.request.adapter or BASE_ADAPTER


def _kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A full-attention cache layer's key and value tensors ([rows, heads, positions, head dim])."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    assert isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor), "checked at load: full attention only"
    return keys, values


def check_full_attention(model: PreTrainedModel, what: str) -> None:
    """``FailedPreconditionError`` unless every cache layer of ``model`` is a plain full-attention one (the
    batcher pads and merges those; sliding-window and linear-attention layers keep other state)."""
    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if kinds != {"DynamicLayer"}:
        raise FailedPreconditionError(
            f"{what} has cache layers of kinds {', '.join(sorted(kinds))}; serving generates with full-attention "
            "models only (Llama, Qwen2, GPT-2 shapes) for now"
        )


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` padded with zeros on the left of its sequence axis (dim 2 of a cache, dim 1 of a mask)."""
    axis = 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


class _TemplateFront:
    """What a generative model does before the batcher: its tokenizer, chat template and context length."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        limit = int(getattr(model.config, "max_position_embeddings", 0) or _NO_LIMIT)
        model_max = int(getattr(tokenizer, "model_max_length", _NO_LIMIT) or _NO_LIMIT)
        self._context = min(limit, model_max, _NO_LIMIT)
        self.memory_bytes = 0

    @property
    def context_length(self) -> int:
        return self._context

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tokenizer, "chat_template", None))

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        if not self.has_chat_template:
            raise FailedPreconditionError(
                "the model has no chat template: send a prompt instead of messages, or register a version whose "
                "tokenizer carries one"
            )
        try:
            rendered = self._tokenizer.apply_chat_template(
                [m.to_json() for m in messages], add_generation_prompt=True, tokenize=True
            )
        except Exception as exc:  # a template may raise on turns it does not accept (jinja raise_exception)
            raise InvalidArgumentError(f"the model's chat template refused the messages: {exc}") from None
        ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        return [int(i) for i in ids]

    def encode_prompt(self, prompt: str) -> list[int]:
        return [int(i) for i in self._tokenizer.encode(prompt, add_special_tokens=False)]


class TransformersGenerator(_TemplateFront):
    """A loaded causal LM (``GenerativeModel``) with a ``ContinuousBatcher`` of its own."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, *, limits: EngineLimits, name: str) -> None:
        super().__init__(model, tokenizer)
        self._model = model
        self.eos_ids = _eos_ids(model, tokenizer)
        self._batcher = ContinuousBatcher(model, tokenizer, eos_ids=self.eos_ids, limits=limits, name=name)

    def submit(self, request: GenerationRequest) -> GenerationStream:
        return self._batcher.submit(request)

    def stats(self) -> EngineStats:
        return self._batcher.stats()

    def close(self) -> None:
        self._batcher.close()
        del self._model
        release_memory()


class SharedBase:
    """One base model in memory with the LoRA adapters of every version loaded on it, and one batcher whose
    batches mix them (``runtime/lora.py``): a new adapter version loads beside the others without loading
    the base again. Kept in ``_BASES`` by the base directory's real path while an adapter uses it."""

    def __init__(self, key: str, model: PreTrainedModel, tokenizer: Any, *, limits: EngineLimits) -> None:
        self.key = key
        self.model: Any = model
        self.dtype = model.dtype
        self.adapters: set[str] = set()
        self.batcher = ContinuousBatcher(
            model, tokenizer, eos_ids=_eos_ids(model, tokenizer), limits=limits, name=f"base-{Path(key).name}"
        )

    def add_adapter(self, directory: Path, name: str) -> None:
        from peft import PeftModel

        # Between two steps of the batcher: a forward pass never sees a half-loaded adapter.
        with self.batcher.model_lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(directory), adapter_name=name).eval()
            # PEFT keeps adapter weights in float32; a bf16 base computes them in its own precision.
            self.model.to(self.dtype)
            self.batcher.use_model(self.model, peft=True)
            self.adapters.add(name)

    def remove_adapter(self, name: str) -> None:
        with self.batcher.model_lock:
            self.adapters.discard(name)
            if self.adapters:
                with warnings.catch_warnings():
                    # PEFT warns that the deleted adapter was the active one; rows always name their adapter.
                    warnings.simplefilter("ignore", UserWarning)
                    self.model.delete_adapter(name)
                self.batcher.adapters_changed()


_BASES: dict[str, SharedBase] = {}
_BASES_LOCK = threading.Lock()
_ADAPTER_NUMBERS = iter(range(1, 1 << 62))


class AdapterGenerator(_TemplateFront):
    """A LoRA adapter version (``GenerativeModel``) served on a ``SharedBase``."""

    def __init__(self, shared: SharedBase, adapter: str, tokenizer: Any) -> None:
        super().__init__(shared.batcher.model, tokenizer)
        self.shared = shared
        self.adapter = adapter

    def submit(self, request: GenerationRequest) -> GenerationStream:
        return self.shared.batcher.submit(replace(request, adapter=self.adapter))

    def stats(self) -> EngineStats:
        return self.shared.batcher.stats()

    def close(self) -> None:
        with _BASES_LOCK:
            self.shared.remove_adapter(self.adapter)
            if self.shared.adapters:
                return
            _BASES.pop(self.shared.key, None)
        # The last adapter of the base: its batcher and the base go.
        self.shared.batcher.close()
        release_memory()


def _eos_ids(model: PreTrainedModel, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        for item in value if isinstance(value, list | tuple) else [value]:
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    return tuple(ids)


def load_transformers_generator(
    directory: Path, resolved: ResolvedVersion, options: LoadOptions, *, limits: EngineLimits | None = None
) -> TransformersGenerator | AdapterGenerator:
    """Load a chat version from ``directory``: a full causal LM (safetensors), or a LoRA adapter whose base model
    the source fetched beside it (``base/``) and which is served on that base shared with the base's other
    adapters. Quantise if asked, warm up, measure memory."""
    what = f"version {resolved.version} of {resolved.registered_model_name}"
    check_chat_template(directory, resolved, what)
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    release_memory()
    before = resident_bytes()
    limits = limits or EngineLimits()
    generator: TransformersGenerator | AdapterGenerator
    if (directory / ADAPTER_CONFIG).is_file():
        if options.quantization is Quantization.DYNAMIC_INT8:
            raise FailedPreconditionError(
                f"{what} is a LoRA adapter; int8 quantisation applies to full models: deploy the merged model "
                "(train with publish_merged), or use bf16 or no quantisation"
            )
        generator = _load_adapter(directory, what, resolved, limits, bf16=options.quantization is Quantization.BF16)
    else:
        model, tokenizer = _load_causal_lm(directory, what)
        if options.quantization is Quantization.DYNAMIC_INT8:
            from gristmill.serving.runtime.classifier import quantize_dynamic_int8

            model = quantize_dynamic_int8(model)
        elif options.quantization is Quantization.BF16:
            model = model.to(torch.bfloat16)
        generator = TransformersGenerator(model, tokenizer, limits=limits, name=f"{resolved.registered_model_name}")
    release_memory()
    generator.memory_bytes = max(resident_bytes() - before, 0)
    log.info(
        "loaded generator %s (%s, %s): %.1f MB resident, context %d",
        what,
        "adapter" if isinstance(generator, AdapterGenerator) else "full model",
        options.quantization.value,
        generator.memory_bytes / 1e6,
        generator.context_length,
    )
    return generator


def check_chat_template(directory: Path, resolved: ResolvedVersion, what: str) -> None:
    """Train = serve: ``FailedPreconditionError`` when the tokenizer the version carries (or, for an adapter
    without one, its base's) has another chat template than the one its lineage says training rendered with."""
    if not resolved.chat_template_sha256:
        return
    tokenizer_dir = directory
    if (directory / ADAPTER_CONFIG).is_file() and not (directory / TOKENIZER_CONFIG_FILE).is_file():
        tokenizer_dir = directory / BASE_DIR
    template = read_chat_template(tokenizer_dir) if tokenizer_dir.is_dir() else ""
    served = chat_template_sha256(template) if template else "none"
    if served != resolved.chat_template_sha256:
        raise FailedPreconditionError(
            f"{what}: its tokenizer's chat template (sha256 {served[:12]}) is not the one it was trained with "
            f"(lineage chat_template.sha256 {resolved.chat_template_sha256[:12]}); replies would be rendered "
            "differently from training: register the version with the tokenizer its training job saved"
        )


def _load_causal_lm(directory: Path, what: str) -> tuple[Any, Any]:
    if not (directory / "model.safetensors").is_file():
        raise FailedPreconditionError(
            f"{what} has no model.safetensors; serving loads causal LMs from safetensors weights (a full model, "
            "or a LoRA adapter with adapter_config.json on its base model)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        with model_loading():
            model: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise FailedPreconditionError(f"{what} is not a loadable Hugging Face causal language model: {exc}") from None
    model.eval()
    check_full_attention(model, what)
    return model, tokenizer


def _load_adapter(
    directory: Path, what: str, resolved: ResolvedVersion, limits: EngineLimits, *, bf16: bool
) -> AdapterGenerator:
    base_dir = directory / BASE_DIR
    if not (base_dir / "config.json").is_file():
        raise FailedPreconditionError(
            f"{what} is a LoRA adapter, but its base model was not fetched with it (the version's lineage must name "
            "a base model imported into the registry)"
        )
    # The version's own tokenizer carries the chat template it was trained with; the base's is the fallback.
    has_tokenizer = (directory / TOKENIZER_CONFIG_FILE).is_file()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory if has_tokenizer else base_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise FailedPreconditionError(f"{what}: its tokenizer does not load: {exc}") from None
    # One shared base per base model and precision: a bf16 deployment does not share an fp32 base.
    key = f"{base_dir.resolve()}{'#bf16' if bf16 else ''}"
    name = f"{resolved.registered_model_name}-v{resolved.version}-{next(_ADAPTER_NUMBERS)}"
    with _BASES_LOCK:
        shared = _BASES.get(key)
        if shared is None:
            model, base_tokenizer = _load_causal_lm(base_dir, f"the base model of {what}")
            if bf16:
                model = model.to(torch.bfloat16)
            shared = _BASES[key] = SharedBase(key, model, base_tokenizer, limits=limits)
        try:
            shared.add_adapter(directory, name)
        except Exception as exc:
            if not shared.adapters:
                _BASES.pop(key, None)
                shared.batcher.close()
            raise FailedPreconditionError(f"{what}: the LoRA adapter does not load on its base model: {exc}") from None
    return AdapterGenerator(shared, name, tokenizer)


def _warm_up(model: Any, tokenizer: Any) -> None:
    """One prefill and a few decoding steps: the first forward passes allocate and pick kernels."""
    ids = tokenizer("warming up the model", return_tensors="pt")
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=_eos_ids(model, tokenizer)[0])
