"""``hyper_parameters.gradient_checkpointing``: every transformer block runs its layers twice per training step
(once more in the backward pass, to recompute what it did not keep) and the run learns exactly what it learns
without; the option travels from the proto to the loop and into the lineage."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.core.errors import InvalidArgumentError
from gristmill.core.storage import ObjectStore
from gristmill.training.api import convert
from gristmill.training.domain import spec as d
from gristmill.training.domain.refs import DatasetRef
from gristmill.training.domain.resolve import BaseModelCatalog, DatasetCatalog, ModelInfo, SpecResolver
from gristmill.training.ml import modeling
from gristmill.training.ml.inspect import HfModelInspector
from gristmill.training.ml.loop import DirectorySession, ListSink, LoopConfig, LoopRunner
from gristmill.training.tasks import training_task
from services.training.tests.unit.test_chat_sft import _loop_config, chat_spec_proto
from services.training.tests.unit.test_loop import _config as _classifier_config
from services.training.tests.unit.test_resolve import FixedCapacity, _resolver, _spec


def _train(config: LoopConfig, root: Path, *, checkpointing: bool) -> tuple[list[float], dict[str, Any], int]:
    """Train; the logged losses, the trained parameters and how often the first block's attention ran."""
    sink = ListSink()
    config = replace(config, sink=sink, hyper=replace(config.hyper, gradient_checkpointing=checkpointing))
    runner = LoopRunner(config, 0, 1, 0, DirectorySession(root))
    calls = 0

    def count(*_: Any) -> None:
        nonlocal calls
        calls += 1

    original = runner._setup

    def setup() -> None:
        original()
        # The first block's attention: transformers checkpoints a block's forward (its own hooks stay outside, for
        # FSDP2), so the recompute shows in the modules inside it.
        first = next(m for m in runner.model.modules() if type(m).__name__ in {"LlamaAttention", "BertAttention"})
        first.register_forward_hook(count)

    runner._setup = setup  # type: ignore[method-assign]
    runner.run()
    base: Any = runner.model.get_base_model() if hasattr(runner.model, "get_base_model") else runner.model
    assert base.is_gradient_checkpointing is checkpointing
    losses = [r["metrics"]["loss"] for r in sink.records if r["type"] == "train"]
    trained = {n: p.detach().clone() for n, p in runner.model.named_parameters() if p.requires_grad}
    return losses, trained, calls


@pytest.mark.parametrize("kind", ["sft-lora", "classify-full"])
def test_checkpointing_recomputes_each_block_and_learns_the_same(
    kind: str, tiny_llama: Path, tiny_model: Path, tmp_path: Path
) -> None:
    if kind == "sft-lora":
        config = _loop_config(tiny_llama, ListSink(), epochs=1, eval_every_steps=0, log_every_steps=1)
        config = replace(config, examples={"train": config.examples["train"][:32]})
    else:
        config = _classifier_config(tiny_model, epochs=1, eval_every_steps=0, log_every_steps=1)
        config = replace(config, examples={"train": config.examples["train"][:32]})
    plain_losses, plain_weights, plain_calls = _train(config, tmp_path / "plain", checkpointing=False)
    losses, weights, calls = _train(config, tmp_path / "checkpointed", checkpointing=True)
    # 32 examples in batches of 8: four steps, each one forward of the block, and one more when recomputed.
    assert (plain_calls, calls) == (4, 8)
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    assert weights.keys() == plain_weights.keys()
    for name, value in plain_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6)


def test_a_model_that_cannot_checkpoint_is_named() -> None:
    with pytest.raises(modeling.GradientCheckpointingUnsupportedError, match="Linear does not support gradient"):
        modeling.enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_the_option_maps_from_the_proto_into_the_lineage() -> None:
    source = chat_spec_proto(display_name="gc", method=pb.TRAINING_METHOD_LORA, objective=pb.OBJECTIVE_SFT)
    source.hyper_parameters.gradient_checkpointing = True
    spec = convert.spec_from_proto(source)
    assert spec.hyper_parameters.gradient_checkpointing
    assert convert.spec_to_proto(spec).hyper_parameters.gradient_checkpointing
    assert d.flatten_hyper_parameters(spec)["gradient_checkpointing"] == "true"
    source.hyper_parameters.gradient_checkpointing = False
    assert d.flatten_hyper_parameters(convert.spec_from_proto(source))["gradient_checkpointing"] == "false"


class _NoCheckpointing(HfModelInspector):
    """The real inspection, of a model class that cannot checkpoint."""

    def inspect(self, model_dir: Path, task: Any, label_map: Any) -> ModelInfo:
        return replace(super().inspect(model_dir, task, label_map), supports_gradient_checkpointing=False)


def test_a_base_whose_class_cannot_checkpoint_is_refused_at_submit(
    objects: ObjectStore, dataset: DatasetRef, tiny_model: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_model, dataset)
    spec = replace(spec, hyper_parameters=replace(spec.hyper_parameters, gradient_checkpointing=True))
    # The tiny BERT's class can: the real inspector says so and the spec resolves.
    assert (
        HfModelInspector()
        .inspect(tiny_model, training_task("text-classification"), ("a", "b"))
        .supports_gradient_checkpointing
    )
    assert _resolver(objects, tmp_path).resolve(spec).spec.hyper_parameters.gradient_checkpointing
    resolver = SpecResolver(
        DatasetCatalog(objects),
        BaseModelCatalog(objects, tmp_path / "cache", allow_local_paths=True),
        _NoCheckpointing(),
        FixedCapacity(),
    )
    with pytest.raises(
        InvalidArgumentError, match="spec.hyper_parameters.gradient_checkpointing: .* cannot recompute"
    ) as caught:
        resolver.resolve(spec)
    assert caught.value.details == {"field": "spec.hyper_parameters.gradient_checkpointing"}
    resolver.resolve(replace(spec, hyper_parameters=replace(spec.hyper_parameters, gradient_checkpointing=False)))
