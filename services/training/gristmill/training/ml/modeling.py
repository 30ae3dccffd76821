"""Hugging Face models for sequence classification: loading, LoRA, parameter counts, saving.

Used by the training loop (in Ray workers) and by the service when it inspects a base model; imports
torch, transformers and peft, so the service imports it lazily.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

_HEAD_SUFFIX = "ForSequenceClassification"


def read_config(model_dir: Path) -> dict[str, Any]:
    data = json.loads((Path(model_dir) / "config.json").read_text())
    if not isinstance(data, dict):
        raise ValueError("config.json must be a JSON object")
    return data


def has_classification_head(config: dict[str, Any]) -> bool:
    return any(str(a).endswith(_HEAD_SUFFIX) for a in config.get("architectures") or ())


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        # Decoder-style tokenizers ship without a pad token; padding with EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(model_dir: Path, label_map: Sequence[str]) -> torch.nn.Module:
    """The base model with a sequence-classification head for ``label_map`` (new head if it has none)."""
    config = AutoConfig.from_pretrained(
        str(model_dir),
        num_labels=len(label_map),
        id2label=dict(enumerate(label_map)),
        label2id={label: i for i, label in enumerate(label_map)},
    )
    model: Any = AutoModelForSequenceClassification.from_pretrained(str(model_dir), config=config)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    assert isinstance(model, torch.nn.Module)
    return model


@dataclass(frozen=True)
class LoraOptions:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


def apply_lora(model: torch.nn.Module, options: LoraOptions) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters; only adapter and classification-head parameters stay trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=options.rank,
        lora_alpha=options.alpha,  # type: ignore[arg-type]  # peft accepts a float scale
        lora_dropout=options.dropout,
        target_modules=list(options.target_modules),
    )
    wrapped: torch.nn.Module = get_peft_model(model, config)
    return wrapped


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapters into the base weights so serving loads a plain Transformers model."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        merged: torch.nn.Module = model.merge_and_unload()
        return merged
    return model


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def default_lora_targets(model_type: str) -> tuple[str, ...]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return tuple(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, ()))


def linear_module_names(model_dir: Path, num_labels: int) -> frozenset[str]:
    """Last name components of every linear layer, from a model built on the meta device (no weights)."""
    config = AutoConfig.from_pretrained(str(model_dir), num_labels=num_labels)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)  # type: ignore[no-untyped-call]
    return frozenset(
        name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
    )
