"""DPO on a causal LM: preference pairs rendered with the chat template, the sigmoid DPO loss against a reference
model, and its evaluation. Plain torch + transformers + TRL + PEFT, no Ray, so it is tested on its own.

**Encoding** (TRL's tokenised preference format). A pair's prompt + chosen reply and prompt + rejected reply are
each rendered with the chat template as SFT renders a conversation (``chat.assistant_spans``: the tokens serving's
``apply_chat_template`` produces, the same template checks) and tokenised with character offsets. The completion
starts at the first token that reaches past the prompt rendered with its generation prompt, which is what TRL's
``DPOTrainer`` computes as the common prefix of the tokenised prompt and prompt + completion: the reply and the
template's end-of-turn token, never the ``<|im_start|>assistant`` header. An example is ``{"prompt_ids",
"chosen_ids", "rejected_ids"}``. Sequences longer than ``max_length`` keep their start (TRL's ``keep_start``); a
pair whose prompt leaves no completion token within ``max_length`` is dropped (TRL drops it too). A template that
renders the prompt differently once a reply follows is refused (``ChatTemplateError``), as SFT refuses it.

**Batches.** TRL's ``DataCollatorForPreference`` pads a batch's chosen sequences, then its rejected ones, into one
batch with a completion mask; the labels are the input ids with every token off the completions set to -100.

**Log-probabilities.** TRL's fused LM head (``add_fused_lm_head``, which its ``DPOTrainer`` installs the same way)
returns each completion token's log-probability without materialising the (batch, length, vocabulary) logits. A
sequence's log-probability is the sum over its completion tokens.

**Reference model**: the starting model. With LoRA (and QLoRA) it is the policy with its adapter disabled (PEFT's
``disable_adapter()``, what TRL does when it is given no reference model). With a full fine-tune it is a frozen copy
of the base made before training (``attach_reference``): no gradients, always in eval mode, and not a submodule, so
it is in neither the optimizer, the checkpoints, the parameter counts nor the saved model; it follows the policy to
its device on first use. Dropout is off in the base's layers (TRL's ``DPOTrainer`` turns it off too) so that the
reference pass sees the layers the policy pass sees; LoRA's own dropout stays as the spec sets it (the adapter is
off in the reference pass). A pair's reference log-probabilities never change, so each split keeps them once
computed (what TRL's ``precompute_ref_log_probs`` does ahead of training, here as batches first need them): after
the first epoch training runs no reference pass, later evaluations neither, and the merged model of
``publish_merged`` (which has no adapter to disable) is scored against the values its adapter model's test
evaluation computed.

**Loss** (``DpoSettings.loss``), of the margin ``(logp(chosen) - ref_logp(chosen)) - (logp(rejected) -
ref_logp(rejected))``, averaged over the batch's pairs: sigmoid DPO (Rafailov et al. 2023) ``-logsigmoid(beta *
margin)``; hinge (SLiC) ``relu(1 - beta * margin)``; IPO (Azar et al. 2023) ``(margin' - 1 / (2 beta))^2`` where
``margin'`` divides each side's ratio by its completion's token count (TRL's normalisation). The rewards are
``beta * (logp - ref_logp)`` whatever the loss, as TRL reports them.
The unit tests check each loss and the rewards against TRL's ``DPOTrainer`` on the same batch. Evaluation reports
the mean loss, the reward accuracy (the fraction of pairs whose chosen reward is above the rejected one) and the mean
reward margin (chosen minus rejected).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from gristmill.training.domain.dpo import DpoLoss
from gristmill.training.ml import chat
from gristmill.training.tasks.base import EncodingError

IGNORE_INDEX = chat.IGNORE_INDEX
Message = chat.Message

# The frozen reference of each full fine-tune's policy (a LoRA policy needs none: its adapter is disabled instead).
# Kept beside the policy, not inside it, so that nothing that walks the policy's modules (the optimizer, .train(),
# checkpoints, saving, DDP) ever sees it.
_REFERENCES: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


class NoPreferencePairsError(EncodingError):
    """No pair of a split keeps a completion token of both replies within the maximum sequence length."""

    field = "spec.hyper_parameters.max_sequence_length"


# --------------------------------------------------------------------------- encoding


def reply_tokens(tokenizer: Any, prompt: Sequence[Message], reply: Sequence[Message]) -> tuple[list[int], int]:
    """The tokens of ``prompt`` + ``reply`` (assistant turns) as the chat template renders them, and the index of the
    first token of the reply."""
    text, spans = chat.assistant_spans(tokenizer, [*prompt, *reply])
    # The reply's turns are the last assistant spans; the first starts where the prompt with its generation prompt ends.
    start = spans[len(spans) - len(reply)][0]
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise chat.ChatTemplateError("finding the reply's tokens needs a fast tokenizer (character offsets)") from None
    offsets = encoded["offset_mapping"]
    first = next((index for index, (_, end) in enumerate(offsets) if end > start), len(offsets))
    return list(encoded["input_ids"]), first


def preference_example(
    tokenizer: Any, prompt: Sequence[Message], chosen: Sequence[Message], rejected: Sequence[Message], max_length: int
) -> dict[str, list[int]] | None:
    """TRL's tokenised preference example (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) cut at ``max_length``;
    None when a reply keeps no token within it."""
    from trl.data_utils import common_prefix_length

    chosen_ids, chosen_start = reply_tokens(tokenizer, prompt, chosen)
    rejected_ids, rejected_start = reply_tokens(tokenizer, prompt, rejected)
    # The prompt's tokens are the same in both (the replies are rendered after the same text).
    length = min(chosen_start, rejected_start, common_prefix_length(chosen_ids, rejected_ids))
    # A completion token needs a token before it to be predicted from.
    if not 0 < length < max_length:
        return None
    example = {
        "prompt_ids": chosen_ids[:length],
        "chosen_ids": chosen_ids[length:max_length],
        "rejected_ids": rejected_ids[length:max_length],
    }
    return example if example["chosen_ids"] and example["rejected_ids"] else None


@dataclass(frozen=True)
class PreferenceSplit:
    """One split's pairs, tokenised: TRL examples (``prompt_ids``, ``chosen_ids``, ``rejected_ids``)."""

    examples: list[dict[str, list[int]]]
    # Pairs left out: a reply without a token within the maximum length.
    dropped: int = 0
    # Example index -> its (chosen, rejected) log-probabilities under the reference model, once computed (a tensor
    # of 2 on the device). A split is trained against one reference.
    reference_logps: dict[int, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.examples)


def encode(
    tokenizer: Any,
    pairs: Sequence[tuple[Sequence[Message], Sequence[Message], Sequence[Message]]],
    max_length: int,
) -> PreferenceSplit:
    """``pairs``: (prompt, chosen, rejected) message lists."""
    examples = []
    for prompt, chosen, rejected in pairs:
        example = preference_example(tokenizer, prompt, chosen, rejected, max_length)
        if example is not None:
            examples.append(example)
    if pairs and not examples:
        raise NoPreferencePairsError(
            f"none of the {len(pairs)} preference pairs keeps a token of both replies within max_sequence_length "
            f"{max_length}; raise hyper_parameters.max_sequence_length"
        )
    return PreferenceSplit(examples, dropped=len(pairs) - len(examples))


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class PreferenceBatch:
    """A batch of pairs: the chosen sequences, then the rejected ones, right-padded (TRL's preference collator)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    # The input ids on the completions, -100 elsewhere (prompts and padding).
    labels: torch.Tensor
    pairs: int
    # The chosen and the rejected sequences' tokens, padding left out (``TrainingBatch.tokens``).
    tokens: int
    # The pairs' indexes in their split, and the split's reference log-probabilities (see ``PreferenceSplit``).
    indices: tuple[int, ...] = ()
    reference_cache: dict[int, torch.Tensor] | None = None

    @property
    def size(self) -> int:
        return self.pairs

    def to(self, device: torch.device) -> PreferenceBatch:
        if device.type == "cpu":
            return self
        return PreferenceBatch(
            self.input_ids.to(device, non_blocking=True),
            self.attention_mask.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.pairs,
            self.tokens,
            self.indices,
            self.reference_cache,
        )


def collate(split: PreferenceSplit, indices: Sequence[int], pad_id: int) -> PreferenceBatch:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collator = DataCollatorForPreference(pad_token_id=pad_id)
    inputs = collator([split.examples[i] for i in indices])
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    return PreferenceBatch(
        inputs["input_ids"],
        inputs["attention_mask"],
        labels,
        len(indices),
        int(inputs["attention_mask"].sum()),
        tuple(indices),
        split.reference_logps,
    )


# --------------------------------------------------------------------------- models


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def prepare(model: torch.nn.Module) -> torch.nn.Module:
    """Make a freshly built causal LM (LoRA-wrapped or not) a DPO policy: dropout off outside the LoRA adapters, and
    TRL's fused LM head on the transformers model (under the PEFT wrapper, as TRL installs it)."""
    from trl.trainer.utils import add_fused_lm_head

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.p = 0.0
    transformers_model: Any = model.get_base_model() if _is_peft(model) else model  # type: ignore[operator]
    add_fused_lm_head(transformers_model)
    return model


def attach_reference(policy: torch.nn.Module, base: torch.nn.Module) -> None:
    """Keep ``base`` (a copy of the starting model, not trained) as ``policy``'s frozen reference."""
    base.requires_grad_(False)
    base.eval()
    _REFERENCES[policy] = base


def frozen_reference(model: torch.nn.Module) -> torch.nn.Module | None:
    """The frozen reference of a full fine-tune's policy (None for a LoRA policy)."""
    return _REFERENCES.get(_unwrapped(model))


def as_policy(model: torch.nn.Module) -> torch.nn.Module:
    """A freshly built causal LM as the DPO policy: LoRA-wrapped, its reference is itself with the adapter disabled;
    otherwise (a full fine-tune) a frozen copy of it, made now, is."""
    if _is_peft(model):
        return prepare(model)
    # Copied before the fused head is installed: the patched forward is bound to the model it was installed on.
    reference = prepare(copy.deepcopy(model))
    policy = prepare(model)
    attach_reference(policy, reference)
    return policy


def _completion_logps(model: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    output = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=batch.labels,
        fused_lm_head=True,
        use_cache=False,
    )
    # Zero off the completions: the sum is the completion's log-probability.
    logps: torch.Tensor = output.log_probs.float().sum(dim=1)
    return logps


def policy_logps(model: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    """Each sequence's completion log-probability under the policy (chosen rows, then rejected rows)."""
    return _completion_logps(model, batch)


def reference_logps(model: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    """The same under the reference model (no gradients): kept by the batch's split once computed, else from the
    frozen copy, or the policy with its adapter disabled. ``model`` may be the DDP-wrapped policy; the reference pass
    runs on the module inside, outside DDP."""
    cache = batch.reference_cache
    if cache is not None and batch.indices and all(i in cache for i in batch.indices):
        pairs = torch.stack([cache[i] for i in batch.indices]).to(batch.input_ids.device)
        return torch.cat([pairs[:, 0], pairs[:, 1]])
    logps = _reference_pass(model, batch)
    if cache is not None and batch.indices:
        for row, (chosen, rejected) in enumerate(zip(*logps.detach().chunk(2), strict=True)):
            cache[batch.indices[row]] = torch.stack([chosen, rejected])
    return logps


def _reference_pass(model: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    policy = _unwrapped(model)
    with torch.no_grad():
        reference = frozen_reference(policy)
        if reference is not None:
            device = batch.input_ids.device
            if next(reference.parameters()).device != device:
                reference.to(device)
            return _completion_logps(reference, batch)
        if not _is_peft(policy):
            raise RuntimeError("a DPO policy needs a reference: a LoRA adapter to disable, or a frozen copy")
        with policy.disable_adapter():  # type: ignore[operator]
            return _completion_logps(policy, batch)


# --------------------------------------------------------------------------- loss and evaluation


@dataclass(frozen=True)
class DpoTerms:
    """Per pair: the preference loss and the implicit rewards ``beta * (logp - ref_logp)`` (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    loss: DpoLoss = DpoLoss.SIGMOID,
    completion_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> DpoTerms:
    """Each pair's ``loss`` from the sequences' log-probabilities under the policy and the reference (IPO also needs
    the chosen and rejected completions' token counts)."""
    chosen_ratios = chosen_logps - reference_chosen_logps
    rejected_ratios = rejected_logps - reference_rejected_logps
    if loss is DpoLoss.SIGMOID:
        losses = -F.logsigmoid(beta * (chosen_ratios - rejected_ratios))
    elif loss is DpoLoss.HINGE:
        losses = torch.relu(1 - beta * (chosen_ratios - rejected_ratios))
    elif loss is DpoLoss.IPO:
        if completion_tokens is None:
            raise ValueError("the IPO loss needs the completions' token counts")
        chosen_tokens, rejected_tokens = (t.to(chosen_ratios.dtype).clamp(min=1.0) for t in completion_tokens)
        losses = (chosen_ratios / chosen_tokens - rejected_ratios / rejected_tokens - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return DpoTerms(losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach())


def completion_tokens(batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The token counts of the chosen and of the rejected completions (the labelled tokens)."""
    counts = (batch.labels != IGNORE_INDEX).sum(dim=1)
    chosen, rejected = counts.chunk(2)
    return chosen, rejected


def pair_terms(
    model: torch.nn.Module, batch: PreferenceBatch, beta: float, loss: DpoLoss = DpoLoss.SIGMOID
) -> DpoTerms:
    reference_chosen, reference_rejected = reference_logps(model, batch).chunk(2)
    chosen, rejected = policy_logps(model, batch).chunk(2)
    counts = completion_tokens(batch) if loss is DpoLoss.IPO else None
    return dpo_loss(chosen, rejected, reference_chosen, reference_rejected, beta, loss, counts)


def loss(model: torch.nn.Module, batch: PreferenceBatch, beta: float, kind: DpoLoss = DpoLoss.SIGMOID) -> torch.Tensor:
    """The mean preference loss of ``batch``'s pairs."""
    return pair_terms(model, batch, beta, kind).losses.mean()


class PreferenceEvaluation:
    """Summed DPO loss, pairs whose chosen reward is above the rejected one, summed reward margin and the pair count;
    scored as loss, reward_accuracy and reward_margin."""

    def __init__(
        self,
        beta: float,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager[Any]],
        loss: DpoLoss = DpoLoss.SIGMOID,
    ) -> None:
        self.beta = beta
        self.loss = loss
        self.autocast = autocast
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    def add(self, model: torch.nn.Module, batch: PreferenceBatch) -> None:
        with self.autocast():
            terms = pair_terms(model, batch, self.beta, self.loss)
        margins = (terms.chosen_rewards - terms.rejected_rewards).double()
        self.sums[0] += terms.losses.double().sum()
        self.sums[1] += (margins > 0).double().sum()
        self.sums[2] += margins.sum()
        self.sums[3] += batch.pairs

    def totals(self) -> torch.Tensor:
        return self.sums

    def scores(self, totals: torch.Tensor) -> dict[str, float]:
        pairs = float(totals[3])
        if not pairs:
            return {"loss": 0.0, "reward_accuracy": 0.0, "reward_margin": 0.0}
        return {
            "loss": float(totals[0]) / pairs,
            "reward_accuracy": float(totals[1]) / pairs,
            "reward_margin": float(totals[2]) / pairs,
        }
