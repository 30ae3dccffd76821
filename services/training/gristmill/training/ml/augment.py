"""Rule-based data augmentation for text classification with few labels (EDA's swap and deletion edits).

Each training example gets ``copies`` extra copies, each edited by one rule chosen at random: swap two words,
``max(1, probability * words)`` times; or drop each word with ``probability`` (never every word). Labels are kept.
Only the train split is augmented, and the edits are seeded (the job's seed), so a resumed run trains on exactly
the same examples. Plain Python: no torch, no lexicon.

EDA also replaces words by synonyms and inserts them; both need a thesaurus, and no maintained offline English
lexicon is installable from a package index here, so those two are not offered.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

SWAP = "swap"
DELETE = "delete"


def random_swap(words: list[str], times: int, rng: random.Random) -> list[str]:
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(times):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], probability: float, rng: random.Random) -> list[str]:
    if len(words) < 2:
        return list(words)
    kept = [word for word in words if rng.random() >= probability]
    # Never the empty text: keep one word at random, as EDA does.
    return kept or [rng.choice(words)]


def edit(text: str, probability: float, rng: random.Random) -> str:
    """One augmented variant of ``text`` (whitespace-separated words; other whitespace becomes one space)."""
    words = text.split()
    if rng.random() < 0.5:
        return " ".join(random_swap(words, max(1, int(probability * len(words))), rng))
    return " ".join(random_deletion(words, probability, rng))


def augment(examples: Sequence[Any], *, copies: int, probability: float, seed: int) -> list[Any]:
    """``examples`` followed by ``copies`` edited copies of each (dataclasses with a ``text`` field)."""
    if copies <= 0:
        return list(examples)
    rng = random.Random(seed)
    extra = [
        dataclasses.replace(example, text=edit(example.text, probability, rng))
        for _ in range(copies)
        for example in examples
    ]
    return [*examples, *extra]
