"""Chat (objective ``sft``): supervised fine-tuning of a causal language model on SFT rows
(``{"id", "messages"}``, the manifest's ``sft-messages`` row format, written by labeling's chat task).

A row's messages are checked like labeling checks them (roles, turn order, at least one assistant turn) and
become the loop's example as plain OpenAI-shaped message dicts. The loop renders them with the chat template
(the base tokenizer's or ``spec.chat_template``), trains on the assistant tokens only and packs a batch's
conversations without padding (``gristmill.training.ml.chat``). Evaluation reports the loss and perplexity
over assistant tokens; once training ended, greedy replies to (at most 64) test conversations add ``exact_match``,
``rouge_l``, the JSON metrics ``json_valid`` and ``json_match_<key>`` (``spec.json_match_keys``; over the replies
whose reference is a JSON object) and the model card's sample generations. With LoRA (or QLoRA, over a 4-bit base)
the published artifact is the PEFT adapter with the tokenizer (its chat template included); the base model is the
lineage's reference, not a copy. ``spec.publish_merged`` adds the merged model under ``merged/`` (the loop does that).

torch, transformers, TRL and peft are imported inside the methods the loop and the inspection call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gristmill.core.chat import ASSISTANT, ROW_FORMAT_SFT, check_turns, message_from_json
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.core.manifests import DatasetRecord
from gristmill.core.tasks import CHAT
from gristmill.core.values import Signature, TensorSpec
from gristmill.training.domain.lora import LoraSettings
from gristmill.training.domain.objectives import Objective
from gristmill.training.tasks.base import ModelCardText

if TYPE_CHECKING:
    import torch

    from gristmill.training.ml.chat import CausalLMEvaluation, ChatGenerationEvaluation, ChatSplit, PackedBatch

# One conversation: OpenAI-shaped message dicts ({"role", "content", ...}), what apply_chat_template takes.
Conversation = list[dict[str, Any]]

# LoRA targets when the spec names none, per architecture: every attention projection (the MLP's
# gate/up/down projections are worth adding for harder tasks; name them in spec.lora.target_modules).
ATTENTION_PROJECTIONS: dict[str, tuple[str, ...]] = {
    name: ("q_proj", "k_proj", "v_proj", "o_proj")
    for name in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2")
} | {"phi3": ("qkv_proj", "o_proj"), "gpt2": ("c_attn", "c_proj"), "gpt_neox": ("query_key_value", "dense")}

# The Open Inference Protocol signature of a chat model: a batch of conversations (each the JSON text of its
# messages) in, the generated replies out (Triton's generate extension names its output "text_output").
CHAT_SIGNATURE = Signature(
    inputs=(TensorSpec("messages", "BYTES", (-1,)),),
    outputs=(TensorSpec("text_output", "BYTES", (-1,)),),
)


def conversation_of(record: DatasetRecord) -> Conversation:
    """The messages of one SFT row, checked (``InvalidArgumentError`` naming the line)."""
    messages = record.data.get("messages")
    if not isinstance(record.data.get("id"), str) or not isinstance(messages, list):
        raise InvalidArgumentError(f"{record.where}: an SFT row needs a string 'id' and a 'messages' list")
    parsed = tuple(message_from_json(m, f"{record.where}, message {n}") for n, m in enumerate(messages, start=1))
    check_turns(parsed, record.where)
    if not any(m.role == ASSISTANT for m in parsed):
        raise FailedPreconditionError(f"{record.where}: the conversation has no assistant turn to learn from")
    return [m.to_json() for m in parsed]


class ChatSft:
    """``TrainingTask`` for ``chat``."""

    @property
    def name(self) -> str:
        return CHAT

    @property
    def objective(self) -> Objective:
        return Objective.SFT

    @property
    def row_format(self) -> str:
        return ROW_FORMAT_SFT

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("loss", "perplexity")

    @property
    def uses_chat_template(self) -> bool:
        return True

    # -- in the service ------------------------------------------------------------------------------------

    def check_label_map(self, label_map: Sequence[str], where: str) -> None:
        # A chat version's label map is its project's review labels; the rows carry no class to learn.
        return None

    def examples(self, records: Sequence[DatasetRecord], label_map: Sequence[str], where: str) -> list[Conversation]:
        return [conversation_of(record) for record in records]

    def output_labels(self, label_map: Sequence[str]) -> tuple[str, ...]:
        # A generator has no classes; the version's label map is its review labels.
        return ()

    def label_counts(self, examples: Sequence[Conversation], label_map: Sequence[str]) -> None:
        # A chat manifest counts rows per stratum (source, length), not per label.
        return None

    def default_lora_targets(self, model_type: str, adaptable: frozenset[str]) -> tuple[str, ...]:
        targets = ATTENTION_PROJECTIONS.get(model_type, ())
        if targets and set(targets) <= adaptable:
            return targets
        from gristmill.training.ml import modeling

        return modeling.default_lora_targets(model_type)

    def signature(self, label_map: Sequence[str]) -> Signature:
        return CHAT_SIGNATURE

    def card(self, label_map: Sequence[str]) -> ModelCardText:
        return ModelCardText(
            summary="Chat model (supervised fine-tuning on assistant turns)",
            data=("- Rows: conversations (`sft-messages`); the loss covers the assistant turns only",),
            lora_weights="published as a PEFT adapter of the base model",
            use="Input: a batch of conversations (`messages`, BYTES: the JSON of each one's messages). Output: the "
            "generated replies (`text_output`, BYTES). Render conversations with the chat template the tokenizer "
            "carries (its SHA-256 is the lineage's `chat_template.sha256`). A LoRA artifact is an adapter "
            "(`adapter_model.safetensors`, `adapter_config.json`): load the base model named in the lineage with "
            "`AutoModelForCausalLM.from_pretrained`, then `PeftModel.from_pretrained(base, <this directory>)`; a full "
            "fine-tune loads with `AutoModelForCausalLM.from_pretrained`.",
        )

    # -- in the training loop ------------------------------------------------------------------------------

    def skeleton(self, model_dir: Path, label_map: Sequence[str]) -> torch.nn.Module:
        from gristmill.training.ml import modeling

        return modeling.causal_lm_skeleton(model_dir)

    def build_model(self, model_dir: Path, label_map: Sequence[str], lora: LoraSettings | None) -> torch.nn.Module:
        from gristmill.training.ml import modeling

        return modeling.causal_lm_for_training(model_dir, lora)

    def encode(self, tokenizer: Any, examples: Sequence[Conversation], max_length: int) -> ChatSplit:
        from gristmill.training.ml import chat

        return chat.encode(tokenizer, examples, max_length)

    def collate(self, split: ChatSplit, indices: Sequence[int], pad_id: int) -> PackedBatch:
        from gristmill.training.ml import chat

        return chat.collate(split, indices, pad_id)

    def loss(self, model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
        from gristmill.training.ml import chat

        return chat.loss(model, batch)

    def evaluation(
        self, label_map: Sequence[str], device: torch.device, autocast: Callable[[], AbstractContextManager[Any]]
    ) -> CausalLMEvaluation:
        from gristmill.training.ml import chat

        return chat.CausalLMEvaluation(device, autocast)

    def generation_evaluation(
        self,
        tokenizer: Any,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager[Any]],
        *,
        json_match_keys: Sequence[str] = (),
        conversation_of: Callable[[Any], Sequence[dict[str, Any]]] | None = None,
    ) -> ChatGenerationEvaluation:
        """Greedy replies to test conversations (``conversation_of`` makes one of another task's example: DPO's)."""
        from gristmill.training.ml import chat

        return chat.ChatGenerationEvaluation(
            tokenizer, device, autocast, json_match_keys=json_match_keys, conversation_of=conversation_of
        )

    def save(self, model: torch.nn.Module, tokenizer: Any, dest: Path) -> None:
        from gristmill.training.ml import modeling

        modeling.save_causal_lm(model, dest)
        # The tokenizer files carry the chat template the job trained with (chat_template.jinja).
        tokenizer.save_pretrained(dest)
