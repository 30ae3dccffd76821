"""Hugging Face models for the training tasks: loading (sequence classifiers, causal LMs, 4-bit QLoRA bases),
LoRA, merging adapters, parameter counts, inspection on the meta device.

Used by the training loop (in Ray workers) and by the service when it inspects a base model; imports
torch, transformers and peft, so the service imports it lazily.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from gristmill.core.hf_loading import model_loading
from gristmill.training.domain.lora import LoraSettings

_HEAD_SUFFIX = "ForSequenceClassification"


class QuantizationUnavailableError(RuntimeError):
    """QLoRA cannot load its 4-bit base here: no CUDA device, or no bitsandbytes."""


def read_config(model_dir: Path) -> dict[str, Any]:
    data = json.loads((Path(model_dir) / "config.json").read_text())
    if not isinstance(data, dict):
        raise ValueError("config.json must be a JSON object")
    return data


def has_classification_head(config: dict[str, Any]) -> bool:
    return any(str(a).endswith(_HEAD_SUFFIX) for a in config.get("architectures") or ())


def load_tokenizer(model_dir: Path, *, chat_template: str = "") -> PreTrainedTokenizerBase:
    """The base's tokenizer; ``chat_template`` (when given) replaces its chat template, so that what it renders
    and what it saves is that template."""
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        # Decoder-style tokenizers ship without a pad token; padding with EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def default_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The template ``apply_chat_template`` uses by default ("" when there is none); a template shipped as named
    variants counts its ``default`` one."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else ""


def load_classifier(model_dir: Path, label_map: Sequence[str]) -> torch.nn.Module:
    """The base model with a sequence-classification head for ``label_map`` (new head if it has none)."""
    config = AutoConfig.from_pretrained(
        str(model_dir),
        num_labels=len(label_map),
        id2label=dict(enumerate(label_map)),
        label2id={label: i for i, label in enumerate(label_map)},
    )
    with model_loading():
        model: Any = AutoModelForSequenceClassification.from_pretrained(str(model_dir), config=config)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    assert isinstance(model, torch.nn.Module)
    return model


def load_causal_lm(model_dir: Path) -> torch.nn.Module:
    """The base as a causal language model, in float32 (mixed precision is the loop's autocast; LoRA adapters
    on half-precision weights would train in half precision)."""
    with model_loading():
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    assert isinstance(model, torch.nn.Module)
    return model


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def load_causal_lm_4bit(model_dir: Path) -> torch.nn.Module:
    """QLoRA's base: the weights quantised to 4-bit NF4 by bitsandbytes on the current CUDA device, bf16 compute,
    prepared for k-bit training by PEFT (norms in fp32, gradient checkpointing, input gradients)."""
    if not torch.cuda.is_available():
        raise QuantizationUnavailableError(
            "QLoRA (method qlora) needs a CUDA GPU on the training worker; this worker has none. Use method lora"
        )
    # transformers' quantiser imports it; fail here with the reason and what to do.
    if not bitsandbytes_installed():
        raise QuantizationUnavailableError(
            "QLoRA (method qlora) needs the bitsandbytes package on the training workers (pip install bitsandbytes); "
            "it is not installed. Install it or use method lora"
        )
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    with model_loading():
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            quantization_config=quantization,
            dtype=torch.bfloat16,
            # The quantised weights are placed when loaded (a 4-bit model is not moved afterwards).
            device_map={"": torch.cuda.current_device()},
        )
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    # Non-reentrant checkpointing: DDP and reentrant checkpointing disagree about which gradients are ready.
    prepared: torch.nn.Module = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    return prepared


class GradientCheckpointingUnsupportedError(RuntimeError):
    """The model's class cannot recompute its activations (the job fails with this message)."""


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of ``model``'s blocks (the model a PEFT model wraps): each block's
    activations are recomputed in the backward pass. Non-reentrant, because reentrant checkpointing needs inputs that
    require gradients (frozen embeddings under LoRA give none) and disagrees with DDP about ready gradients."""
    get_base = getattr(model, "get_base_model", None)
    base: Any = get_base() if callable(get_base) else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise GradientCheckpointingUnsupportedError(
            f"{type(base).__name__} does not support gradient checkpointing; train it without "
            "hyper_parameters.gradient_checkpointing"
        )
    options = {"use_reentrant": False}
    enable = getattr(base, "activation_checkpointing_enable", None)  # transformers 5.x's name
    if callable(enable):
        enable(activation_checkpointing_kwargs=options)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if getattr(base.config, "use_cache", None):
        # A cache is built for generation only; with checkpointing transformers would turn it off with a warning.
        base.config.use_cache = False


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model a PEFT model wraps) was loaded quantised (its weights cannot be moved or
    merged as they are)."""
    config = getattr(model, "config", None)
    return bool(getattr(model, "is_quantized", False) or getattr(config, "quantization_config", None))


def causal_lm_for_training(model_dir: Path, lora: LoraSettings | None) -> torch.nn.Module:
    """The causal LM a generative objective trains: the full model, or LoRA adapters (targets resolved) over the
    base in float32, or over the 4-bit base for QLoRA (``lora.quantize_base``)."""
    if lora is None:
        return load_causal_lm(model_dir)
    model = load_causal_lm_4bit(model_dir) if lora.quantize_base else load_causal_lm(model_dir)
    return apply_lora(model, LoraOptions(lora.rank, lora.alpha, lora.dropout, lora.target_modules, "CAUSAL_LM"))


@dataclass(frozen=True)
class LoraOptions:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    # PEFT's task type: "SEQ_CLS" keeps the classification head trainable; "CAUSAL_LM" trains adapters only.
    task_type: str = "SEQ_CLS"


def apply_lora(model: torch.nn.Module, options: LoraOptions) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters; only adapter (and classification-head) parameters stay trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType(options.task_type),
        r=options.rank,
        lora_alpha=options.alpha,  # type: ignore[arg-type]  # peft accepts a float scale
        lora_dropout=options.dropout,
        target_modules=list(options.target_modules),
    )
    wrapped: torch.nn.Module = get_peft_model(model, config)
    return wrapped


def apply_ia3(model: torch.nn.Module) -> torch.nn.Module:
    """Wrap a sequence classifier with (IA)^3 vectors on PEFT's default modules for its architecture (a BERT's
    key, value and feed-forward output); the vectors and the classification head stay trainable."""
    from peft import IA3Config, TaskType, get_peft_model

    wrapped: torch.nn.Module = get_peft_model(model, IA3Config(task_type=TaskType.SEQ_CLS))
    return wrapped


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapters into the base weights so serving loads a plain Transformers model."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        merged: torch.nn.Module = model.merge_and_unload()
        return merged
    return model


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The float dtype the base checkpoint stores its weights in (config ``dtype``); float32 when it names none."""
    config = read_config(model_dir)
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def merge_adapter(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The LoRA adapters folded into the base weights (W + BA), computed in float32, then cast to ``dtype`` (the
    base checkpoint's). Consumes ``model``: its layers become the merged model's.

    Tied input and output embeddings are untied first when LoRA adapts either of them: folding the update into the
    shared matrix would change the other one too, which the adapter never did."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"merging needs a PEFT LoRA model, not {type(model).__name__}")
    if is_quantized(model):
        raise ValueError("a LoRA adapter over a quantised (4-bit) base cannot be merged without loss")
    base: Any = model.get_base_model()
    inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    if inputs is not None and outputs is not None:
        inner_in, inner_out = getattr(inputs, "base_layer", inputs), getattr(outputs, "base_layer", outputs)
        adapted = inner_in is not inputs or inner_out is not outputs
        if adapted and inner_out.weight is inner_in.weight:
            inner_out.weight = torch.nn.Parameter(inner_out.weight.detach().clone())
            base.config.tie_word_embeddings = False
    model.to(torch.float32)
    merged: torch.nn.Module = model.merge_and_unload(safe_merge=True)
    return merged.to(dtype)


def save_merged(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, dest: Path) -> None:
    """A merged model as a plain Transformers directory: weights, config, generation config, tokenizer (with its
    chat template)."""
    model.save_pretrained(str(dest), safe_serialization=True)  # type: ignore[operator]
    tokenizer.save_pretrained(str(dest))


def save_causal_lm(model: torch.nn.Module, dest: Path) -> None:
    """A LoRA model as its PEFT adapter (``adapter_model.safetensors``, ``adapter_config.json``), anything else as
    a full model (``model.safetensors``, ``config.json``)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        for config in model.peft_config.values():
            # PEFT records the base's path on the training host (and fills in a None); the artifact's lineage
            # names the base instead.
            config.base_model_name_or_path = ""
        model.save_pretrained(str(dest), safe_serialization=True)
        # PEFT writes a README of its own; the published card is model-card.md.
        (Path(dest) / "README.md").unlink(missing_ok=True)
        return
    model.save_pretrained(dest, safe_serialization=True)  # type: ignore[operator]


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def default_lora_targets(model_type: str) -> tuple[str, ...]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return tuple(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, ()))


def classifier_skeleton(model_dir: Path, num_labels: int) -> torch.nn.Module:
    """The base with a sequence-classification head, built on the meta device (no weights)."""
    config = AutoConfig.from_pretrained(str(model_dir), num_labels=num_labels)
    with model_loading(), torch.device("meta"):
        model: torch.nn.Module = AutoModelForSequenceClassification.from_config(config)  # type: ignore[no-untyped-call]
    return model


def causal_lm_skeleton(model_dir: Path) -> torch.nn.Module:
    """The base as a causal language model, built on the meta device (no weights)."""
    config = AutoConfig.from_pretrained(str(model_dir))
    with model_loading(), torch.device("meta"):
        model: torch.nn.Module = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return model


def linear_module_names(model: torch.nn.Module) -> frozenset[str]:
    """Last name components of every linear layer of ``model`` (what LoRA can adapt; GPT-2 style models use
    transformers' ``Conv1D`` for theirs)."""
    from transformers.pytorch_utils import Conv1D

    return frozenset(
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D)
    )


def max_positions(config: dict[str, Any]) -> int | None:
    """The longest sequence the architecture takes (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None
