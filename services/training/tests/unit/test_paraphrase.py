"""Paraphrase augmentation (few labels): the generation, its place in the loop, its spec rules and resolution."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from gristmill.core.errors import InvalidArgumentError
from gristmill.core.storage import ObjectStore
from gristmill.training.api import convert
from gristmill.training.devtools import LABELS, sentiment_rows
from gristmill.training.domain import spec as d
from gristmill.training.domain.refs import BaseModelRef, DatasetRef
from gristmill.training.domain.runs import SideModel
from gristmill.training.ml import paraphrase as P
from gristmill.training.ml.loop import DirectorySession, ListSink, LoopConfig, LoopRunner
from gristmill.training.tasks.text_classification import LabelledText
from services.training.tests.unit.test_resolve import _resolver, _spec

CPU = torch.device("cpu")


def _examples(n: int, seed: int) -> list[LabelledText]:
    return [LabelledText(t, LABELS.index(label)) for t, label in sentiment_rows(n, seed)]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("  The food was lovely.\nMore text", "The food was lovely."),
        ('Paraphrase: "Great service"', "Great service"),
        ("\n\n\u201cNice place\u201d", "Nice place"),
        ("   \n  ", ""),
        ('""', ""),
    ],
)
def test_a_reply_is_cleaned_to_its_first_line(reply: str, expected: str) -> None:
    assert P.clean(reply) == expected


def test_paraphrases_follow_the_examples_keep_their_labels_and_are_seeded(tiny_llama: Path) -> None:
    examples = _examples(20, 1)  # more than one generation batch
    out = P.paraphrase(examples, tiny_llama, copies=2, seed=7, device=CPU)
    assert out[:20] == examples and len(out) == 60
    assert [e.label for e in out[20:]] == [e.label for e in examples] * 2
    assert all(e.text for e in out)
    # The tiny model's paraphrases are noise, but noise of its own: not the original texts.
    assert sum(copy.text != original.text for copy, original in zip(out[20:], examples * 2, strict=True)) >= 30
    assert out[20:40] != out[40:]  # the two copies differ
    assert P.paraphrase(examples, tiny_llama, copies=2, seed=7, device=CPU) == out  # a resumed run sees the same
    assert P.paraphrase(examples, tiny_llama, copies=2, seed=8, device=CPU) != out
    assert P.paraphrase(examples, tiny_llama, copies=0, seed=7, device=CPU) == examples


def test_the_loop_trains_on_paraphrased_copies(tiny_model: Path, tiny_llama: Path, tmp_path: Path) -> None:
    hyper = d.build_hyper_parameters(
        method=d.Method.FULL, learning_rate=1e-2, epochs=1, per_worker_batch_size=8, log_every_steps=1
    )
    few = d.build_few_labels(paraphrase_copies=1, paraphrase_model=BaseModelRef(local_path=str(tiny_llama)))
    sink = ListSink()
    config = LoopConfig(
        job_id="para",
        model_dir=str(tiny_model),
        label_map=LABELS,
        examples={"train": _examples(32, 1), "test": _examples(16, 3)},
        method=d.Method.FULL,
        lora=None,
        hyper=dataclasses.replace(hyper, few_labels=few),
        sink=sink,
        side_models={d.PARAPHRASER: SideModel(str(tiny_llama))},
    )
    LoopRunner(config, 0, 1, 0, DirectorySession(tmp_path)).run()
    started = next(r for r in sink.records if r["type"] == "started")
    assert started["total_steps"] == 8  # 32 examples and 32 paraphrases, batches of 8, one epoch
    assert started["timings"]["paraphrase_s"] > 0


def test_paraphrase_fields_are_checked_survive_the_proto_and_reach_the_lineage() -> None:
    model = BaseModelRef(name="smollm2-135m-instruct")
    few = d.build_few_labels(paraphrase_copies=2, paraphrase_model=model)
    assert few.enabled and (few.paraphrase_copies, few.paraphrase_model) == (2, model)
    for bad, field in (
        ({"paraphrase_copies": 2}, "paraphrase_model is required"),
        ({"paraphrase_model": model}, "paraphrase_model is only used with paraphrase_copies"),
        ({"paraphrase_copies": 9, "paraphrase_model": model}, "paraphrase_copies must be between 0 and 8"),
    ):
        with pytest.raises(InvalidArgumentError, match=field):
            d.build_few_labels(**bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="few_labels is only for objective classify"):
        d.check_few_labels(few, d.Objective.SFT)
    spec = d.JobSpec(
        display_name="para",
        base_model=BaseModelRef(name="minilm"),
        dataset=d.DatasetRef("p", "v"),
        task=d.TaskType.TEXT_CLASSIFICATION,
        method=d.Method.FULL,
        lora=None,
        hyper_parameters=d.build_hyper_parameters(method=d.Method.FULL, few_labels=few),
        resources=d.Resources(),
    )
    proto = convert.spec_to_proto(spec)
    assert convert.spec_from_proto(proto).hyper_parameters.few_labels == few
    resolved = dataclasses.replace(model, content_sha256="cd" * 32)
    flat = d.flatten_hyper_parameters(
        dataclasses.replace(
            spec,
            hyper_parameters=dataclasses.replace(
                spec.hyper_parameters, few_labels=dataclasses.replace(few, paraphrase_model=resolved)
            ),
        )
    )
    assert flat["few_labels.paraphrase_copies"] == "2"
    assert flat["few_labels.paraphrase_model"] == "base_model_name:smollm2-135m-instruct"
    assert flat["few_labels.paraphrase_model.content_sha256"] == "cd" * 32
    assert d.side_models(spec) == {d.PARAPHRASER: model}


def test_the_resolver_wants_a_chat_model_for_paraphrases_naming_the_field(
    objects: ObjectStore,
    dataset: DatasetRef,
    tiny_model: Path,
    tiny_llama: Path,
    templateless_llama: Path,
    tmp_path: Path,
) -> None:
    resolver = _resolver(objects, tmp_path)

    def spec(model: Path) -> d.JobSpec:
        plain = _spec(tiny_model, dataset)
        few = d.build_few_labels(paraphrase_copies=1, paraphrase_model=BaseModelRef(local_path=str(model)))
        return dataclasses.replace(plain, hyper_parameters=dataclasses.replace(plain.hyper_parameters, few_labels=few))

    resolved = resolver.resolve(spec(tiny_llama))
    model = resolved.spec.hyper_parameters.few_labels.paraphrase_model
    assert model is not None and len(model.content_sha256) == 64
    assert resolved.side_models[d.PARAPHRASER].local_dir == tiny_llama
    where = "spec.hyper_parameters.few_labels.paraphrase_model"
    with pytest.raises(InvalidArgumentError, match=f"{where}: the model \\(llama\\) has no chat template") as caught:
        resolver.resolve(spec(templateless_llama))
    assert caught.value.details == {"field": where}
    with pytest.raises(InvalidArgumentError, match=f"{where}: the model \\(bert\\) has no chat template") as caught:
        resolver.resolve(spec(tiny_model))  # a BERT classifier is no chat model
    assert caught.value.details == {"field": where}
