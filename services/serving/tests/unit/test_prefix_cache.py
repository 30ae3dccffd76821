"""Automatic prefix caching: the cache's blocks (lookup, namespaces, eviction) and the batcher on a tiny Llama,
whose replies with prefixes found in the cache are the replies transformers' ``generate`` gives without it."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
import torch

from gristmill.core.chat import ChatMessage
from gristmill.serving.domain.generation import GenerationRequest, SamplingParams
from gristmill.serving.domain.sources import LoadOptions, ResolvedVersion
from gristmill.serving.runtime import generation as runtime
from gristmill.serving.runtime.generation import EngineLimits, TransformersGenerator, load_transformers_generator
from gristmill.serving.runtime.prefix_cache import BLOCK, LayerKV, PrefixCache
from services.serving.tests.support import greedy_tokens, merged_greedy_tokens
from tests.support.tiny_model import make_tiny_llama, make_tiny_lora_adapter

GREEDY = SamplingParams(temperature=0.0)
TEXTS = [
    "the service was quick and the staff were friendly",
    "the parcel arrived broken and nobody answered my mail",
    "great value for the money, would buy again",
    "the battery died after two days of light use",
]
# A shared instruction before each review, as a deployment's prompts have (a system prompt, a task).
INSTRUCTION = "read the review and answer whether the customer was happy with the service and the parcel: "


# --------------------------------------------------------------------------- the cache


def _kv_of(tokens: list[int], layers: int = 2) -> LayerKV:
    """Fake keys and values whose every entry is its token's id (values: minus it), [heads 2, tokens, dim 3]."""
    ids = torch.tensor(tokens, dtype=torch.float32).view(1, -1, 1).expand(2, -1, 3).contiguous()
    return [(ids + layer, -ids - layer) for layer in range(layers)]


def _store(cache: PrefixCache, prompt: list[int], namespace: str = "base") -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []

    def kv(start: int, end: int) -> LayerKV:
        calls.append((start, end))
        return _kv_of(prompt[start:end])

    cache.store(namespace, prompt, kv)
    return calls


def test_a_lookup_finds_whole_blocks_and_leaves_a_token_to_compute() -> None:
    cache = PrefixCache(max_bytes=1 << 20, block=4)
    prompt = list(range(100, 110))  # 10 tokens: 2 whole blocks
    assert _store(cache, prompt) == [(0, 8)]
    assert _store(cache, prompt) == [], "a prompt stored once is not gathered again"

    length, layers = cache.lookup("base", [*prompt[:8], 7, 7])
    assert length == 8 and layers is not None and len(layers) == 2
    keys, values = layers[1]
    assert keys.shape == (2, 8, 3) and torch.equal(keys[0, :, 0], torch.arange(101.0, 109.0))
    assert torch.equal(values, -keys)
    # The same 8 tokens as a whole prompt: the last block stays to compute (its forward gives the first token).
    assert cache.lookup("base", prompt[:8])[0] == 4
    assert cache.lookup("base", prompt[:3])[0] == 0
    # A prompt that differs inside the second block reuses the first only.
    assert cache.lookup("base", [*prompt[:6], 1, 1, 1, 1])[0] == 4
    assert cache.lookup("base", [1, *prompt])[0] == 0
    assert (cache.hit_tokens, cache.looked_up_tokens) == (16, 10 + 8 + 3 + 10 + 11)


def test_blocks_are_kept_per_namespace_and_extended_where_a_stored_prefix_ends() -> None:
    cache = PrefixCache(max_bytes=1 << 20, block=4)
    shared = list(range(100, 108))
    assert _store(cache, [*shared, 1]) == [(0, 8)]
    assert cache.lookup("adapter-a", [*shared, 1])[0] == 0, "another adapter's keys and values differ"
    # A longer prompt with the same start gathers only its new blocks, and the lookup joins both stores.
    longer = [*shared, 5, 6, 7, 8, 9]
    assert _store(cache, longer) == [(8, 12)]
    length, layers = cache.lookup("base", longer)
    assert length == 12 and layers is not None
    assert torch.equal(layers[0][0][0, :, 0], torch.tensor([float(t) for t in longer[:12]]))


BLOCK_BYTES = 4 * 2 * (2 * 3 * 4) * 2  # 4 tokens x 2 layers x (2 heads x 3 dims x 4 bytes) x keys and values


def test_the_least_recently_used_blocks_leave_beyond_the_budget() -> None:
    cache = PrefixCache(max_bytes=8 * BLOCK_BYTES, block=4)  # 8 blocks, at most 2 new ones per prompt
    prompts = [[*range(start, start + 8), 0] for start in (100, 200, 300, 400, 500)]
    for prompt in prompts[:4]:
        _store(cache, prompt)
    assert cache.bytes == 8 * BLOCK_BYTES
    assert cache.lookup("base", prompts[0])[0] == 8  # used again: now the most recent
    _store(cache, prompts[4])  # the two oldest blocks leave: the second prompt's
    assert cache.bytes == 8 * BLOCK_BYTES
    assert [cache.lookup("base", p)[0] for p in prompts] == [8, 0, 8, 8, 8]
    cache.clear()
    assert cache.bytes == 0 and cache.lookup("base", prompts[4])[0] == 0


def test_one_prompt_adds_at_most_a_quarter_of_the_budget() -> None:
    cache = PrefixCache(max_bytes=8 * BLOCK_BYTES, block=4)
    # The first store learns the size of a token from what it gathered: it keeps 2 of the 10 blocks.
    first = [*range(2000, 2040), 0]
    assert _store(cache, first) == [(0, 40)]
    assert cache.bytes == 2 * BLOCK_BYTES and cache.lookup("base", first)[0] == 8
    # From then on a long prompt gathers only the 2 new blocks it may keep, after those found.
    shared = list(range(100, 108))
    _store(cache, [*shared, 0])
    long = [*shared, *range(1000, 1032), 0]
    assert _store(cache, long) == [(8, 16)]
    assert cache.bytes == 6 * BLOCK_BYTES
    assert cache.lookup("base", long)[0] == 16
    assert cache.lookup("base", first)[0] == 8, "the long prompts pushed nothing out"


def test_a_budget_of_zero_keeps_nothing() -> None:
    cache = PrefixCache(max_bytes=0, block=4)
    assert _store(cache, list(range(20))) == []
    assert cache.lookup("base", list(range(20)))[0] == 0


# --------------------------------------------------------------------------- the batcher


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = [INSTRUCTION + text for text in TEXTS] * 4
    return make_tiny_llama(tmp_path_factory.mktemp("llama"), corpus, initializer_range=0.2)


def _resolved() -> ResolvedVersion:
    return ResolvedVersion(registered_model_name="assistant", version=1, task="TASK_TYPE_CHAT")


def _replies(generator: runtime.GenerativeModel, prompts: list[list[int]], budget: int) -> list[list[int]]:
    async def one(index: int, prompt: list[int]) -> list[int]:
        request = GenerationRequest(f"p{index}", tuple(prompt), budget, sampling=GREEDY)
        return [t for chunk in [c async for c in generator.submit(request)] for t in chunk.token_ids]

    async def run() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    return asyncio.run(run())


def test_prompts_that_start_alike_reuse_the_prefix_and_reply_as_generate_does(llama_dir: Path) -> None:
    generator = load_transformers_generator(llama_dir, _resolved(), LoadOptions())
    assert isinstance(generator, TransformersGenerator)
    try:
        prompts = [generator.render_chat([ChatMessage("user", INSTRUCTION + text)]) for text in TEXTS]
        shared = sum(1 for _ in itertools.takewhile(lambda column: len(set(column)) == 1, zip(*prompts, strict=False)))
        assert shared >= 2 * BLOCK, "the prompts should share whole blocks"
        expected = [greedy_tokens(llama_dir, p, 10) for p in prompts]

        # One prompt alone: nothing to reuse; it leaves its blocks in the cache.
        assert _replies(generator, prompts[:1], 10) == expected[:1]
        assert generator.stats().prefix_hit_tokens == 0
        # The others together: each finds the shared blocks (and the first prompt all but its last block).
        assert _replies(generator, prompts, 10) == expected
        stats = generator.stats()
        whole = shared // BLOCK * BLOCK
        assert stats.prefix_hit_tokens >= 3 * whole + (len(prompts[0]) - 1) // BLOCK * BLOCK
        assert stats.prompt_tokens == len(prompts[0]) + sum(map(len, prompts))
        # Nothing of the reused prefixes stays in the running batch.
        assert (stats.running, stats.cached_tokens, stats.reserved_tokens) == (0, 0, 0)
    finally:
        generator.close()


def test_a_prompt_with_a_cached_prefix_prefilled_beside_one_without_matches_generate(llama_dir: Path) -> None:
    generator = load_transformers_generator(llama_dir, _resolved(), LoadOptions())
    try:
        warm = generator.render_chat([ChatMessage("user", INSTRUCTION + TEXTS[0])])
        _replies(generator, [warm], 2)
        before = generator.stats().prefix_hit_tokens
        # Admitted together: one row reuses the instruction's blocks, the other (another start) cannot.
        prompts = [
            generator.render_chat([ChatMessage("user", INSTRUCTION + TEXTS[3])]),
            generator.render_chat([ChatMessage("user", TEXTS[1] + " " + TEXTS[2])]),
        ]
        expected = [greedy_tokens(llama_dir, p, 12) for p in prompts]
        assert _replies(generator, prompts, 12) == expected
        assert generator.stats().prefix_hit_tokens > before
    finally:
        generator.close()


def test_without_a_prefix_budget_nothing_is_reused_and_replies_are_the_same(llama_dir: Path) -> None:
    generator = load_transformers_generator(
        llama_dir, _resolved(), LoadOptions(), limits=EngineLimits(prefix_cache_bytes=0)
    )
    try:
        prompts = [generator.render_chat([ChatMessage("user", INSTRUCTION + text)]) for text in TEXTS[:2]]
        expected = [greedy_tokens(llama_dir, p, 6) for p in prompts]
        assert _replies(generator, prompts, 6) == expected
        assert _replies(generator, prompts, 6) == expected
        assert generator.stats().prefix_hit_tokens == 0
    finally:
        generator.close()


def test_an_adapter_never_reuses_the_base_model_s_prefixes(llama_dir: Path, tmp_path: Path) -> None:
    adapter = make_tiny_lora_adapter(llama_dir, tmp_path / "a1", seed=1, link_base=True)
    generator = load_transformers_generator(adapter, ResolvedVersion("bot", 1, task="TASK_TYPE_CHAT"), LoadOptions())
    try:
        assert isinstance(generator, runtime.AdapterGenerator)
        prompt = generator.render_chat([ChatMessage("user", INSTRUCTION + TEXTS[0])])
        batcher = generator.shared.batcher
        # The base model's keys and values of this very prompt are in the cache, under the base's namespace.
        base_request = GenerationRequest("base", tuple(prompt), 2, sampling=GREEDY)

        async def base_reply() -> None:
            async for _ in batcher.submit(base_request):
                pass

        asyncio.run(base_reply())
        before = generator.stats().prefix_hit_tokens
        expected = merged_greedy_tokens(adapter, prompt, 10)
        assert _replies(generator, [prompt], 10) == [expected]
        assert generator.stats().prefix_hit_tokens == before, "the adapter's row must not reuse the base's prefix"
        # Its own second request does.
        assert _replies(generator, [prompt], 10) == [expected]
        assert generator.stats().prefix_hit_tokens > before
    finally:
        generator.close()
