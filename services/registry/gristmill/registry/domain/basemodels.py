"""Base models: a Hugging Face model directory, checked and described without loading it.

A base model comes from a directory on the registry's host, a prefix in the object store, or a GGUF file (on
the host or in the object store) that ``gguf.dequantize_gguf`` turns into such a directory first. A directory
qualifies when it has ``config.json``, weights (``*.safetensors`` or ``pytorch_model*.bin``) and a tokenizer
(``tokenizer.json``, ``vocab.txt``, ``spiece.model``, ``sentencepiece.bpe.model`` or ``merges.txt`` +
``vocab.json``). The parameter count is summed from the safetensors headers (a JSON header per file: reading
it costs a few kilobytes, no torch); PyTorch-only weights leave it 0.

``content_sha256`` is the SHA-256 of the lines ``<relative name>\\t<sha256>\\n`` in name order: the
same value for the same files wherever they are stored, which is what lineage records.
``chat_template_sha256`` is the SHA-256 of the chat template the tokenizer applies (``read_chat_template``):
training and serving compare it, so a model is served with the template it was trained with.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from gristmill.core import paging
from gristmill.core.base_models import content_sha256
from gristmill.core.chat_templates import (
    chat_template_sha256,
    read_chat_template,
)
from gristmill.core.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from gristmill.core.storage import ObjectStore, object_key, validate_key
from gristmill.core.storage.base import sha256_file
from gristmill.core.tasks import CAUSAL_LM, CHAT, PREFERENCE, task_type_enum_name
from gristmill.core.values import FileRef
from gristmill.registry.domain import names
from gristmill.registry.domain.common import base_model_prefix
from gristmill.registry.domain.gguf import dequantize_gguf, require_gguf_support
from gristmill.registry.domain.model import BaseModel, Caller
from gristmill.registry.domain.names import CLASSIFIER_TASKS
from gristmill.registry.domain.ports import RegistryStore

log = logging.getLogger(__name__)

# A safetensors header larger than this is not a header (the format caps it at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")

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
# What a decoder (``*ForCausalLM``) can be fine-tuned for: plain text, chat (SFT) and preference pairs (DPO).
_DECODER_TASKS = tuple(task_type_enum_name(t) for t in (CAUSAL_LM, CHAT, PREFERENCE))


@dataclass(frozen=True)
class DirectoryFacts:
    model_type: str
    architectures: tuple[str, ...]
    tasks: tuple[str, ...]
    parameter_count: int
    chat_template_sha256: str


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
    template = read_chat_template(root, names)
    return DirectoryFacts(
        model_type,
        architectures,
        infer_tasks(model_type, architectures),
        parameters,
        chat_template_sha256(template) if template else "",
    )


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
        tasks.extend(CLASSIFIER_TASKS)
    if any(a.endswith("ForTokenClassification") for a in architectures) or model_type in _ENCODERS:
        tasks.append("TASK_TYPE_TOKEN_CLASSIFICATION")
    if any(a.endswith("ForCausalLM") for a in architectures):
        tasks.extend(_DECODER_TASKS)
    return tuple(dict.fromkeys(tasks))


def _directory_files(root: Path) -> list[str]:
    """The files under ``root`` a model consists of, relative and sorted; hidden ones are left out."""
    files: list[str] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        # Hidden files and folders (.git, .cache, .gitattributes) are not part of a model.
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        try:
            validate_key(rel.as_posix())
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"file {rel.as_posix()!r} cannot be stored: {exc}") from None
        files.append(rel.as_posix())
    return files


class BaseModels:
    """The base-model aggregate: directories (or GGUF files, de-quantised) imported once, checked, copied and
    described."""

    def __init__(
        self, store: RegistryStore, objects: ObjectStore, *, clock: Callable[[], datetime], allow_local_paths: bool
    ) -> None:
        self.store = store
        self.objects = objects
        self.clock = clock
        self.allow_local_paths = allow_local_paths

    def import_base_model(
        self,
        caller: Caller,
        name: str,
        *,
        local_path: str | None,
        object_prefix: str | None,
        gguf_file: str | None = None,
        gguf_object_key: str | None = None,
        license: str,
        description: str,
        tasks: tuple[str, ...],
    ) -> BaseModel:
        names.validate_base_model_name(name)
        names.validate_text(license, what="license", limit=1000)
        names.validate_text(description, what="description")
        for task in tasks:
            if task == names.TASK_UNSPECIFIED:
                raise InvalidArgumentError("tasks must not contain TASK_TYPE_UNSPECIFIED")
        if sum(s is not None for s in (local_path, object_prefix, gguf_file, gguf_object_key)) != 1:
            raise InvalidArgumentError(
                "set exactly one source: local_path, object_prefix, gguf_file or gguf_object_key"
            )
        org = caller.organization_id
        with self.store.transaction() as tx:
            if tx.get_base_model(org, name) is not None:
                raise AlreadyExistsError(f"base model {name!r} already exists; choose another name")
        with tempfile.TemporaryDirectory(prefix="registry-base-model-") as tmp:
            if local_path is not None:
                root, files = self._local_source(local_path)
            elif object_prefix is not None:
                root, files = self._download_prefix(object_prefix, Path(tmp))
            else:
                root, files = self._gguf_source(gguf_file, gguf_object_key, Path(tmp))
            facts = inspect_directory(root, files)
            prefix = base_model_prefix(org, name)
            started = time.monotonic()
            log.info(
                "base model %r: storing %d files (%.1f MB) under %s",
                name,
                len(files),
                sum((root / rel).stat().st_size for rel in files) / 1e6,
                prefix,
            )
            refs: list[FileRef] = []
            checksums: dict[str, str] = {}
            for rel in files:
                sha = sha256_file(root / rel)
                key = object_key(prefix.rstrip("/"), rel)
                try:
                    existing = self.objects.stat(key)
                except NotFoundError:
                    existing = None
                if existing is None or existing.sha256 != sha:
                    info = self.objects.put_file(key, root / rel, overwrite=existing is not None)
                    sha = info.sha256
                refs.append(FileRef(key, sha, (root / rel).stat().st_size))
                checksums[rel] = sha
            log.info("base model %r: files stored in %.1f s", name, time.monotonic() - started)
        base = BaseModel(
            organization_id=org,
            name=name,
            model_type=facts.model_type,
            architectures=facts.architectures,
            tasks=tasks or facts.tasks,
            parameter_count=facts.parameter_count,
            license=license,
            description=description,
            artifact_prefix=prefix,
            files=tuple(refs),
            content_sha256=content_sha256(checksums),
            create_time=self.clock(),
            chat_template_sha256=facts.chat_template_sha256,
        )
        with self.store.transaction() as tx:
            return tx.insert_base_model(base)

    def _local_source(self, local_path: str) -> tuple[Path, list[str]]:
        if not self.allow_local_paths:
            raise FailedPreconditionError(
                "importing from a local path is disabled in this installation "
                "(GRISTMILL_REGISTRY_ALLOW_LOCAL_PATHS); upload the directory and use object_prefix"
            )
        root = Path(local_path)
        if not root.is_absolute():
            raise InvalidArgumentError(f"local_path {local_path[:200]!r} must be an absolute path")
        if not root.is_dir():
            raise NotFoundError(f"local_path {local_path[:200]!r} is not a directory on the registry's host")
        return root, _directory_files(root)

    def _gguf_source(self, gguf_file: str | None, gguf_object_key: str | None, work: Path) -> tuple[Path, list[str]]:
        """De-quantise the GGUF file (on this host, or downloaded from the object store) into ``work``/model."""
        if gguf_file is not None:
            what = f"gguf_file {gguf_file[:200]!r}"
            if not self.allow_local_paths:
                raise FailedPreconditionError(
                    "importing from a local path is disabled in this installation "
                    "(GRISTMILL_REGISTRY_ALLOW_LOCAL_PATHS); upload the file and use gguf_object_key"
                )
            path = Path(gguf_file)
            if not path.is_absolute():
                raise InvalidArgumentError(f"{what} must be an absolute path")
            require_gguf_support()
            if not path.is_file():
                raise NotFoundError(f"{what} is not a file on the registry's host")
            # transformers also reads config and tokenizer files beside the GGUF: give it a folder of its own.
            source = work / "gguf" / path.name
            source.parent.mkdir()
            source.symlink_to(path)
            path = source
        else:
            assert gguf_object_key is not None
            what = f"gguf_object_key {gguf_object_key[:200]!r}"
            try:
                key = validate_key(gguf_object_key)
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"gguf_object_key is not valid: {exc}") from None
            # Refuse before a download of gigabytes that could not be converted anyway.
            require_gguf_support()
            info = self.objects.stat(key)  # NotFoundError names the key
            path = work / "gguf" / Path(key).name
            log.info("GGUF %s: downloading %.1f MB from the object store", key, info.size / 1e6)
            self.objects.get_file(key, path, expected_sha256=info.sha256 or None)
        root = work / "model"
        dequantize_gguf(path, root, what=what)
        return root, _directory_files(root)

    def _download_prefix(self, object_prefix: str, dest: Path) -> tuple[Path, list[str]]:
        try:
            prefix = validate_key(object_prefix.rstrip("/")) + "/"
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"object_prefix is not valid: {exc}") from None
        files: list[str] = []
        for info in self.objects.list(prefix):
            rel = info.key[len(prefix) :]
            self.objects.get_file(info.key, dest / rel, expected_sha256=info.sha256 or None)
            files.append(rel)
        if not files:
            raise NotFoundError(f"object_prefix {prefix!r} holds no objects")
        return dest, files

    def get_base_model(self, caller: Caller, name: str) -> BaseModel:
        names.validate_base_model_name(name)
        with self.store.transaction() as tx:
            found = tx.get_base_model(caller.organization_id, name)
        if found is None:
            raise NotFoundError(f"base model {name!r} does not exist")
        return found

    def list_base_models(
        self, caller: Caller, task: str, page_size: int, page_token: str
    ) -> tuple[list[BaseModel], str]:
        fingerprint = paging.fingerprint("base-models", [task])
        page = paging.page_request(page_size, page_token, fingerprint)
        with self.store.transaction() as tx:
            items, after = tx.list_base_models(
                caller.organization_id, "" if task == names.TASK_UNSPECIFIED else task, page
            )
        return items, paging.next_page_token(after, fingerprint)
