"""Chat SFT on a causal LM: conversations rendered with the chat template, the loss on assistant tokens only,
and padding-free packing. Plain torch + transformers + TRL, no Ray, so it is tested on its own.

**Templating and masks.** A conversation is rendered once with ``tokenizer.apply_chat_template`` (the
tokens serving's ``apply_chat_template`` will produce) and tokenised with character offsets. The assistant
tokens are the ones overlapping an assistant turn's characters, which come from:

- the template's ``{% generation %}`` markers when it has them (transformers' ``return_assistant_tokens_mask``,
  what TRL's ``SFTTrainer(assistant_only_loss=True)`` uses);
- otherwise (most templates, ChatML among them) the renderings of the conversation's prefixes: assistant turn
  *i* spans from the end of ``messages[:i]`` rendered with the generation prompt to the end of
  ``messages[:i+1]``, so it covers the reply and the template's end-of-turn token (the model learns to stop),
  never the ``<|im_start|>assistant`` header. A template that renders an earlier turn differently once later
  turns follow (not prefix-preserving) is refused with ``ChatTemplateError``: give it generation markers.

Labels are the input ids with every other token set to -100. A conversation longer than ``max_length`` is cut
at ``max_length`` (its assistant tokens before the cut still train); one left with no assistant token is
dropped.

**Packing.** TRL's ``DataCollatorForLanguageModeling(padding_free=True)`` concatenates a batch's conversations
into one row without padding; ``position_ids`` restart at 0 for each, and the collator masks the label of each
conversation's first token (nothing of the previous one may predict it). Isolation comes from the model:
transformers' mask builder (``masking_utils.find_packed_sequence_indices``) turns restarting position ids
into a block-diagonal causal mask for the SDPA and eager kernels, and flash-attention kernels take the
collator's ``cu_seq_lens_*``. It does so only without a KV cache, so every forward here passes
``use_cache=False`` (a model in train mode would otherwise build a cache and attend across conversations).
The unit tests check that a conversation's logits are the same packed after another as alone. On CPU the
packed row costs attention over the whole row (masked, not skipped), quadratic in the row's length; batches
of short conversations keep that small, and GPU varlen kernels skip the masked blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from gristmill.training.tasks.base import EncodingError

IGNORE_INDEX = -100
ASSISTANT = "assistant"


class ChatTemplateError(EncodingError):
    """The chat template cannot render a conversation, or not in a way assistant tokens can be found."""

    field = "spec.chat_template"


class NothingToLearnError(EncodingError):
    """No conversation of a split keeps an assistant token within the maximum sequence length."""

    field = "spec.hyper_parameters.max_sequence_length"


Message = Mapping[str, Any]


def has_generation_markers(template: str) -> bool:
    from trl.chat_template_utils import has_generation_markers as trl_has_generation_markers

    return bool(trl_has_generation_markers(template))


def _render(tokenizer: Any, messages: Sequence[Message], *, generation_prompt: bool = False) -> str:
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2 raises TemplateError and friends; templates raise_exception() on bad input
        raise ChatTemplateError(f"the chat template cannot render the conversation: {_one_line(exc)}") from None
    if not isinstance(text, str):
        raise ChatTemplateError("the chat template did not render a string")
    return text


def assistant_spans(tokenizer: Any, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (prefix renderings)."""
    text = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message.get("role") != ASSISTANT:
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True) if index else ""
        through = _render(tokenizer, messages[: index + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise ChatTemplateError(
                f"the chat template renders assistant turn {index + 1} differently once later turns follow (it is not "
                "prefix-preserving), so its tokens cannot be found; give the template {% generation %} / "
                "{% endgeneration %} markers around assistant replies"
            )
        spans.append((len(before), len(through)))
    return text, spans


def _overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token overlapping a span (both in order, so one pass), as transformers marks generation spans."""
    mask = [0] * len(offsets)
    span = 0
    for token, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if end > spans[span][0]:
            mask[token] = 1
    return mask


def tokenize_conversation(tokenizer: Any, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """(input ids, assistant mask) of one conversation, as the chat template renders it."""
    from gristmill.training.ml.modeling import default_chat_template

    template = default_chat_template(tokenizer)
    if template and has_generation_markers(template):
        try:
            out = tokenizer.apply_chat_template(list(messages), return_dict=True, return_assistant_tokens_mask=True)
        except Exception as exc:
            raise ChatTemplateError(f"the chat template cannot render the conversation: {_one_line(exc)}") from None
        return list(out["input_ids"]), list(out["assistant_masks"])
    text, spans = assistant_spans(tokenizer, messages)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ChatTemplateError("finding assistant tokens needs a fast tokenizer (character offsets)") from None
    return list(encoded["input_ids"]), _overlap_mask(encoded["offset_mapping"], spans)


def sft_example(tokenizer: Any, messages: Sequence[Message], max_length: int) -> dict[str, list[int]] | None:
    """TRL's tokenised language-modelling example (``input_ids`` and ``labels``, -100 off the assistant turns),
    cut at ``max_length``; None when no assistant token is left to learn (one at position 0 never is: nothing
    precedes it)."""
    ids, mask = tokenize_conversation(tokenizer, messages)
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask[1:]):
        return None
    return {"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]}


@dataclass(frozen=True)
class ChatSplit:
    """One split's conversations, tokenised: TRL examples (``input_ids``, ``labels``)."""

    examples: list[dict[str, list[int]]]
    # Conversations left out: no assistant token within the maximum length.
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.examples)


def encode(tokenizer: Any, conversations: Sequence[Sequence[Message]], max_length: int) -> ChatSplit:
    examples = []
    for messages in conversations:
        example = sft_example(tokenizer, messages, max_length)
        if example is not None:
            examples.append(example)
    if conversations and not examples:
        raise NothingToLearnError(
            f"none of the {len(conversations)} conversations keeps an assistant token within max_sequence_length "
            f"{max_length}; raise hyper_parameters.max_sequence_length"
        )
    return ChatSplit(examples, dropped=len(conversations) - len(examples))


@dataclass(frozen=True)
class PackedBatch:
    """Conversations packed into one row by TRL's padding-free collator: ``inputs`` are the model's keyword
    arguments (``input_ids``, ``position_ids``, ``labels`` and the flash-attention sequence boundaries)."""

    inputs: dict[str, Any]
    conversations: int
    # Tokens whose label counts (the loss's denominator).
    label_tokens: int = field(default=0)

    @property
    def size(self) -> int:
        return self.conversations

    def to(self, device: torch.device) -> PackedBatch:
        if device.type == "cpu":
            return self
        moved = {
            key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in self.inputs.items()
        }
        return PackedBatch(moved, self.conversations, self.label_tokens)


def collate(split: ChatSplit, indices: Sequence[int], pad_id: int) -> PackedBatch:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)
    inputs = dict(collator([split.examples[i] for i in indices]))
    labels = inputs["labels"]
    # The loss shifts labels left by one: the first label never counts.
    return PackedBatch(inputs, len(indices), int((labels[:, 1:] != IGNORE_INDEX).sum()))


def forward(model: torch.nn.Module, batch: PackedBatch) -> Any:
    """The model on a packed batch; no KV cache, so the packed conversations stay isolated (see the module)."""
    return model(**batch.inputs, use_cache=False)


def loss(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    value: torch.Tensor = forward(model, batch).loss
    return value


class CausalLMEvaluation:
    """Summed token cross-entropy and token count over assistant tokens; scored as loss and perplexity."""

    def __init__(self, device: torch.device, autocast: Callable[[], AbstractContextManager[Any]]) -> None:
        self.autocast = autocast
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)

    def add(self, model: torch.nn.Module, batch: PackedBatch) -> None:
        if not batch.label_tokens:
            return
        with self.autocast():
            mean = forward(model, batch).loss
        self.sums[0] += mean.double() * batch.label_tokens
        self.sums[1] += batch.label_tokens

    def totals(self) -> torch.Tensor:
        return self.sums

    def scores(self, totals: torch.Tensor) -> dict[str, float]:
        tokens = float(totals[1])
        loss = float(totals[0]) / tokens if tokens else 0.0
        # exp overflows past ~709; a perplexity that large means "untrained" either way.
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def _one_line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]
