"""The KV cache of prompt prefixes the model has seen (automatic prefix caching, as vLLM and SGLang do it).

Prompts of one deployment mostly start alike: the chat template, the system prompt, an instruction. Their keys and
values depend only on the tokens before them (causal attention, positions counted from the prompt's start), so a
prompt that starts with a prefix prefilled before needs only its remaining tokens computed. SmolLM2's benchmark
prompts share 61 of their ~81 tokens.

Prefixes are kept in blocks of ``BLOCK`` tokens. A block is found by its own tokens and the block before it (an
exact key, not a hash), within a namespace: the LoRA adapter a row runs with changes its keys and values. Blocks
are evicted least recently used first, within a budget of bytes; one prompt adds at most a quarter of it (its start
is what other prompts share: a long prompt's tail would otherwise push out the blocks every prompt uses). A lookup
leaves at least one token of the prompt to compute: its forward pass gives the first token of the reply.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

BLOCK = 8

# Per layer: keys and values of some tokens, [heads, tokens, head dim].
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Block:
    id: int
    # The tensors this block is a slice of (one store's gathered keys and values, shared by its blocks), and where.
    base: LayerKV
    start: int
    bytes: int


class PrefixCache:
    """Blocks of prefix keys and values, least recently used out first beyond ``max_bytes``. Not thread-safe:
    the model's thread uses it, and whoever swaps the model clears it under the model's lock."""

    def __init__(self, max_bytes: int, block: int = BLOCK) -> None:
        self.max_bytes = max_bytes
        self.block = block
        self._blocks: OrderedDict[tuple[str, int, tuple[int, ...]], _Block] = OrderedDict()
        self._ids = itertools.count(1)
        self.bytes = 0
        # Bytes of one token's keys and values over all layers (known from the first store).
        self._token_bytes: int | None = None
        # Prompt tokens looked up, and those found (counters since the start).
        self.looked_up_tokens = 0
        self.hit_tokens = 0

    def lookup(self, namespace: str, prompt: Sequence[int]) -> tuple[int, LayerKV | None]:
        """The longest cached prefix of ``prompt`` that leaves at least one token: (its length, per layer its keys
        and values) or (0, None)."""
        self.looked_up_tokens += len(prompt)
        chain = self._chain(namespace, prompt, (len(prompt) - 1) // self.block)
        if not chain:
            return 0, None
        length = len(chain) * self.block
        self.hit_tokens += length
        return length, self._gather(chain)

    def store(self, namespace: str, prompt: Sequence[int], kv: Callable[[int, int], LayerKV]) -> None:
        """Keep the whole blocks of ``prompt`` not cached yet; ``kv(start, end)`` gives the keys and values of its
        tokens ``start:end`` (called once, only when something is missing)."""
        if self.max_bytes <= 0:
            return
        whole = len(prompt) // self.block
        chain = self._chain(namespace, prompt, whole)
        if self._token_bytes is not None:
            whole = min(whole, len(chain) + self._blocks_per_prompt())
        if len(chain) >= whole:
            return
        start = len(chain) * self.block
        base = kv(start, whole * self.block)
        if self._token_bytes is None:
            self._token_bytes = sum(k[:, :1].nbytes + v[:, :1].nbytes for k, v in base)
            whole = min(whole, len(chain) + self._blocks_per_prompt())
        parent = chain[-1].id if chain else 0
        for index in range(len(chain), whole):
            tokens = tuple(prompt[index * self.block : (index + 1) * self.block])
            block = _Block(next(self._ids), base, index * self.block - start, self._token_bytes * self.block)
            self._blocks[(namespace, parent, tokens)] = block
            self.bytes += block.bytes
            parent = block.id
        while self.bytes > self.max_bytes and self._blocks:
            _, evicted = self._blocks.popitem(last=False)
            self.bytes -= evicted.bytes

    def _blocks_per_prompt(self) -> int:
        assert self._token_bytes is not None
        return self.max_bytes // 4 // (self._token_bytes * self.block)

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0

    def _chain(self, namespace: str, prompt: Sequence[int], limit: int) -> list[_Block]:
        """The cached blocks that start ``prompt``, at most ``limit``, each marked as just used."""
        chain: list[_Block] = []
        parent = 0
        for index in range(limit):
            key = (namespace, parent, tuple(prompt[index * self.block : (index + 1) * self.block]))
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            chain.append(block)
            parent = block.id
        return chain

    def _gather(self, chain: list[_Block]) -> LayerKV:
        """Per layer, the chain's keys and values as one tensor each: a slice when its blocks are adjacent in one
        store's tensors (the usual case: a shared prefix stored once), else the slices of each run concatenated."""
        runs: list[tuple[LayerKV, int, int]] = []  # (base, start, end)
        for block in chain:
            if runs and runs[-1][0] is block.base and runs[-1][2] == block.start:
                base, start, _ = runs[-1]
                runs[-1] = (base, start, block.start + self.block)
            else:
                runs.append((block.base, block.start, block.start + self.block))
        layers: LayerKV = []
        for layer in range(len(chain[0].base)):
            keys = [base[layer][0][:, start:end] for base, start, end in runs]
            values = [base[layer][1][:, start:end] for base, start, end in runs]
            if len(runs) == 1:
                layers.append((keys[0], values[0]))
            else:
                layers.append((torch.cat(keys, dim=1), torch.cat(values, dim=1)))
        return layers
