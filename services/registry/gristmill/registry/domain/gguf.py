"""GGUF files as base models: de-quantised once into a Hugging Face directory, then stored like any other.

transformers' GGUF loader (``from_pretrained(folder, gguf_file=name)``) reads the hyper-parameters, the tokenizer
and its chat template from the file's metadata and de-quantises the weights; ``save_pretrained`` then writes
``config.json``, ``generation_config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``
and ``chat_template.jinja``. Training and serving read that directory like an imported one: nothing downstream
needs the ``gguf`` package, and nothing de-quantises again.

The weights are stored in the smallest dtype that holds the de-quantised values exactly: bfloat16 (float16)
when every matrix of the file is BF16 (F16), float32 otherwise. Quantised blocks de-quantise to float32 values
(scale x integer + offset), so a Q4_1 file of SmolLM2-135M (98 MB) becomes 538 MB of float32 safetensors;
a training job casts to its own dtype as it loads.

torch, transformers, gguf and accelerate (the registry's ``[gguf]`` extra) are imported here only, when a GGUF
is imported; without them the import is refused with FAILED_PRECONDITION. One conversion runs at a time per
process, because each holds a whole de-quantised model in memory.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.core.hf_loading import model_loading

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# The [gguf] extra; accelerate because transformers refuses to load a GGUF without it.
_REQUIRED_MODULES = ("torch", "transformers", "gguf", "accelerate")
_CONVERSION = threading.Lock()
# What the gguf reader and transformers' loader raise for a file they cannot read (a truncated or corrupt file,
# an architecture or tokenizer they do not support, a model that is not a causal LM). Anything else (out of
# memory, a full disk) is not the caller's fault and stays an internal error.
_UNREADABLE = (ValueError, KeyError, IndexError, TypeError, NotImplementedError, EOFError, struct.error)


def require_gguf_support() -> None:
    """FAILED_PRECONDITION naming what is missing when this host cannot de-quantise GGUF files."""
    missing = [name for name in _REQUIRED_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise FailedPreconditionError(
            f"importing a GGUF file needs {', '.join(missing)} on the registry's host "
            "(install gristmill-registry[gguf]); import a Hugging Face directory instead"
        )


def check_gguf_magic(path: Path, *, what: str) -> None:
    """INVALID_ARGUMENT unless ``path`` starts with the GGUF magic bytes (read before any heavy import)."""
    with path.open("rb") as fh:
        head = fh.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise InvalidArgumentError(f"{what} is not a GGUF file (it does not start with the bytes 'GGUF')")


def dequantize_gguf(path: Path, dest: Path, *, what: str) -> None:
    """Write the Hugging Face directory of the GGUF file ``path`` into ``dest`` (created).

    ``what`` names the source in errors (``gguf_file '/models/x.gguf'``). INVALID_ARGUMENT with one line when
    the file is not a GGUF transformers can load as a causal language model.
    """
    require_gguf_support()
    check_gguf_magic(path, what=what)
    with _CONVERSION:
        try:
            header = _read_header(path)
        except _UNREADABLE as exc:
            raise InvalidArgumentError(
                f"{what} is not a readable GGUF file (truncated or corrupt: {_first_line(exc)})"
            ) from None
        try:
            _convert(path, header, dest)
        except _UNREADABLE as exc:
            raise InvalidArgumentError(f"{what} cannot be loaded as a model: {_first_line(exc)}") from None
        finally:
            # The de-quantised model is garbage now; give its memory back before the upload starts.
            gc.collect()


@dataclass(frozen=True)
class _Header:
    architecture: str
    tensors: int
    dtype: Any  # the torch dtype the weights are stored in


def _read_header(path: Path) -> _Header:
    """The metadata and tensor index (the reader memory-maps the file; no weight is read)."""
    import torch
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return _Header(
        _text_field(reader, "general.architecture") or "unknown", len(reader.tensors), _storage_dtype(reader, torch)
    )


def _convert(path: Path, header: _Header, dest: Path) -> None:
    import transformers

    # transformers' lazy module namespace is not fully typed: use it as Any.
    hf: Any = transformers
    started = time.monotonic()
    architecture, dtype = header.architecture, header.dtype
    log.info(
        "GGUF %s: architecture %s, %d tensors, %.1f MB; de-quantising to %s safetensors",
        path.name,
        architecture,
        header.tensors,
        path.stat().st_size / 1e6,
        str(dtype).removeprefix("torch."),
    )

    step = time.monotonic()
    tokenizer = hf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    log.info(
        "GGUF %s: tokenizer read in %.1f s (vocabulary %d, %s)",
        path.name,
        time.monotonic() - step,
        len(tokenizer),
        "with a chat template" if getattr(tokenizer, "chat_template", None) else "no chat template",
    )

    step = time.monotonic()
    options: dict[str, Any] = {}
    if hasattr(hf, "GgufConfig"):
        # transformers 5 keeps GGUF weights packed unless told otherwise, and a packed model does not save.
        options["quantization_config"] = hf.GgufConfig(dequantize=True)
    with model_loading():
        model, loading = hf.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, output_loading_info=True, **options
        )
    # transformers initialises weights the file lacks at random and only warns: a file like that is not a model.
    missing = sorted(loading.get("missing_keys") or ())
    mismatched = sorted(str(m[0]) for m in loading.get("mismatched_keys") or ())
    if missing or mismatched:
        raise ValueError(
            f"the file lacks weights the {architecture} architecture needs "
            f"({', '.join((missing + mismatched)[:5])}{', ...' if len(missing) + len(mismatched) > 5 else ''})"
        )
    parameters = sum(p.numel() for p in model.parameters())
    log.info(
        "GGUF %s: %s with %.1f M parameters de-quantised in %.1f s",
        path.name,
        type(model).__name__,
        parameters / 1e6,
        time.monotonic() - step,
    )

    step = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    del model, tokenizer
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    log.info(
        "GGUF %s: saved %.1f MB in %.1f s (%.1f s in all)",
        path.name,
        size / 1e6,
        time.monotonic() - step,
        time.monotonic() - started,
    )


def _text_field(reader: Any, key: str) -> str:
    field = reader.get_field(key)
    if field is None:
        return ""
    try:
        return str(field.contents())
    except (ValueError, IndexError, UnicodeDecodeError):
        return ""


def _storage_dtype(reader: Any, torch: Any) -> Any:
    """bfloat16 / float16 when every matrix is BF16 / F16 (exact), float32 for anything quantised or mixed."""
    from gguf import GGMLQuantizationType

    kinds = {t.tensor_type for t in reader.tensors if len(t.shape) >= 2}
    if kinds == {GGMLQuantizationType.BF16}:
        return torch.bfloat16
    if kinds == {GGMLQuantizationType.F16}:
        return torch.float16
    return torch.float32


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."
