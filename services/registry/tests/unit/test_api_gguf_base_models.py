"""Base models from GGUF files and the chat template hash, over real gRPC.

A tiny Q8_0 Llama written with the ``gguf`` writer (tests/support/tiny_gguf.py) goes through the whole path:
de-quantised by transformers' GGUF loader, stored as safetensors with its tokenizer and chat template, and the
stored directory loads with ``AutoModelForCausalLM`` and generates what the GGUF-loaded model generates.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import grpc
import pytest

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as pb
from gristmill.core.chat_templates import read_chat_template
from gristmill.registry.domain import gguf as gguf_module
from services.registry.tests.api import Api, fails
from tests.support.tiny_gguf import CHATML_TEMPLATE, write_tiny_llama_gguf

DECODER_TASKS = [common_pb2.TASK_TYPE_CAUSAL_LM, common_pb2.TASK_TYPE_CHAT, common_pb2.TASK_TYPE_PREFERENCE]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hf_decoder_directory(root: Path, tokenizer_config: dict[str, Any] | None = None) -> Path:
    """A header-only Llama directory (no torch needed): config, one safetensors tensor, a tokenizer."""
    root.mkdir(parents=True)
    header = json.dumps({"lm_head.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]}}).encode()
    (root / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 32)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (root / "tokenizer.json").write_text("{}")
    if tokenizer_config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return root


def stored_keys(api: Api) -> list[str]:
    return [info.key for info in api.app.host.platform.objects.list("base-models/")]


def greedy(model: Any, tokenizer: Any) -> list[int]:
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the thin"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [int(t) for t in out[0]]


async def test_directory_import_records_the_chat_template_hash(api: Api) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    in_config = hf_decoder_directory(api.tmp / "in-config", {"chat_template": template})
    named = hf_decoder_directory(
        api.tmp / "named",
        {"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": template}]},
    )
    jinja = hf_decoder_directory(api.tmp / "jinja", {"chat_template": "overridden by the .jinja file"})
    (jinja / "chat_template.jinja").write_text(template + "\n")
    plain = hf_decoder_directory(api.tmp / "plain")

    got = {}
    for source in (in_config, named, jinja, plain):
        got[source.name] = await api.stub.ImportBaseModel(
            pb.ImportBaseModelRequest(name=source.name, local_path=str(source))
        )
    assert got["in-config"].chat_template_sha256 == got["named"].chat_template_sha256 == sha256_text(template)
    assert got["jinja"].chat_template_sha256 == sha256_text(template + "\n")  # the file's text, as written
    assert got["plain"].chat_template_sha256 == ""
    # Decoders can be fine-tuned as language models, on conversations and on preference pairs.
    assert list(got["plain"].tasks) == DECODER_TASKS
    assert (await api.stub.GetBaseModel(pb.GetBaseModelRequest(name="jinja"))) == got["jinja"]
    listed = await api.stub.ListBaseModels(pb.ListBaseModelsRequest(task=common_pb2.TASK_TYPE_CHAT))
    assert [b.name for b in listed.base_models] == ["in-config", "jinja", "named", "plain"]

    bad = hf_decoder_directory(api.tmp / "bad", {"chat_template": 42})
    await fails(
        api.stub.ImportBaseModel(pb.ImportBaseModelRequest(name="bad", local_path=str(bad))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "chat_template must be a string",
    )


def test_chat_template_matches_what_transformers_loads(tmp_path: Path) -> None:
    """The recorded text is the tokenizer's ``chat_template`` after a save/load round trip, byte for byte."""
    import transformers

    gguf_path = write_tiny_llama_gguf(tmp_path / "src" / "tiny.gguf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(tmp_path / "saved")
    names = [p.name for p in (tmp_path / "saved").iterdir()]
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert read_chat_template(tmp_path / "saved", names) == reloaded.chat_template == CHATML_TEMPLATE


async def test_gguf_import_stores_safetensors_tokenizer_and_chat_template(api: Api) -> None:
    import torch
    import transformers

    source = write_tiny_llama_gguf(api.tmp / "gguf" / "tiny-llama.Q8_0.gguf")
    imported = await api.stub.ImportBaseModel(
        pb.ImportBaseModelRequest(name="tiny-llama", gguf_file=str(source), license="apache-2.0")
    )
    prefix = "base-models/tiny-llama/"
    assert sorted(f.key.removeprefix(prefix) for f in imported.files) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]  # the GGUF itself is not kept
    assert (imported.model_type, list(imported.architectures)) == ("llama", ["LlamaForCausalLM"])
    assert list(imported.tasks) == DECODER_TASKS and imported.license == "apache-2.0"
    assert imported.chat_template_sha256 == sha256_text(CHATML_TEMPLATE)

    # The stored directory is a plain Hugging Face model: it loads without the GGUF and generates exactly what
    # the GGUF-loaded model generates (float32 holds the de-quantised Q8_0 values exactly).
    objects = api.app.host.platform.objects
    stored = api.tmp / "stored"
    for ref in imported.files:
        objects.get_file(ref.key, stored / ref.key.removeprefix(prefix), expected_sha256=ref.sha256)
    model = transformers.AutoModelForCausalLM.from_pretrained(stored)
    tokenizer = transformers.AutoTokenizer.from_pretrained(stored)
    assert model.dtype == torch.float32 and tokenizer.chat_template == CHATML_TEMPLATE
    assert imported.parameter_count == sum(p.numel() for p in model.parameters())
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    assert greedy(model, tokenizer) == greedy(reference, reference_tokenizer)

    # The same file from the object store gives the same stored content.
    objects.put_file("uploads/tiny-llama.Q8_0.gguf", source)
    copy = await api.stub.ImportBaseModel(
        pb.ImportBaseModelRequest(name="tiny-llama-2", gguf_object_key="uploads/tiny-llama.Q8_0.gguf")
    )
    assert copy.content_sha256 == imported.content_sha256
    assert copy.chat_template_sha256 == imported.chat_template_sha256


async def test_a_gguf_without_chat_template_records_none(api: Api) -> None:
    source = write_tiny_llama_gguf(api.tmp / "gguf" / "base.gguf", chat_template=None)
    imported = await api.stub.ImportBaseModel(pb.ImportBaseModelRequest(name="base", gguf_file=str(source)))
    assert imported.chat_template_sha256 == ""
    assert "base-models/base/model.safetensors" in [f.key for f in imported.files]


async def test_bad_gguf_files_are_refused_and_nothing_is_stored(api: Api) -> None:
    not_gguf = api.tmp / "notes.gguf"
    not_gguf.write_text("a text file, not a model")
    truncated = api.tmp / "truncated.gguf"
    truncated.write_bytes(write_tiny_llama_gguf(api.tmp / "whole" / "x.gguf").read_bytes()[:2000])
    unsupported = write_tiny_llama_gguf(api.tmp / "unsupported" / "x.gguf", architecture="nonesuch")
    incomplete = write_tiny_llama_gguf(api.tmp / "incomplete" / "x.gguf", leave_out=("blk.1.ffn_up.weight",))
    api.app.host.platform.objects.put_file("uploads/notes.gguf", not_gguf)

    def request(**source: str) -> pb.ImportBaseModelRequest:
        return pb.ImportBaseModelRequest(name="bad", **source)

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    for call, code, message in [
        (request(gguf_file=str(not_gguf)), invalid, "is not a GGUF file"),
        (request(gguf_object_key="uploads/notes.gguf"), invalid, "is not a GGUF file"),
        (request(gguf_file=str(truncated)), invalid, "is not a readable GGUF file (truncated or corrupt"),
        (request(gguf_file=str(unsupported)), invalid, "architecture nonesuch is not supported"),
        (request(gguf_file=str(incomplete)), invalid, "lacks weights the llama architecture needs"),
        (request(gguf_file="model.gguf"), invalid, "must be an absolute path"),
        (request(gguf_object_key="../escape.gguf"), invalid, "gguf_object_key is not valid"),
        (request(gguf_file=str(api.tmp / "missing.gguf")), grpc.StatusCode.NOT_FOUND, "is not a file"),
        (request(gguf_object_key="uploads/missing.gguf"), grpc.StatusCode.NOT_FOUND, "uploads/missing.gguf"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await api.stub.ImportBaseModel(call)
        assert info.value.code() == code, info.value.details()
        details = info.value.details() or ""
        assert message in details and "\n" not in details, details
    assert (await api.stub.ListBaseModels(pb.ListBaseModelsRequest())).base_models == []
    assert stored_keys(api) == []


async def test_gguf_import_without_its_packages_is_a_failed_precondition(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf_module, "_REQUIRED_MODULES", ("torch", "no_such_gguf_module"))
    source = write_tiny_llama_gguf(api.tmp / "gguf" / "x.gguf")
    await fails(
        api.stub.ImportBaseModel(pb.ImportBaseModelRequest(name="x", gguf_file=str(source))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "needs no_such_gguf_module on the registry's host (install gristmill-registry[gguf])",
    )
    # A directory import needs none of them.
    directory = hf_decoder_directory(api.tmp / "dir")
    assert (await api.stub.ImportBaseModel(pb.ImportBaseModelRequest(name="d", local_path=str(directory)))).name
