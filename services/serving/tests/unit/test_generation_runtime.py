"""The continuous batcher on a tiny Llama: replies match transformers' ``generate`` token for token (greedy),
sequences join and leave a running batch, cancellation frees the cache, stop sequences, limits."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from gristmill.core.chat import ChatMessage
from gristmill.core.errors import (
    ConfigurationError,
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from gristmill.core.settings import load_settings
from gristmill.serving.domain.generation import (
    FinishReason,
    GenerationRequest,
    GenerationStream,
    GenerativeModel,
    SamplingParams,
)
from gristmill.serving.domain.sources import LoadOptions, ResolvedVersion
from gristmill.serving.runtime import generation as runtime
from gristmill.serving.runtime import threads as serving_threads
from gristmill.serving.runtime.generation import (
    EngineLimits,
    TransformersGenerator,
    draw,
    load_transformers_generator,
    nucleus,
)
from gristmill.serving.settings import ServingSettings
from gristmill.serving.tasks import TaskRuntimeLoader
from services.serving.tests.support import decoding_paused, greedy_tokens, merged_greedy_tokens
from tests.support.tiny_model import make_tiny_llama, make_tiny_lora_adapter

TEXTS = [
    "the service was quick and the staff were friendly",
    "the parcel arrived broken and nobody answered my mail",
    "great value for the money, would buy again",
    "the battery died after two days of light use",
]
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A larger initializer range: random weights whose greedy replies vary with the prompt (not one token
    # repeated), so that a wrong cache row or position shows as a different reply.
    return make_tiny_llama(tmp_path_factory.mktemp("llama"), TEXTS * 4, initializer_range=0.2)


def _resolved() -> ResolvedVersion:
    return ResolvedVersion(registered_model_name="assistant", version=1, task="TASK_TYPE_CHAT")


def _load(directory: Path, **limits: int) -> TransformersGenerator:
    return load_transformers_generator(directory, _resolved(), LoadOptions(), limits=EngineLimits(**limits))


def _request(rid: str, prompt: list[int], max_new: int, **kwargs: object) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_ids=tuple(prompt), max_new_tokens=max_new, **kwargs)  # type: ignore[arg-type]


async def _tokens(generator: GenerativeModel, request: GenerationRequest) -> tuple[list[int], FinishReason]:
    tokens: list[int] = []
    async for chunk in generator.submit(request):
        tokens.extend(chunk.token_ids)
        if chunk.finish_reason is not None:
            assert chunk.usage is not None and chunk.usage.prompt_tokens == len(request.prompt_ids)
            assert chunk.usage.completion_tokens == len(tokens)
            return tokens, chunk.finish_reason
    raise AssertionError("the stream ended without a finish reason")


async def _text(stream: GenerationStream) -> tuple[str, FinishReason | None]:
    parts, reason = [], None
    async for chunk in stream:
        parts.append(chunk.text)
        reason = chunk.finish_reason
    return "".join(parts), reason


def test_staggered_requests_match_generate_token_for_token(llama_dir: Path) -> None:
    generator = _load(llama_dir)
    try:
        prompts = [generator.render_chat([ChatMessage("user", text)]) for text in TEXTS]
        budgets = [12, 5, 20, 9]
        expected = [greedy_tokens(llama_dir, p, n) for p, n in zip(prompts, budgets, strict=True)]

        async def run() -> list[list[int]]:
            tasks = []
            for index, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
                tasks.append(
                    asyncio.create_task(_tokens(generator, _request(f"r{index}", prompt, budget, sampling=GREEDY)))
                )
                # Later requests join a batch that is already decoding.
                await asyncio.sleep(0.02 * index)
            return [tokens for tokens, _ in await asyncio.gather(*tasks)]

        assert asyncio.run(run()) == expected
        assert generator.stats().running == 0 and generator.stats().cached_tokens == 0
    finally:
        generator.close()


def test_cancel_frees_the_sequence_and_its_cache(llama_dir: Path) -> None:
    generator = _load(llama_dir)
    try:
        prompt = generator.encode_prompt(TEXTS[0])

        async def run() -> None:
            # Slow steps (20 ms each) and greedy replies that run to max_new_tokens: both are still running when
            # the test looks, however loaded the machine.
            with decoding_paused(generator, step_s=0.02):
                keep = generator.submit(_request("keep", prompt, 200, sampling=GREEDY))
                gone = generator.submit(_request("gone", prompt + prompt, 200, sampling=GREEDY))
                await gone.__anext__()
                assert generator.stats().running == 2
                gone.cancel()
                # The cancel takes effect at the next decoding step. Tokens of "keep" decoded before it may already
                # wait in its stream, so reading two of them does not prove a step ran since: read until one has.
                deadline = time.monotonic() + 10
                while generator.stats().running != 1 and time.monotonic() < deadline:
                    await keep.__anext__()
                stats = generator.stats()
                assert stats.running == 1 and stats.reserved_tokens == len(prompt) + 200
                keep.cancel()
            deadline = time.monotonic() + 10
            while generator.stats().running and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

        asyncio.run(run())
        stats = generator.stats()
        assert (stats.running, stats.queued, stats.cached_tokens, stats.reserved_tokens) == (0, 0, 0, 0)
    finally:
        generator.close()


def test_stop_sequence_ends_the_reply_before_it(llama_dir: Path) -> None:
    generator = _load(llama_dir)
    try:
        prompt = generator.encode_prompt(TEXTS[2])

        async def reply(stop: tuple[str, ...]) -> tuple[str, FinishReason | None]:
            return await _text(generator.submit(_request("s", prompt, 24, sampling=GREEDY, stop=stop)))

        full, reason = asyncio.run(reply(()))
        assert reason is FinishReason.LENGTH and len(full) > 6
        stop = full[4:7]
        cut, reason = asyncio.run(reply((stop,)))
        assert reason is FinishReason.STOP
        assert cut == full[: full.index(stop)]
    finally:
        generator.close()


def test_seeded_sampling_repeats_and_greedy_ignores_the_seed(llama_dir: Path) -> None:
    generator = _load(llama_dir)
    try:
        prompt = generator.encode_prompt(TEXTS[1])

        async def reply(sampling: SamplingParams) -> str:
            text, _ = await _text(generator.submit(_request("x", prompt, 16, sampling=sampling)))
            return text

        seeded = SamplingParams(temperature=1.5, top_p=0.9, top_k=50, seed=7)
        first, again = asyncio.run(reply(seeded)), asyncio.run(reply(seeded))
        assert first == again
        others = {asyncio.run(reply(SamplingParams(temperature=1.5, seed=s))) for s in range(1, 6)}
        assert len(others) > 1, "different seeds gave the same reply every time"
    finally:
        generator.close()


def test_limits_queue_budget_and_deadline(llama_dir: Path) -> None:
    generator = _load(llama_dir, max_sequences=1, max_queue=1, max_cache_tokens=300)
    try:
        prompt = generator.encode_prompt(TEXTS[0])
        with pytest.raises(InvalidArgumentError, match="cache budget of 300"):
            asyncio.run(_tokens(generator, _request("big", prompt, 300)))

        async def run() -> None:
            # "a" cannot finish before b's deadline passes: its decoding waits (a tiny model decodes 200 tokens in
            # less than b's 50 ms), and greedy decoding does not end its first token by chance.
            with decoding_paused(generator):
                first = generator.submit(_request("a", prompt, 200, sampling=GREEDY))
                await first.__anext__()
                # The running sequence holds the only place: the next waits, one more is refused.
                late = generator.submit(_request("b", prompt, 10, deadline=time.monotonic() + 0.05))
                with pytest.raises(ResourceExhaustedError, match="already waiting"):
                    generator.submit(_request("c", prompt, 10))
                await asyncio.sleep(0.1)
                first.cancel()
            with pytest.raises(DeadlineExceededError):
                await late.__anext__()

        asyncio.run(run())
    finally:
        generator.close()


def test_two_adapters_share_one_base_and_decode_in_one_batch(llama_dir: Path, tmp_path: Path) -> None:
    from gristmill.serving.runtime import generation as runtime

    first = make_tiny_lora_adapter(llama_dir, tmp_path / "a1", seed=1, link_base=True)
    second = make_tiny_lora_adapter(llama_dir, tmp_path / "a2", seed=2, link_base=True)
    one = load_transformers_generator(first, ResolvedVersion("bot", 1, task="TASK_TYPE_CHAT"), LoadOptions())
    two = load_transformers_generator(second, ResolvedVersion("bot", 2, task="TASK_TYPE_CHAT"), LoadOptions())
    try:
        assert isinstance(one, runtime.AdapterGenerator) and isinstance(two, runtime.AdapterGenerator)
        assert one.shared is two.shared and list(runtime._BASES) == [str(llama_dir.resolve())]
        prompts = [one.render_chat([ChatMessage("user", text)]) for text in TEXTS]
        expected_one = [merged_greedy_tokens(first, p, 10) for p in prompts]
        expected_two = [merged_greedy_tokens(second, p, 10) for p in prompts]
        assert expected_one != expected_two, "the two adapters should answer differently"

        async def run() -> tuple[list[list[int]], list[list[int]]]:
            # Both adapters' requests in flight together: their rows share the batch.
            a = [
                asyncio.create_task(_tokens(one, _request(f"a{i}", p, 10, sampling=GREEDY)))
                for i, p in enumerate(prompts)
            ]
            b = [
                asyncio.create_task(_tokens(two, _request(f"b{i}", p, 10, sampling=GREEDY)))
                for i, p in enumerate(prompts)
            ]
            return [t for t, _ in await asyncio.gather(*a)], [t for t, _ in await asyncio.gather(*b)]

        got_one, got_two = asyncio.run(run())
        assert got_one == expected_one
        assert got_two == expected_two
        # Unloading one adapter leaves the other serving on the same base.
        one.close()
        alone, _ = asyncio.run(_tokens(two, _request("solo", prompts[0], 10, sampling=GREEDY)))
        assert alone == expected_two[0]
    finally:
        two.close()
        one.close()
    assert runtime._BASES == {}


def test_a_version_whose_template_is_not_the_trained_one_is_refused(llama_dir: Path) -> None:
    from gristmill.core.chat_templates import chat_template_sha256, read_chat_template
    from gristmill.core.errors import FailedPreconditionError

    trained = chat_template_sha256(read_chat_template(llama_dir))
    wrong = chat_template_sha256("{{ messages }}")
    refused = ResolvedVersion("assistant", 3, task="TASK_TYPE_CHAT", chat_template_sha256=wrong)
    with pytest.raises(FailedPreconditionError, match="not the one it was trained with"):
        load_transformers_generator(llama_dir, refused, LoadOptions())
    same = ResolvedVersion("assistant", 4, task="TASK_TYPE_CHAT", chat_template_sha256=trained)
    load_transformers_generator(llama_dir, same, LoadOptions()).close()


def test_bf16_serves_the_model_in_bfloat16(llama_dir: Path) -> None:
    from gristmill.serving.domain.model import Quantization

    generator = load_transformers_generator(
        llama_dir, ResolvedVersion("assistant", 5, task="TASK_TYPE_CHAT"), LoadOptions(quantization=Quantization.BF16)
    )
    try:
        assert generator._model.dtype == torch.bfloat16  # type: ignore[union-attr]
        prompt = generator.render_chat([ChatMessage("user", TEXTS[0])])
        tokens, reason = asyncio.run(_tokens(generator, _request("bf", prompt, 8, sampling=GREEDY)))
        assert 0 < len(tokens) <= 8 and reason in (FinishReason.STOP, FinishReason.LENGTH)
    finally:
        generator.close()


SENTIMENT_SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"enum": ["positive", "negative"]}, "ok": {"type": "boolean"}},
    "required": ["sentiment", "ok"],
    "additionalProperties": False,
}


def test_structured_output_always_parses_and_follows_the_schema(llama_dir: Path) -> None:
    import json

    from gristmill.serving.domain.generation import FormatKind, ResponseFormat

    generator = _load(llama_dir)
    try:
        prompt = generator.render_chat([ChatMessage("user", TEXTS[1])])
        schema = ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(SENTIMENT_SCHEMA))

        async def run() -> list[tuple[str, FinishReason | None]]:
            # Random weights, sampled: without the grammar these replies are noise.
            streams = [
                generator.submit(
                    _request(
                        f"j{seed}",
                        prompt,
                        96,
                        sampling=SamplingParams(temperature=1.0, seed=seed),
                        response_format=schema,
                    )
                )
                for seed in range(4)
            ]
            streams.append(
                generator.submit(
                    _request("any", prompt, 96, sampling=GREEDY, response_format=ResponseFormat(FormatKind.JSON_OBJECT))
                )
            )
            return [await _text(stream) for stream in streams]

        replies = asyncio.run(run())
        for text, reason in replies[:4]:
            assert reason is FinishReason.STOP, text
            value = json.loads(text)
            assert set(value) == {"sentiment", "ok"} and value["sentiment"] in ("positive", "negative")
            assert isinstance(value["ok"], bool)
        # Any JSON object: greedy noise may never close its first string, but what comes is an object's start,
        # and a reply that ended on its own parses.
        text, reason = replies[4]
        assert text.startswith("{")
        assert reason is FinishReason.LENGTH or isinstance(json.loads(text), dict)
        bad = ResponseFormat(FormatKind.JSON_SCHEMA, '{"type": "no-such-type"}')

        async def refused() -> None:
            generator.submit(_request("bad", prompt, 8, response_format=bad))

        with pytest.raises(InvalidArgumentError, match="response_format"):
            asyncio.run(refused())
    finally:
        generator.close()


def test_two_requests_with_the_same_id_cancel_only_themselves(llama_dir: Path) -> None:
    generator = _load(llama_dir)
    try:
        prompt = generator.encode_prompt(TEXTS[0])

        async def run() -> None:
            # Callers choose request ids (Triton clients often send "0"): they are not the runtime's handle.
            first = generator.submit(_request("0", prompt, 200))
            second = generator.submit(_request("0", prompt, 12, sampling=GREEDY))
            await first.__anext__()
            first.cancel()
            _, reason = await _text(second)
            assert reason in (FinishReason.STOP, FinishReason.LENGTH)

        asyncio.run(run())
        # The engine retires the cancelled sequence at its next step, which may come just after the second
        # reply's last token reached the caller (CI saw running == 1 here once); uncancelled, the first request
        # would run for its 200 tokens.
        deadline = time.monotonic() + 1.0
        while generator.stats().running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert generator.stats().running == 0
    finally:
        generator.close()


def test_min_tokens_keeps_the_end_of_sequence_token_out_until_reached(llama_dir: Path) -> None:
    from gristmill.serving.runtime.generation import _Sequence

    generator = _load(llama_dir)
    try:
        batcher = generator._batcher
        eos = generator.eos_ids[0]
        logits = torch.zeros((1, 400))
        logits[0, eos] = 10.0  # the end of the sequence is by far the most likely next token

        def next_token(generated: int, min_tokens: int) -> int:
            request = _request("m", [1, 2, 3], 50, sampling=SamplingParams(temperature=0.0, min_tokens=min_tokens))
            sequence = _Sequence(request, stream=None, generated=[7] * generated)  # type: ignore[arg-type]
            return batcher._sample(logits.clone(), [sequence])[0]

        assert next_token(generated=3, min_tokens=0) == eos
        assert next_token(generated=3, min_tokens=5) != eos
        assert next_token(generated=5, min_tokens=5) == eos
    finally:
        generator.close()


def test_prompts_of_very_different_lengths_prefilled_together_match_generate(llama_dir: Path) -> None:
    generator = _load(llama_dir)
    try:
        # Short and long prompts arriving at once: prefilled in groups of similar length, merged into one batch.
        texts = [TEXTS[0], " ".join(TEXTS * 3), TEXTS[2][:12], " ".join(TEXTS[1:] * 2)]
        prompts = [generator.render_chat([ChatMessage("user", text)]) for text in texts]
        assert max(map(len, prompts)) > 2 * min(map(len, prompts))
        expected = [greedy_tokens(llama_dir, p, 8) for p in prompts]

        async def run() -> list[list[int]]:
            streams = [_tokens(generator, _request(f"g{i}", p, 8, sampling=GREEDY)) for i, p in enumerate(prompts)]
            return [tokens for tokens, _ in await asyncio.gather(*streams)]

        assert asyncio.run(run()) == expected
    finally:
        generator.close()


def test_a_tiny_model_runs_on_one_thread_whatever_the_limit(llama_dir: Path) -> None:
    """A second OpenMP thread buys a model this small nothing and costs it 3-5x on a busy machine
    (``runtime/threads.py``)."""
    calls: list[int] = []

    def record(module: torch.nn.Module, args: object) -> None:
        if isinstance(module, PreTrainedModel):
            calls.append(torch.get_num_threads())

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        generator = _load(llama_dir, threads=2)
        generator.close()
    finally:
        hook.remove()
    assert calls and set(calls) == {1}
    assert serving_threads.threads_for_model(serving_threads.SMALL_MODEL_PARAMETERS, 2) == 2


def _threads_of_a_new_thread() -> int:
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_the_model_thread_warms_up_and_runs_with_its_threads_leaving_the_process_default(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tiny test model would get one thread (the next test); here it stands for a model big enough for two.
    monkeypatch.setattr(serving_threads, "SMALL_MODEL_PARAMETERS", 0)
    calls: list[tuple[str, int]] = []

    def record(module: torch.nn.Module, args: object) -> None:
        if isinstance(module, PreTrainedModel):
            calls.append((threading.current_thread().name, torch.get_num_threads()))

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the serving process's default (torch_threads)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        generator = _load(llama_dir, threads=2)
        try:
            # The warm-up ran on the model's thread, with its thread count, before the load returned.
            assert calls and set(calls) == {("assistant-batcher", 2)}
            warm_up = len(calls)
            prompt = generator.render_chat([ChatMessage("user", TEXTS[1])])
            asyncio.run(_tokens(generator, _request("t", prompt, 3, sampling=GREEDY)))
            assert len(calls) > warm_up and set(calls) == {("assistant-batcher", 2)}
            # Threads that start later (a classifier's batch workers, the next load) keep the process default.
            assert _threads_of_a_new_thread() == 1
        finally:
            generator.close()
    finally:
        hook.remove()
        torch.set_num_threads(before)


def test_a_warm_up_that_fails_fails_the_load_and_leaves_no_thread(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(model: object, tokenizer: object) -> None:
        raise RuntimeError("the forward pass failed")

    monkeypatch.setattr(runtime, "_warm_up", broken)
    before = {t for t in threading.enumerate() if t.name == "assistant-batcher"}
    with pytest.raises(RuntimeError, match="the forward pass failed"):
        _load(llama_dir)
    assert {t for t in threading.enumerate() if t.name == "assistant-batcher"} == before


@pytest.mark.parametrize("temperature", [0.3, 1.0, 8.0])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_the_nucleus_is_the_one_a_full_sort_finds(temperature: float, top_p: float) -> None:
    """Peaked rows end among the top candidates, flat ones (temperature 8) need the whole sort: both the same set."""
    rng = torch.Generator().manual_seed(3)
    for _ in range(20):
        probs = torch.softmax(torch.randn(5000, generator=rng) * 6 / temperature, dim=-1)
        ordered, order = torch.sort(probs, descending=True)
        wanted = order[ordered.cumsum(-1) - ordered < top_p]
        kept, ids = nucleus(probs, top_p)
        assert ids.tolist() == wanted.tolist()
        assert torch.equal(kept, probs[ids])
    assert nucleus(torch.tensor([0.2, 0.5, 0.3]), 0.6)[1].tolist() == [1, 2]


def test_draw_follows_the_weights_and_never_draws_a_zero_weight() -> None:
    weights = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])
    rng = torch.Generator().manual_seed(11)
    counts = torch.zeros(6)
    for _ in range(20_000):
        counts[draw(weights, rng)] += 1
    assert counts[0] == counts[2] == counts[5] == 0
    # Each share within 1.5 points of its weight (the standard error is at most 0.35 points here).
    assert torch.allclose(counts / counts.sum(), weights, atol=0.015)
    # Seeded: the same generator state, the same draws; unnormalised weights, the same distribution.
    first = [draw(weights, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert first == [draw(weights * 7, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert draw(torch.tensor([0.0, 0.0, 2.0]), None) == 2


# --------------------------------------------------------------------------- the service's settings


def test_the_services_generation_settings_reach_the_batcher(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"MAX_SEQUENCES": "3", "MAX_CACHE_TOKENS": "64", "MAX_QUEUE": "5", "MAX_PREFILL_TOKENS": "100"}
    settings |= {"PREFIX_CACHE_MIB": "0", "THREADS": "1"}
    for name, value in settings.items():
        monkeypatch.setenv(f"GRISTMILL_SERVING_GENERATION_{name}", value)
    limits = load_settings(ServingSettings).generation_limits()
    assert limits == EngineLimits(
        max_sequences=3, max_cache_tokens=64, max_queue=5, max_prefill_tokens=100, prefix_cache_bytes=0, threads=1
    )
    # Through the service's loader, as build_app makes it: the chat task hands the limits to the batcher.
    generator = TaskRuntimeLoader(trace=False, generation_limits=limits)(llama_dir, _resolved(), LoadOptions())
    assert isinstance(generator, TransformersGenerator)
    try:
        assert generator._batcher.limits == limits

        async def too_long() -> None:
            generator.submit(_request("long", [5] * 10, 60))

        with pytest.raises(InvalidArgumentError, match="exceed the deployment's cache budget of 64 tokens"):
            asyncio.run(too_long())
    finally:
        generator.close()


def test_generation_settings_default_to_the_engines_defaults_and_bad_ones_name_their_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ServingSettings().generation_limits() == EngineLimits()
    monkeypatch.setenv("GRISTMILL_SERVING_GENERATION_MAX_SEQUENCES", "0")
    with pytest.raises(ConfigurationError, match="GRISTMILL_SERVING_GENERATION_MAX_SEQUENCES='0'"):
        load_settings(ServingSettings)
    monkeypatch.setenv("GRISTMILL_SERVING_GENERATION_MAX_SEQUENCES", "8")
    monkeypatch.setenv("GRISTMILL_SERVING_GENERATION_PREFIX_CACHE_MIB", "-1")
    with pytest.raises(ConfigurationError, match="GRISTMILL_SERVING_GENERATION_PREFIX_CACHE_MIB='-1'"):
        load_settings(ServingSettings)
