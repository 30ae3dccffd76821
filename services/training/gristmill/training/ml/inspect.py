"""Base-model inspection for SubmitJob: is it a Hugging Face model we can fine-tune, and how."""

from __future__ import annotations

import json
from pathlib import Path

from gristmill.core.errors import InvalidArgumentError
from gristmill.training.domain.resolve import ModelInfo


class HfModelInspector:
    """Reads config.json and the tokenizer, and lists linear layers on the meta device (no weights loaded)."""

    def inspect(self, model_dir: Path) -> ModelInfo:
        from gristmill.training.ml import modeling

        where = f"base model directory {str(model_dir)[:200]!r}"
        if not (model_dir / "config.json").is_file():
            raise InvalidArgumentError(f"{where} is not a Hugging Face model: it has no config.json")
        try:
            config = modeling.read_config(model_dir)
        except (ValueError, json.JSONDecodeError) as exc:
            raise InvalidArgumentError(f"{where} has an unreadable config.json: {exc}") from None
        model_type = str(config.get("model_type") or "")
        try:
            modeling.load_tokenizer(model_dir)
        except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
            raise InvalidArgumentError(f"{where} has no usable tokenizer: {_one_line(exc)}") from None
        try:
            modules = modeling.linear_module_names(model_dir, num_labels=int(config.get("num_labels", 2) or 2))
        except Exception as exc:  # an architecture transformers cannot build for sequence classification
            raise InvalidArgumentError(
                f"{where} (model type {model_type!r}) cannot be loaded for sequence classification: {_one_line(exc)}"
            ) from None
        head = None
        if modeling.has_classification_head(config):
            id2label = config.get("id2label")
            head = len(id2label) if isinstance(id2label, dict) and id2label else int(config.get("num_labels", 2))
        return ModelInfo(
            model_type=model_type,
            head_labels=head,
            adaptable_modules=modules,
            default_lora_targets=modeling.default_lora_targets(model_type),
        )


def _one_line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]
