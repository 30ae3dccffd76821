"""QLoRA (TRAINING_METHOD_QLORA): refused before any Ray work without GPU workers (FAILED_PRECONDITION naming
spec.method) or for classification (INVALID_ARGUMENT); resolved like LoRA where the cluster has GPUs.

This machine has no CUDA device (and CI has none), so nothing here trains in 4-bit. The refusals are real; the
worker's model building is checked for its clear errors on a host without CUDA or bitsandbytes, and for what it
asks transformers and PEFT for (with their loading replaced), not for what 4-bit kernels compute."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.core.storage import ObjectStore
from gristmill.training.api import convert
from gristmill.training.app import TrainingApp
from gristmill.training.domain import spec as d
from gristmill.training.domain.refs import DatasetRef
from gristmill.training.domain.resolve import BaseModelCatalog, ClusterCapacity, DatasetCatalog, SpecResolver
from gristmill.training.ml import modeling
from gristmill.training.ml.inspect import HfModelInspector
from services.training.tests.unit.test_chat_sft import _build_arguments, _spec, chat_spec_proto

QLORA = d.Method.QLORA


class Capacity:
    def __init__(self, gpus: float) -> None:
        self.value = ClusterCapacity(cpus=4, gpus=gpus, max_node_cpus=4, max_node_gpus=gpus)

    def capacity(self) -> ClusterCapacity:
        return self.value


def _resolver(objects: ObjectStore, tmp_path: Path, gpus: float) -> SpecResolver:
    models = BaseModelCatalog(objects, tmp_path / "cache", allow_local_paths=True)
    return SpecResolver(DatasetCatalog(objects), models, HfModelInspector(), Capacity(gpus))


def _qlora(model: Path, dataset: DatasetRef, *, use_gpu: bool = True) -> d.JobSpec:
    # Built as LoRA and switched: the builder itself refuses QLoRA without use_gpu.
    lora = d.build_lora(method=QLORA, given=False)
    return replace(_spec(model, dataset), method=QLORA, lora=lora, resources=d.build_resources(use_gpu=use_gpu))


def test_qlora_maps_from_the_proto_and_trains_adapters_over_a_quantised_base() -> None:
    source = chat_spec_proto(display_name="q", method=pb.TRAINING_METHOD_QLORA, objective=pb.OBJECTIVE_SFT)
    source.resources.use_gpu = True
    spec = convert.spec_from_proto(source)
    assert spec.method is QLORA and spec.lora is not None and spec.lora.quantize_base
    assert spec.hyper_parameters.learning_rate == d.DEFAULT_LEARNING_RATE[d.Method.LORA]
    assert convert.spec_to_proto(spec).method == pb.TRAINING_METHOD_QLORA
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec
    assert d.flatten_hyper_parameters(spec)["method"] == "qlora"
    lora = d.build_lora(method=d.Method.LORA, given=False)
    assert lora is not None and not lora.quantize_base


def test_qlora_without_gpu_workers_is_refused_naming_the_method() -> None:
    lora = d.build_lora(method=QLORA, given=False)
    with pytest.raises(FailedPreconditionError, match="QLORA needs CUDA GPUs") as caught:
        d.build_spec(**_build_arguments(method=QLORA, lora=lora))
    assert caught.value.details["field"] == "spec.method"
    assert "use TRAINING_METHOD_LORA" in caught.value.message
    with pytest.raises(InvalidArgumentError, match="QLORA trains adapters of generative models") as task:
        d.build_spec(**_build_arguments(method=QLORA, lora=lora, objective=d.Objective.CLASSIFY))
    assert task.value.details["field"] == "spec.method"
    with pytest.raises(InvalidArgumentError, match="publish_merged needs method TRAINING_METHOD_LORA"):
        d.build_spec(
            **_build_arguments(method=QLORA, lora=lora, resources=d.build_resources(use_gpu=True), publish_merged=True)
        )


def test_a_cluster_without_gpus_refuses_qlora_before_reading_anything(objects: ObjectStore, tmp_path: Path) -> None:
    # The dataset version does not exist: the refusal comes before the resolver reads it.
    spec = _qlora(Path("/no/model"), DatasetRef("nowhere", "v1"))
    with pytest.raises(FailedPreconditionError, match="the Ray cluster has no GPUs") as caught:
        _resolver(objects, tmp_path, gpus=0).resolve(spec)
    assert caught.value.details["field"] == "spec.method"
    with pytest.raises(FailedPreconditionError, match="resources.use_gpu is false"):
        _resolver(objects, tmp_path, gpus=1).check_resources(replace(spec, resources=d.build_resources()))


def test_qlora_resolves_like_lora_on_a_gpu_cluster_and_refuses_classification(
    objects: ObjectStore, chat_version: Any, sentiment_version: Any, tiny_llama: Path, tiny_model: Path, tmp_path: Path
) -> None:
    resolver = _resolver(objects, tmp_path, gpus=1)
    resolved = resolver.resolve(_qlora(tiny_llama, chat_version(objects)))
    assert resolved.spec.method is QLORA and resolved.spec.objective is d.Objective.SFT
    assert resolved.spec.lora is not None and resolved.spec.lora.quantize_base
    assert resolved.spec.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    with pytest.raises(InvalidArgumentError, match="not objective classify; use TRAINING_METHOD_LORA") as caught:
        resolver.resolve(_qlora(tiny_model, sentiment_version(objects)))
    assert caught.value.details["field"] == "spec.method"


async def test_submitting_qlora_to_a_service_without_gpus_is_failed_precondition(
    service: tuple[TrainingApp, pb_grpc.TrainingServiceStub], tiny_llama: Path, chat_version: Any
) -> None:
    app, stub = service
    chat_version(app.host.platform.objects, "chats", "v1")
    spec = pb.JobSpec(display_name="q", method=pb.TRAINING_METHOD_QLORA)
    spec.base_model.local_path = str(tiny_llama)
    spec.dataset_version.project_id, spec.dataset_version.dataset_version_id = "chats", "v1"
    for use_gpu, reason in ((False, "resources.use_gpu is false"), (True, "the Ray cluster has no GPUs")):
        spec.resources.use_gpu = use_gpu
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "spec.method TRAINING_METHOD_QLORA needs CUDA GPUs" in (caught.value.details() or "")
        assert reason in (caught.value.details() or "")


# --------------------------------------------------------------------------- the worker's model


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without CUDA")
def test_a_worker_without_cuda_says_qlora_needs_a_gpu(tiny_llama: Path) -> None:
    with pytest.raises(modeling.QuantizationUnavailableError, match="needs a CUDA GPU on the training worker"):
        modeling.load_causal_lm_4bit(tiny_llama)


@pytest.mark.skipif(modeling.bitsandbytes_installed(), reason="bitsandbytes is installed")
def test_a_worker_without_bitsandbytes_says_so(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a GPU worker where bitsandbytes is missing: the error names the package and the alternative.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(modeling.QuantizationUnavailableError, match="needs the bitsandbytes package") as caught:
        modeling.load_causal_lm_4bit(tiny_llama)
    assert "use method lora" in str(caught.value)


def test_the_4bit_base_asks_for_nf4_with_bf16_compute_then_gets_lora_adapters(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the QLoRA path asks of transformers and PEFT. Their loading is replaced (no CUDA, no bitsandbytes
    here): the tiny Llama stands in for the quantised model, so only the requests are checked, not 4-bit maths."""
    import peft
    from transformers import AutoModelForCausalLM

    loaded: dict[str, Any] = {}
    prepared: dict[str, Any] = {}
    real_load = AutoModelForCausalLM.from_pretrained

    def load(path: str, **kwargs: Any) -> Any:
        loaded.update(kwargs, path=path)
        return real_load(path)

    def prepare(model: Any, **kwargs: Any) -> Any:
        prepared.update(kwargs)
        return model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(modeling, "bitsandbytes_installed", lambda: True)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    lora = d.build_lora(method=QLORA, given=False, target_modules=["q_proj", "v_proj"])
    assert lora is not None

    model = modeling.causal_lm_for_training(tiny_llama, lora)

    quantization = loaded["quantization_config"]
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"
    assert quantization.bnb_4bit_compute_dtype is torch.bfloat16
    assert loaded["device_map"] == {"": 0} and loaded["dtype"] is torch.bfloat16
    assert prepared == {"use_gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    assert isinstance(model, peft.PeftModel)
    assert {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
