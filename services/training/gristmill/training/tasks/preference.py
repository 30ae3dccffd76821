"""Preference (objective ``dpo``): direct preference optimisation of a causal language model on preference rows
(``{"id", "prompt", "chosen", "rejected"}``, the manifest's ``dpo-conversational`` row format, TRL's conversational
preference format, written by labeling's preference task).

A row's prompt is checked like labeling checks it (roles, turn order, ending before the reply) and each reply is one
or more assistant turns; the loop's example is a ``PreferencePair`` of plain OpenAI-shaped message dicts. The loop
renders prompt + chosen and prompt + rejected with the chat template (the base tokenizer's or
``spec.chat_template``), scores the replies' tokens only, against a reference model that is the starting model (the
base with the LoRA adapter disabled, or a frozen copy for a full fine-tune), with ``spec.dpo.loss`` (sigmoid DPO,
IPO or hinge) at ``spec.dpo.beta`` (``gristmill.training.ml.preference``). Evaluation reports the loss, the reward
accuracy and the mean reward margin. Once training ended, the model replies (greedy) to (at most 64) test prompts,
scored against the chosen reply by SFT's generation evaluation (``exact_match``, ``rouge_l``, ``json_valid``,
``json_match_<key>``, and the model card's sample generations). The trained model is a chat model: SFT's signature
and published files (with LoRA, the PEFT adapter with the tokenizer and its chat template; the base model is the
lineage's reference), and the manifest's task type is ``TASK_TYPE_CHAT`` (``domain.objectives.model_task_type``).

torch, transformers, TRL and peft are imported inside the methods the loop and the inspection call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gristmill.core.chat import ASSISTANT, ROW_FORMAT_DPO, check_turns, message_from_json
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.manifests import DatasetRecord
from gristmill.core.tasks import PREFERENCE
from gristmill.core.values import Signature
from gristmill.training.domain.dpo import DpoSettings
from gristmill.training.domain.lora import LoraSettings
from gristmill.training.domain.objectives import Objective
from gristmill.training.tasks.base import ModelCardText
from gristmill.training.tasks.chat import CHAT_SIGNATURE, ChatSft

if TYPE_CHECKING:
    import torch

    from gristmill.training.ml.chat import ChatGenerationEvaluation
    from gristmill.training.ml.preference import PreferenceBatch, PreferenceEvaluation, PreferenceSplit

# What DPO shares with SFT: the causal LM and its LoRA targets, the chat model's files and the card's "Use" section.
_CHAT = ChatSft()


@dataclass(frozen=True)
class PreferencePair:
    """One preference example: the prompt's messages and the two replies' (OpenAI-shaped message dicts)."""

    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]


def chosen_conversation(pair: PreferencePair) -> list[dict[str, Any]]:
    """The conversation generation scores a pair by: the prompt, then the chosen reply, whose last turn is the
    reference (its earlier turns, rare, become part of the prompt)."""
    return [*pair.prompt, *pair.chosen]


def preference_pair_of(record: DatasetRecord) -> PreferencePair:
    """The prompt and replies of one preference row, checked (``InvalidArgumentError`` naming the line)."""
    where = record.where
    data = record.data
    if not isinstance(data.get("id"), str) or not all(
        isinstance(data.get(key), list) for key in ("prompt", "chosen", "rejected")
    ):
        raise InvalidArgumentError(
            f"{where}: a preference row needs a string 'id' and 'prompt', 'chosen' and 'rejected' message lists"
        )
    prompt = tuple(message_from_json(m, f"{where}, prompt message {n}") for n, m in enumerate(data["prompt"], 1))
    check_turns(prompt, f"{where}, prompt", prompt_only=True)
    replies = []
    for key in ("chosen", "rejected"):
        reply = tuple(message_from_json(m, f"{where}, {key} message {n}") for n, m in enumerate(data[key], 1))
        if not reply or any(m.role != ASSISTANT for m in reply):
            raise InvalidArgumentError(f"{where}, field '{key}': the reply must be one or more assistant turns")
        replies.append([m.to_json() for m in reply])
    return PreferencePair([m.to_json() for m in prompt], replies[0], replies[1])


class PreferenceDpo:
    """``TrainingTask`` for ``preference``; ``settings``: the job's (``spec.dpo``), which the loss reads."""

    def __init__(self, settings: DpoSettings | None = None) -> None:
        self.settings = settings or DpoSettings()

    def with_settings(self, settings: DpoSettings) -> PreferenceDpo:
        return PreferenceDpo(settings)

    @property
    def name(self) -> str:
        return PREFERENCE

    @property
    def objective(self) -> Objective:
        return Objective.DPO

    @property
    def row_format(self) -> str:
        return ROW_FORMAT_DPO

    @property
    def metrics(self) -> tuple[str, ...]:
        # The loss first: the validation metric when the spec names none (smooth, where reward accuracy saturates).
        return ("loss", "reward_accuracy", "reward_margin")

    @property
    def uses_chat_template(self) -> bool:
        return True

    # -- in the service ------------------------------------------------------------------------------------

    def check_label_map(self, label_map: Sequence[str], where: str) -> None:
        # A preference version's label map is its project's review labels; the rows carry no class to learn.
        return None

    def examples(self, records: Sequence[DatasetRecord], label_map: Sequence[str], where: str) -> list[PreferencePair]:
        return [preference_pair_of(record) for record in records]

    def output_labels(self, label_map: Sequence[str]) -> tuple[str, ...]:
        return ()

    def label_counts(self, examples: Sequence[PreferencePair], label_map: Sequence[str]) -> None:
        # A preference manifest counts rows per stratum, not per label.
        return None

    def default_lora_targets(self, model_type: str, adaptable: frozenset[str]) -> tuple[str, ...]:
        return _CHAT.default_lora_targets(model_type, adaptable)

    def signature(self, label_map: Sequence[str]) -> Signature:
        return CHAT_SIGNATURE

    def card(self, label_map: Sequence[str]) -> ModelCardText:
        return ModelCardText(
            summary="Chat model (direct preference optimisation on chosen and rejected replies)",
            data=(
                "- Rows: preference pairs (`dpo-conversational`): a prompt, the chosen reply and the rejected one; the "
                "preference loss (`dpo.loss`, at `dpo.beta`) covers the replies' tokens only, against the "
                "starting model as the reference",
            ),
            lora_weights="published as a PEFT adapter of the base model",
            use=_CHAT.card(label_map).use,
        )

    # -- in the training loop ------------------------------------------------------------------------------

    def skeleton(self, model_dir: Path, label_map: Sequence[str]) -> torch.nn.Module:
        return _CHAT.skeleton(model_dir, label_map)

    def build_model(self, model_dir: Path, label_map: Sequence[str], lora: LoraSettings | None) -> torch.nn.Module:
        from gristmill.training.ml import preference

        return preference.as_policy(_CHAT.build_model(model_dir, label_map, lora))

    def encode(self, tokenizer: Any, examples: Sequence[PreferencePair], max_length: int) -> PreferenceSplit:
        from gristmill.training.ml import preference

        return preference.encode(tokenizer, [(e.prompt, e.chosen, e.rejected) for e in examples], max_length)

    def collate(self, split: PreferenceSplit, indices: Sequence[int], pad_id: int) -> PreferenceBatch:
        from gristmill.training.ml import preference

        return preference.collate(split, indices, pad_id)

    def loss(self, model: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
        from gristmill.training.ml import preference

        return preference.loss(model, batch, self.settings.beta, self.settings.loss)

    def evaluation(
        self, label_map: Sequence[str], device: torch.device, autocast: Callable[[], AbstractContextManager[Any]]
    ) -> PreferenceEvaluation:
        from gristmill.training.ml import preference

        return preference.PreferenceEvaluation(self.settings.beta, device, autocast, self.settings.loss)

    def generation_evaluation(
        self,
        tokenizer: Any,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager[Any]],
        *,
        json_match_keys: Sequence[str] = (),
    ) -> ChatGenerationEvaluation:
        """SFT's generation evaluation over the test pairs' prompts, the chosen reply being the reference."""
        return _CHAT.generation_evaluation(
            tokenizer, device, autocast, json_match_keys=json_match_keys, conversation_of=chosen_conversation
        )

    def save(self, model: torch.nn.Module, tokenizer: Any, dest: Path) -> None:
        _CHAT.save(model, tokenizer, dest)
