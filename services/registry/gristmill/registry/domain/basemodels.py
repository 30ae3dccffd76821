"""Base models: a Hugging Face model directory, checked and described without loading it.

A directory qualifies when it has ``config.json``, weights (``*.safetensors`` or ``pytorch_model*.bin``)
and a tokenizer (``tokenizer.json``, ``vocab.txt``, ``spiece.model``, ``sentencepiece.bpe.model`` or
``merges.txt`` + ``vocab.json``). The parameter count is summed from the safetensors headers (a JSON
header per file: reading it costs a few kilobytes, no torch); PyTorch-only weights leave it 0.

``content_sha256`` is the SHA-256 of the lines ``<relative name>\\t<sha256>\\n`` in name order: the
same value for the same files wherever they are stored, which is what lineage records.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gristmill.core.errors import InvalidArgumentError

# A safetensors header larger than this is not a header (the format caps it at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")

CLASSIFICATION_TASKS = ("TASK_TYPE_TEXT_CLASSIFICATION", "TASK_TYPE_TEXT_MULTI_LABEL_CLASSIFICATION")
# Encoder families a sequence-classification head fine-tunes well.
_ENCODERS = {
    "bert",
    "roberta",
    "distilbert",
    "deberta",
    "deberta-v2",
    "electra",
    "xlm-roberta",
    "albert",
    "mpnet",
    "camembert",
    "modernbert",
    "xlnet",
    "longformer",
    "funnel",
    "ernie",
}


@dataclass(frozen=True)
class DirectoryFacts:
    model_type: str
    architectures: tuple[str, ...]
    tasks: tuple[str, ...]
    parameter_count: int


def content_sha256(files: Mapping[str, str]) -> str:
    """SHA-256 over ``name\\tsha256\\n`` lines of ``files`` (relative name → sha256), in name order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\t{files[name]}\n".encode())
    return digest.hexdigest()


def inspect_directory(root: Path, names: list[str]) -> DirectoryFacts:
    """Check that ``names`` (files relative to ``root``) form a Hugging Face model; describe it.

    ``InvalidArgumentError`` names what is missing or unreadable.
    """
    present = set(names)
    if "config.json" not in present:
        raise InvalidArgumentError("not a Hugging Face model directory: config.json is missing")
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    torch_weights = sorted(n for n in names if Path(n).name.startswith("pytorch_model") and n.endswith(".bin"))
    if not weights and not torch_weights:
        raise InvalidArgumentError(
            "not a Hugging Face model directory: no weights (model.safetensors or pytorch_model.bin) found"
        )
    has_tokenizer = any(Path(n).name in _TOKENIZER_FILES for n in names) or {"merges.txt", "vocab.json"} <= present
    if not has_tokenizer:
        raise InvalidArgumentError(
            "not a Hugging Face model directory: no tokenizer (tokenizer.json, vocab.txt, spiece.model, "
            "or merges.txt with vocab.json) found"
        )
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidArgumentError("config.json must be a JSON object")
    model_type = str(config.get("model_type", ""))
    raw_arch = config.get("architectures") or []
    architectures = tuple(str(a) for a in raw_arch) if isinstance(raw_arch, list) else ()
    parameters = sum(safetensors_parameter_count(root / n) for n in weights)
    return DirectoryFacts(model_type, architectures, infer_tasks(model_type, architectures), parameters)


def safetensors_parameter_count(path: Path) -> int:
    """Elements in every tensor of a safetensors file, read from its JSON header only."""
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise InvalidArgumentError(f"{path.name} is not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER:
            raise InvalidArgumentError(f"{path.name} is not a safetensors file (header length {length})")
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidArgumentError(f"{path.name} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise InvalidArgumentError(f"{path.name} is not a safetensors file (header is not an object)")
    total = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        try:
            total += math.prod(int(d) for d in tensor["shape"])
        except (KeyError, TypeError, ValueError):
            raise InvalidArgumentError(f"{path.name}: tensor {name!r} has no valid shape in the header") from None
    return total


def infer_tasks(model_type: str, architectures: tuple[str, ...]) -> tuple[str, ...]:
    """Task families the architecture can be fine-tuned for (empty when unknown)."""
    tasks: list[str] = []
    if model_type in _ENCODERS or any(a.endswith("ForSequenceClassification") for a in architectures):
        tasks.extend(CLASSIFICATION_TASKS)
    if any(a.endswith("ForTokenClassification") for a in architectures) or model_type in _ENCODERS:
        tasks.append("TASK_TYPE_TOKEN_CLASSIFICATION")
    if any(a.endswith("ForCausalLM") for a in architectures):
        tasks.append("TASK_TYPE_CAUSAL_LM")
    return tuple(dict.fromkeys(tasks))
