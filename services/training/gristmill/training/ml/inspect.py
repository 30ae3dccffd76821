"""Base-model inspection for SubmitJob: is it a Hugging Face model the job's task can fine-tune, and how."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gristmill.core.errors import InvalidArgumentError
from gristmill.training.domain.resolve import ModelInfo
from gristmill.training.tasks import EncodingError, TrainingTask


class HfModelInspector:
    """Reads config.json and the tokenizer, and builds the task's model on the meta device (no weights loaded)."""

    def inspect(self, model_dir: Path, task: TrainingTask, label_map: Sequence[str]) -> ModelInfo:
        from gristmill.training.ml import modeling

        where = _where(model_dir)
        if not (model_dir / "config.json").is_file():
            raise InvalidArgumentError(f"{where} is not a Hugging Face model: it has no config.json")
        try:
            config = modeling.read_config(model_dir)
        except (ValueError, json.JSONDecodeError) as exc:
            raise InvalidArgumentError(f"{where} has an unreadable config.json: {exc}") from None
        model_type = str(config.get("model_type") or "")
        try:
            tokenizer = modeling.load_tokenizer(model_dir)
        except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
            raise InvalidArgumentError(f"{where} has no usable tokenizer: {_one_line(exc)}") from None
        try:
            skeleton = task.skeleton(model_dir, label_map)
            modules = modeling.linear_module_names(skeleton)
        except Exception as exc:  # an architecture transformers cannot build for the task's model class
            raise InvalidArgumentError(
                f"{where} (model type {model_type!r}) cannot be loaded for {task.name} training: {_one_line(exc)}"
            ) from None
        head = None
        if modeling.has_classification_head(config):
            id2label = config.get("id2label")
            head = len(id2label) if isinstance(id2label, dict) and id2label else int(config.get("num_labels", 2))
        return ModelInfo(
            model_type=model_type,
            head_labels=head,
            adaptable_modules=modules,
            default_lora_targets=task.default_lora_targets(model_type, modules),
            max_positions=modeling.max_positions(config),
            chat_template=modeling.default_chat_template(tokenizer),
            config=config,
            supports_gradient_checkpointing=bool(getattr(skeleton, "supports_gradient_checkpointing", False)),
        )

    def check_examples(
        self, model_dir: Path, task: TrainingTask, examples: Sequence[Any], *, chat_template: str, max_length: int
    ) -> None:
        """Encode ``examples`` as the training loop will (the base's tokenizer, ``chat_template`` when given):
        a template that cannot render them, or a length that leaves nothing to learn, is refused now rather than
        in a Ray worker."""
        from gristmill.training.ml import modeling

        tokenizer = modeling.load_tokenizer(model_dir, chat_template=chat_template)
        try:
            task.encode(tokenizer, examples, max_length)
        except EncodingError as exc:
            subject = f"the first {len(examples)} rows of the train split"
            if exc.field == "spec.chat_template" and not chat_template:
                subject += f" with the chat template of {_where(model_dir)}"
            raise InvalidArgumentError(
                f"{subject} cannot be trained on ({exc.field}): {exc}", details={"field": exc.field}
            ) from None


def _where(model_dir: Path) -> str:
    return f"base model directory {str(model_dir)[:200]!r}"


def _one_line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]
