"""Paraphrases of the train split by a generative model (few labels): each text reworded by an instruction-tuned
causal LM, asked in a chat turn, with the example's label kept.

Sampled (temperature 0.7, top-p 0.9) so that copies differ, and seeded by the job's seed and the copy, so a
resumed run trains on the same texts. A reply that is empty once cleaned keeps the original text: every copy
has as many examples as the split, whatever the model answers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gristmill.training.ml.ranks import each_chunk_once

PROMPT = (
    "Paraphrase this text in different words. Keep its meaning and its sentiment. Answer with the paraphrase "
    "only.\n\nText: {text}"
)
BATCH = 16
TEMPERATURE = 0.7
TOP_P = 0.9
# A paraphrase runs about as long as its text: the longest text of the batch in tokens, twice, plus some slack;
# never more than this.
MAX_NEW_TOKENS = 96


def clean(reply: str) -> str:
    """The paraphrase in a reply: its first non-empty line, without a leading label or surrounding quotes."""
    for line in reply.strip().splitlines():
        line = line.strip()
        for label in ("Paraphrase:", "Text:", "Paraphrased text:"):
            if line.lower().startswith(label.lower()):
                line = line[len(label) :].strip()
        line = line.strip().strip('"').strip("\u201c\u201d").strip()
        if line:
            return line
    return ""


def paraphrase(
    examples: Sequence[Any],
    model_dir: Path,
    *,
    copies: int,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> list[Any]:
    """``examples`` followed by ``copies`` paraphrased copies of each (dataclasses with a ``text`` field). With
    several workers each generates a share of the batches (``ranks.each_chunk_once``); every batch is seeded by
    its place, so the texts are the same whatever the number of workers."""
    if copies <= 0 or not examples:
        return list(examples)
    from gristmill.training.ml import modeling

    tokenizer = modeling.load_tokenizer(model_dir)
    tokenizer.padding_side = "left"  # generation continues every row from its own last token
    model: Any = modeling.load_causal_lm(model_dir).to(device).eval()
    chunks = [(copy, start) for copy in range(copies) for start in range(0, len(examples), BATCH)]

    def generate(chunk: int) -> list[str]:
        copy, start = chunks[chunk]
        texts = [e.text for e in examples[start : start + BATCH]]
        return _generate(model, tokenizer, texts, seed * 1_000_003 + copy * 10_007 + start)

    replies = each_chunk_once(len(chunks), generate, rank=rank, world_size=world_size)
    extra: list[Any] = []
    for (_, start), batch_replies in zip(chunks, replies, strict=True):
        batch = examples[start : start + BATCH]
        extra.extend(
            dataclasses.replace(e, text=clean(reply) or e.text) for e, reply in zip(batch, batch_replies, strict=True)
        )
    return [*examples, *extra]


def _generate(model: Any, tokenizer: Any, texts: list[str], seed: int) -> list[str]:
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT.format(text=text)}], tokenize=False, add_generation_prompt=True
        )
        for text in texts
    ]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    longest = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        output = model.generate(
            **inputs,
            do_sample=True,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            max_new_tokens=min(MAX_NEW_TOKENS, 2 * longest + 8),
            pad_token_id=tokenizer.pad_token_id,
        )
    new = output[:, inputs["input_ids"].shape[1] :]
    return [str(text) for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
