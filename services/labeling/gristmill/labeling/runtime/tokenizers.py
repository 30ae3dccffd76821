"""Token counters from Hugging Face tokenizers: a registry base model's (``RegistryTokenizerSource``), or a local
directory's (``LocalTokenizerSource``: tests, benchmarks).

The registry source asks ``GetBaseModel`` for the base model's files, downloads only the tokenizer's
(``TOKENIZER_FILES``, each verified against its sha256 by ``gristmill.core.manifests.download_files``) into
``<cache dir>/<content_sha256>/`` and loads them with ``transformers.AutoTokenizer``. Loaded counters stay in
memory, least recently used ones evicted beyond ``capacity``; a directory is downloaded and loaded once even
when several imports ask for it at the same time.

How a conversation is counted (``HfTokenCounter``): when the tokenizer has a chat template, the tokens of the
conversation as the template renders it (no generation prompt), so the count is what training on the base
model sees; otherwise (encoder tokenizers such as BERT's) the sum of each turn's tokens (its text, and its tool
calls' JSON) plus ``TURN_OVERHEAD_TOKENS`` per turn. A conversation the template refuses (some templates
raise on roles they do not support) is counted the second way. Texts are encoded in batches by the
tokenizer's Rust encoder, without truncation, padding or added special tokens (a template writes its own).

transformers is imported on the first load only: it takes a second or two and most projects never need it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gristmill.api.registry.v1 import registry_pb2
from gristmill.core.base_models import RegistryBaseModels, StoredBaseModel, stored_base_model
from gristmill.core.errors import FailedPreconditionError, NotFoundError
from gristmill.core.storage import ObjectStore
from gristmill.core.tls import TlsSettings
from gristmill.labeling.domain.tokens import TURN_OVERHEAD_TOKENS, TokenCounter, TokenizerSource, Turns

log = logging.getLogger(__name__)

# What AutoTokenizer reads from a model directory: the tokenizer in its formats (fast tokenizer.json, WordPiece,
# BPE, SentencePiece), its settings and special tokens, its chat template, and config.json (a few kB: the model
# type picks the tokenizer class when tokenizer_config.json does not name one). Not the weights.
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "tokenizer.model",
        "chat_template.jinja",
        "chat_template.json",
        "config.json",
    }
)
# Characters of turn texts whose token counts a counter remembers, so that the turns a long conversation keeps
# are not encoded again for each cut it is tried at, nor a shared system prompt again for each batch.
_MEMO_CHARS = 16_000_000


class HfTokenCounter(TokenCounter):
    """Counts with a loaded transformers tokenizer (see the module docstring for how)."""

    def __init__(self, tokenizer: Any, name: str = "") -> None:
        self.name = name
        self._tokenizer = tokenizer
        self.chat_template = bool(getattr(tokenizer, "chat_template", None))
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # Turn text → tokens. Shared by the imports that use this counter at once: counts never change, so a
        # lost update only costs an encoding (each dict operation is atomic); cleared when full.
        self._memo: dict[str, int] = {}
        self._memo_chars = 0
        self._encoder: Any = None
        if backend is not None:
            # A private copy: the wrapper switches truncation and padding on the shared one per call, and a
            # tokenizer.json may carry its own (all-MiniLM-L6-v2's truncates to 128).
            from tokenizers import Tokenizer

            self._encoder = Tokenizer.from_str(backend.to_str())
            self._encoder.no_truncation()
            self._encoder.no_padding()

    def lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text, without added special tokens."""
        if not texts:
            return []
        if self._encoder is not None:
            encodings = self._encoder.encode_batch_fast(list(texts), add_special_tokens=False)
            return [len(encoding.ids) for encoding in encodings]
        ids = self._tokenizer(
            list(texts), add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
        )["input_ids"]
        return [len(row) for row in ids]

    def count_many(self, conversations: Sequence[Turns]) -> list[int]:
        rendered: list[str | None] = [self._render(turns) for turns in conversations] if self.chat_template else []
        by_turn = [index for index in range(len(conversations)) if not rendered or rendered[index] is None]
        counts = [0] * len(conversations)
        if rendered:
            templated = [index for index in range(len(conversations)) if rendered[index] is not None]
            for index, tokens in zip(templated, self.lengths([rendered[i] or "" for i in templated]), strict=True):
                counts[index] = tokens
        if by_turn:
            # Each distinct text is encoded once, and not again while the counter remembers it.
            memo = self._memo
            tokens_of = {text: memo.get(text) for index in by_turn for text in _turn_texts(conversations[index])}
            new = [text for text, tokens in tokens_of.items() if tokens is None]
            size = sum(map(len, new))
            if self._memo_chars + size > _MEMO_CHARS:
                memo.clear()
                self._memo_chars = 0
            self._memo_chars += size
            for text, tokens in zip(new, self.lengths(new), strict=True):
                tokens_of[text] = memo[text] = tokens
            for index in by_turn:
                turns = conversations[index]
                counted = sum(tokens_of[text] or 0 for text in _turn_texts(turns))
                counts[index] = counted + TURN_OVERHEAD_TOKENS * len(turns)
        return counts

    def _render(self, turns: Turns) -> str | None:
        try:
            text = self._tokenizer.apply_chat_template(
                [message.to_json() for message in turns], tokenize=False, add_generation_prompt=False
            )
        except Exception as exc:
            log.debug("chat template of %s refused a conversation (%s); counting its turns", self.name, exc)
            return None
        return text if isinstance(text, str) else None


def _turn_texts(turns: Turns) -> list[str]:
    texts = []
    for message in turns:
        texts.append(message.content)
        if message.tool_calls:
            texts.append(message.tool_calls)
    return texts


def load_counter(directory: Path, name: str) -> HfTokenCounter:
    """``directory``'s tokenizer (``AutoTokenizer``, local files only); ``FailedPreconditionError`` when it cannot
    be loaded."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise FailedPreconditionError(
            f"the tokenizer of base model {name!r} cannot be loaded: {type(exc).__name__}: {str(exc)[:300]}"
        ) from None
    return HfTokenCounter(tokenizer, name)


class _LoadedCounters:
    """Loaded counters by key, least recently used evicted beyond ``capacity``; each key loaded once at a time."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._counters: OrderedDict[str, HfTokenCounter] = OrderedDict()
        self._guard = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, key: str, load: Callable[[], HfTokenCounter]) -> HfTokenCounter:
        with self._guard:
            found = self._counters.get(key)
            if found is not None:
                self._counters.move_to_end(key)
                return found
            lock = self._loading.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                found = self._counters.get(key)
            if found is None:
                found = load()
            with self._guard:
                self._counters[key] = found
                self._counters.move_to_end(key)
                while len(self._counters) > self.capacity:
                    self._counters.popitem(last=False)
                self._loading.pop(key, None)
            return found


class RegistryTokenizerSource(TokenizerSource):
    """Base models' tokenizers through the registry's ``GetBaseModel``, files from the object store."""

    def __init__(
        self,
        address: str,
        objects: ObjectStore,
        cache_dir: Path,
        *,
        timeout_s: float = 30.0,
        capacity: int = 8,
        tls: TlsSettings | None = None,
        metadata_for: Callable[[str], tuple[tuple[str, str], ...]] = lambda organization_id: (),
    ) -> None:
        """``tls``: mTLS to the registry; ``metadata_for(organization_id)``: this service's key acting for the
        project's organisation (``Security.call_metadata``)."""
        self.address = address
        self._objects = objects
        self._cache_dir = Path(cache_dir)
        self._registry = RegistryBaseModels(address, timeout_s=timeout_s, tls=tls, metadata_for=metadata_for)
        self._loaded = _LoadedCounters(capacity)

    def base_model(self, organization_id: str, name: str) -> registry_pb2.BaseModel:
        return self._registry.get(organization_id, name, field="settings.cleaning.tokenizer")

    def counter(self, organization_id: str, base_model_name: str) -> TokenCounter:
        base = stored_base_model(self.base_model(organization_id, base_model_name))
        if not any(name in TOKENIZER_FILES and name != "config.json" for name in base.files):
            raise FailedPreconditionError(f"base model {base_model_name!r} has no tokenizer files in the registry")
        return self._loaded.get(base.content_sha256, lambda: self._load(base))

    def _load(self, base: StoredBaseModel) -> HfTokenCounter:
        directory = base.download(self._objects, self._cache_dir / base.content_sha256, only=TOKENIZER_FILES)
        return load_counter(directory, base.name)

    def close(self) -> None:
        self._registry.close()


class LocalTokenizerSource(TokenizerSource):
    """Tokenizers of local model directories by base-model name (tests, benchmarks): nothing is downloaded,
    so nothing is verified either."""

    def __init__(self, directories: Mapping[str, Path], *, capacity: int = 8) -> None:
        self.directories = {name: Path(path) for name, path in directories.items()}
        self._loaded = _LoadedCounters(capacity)

    def counter(self, organization_id: str, base_model_name: str) -> TokenCounter:
        directory = self.directories.get(base_model_name)
        if directory is None:
            raise NotFoundError(f"base model {base_model_name!r} does not exist")
        return self._loaded.get(str(directory.resolve()), lambda: load_counter(directory, base_model_name))

    def close(self) -> None:
        return None
