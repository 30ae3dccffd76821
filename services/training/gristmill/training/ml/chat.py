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

**Evaluation by generation.** Once training ended, the model replies (greedy) to the first
``GENERATION_EXAMPLES`` test conversations: the prompt is the conversation up to its last assistant turn,
rendered with the chat template and its generation prompt; the reference is that turn. A reply stops at EOS or
the template's end-of-turn token, and at the reference's length in tokens plus ``GENERATION_MARGIN_TOKENS``
(within the model's context), which bounds the cost. ``exact_match`` compares reply and reference after
stripping whitespace; ``rouge_l`` is the ROUGE-L F-measure (longest common subsequence over whitespace tokens).
Replies whose reference is a JSON object (structured output) are also scored as JSON (``reply_scores``):
``json_valid``, the reply is a JSON object with the reference's top-level keys, and for each of the job's
``json_match_keys`` K that the reference holds, ``json_match_<K>``, the reply's K value equals the reference's
(strings compared after stripping whitespace and case folding). Each metric is the mean over the replies it
applies to, and is absent when it applies to none. DPO scores its test prompts' replies against the chosen reply
with the same evaluation (``conversation_of`` turns a pair into the conversation it scores).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from gristmill.training.domain.objectives import JSON_VALID_METRIC, json_match_metric
from gristmill.training.tasks.base import EncodingError, SampleGeneration

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
    # The conversations' tokens (``TrainingBatch.tokens``; a packed row has no padding).
    tokens: int
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
        return PackedBatch(moved, self.conversations, self.tokens, self.label_tokens)


def collate(split: ChatSplit, indices: Sequence[int], pad_id: int) -> PackedBatch:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)
    examples = [split.examples[i] for i in indices]
    inputs = dict(collator(examples))
    labels = inputs["labels"]
    tokens = sum(len(example["input_ids"]) for example in examples)
    # The loss shifts labels left by one: the first label never counts.
    return PackedBatch(inputs, len(indices), tokens, int((labels[:, 1:] != IGNORE_INDEX).sum()))


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


# Generation on the test split: at most this many conversations (over all ranks), replies at most the reference's
# length plus this margin in tokens, at most this many prompts per generate call and this many tokens (prompt and
# reply room, padded, over the rows: what the KV cache holds), this many samples kept for the card. The token bound
# lets short chat prompts share one call (SmolLM2's 20 demo conversations of ~160 tokens: 1 call, not 3 of 8),
# while long ones batch as few as before (8 prompts of 1,000 tokens).
GENERATION_EXAMPLES = 64
GENERATION_MARGIN_TOKENS = 16
GENERATION_BATCH_SIZE = 32
GENERATION_BATCH_TOKENS = 8192
SAMPLE_GENERATIONS = 5


def prompt_and_reference(messages: Sequence[Message]) -> tuple[list[dict[str, Any]], str]:
    """The conversation up to its last assistant turn, and that turn's text (the reference reply)."""
    last = max(index for index, message in enumerate(messages) if message.get("role") == ASSISTANT)
    return [dict(m) for m in messages[:last]], str(messages[last].get("content") or "")


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (dynamic programming, two rows)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(generation: str, reference: str) -> float:
    """ROUGE-L F-measure over whitespace tokens: the harmonic mean of LCS / generated tokens and LCS / reference
    tokens (1 when both are empty)."""
    generated, expected = generation.split(), reference.split()
    if not generated or not expected:
        return float(generated == expected)
    common = lcs_length(generated, expected)
    if not common:
        return 0.0
    precision, recall = common / len(generated), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(generation: str, reference: str) -> float:
    return float(generation.strip() == reference.strip())


def json_object(text: str) -> dict[str, Any] | None:
    """What ``text`` holds (whitespace stripped) when it is a JSON object; None for invalid JSON, another JSON value,
    or an object inside a markdown code fence (not JSON)."""
    try:
        value = json.loads(text.strip())
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def json_values_equal(generated: Any, expected: Any) -> bool:
    """Whether two parsed JSON values are equal, strings (also inside lists and objects) compared after stripping
    whitespace and case folding; true and 1 differ (Python's ``True == 1`` does not count)."""
    if isinstance(generated, str) and isinstance(expected, str):
        return generated.strip().casefold() == expected.strip().casefold()
    if isinstance(generated, bool) or isinstance(expected, bool):
        return generated is expected
    if isinstance(generated, dict) and isinstance(expected, dict):
        return generated.keys() == expected.keys() and all(
            json_values_equal(generated[k], v) for k, v in expected.items()
        )
    if isinstance(generated, list) and isinstance(expected, list):
        return len(generated) == len(expected) and all(
            json_values_equal(g, e) for g, e in zip(generated, expected, strict=True)
        )
    # Numbers and null; a string, list or object against another kind of value is never equal.
    return bool(generated == expected)


def generation_metric_names(json_match_keys: Sequence[str] = ()) -> tuple[str, ...]:
    """Every metric ``reply_scores`` may report, in a fixed order (the accumulator's layout)."""
    return ("exact_match", "rouge_l", JSON_VALID_METRIC, *(json_match_metric(key) for key in json_match_keys))


def reply_scores(generation: str, reference: str, json_match_keys: Sequence[str] = ()) -> dict[str, float]:
    """One reply's scores against its reference: ``exact_match`` and ``rouge_l`` always; when the reference is a JSON
    object, ``json_valid`` (the reply is a JSON object with the same top-level keys) and, for each key K of
    ``json_match_keys`` the reference holds, ``json_match_<K>`` (the reply is a JSON object whose K value equals
    the reference's). A metric that does not apply to this reference is left out (it is not a miss)."""
    scores = {"exact_match": exact_match(generation, reference), "rouge_l": rouge_l(generation, reference)}
    expected = json_object(reference)
    if expected is None:
        return scores
    generated = json_object(generation)
    scores[JSON_VALID_METRIC] = float(generated is not None and generated.keys() == expected.keys())
    for key in json_match_keys:
        if key in expected:
            scores[json_match_metric(key)] = float(
                generated is not None and key in generated and json_values_equal(generated[key], expected[key])
            )
    return scores


def stop_token_ids(tokenizer: Any, model: torch.nn.Module | None = None) -> list[int]:
    """The tokens that end a reply: EOS (the tokenizer's and the model's generation config's) and the chat template's
    end-of-turn token (the special token a rendered assistant turn ends with, ChatML's ``<|im_end|>``)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids.update([value] if isinstance(value, int) else list(value or ()))
    probe = "gristmill-probe-reply"
    try:
        rendered = _render(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}])
    except ChatTemplateError:
        return sorted(ids)
    after = rendered[rendered.rfind(probe) + len(probe) :] if probe in rendered else ""
    if after.strip():
        first = tokenizer(after.lstrip(), add_special_tokens=False)["input_ids"][:1]
        ids.update(t for t in first if t in set(tokenizer.all_special_ids))
    return sorted(ids)


def _context_length(model: torch.nn.Module) -> int | None:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


@dataclass(frozen=True)
class _Prompt:
    messages: list[dict[str, Any]]
    reference: str
    ids: list[int]
    # The most tokens the reply may have.
    budget: int


class ChatGenerationEvaluation:
    """Greedy replies to test conversations, scored against the reference (``reply_scores``): per metric, the summed
    scores and the count of replies it applies to; the first ``SAMPLE_GENERATIONS`` replies are kept for the model
    card. ``conversation_of`` turns an example into the conversation scored (SFT's examples are conversations)."""

    def __init__(
        self,
        tokenizer: Any,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager[Any]],
        *,
        json_match_keys: Sequence[str] = (),
        conversation_of: Callable[[Any], Sequence[Message]] | None = None,
        margin: int = GENERATION_MARGIN_TOKENS,
        batch_size: int = GENERATION_BATCH_SIZE,
        batch_tokens: int = GENERATION_BATCH_TOKENS,
        keep: int = SAMPLE_GENERATIONS,
    ) -> None:
        self.tokenizer = tokenizer
        self.device = device
        self.autocast = autocast
        self.json_match_keys = tuple(json_match_keys)
        self.conversation_of = conversation_of
        self.margin = margin
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.keep = keep
        self.metrics = generation_metric_names(self.json_match_keys)
        # Metric i's summed scores at 2i, the replies it applied to at 2i + 1 (the same layout on every rank), on the
        # host until ``totals``.
        self.sums = [0.0] * (2 * len(self.metrics))
        self._samples: list[SampleGeneration] = []

    def _prompt(self, messages: Sequence[Message], context: int | None) -> _Prompt | None:
        prompt, reference = prompt_and_reference(messages)
        text = _render(self.tokenizer, prompt, generation_prompt=True)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        budget = len(self.tokenizer(reference, add_special_tokens=False)["input_ids"]) + self.margin
        if context is not None:
            budget = min(budget, context - len(ids))
        # A prompt that fills the context leaves no room for a reply: not scored.
        return _Prompt(prompt, reference, ids, budget) if budget > 0 else None

    def _batches(self, prompts: Sequence[_Prompt]) -> Iterator[list[_Prompt]]:
        """Consecutive prompts, at most ``batch_size`` a call and, padded, at most ``batch_tokens`` of prompt and
        reply room (one prompt alone may exceed it)."""
        batch: list[_Prompt] = []
        width = room = 0
        for prompt in prompts:
            wider, roomier = max(width, len(prompt.ids)), max(room, prompt.budget)
            if batch and (len(batch) == self.batch_size or (len(batch) + 1) * (wider + roomier) > self.batch_tokens):
                yield batch
                batch, wider, roomier = [], len(prompt.ids), prompt.budget
            batch.append(prompt)
            width, room = wider, roomier
        if batch:
            yield batch

    def add(self, model: torch.nn.Module, examples: Sequence[Sequence[Message]]) -> None:
        from transformers import GenerationConfig

        context = _context_length(model)
        conversations = examples if self.conversation_of is None else [self.conversation_of(e) for e in examples]
        prompts = [p for p in (self._prompt(m, context) for m in conversations) if p is not None]
        stops = stop_token_ids(self.tokenizer, model)
        pad = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0])
        generate: Any = model.generate  # PEFT's and transformers' generate (torch.nn.Module does not declare it)
        for batch in self._batches(prompts):
            width = max(len(p.ids) for p in batch)
            # Left padding: every prompt ends where its reply starts.
            ids = torch.tensor([[pad] * (width - len(p.ids)) + p.ids for p in batch], device=self.device)
            mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in batch], device=self.device)
            longest = max(p.budget for p in batch)
            if context is not None:
                # Positions run to the padded width plus the reply: the longest prompt's room bounds the batch.
                longest = min(longest, context - width)
            config = GenerationConfig(  # type: ignore[no-untyped-call]
                max_new_tokens=longest,
                do_sample=False,
                num_beams=1,
                eos_token_id=stops or None,
                pad_token_id=pad,
            )
            with self.autocast():
                output = generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for prompt, row in zip(batch, output[:, width:].tolist(), strict=True):
                reply = row[: prompt.budget]
                cut = next((i for i, token in enumerate(reply) if token in stops), len(reply))
                text = str(self.tokenizer.decode(reply[:cut], skip_special_tokens=True)).strip()
                self._score(reply_scores(text, prompt.reference, self.json_match_keys))
                if len(self._samples) < self.keep:
                    self._samples.append(SampleGeneration(prompt.messages, prompt.reference, text))

    def _score(self, scores: Mapping[str, float]) -> None:
        for index, name in enumerate(self.metrics):
            if name in scores:
                self.sums[2 * index] += scores[name]
                self.sums[2 * index + 1] += 1.0

    def totals(self) -> torch.Tensor:
        return torch.tensor(self.sums, dtype=torch.float64, device=self.device)

    def scores(self, totals: torch.Tensor) -> dict[str, float]:
        values = totals.tolist()
        return {
            name: values[2 * index] / values[2 * index + 1]
            for index, name in enumerate(self.metrics)
            if values[2 * index + 1]
        }

    def samples(self) -> list[SampleGeneration]:
        return list(self._samples)


def _one_line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]
