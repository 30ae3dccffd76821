"""Slimmer classifiers: structured pruning (``ml.slimming``), distillation (``ml.distillation``), both in the loop,
and their spec rules."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from gristmill.core.storage import ObjectStore
from gristmill.training.api import convert
from gristmill.training.devtools import LABELS, sentiment_rows
from gristmill.training.domain import spec as d
from gristmill.training.domain.refs import BaseModelRef, DatasetRef
from gristmill.training.domain.runs import SideModel
from gristmill.training.ml import distillation as D
from gristmill.training.ml import slimming as S
from gristmill.training.ml.loop import DirectorySession, ListSink, LoopConfig, LoopRunner
from gristmill.training.tasks import training_task
from gristmill.training.tasks.text_classification import LabelledText
from services.training.tests.unit.test_resolve import _resolver, _spec


def _bert(layers: int = 4, hidden: int = 48, vocab: int = 300, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=3,
    )
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        # Random LayerNorm scales and shifts: the mapping must carry them, not rely on ones and zeros.
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model


def _inputs(vocab: int = 300) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (6, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[3:, 8:] = 0  # padded rows too
    return {"input_ids": ids, "attention_mask": mask}


# -- slimming --------------------------------------------------------------------------------------------------


KEPT = [
    (6, 3, [0, 2, 5]),
    (6, 2, [0, 5]),
    (6, 1, [5]),
    (4, 0, [0, 1, 2, 3]),
    (4, 4, [0, 1, 2, 3]),
    (12, 4, [0, 4, 7, 11]),
]


@pytest.mark.parametrize(("total", "keep", "expected"), KEPT)
def test_kept_layers_are_evenly_spaced_with_the_first_and_last(total: int, keep: int, expected: list[int]) -> None:
    assert S.kept_layers(total, keep) == expected


def test_a_factorised_embedding_of_full_rank_computes_exactly_what_the_teacher_computes() -> None:
    """E = H: every direction a centred H-vector can take is kept, so the ALBERT student is the BERT teacher under
    other names (LayerNorm centring, its scale and shift, and the projection all carried over)."""
    teacher = _bert()
    student = S.slim_bert_classifier(teacher, S.SlimShape(embedding_size=48)).eval()
    assert type(student).__name__ == "AlbertForSequenceClassification"
    with torch.no_grad():
        expected, got = teacher(**_inputs()).logits, student(**_inputs()).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_narrower_embeddings_and_fewer_layers_make_a_smaller_model_that_stays_close() -> None:
    teacher = _bert(layers=4, hidden=48)
    narrow = S.slim_bert_classifier(teacher, S.SlimShape(layers=2, embedding_size=16)).eval()
    assert narrow.config.num_hidden_layers == 2 and narrow.config.embedding_size == 16
    assert S.parameter_count(narrow) < 0.6 * S.parameter_count(teacher)
    # The kept layers are the teacher's first and last, weight for weight.
    kept = narrow.albert.encoder.albert_layer_groups[1].albert_layers[0]  # type: ignore[union-attr,index]
    assert torch.equal(kept.ffn.weight, teacher.bert.encoder.layer[3].intermediate.dense.weight)
    # Fewer embedding directions lose some of the teacher's input, less with more of them.
    with torch.no_grad():
        reference = teacher.bert(**_inputs()).last_hidden_state
        errors = []
        for width in (8, 24, 40):
            student = S.slim_bert_classifier(teacher, S.SlimShape(embedding_size=width)).eval()
            errors.append((student.albert(**_inputs()).last_hidden_state - reference).norm().item())
    assert errors[0] > errors[1] > errors[2] > 0


def test_cutting_only_layers_keeps_a_bert_with_the_chosen_blocks() -> None:
    teacher = _bert(layers=4)
    student = S.slim_bert_classifier(teacher, S.SlimShape(layers=2)).eval()
    assert isinstance(student, BertForSequenceClassification) and student.config.num_hidden_layers == 2
    assert torch.equal(
        student.bert.encoder.layer[1].output.dense.weight, teacher.bert.encoder.layer[3].output.dense.weight
    )
    # Those blocks, run by hand on the teacher, give the student's output.
    with torch.no_grad():
        inputs = _inputs()
        hidden = teacher.bert.embeddings(input_ids=inputs["input_ids"])
        mask = (1.0 - inputs["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
        for index in (0, 3):
            hidden = teacher.bert.encoder.layer[index](hidden, attention_mask=mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        assert torch.allclose(student.bert(**inputs).last_hidden_state, hidden, atol=1e-5)
    assert teacher.config.num_hidden_layers == 4  # the teacher is not changed


def _without_neurons(teacher: Any, kept: list[torch.Tensor], layers: list[int]) -> Any:
    """A copy of ``teacher`` whose feed-forward neurons other than ``kept`` (per layer in ``layers``) contribute
    nothing (output columns zeroed): what a student that drops them must compute."""
    reference = type(teacher)(teacher.config).eval()
    reference.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for index, neurons in zip(layers, kept, strict=True):
            weight = reference.bert.encoder.layer[index].output.dense.weight
            dropped = torch.ones(weight.shape[1], dtype=torch.bool)
            dropped[neurons] = False
            weight[:, dropped] = 0.0
    return reference


@pytest.mark.parametrize("embedding_size", [0, 48])
def test_a_narrower_feed_forward_keeps_the_strongest_neurons_and_computes_the_teacher_without_the_others(
    embedding_size: int,
) -> None:
    """Both student classes (a BERT when the embeddings are kept, an ALBERT when factorised at full rank): the
    student is exactly the teacher with the dropped neurons silenced, layer for layer."""
    teacher = _bert(layers=4, hidden=48)
    with torch.no_grad():  # one neuron made the strongest of layer 3, one the weakest: the choice must follow
        teacher.bert.encoder.layer[3].intermediate.dense.weight[7] *= 10
        teacher.bert.encoder.layer[3].output.dense.weight[:, 9] *= 0.01
    student = S.slim_bert_classifier(
        teacher, S.SlimShape(layers=2, embedding_size=embedding_size, intermediate_size=40)
    )
    assert student.config.intermediate_size == 40 and student.config.num_hidden_layers == 2
    kept = [S.kept_neurons(teacher.bert.encoder.layer[i], 40) for i in (0, 3)]
    assert 7 in kept[1] and 9 not in kept[1] and all(len(k) == 40 and torch.all(k[1:] > k[:-1]) for k in kept)
    assert S.parameter_count(student) < S.parameter_count(S.slim_bert_classifier(teacher, S.SlimShape(layers=2)))
    reference = S.slim_bert_classifier(_without_neurons(teacher, kept, [0, 3]), S.SlimShape(layers=2))
    with torch.no_grad():
        expected, got = reference.eval()(**_inputs()).logits, student.eval()(**_inputs()).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # As wide as the teacher's feed-forward (or 0): every neuron, in order.
    assert torch.equal(S.kept_neurons(teacher.bert.encoder.layer[0], 96), torch.arange(96))
    assert torch.equal(S.kept_neurons(teacher.bert.encoder.layer[0], 0), torch.arange(96))


def test_the_student_saves_and_loads_with_transformers_auto_classes(tmp_path: Path) -> None:
    teacher = _bert()
    student = S.slim_bert_classifier(teacher, S.SlimShape(layers=2, embedding_size=16, intermediate_size=32)).eval()
    student.save_pretrained(tmp_path, safe_serialization=True)  # type: ignore[operator]
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs()).logits, student(**_inputs()).logits)


# -- the loss --------------------------------------------------------------------------------------------------


def test_the_distillation_loss_mixes_the_labels_and_the_softened_teacher() -> None:
    torch.manual_seed(0)
    logits, teacher, labels = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    hard = F.cross_entropy(logits, labels)
    assert torch.equal(D.distillation_loss(logits, teacher, labels, temperature=2.0, weight=0.0), hard)
    # Matching the teacher exactly leaves only the hard term.
    same = D.distillation_loss(teacher, teacher, labels, temperature=3.0, weight=0.25)
    assert same.item() == pytest.approx(0.75 * F.cross_entropy(teacher, labels).item(), rel=1e-5)
    # The soft term by its definition: T^2 KL(p_teacher || p_student) over softened distributions.
    t = 4.0
    p = F.softmax(teacher / t, dim=-1)
    kl = (p * (p.log() - F.log_softmax(logits / t, dim=-1))).sum(dim=-1).mean() * t * t
    mixed = D.distillation_loss(logits, teacher, labels, temperature=t, weight=0.9)
    assert mixed.item() == pytest.approx(0.1 * hard.item() + 0.9 * kl.item(), rel=1e-5)


def test_the_teacher_loss_looks_up_each_rows_outputs_by_example_index() -> None:
    model = _bert(layers=1, hidden=16)
    batch_inputs = _inputs()
    table, hidden = torch.randn(10, 3), torch.randn(10, 16) * 3.0
    rows = [7, 2, 9, 0, 4, 1]
    labels = torch.zeros(6, dtype=torch.long)
    batch = type("B", (), {**batch_inputs, "labels": labels})()
    logits_only = D.Teacher(D.TeacherOutputs(table, hidden), temperature=2.0, weight=1.0)
    both = D.Teacher(D.TeacherOutputs(table, hidden), temperature=2.0, weight=1.0, hidden_weight=0.5)
    with torch.no_grad():
        output = model(**batch_inputs, output_hidden_states=True)
        expected = D.distillation_loss(output.logits, table[rows], labels, temperature=2.0, weight=1.0)
        assert torch.equal(logits_only.loss(model, batch, rows), expected)
        # The hidden term: the last layer's first token against the teacher's, over the teacher's mean variance.
        scale = hidden.var(dim=0).mean()
        first = output.hidden_states[-1][:, 0]
        extra = 0.5 * F.mse_loss(first, hidden[rows]) / scale
        assert both.loss(model, batch, rows).item() == pytest.approx((expected + extra).item(), rel=1e-5)


def test_teacher_outputs_are_the_teachers_in_example_order(tiny_model: Path) -> None:
    examples = [LabelledText(t, LABELS.index(label)) for t, label in sentiment_rows(70, 5)]
    task = training_task("text-classification")
    outputs = D.teacher_outputs(tiny_model, task, examples, LABELS, max_length=32, device=torch.device("cpu"))
    assert outputs.logits.shape == (70, 2) and outputs.hidden.shape == (70, 32)
    assert not outputs.logits.is_inference() and not outputs.hidden.is_inference()
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    with torch.no_grad():
        one = model(**tokenizer([examples[66].text], return_tensors="pt"), output_hidden_states=True)
    assert torch.allclose(outputs.logits[66], one.logits[0], atol=1e-5)
    assert torch.allclose(outputs.hidden[66], one.hidden_states[-1][0, 0], atol=1e-5)


# -- in the loop -----------------------------------------------------------------------------------------------


def _config(model: Path, sink: Any, **changes: Any) -> LoopConfig:
    def examples(n: int, seed: int) -> list[LabelledText]:
        return [LabelledText(t, LABELS.index(label)) for t, label in sentiment_rows(n, seed)]

    hyper = d.build_hyper_parameters(
        method=d.Method.FULL, learning_rate=1e-2, epochs=3, per_worker_batch_size=8, log_every_steps=1
    )
    config = LoopConfig(
        job_id="slim",
        model_dir=str(model),
        label_map=LABELS,
        examples={"train": examples(96, 1), "test": examples(32, 3)},
        method=d.Method.FULL,
        lora=None,
        hyper=hyper,
        sink=sink,
    )
    return dataclasses.replace(config, **changes)


def test_the_loop_prunes_the_base_and_distils_the_teacher_into_it(tiny_model: Path, tmp_path: Path) -> None:
    """The tiny BERT (2 layers, hidden 32) trained first (long enough to be confident: a teacher at 0.53 mean
    probability teaches the uniform distribution), then a 1-layer student with 16-wide embeddings learns from it:
    the published model is the smaller ALBERT, and it learned (the task is easy)."""
    teacher_config = _config(tiny_model, ListSink())
    teacher_config = dataclasses.replace(teacher_config, hyper=dataclasses.replace(teacher_config.hyper, epochs=10))
    teacher_session = DirectorySession(tmp_path / "teacher")
    LoopRunner(teacher_config, 0, 1, 0, teacher_session).run()
    teacher_dir = teacher_session.checkpoints[-1]
    sink, session = ListSink(), DirectorySession(tmp_path / "student")
    config = _config(
        tiny_model,
        sink,
        pruning=d.Pruning(layers=1, embedding_size=16),
        distillation=d.Distillation(teacher=BaseModelRef(local_path=str(teacher_dir)), temperature=2.0, weight=0.9),
        side_models={d.TEACHER: SideModel(str(teacher_dir))},
    )
    config = dataclasses.replace(config, hyper=dataclasses.replace(config.hyper, learning_rate=3e-3, epochs=8))
    LoopRunner(config, 0, 1, 0, session).run()
    started = next(r for r in sink.records if r["type"] == "started")
    assert "teacher_s" in started["timings"]
    final = session.reports[-1]
    assert final["finished"] and final["test_accuracy"] >= 0.9
    student = AutoModelForSequenceClassification.from_pretrained(str(session.checkpoints[-1]))
    assert type(student).__name__ == "AlbertForSequenceClassification"
    assert student.config.num_hidden_layers == 1 and student.config.embedding_size == 16
    teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_dir))
    assert S.parameter_count(student) < 0.7 * S.parameter_count(teacher)


# -- spec ------------------------------------------------------------------------------------------------------


def test_pruning_and_distillation_fields_are_checked_and_survive_the_proto() -> None:
    assert d.build_pruning(given=False, layers=3) is None
    assert d.build_pruning(given=True) is None  # nothing to cut
    assert d.build_pruning(given=True, layers=3, embedding_size=128) == d.Pruning(3, 128)
    assert d.build_pruning(given=True, intermediate_size=768) == d.Pruning(0, 0, 768)
    for bad in ({"layers": -1}, {"embedding_size": 8}, {"layers": 10_000}, {"intermediate_size": 15}):
        with pytest.raises(InvalidArgumentError, match="spec.pruning"):
            d.build_pruning(given=True, **bad)
    teacher = BaseModelRef(object_prefix="models/teacher/1")
    assert d.build_distillation(given=True, teacher=teacher) == d.Distillation(teacher, 2.0, 0.9)
    with pytest.raises(InvalidArgumentError, match=r"spec.distillation.teacher is required"):
        d.build_distillation(given=True)
    for bad_value in ({"temperature": -1.0}, {"temperature": 21.0}, {"weight": 1.5}, {"weight": float("nan")}):
        with pytest.raises(InvalidArgumentError, match="spec.distillation"):
            d.build_distillation(given=True, teacher=teacher, **bad_value)
    with pytest.raises(InvalidArgumentError, match="spec.pruning .*method TRAINING_METHOD_FULL"):
        d.check_compression(d.Method.LORA, d.Pruning(3), None, d.Objective.CLASSIFY)
    with pytest.raises(InvalidArgumentError, match="spec.distillation is only for objective classify"):
        d.check_compression(d.Method.FULL, None, d.Distillation(teacher), d.Objective.SFT)
    d.check_compression(d.Method.LORA, None, d.Distillation(teacher), None)  # distilling into adapters is fine

    proto = convert.spec_to_proto(
        dataclasses.replace(
            d.JobSpec(
                display_name="slim",
                base_model=BaseModelRef(name="minilm"),
                dataset=d.DatasetRef("p", "v"),
                task=d.TaskType.TEXT_CLASSIFICATION,
                method=d.Method.FULL,
                lora=None,
                hyper_parameters=d.build_hyper_parameters(method=d.Method.FULL),
                resources=d.Resources(),
            ),
            pruning=d.Pruning(3, 128, 768),
            distillation=d.Distillation(teacher, 4.0, 0.5),
        )
    )
    back = convert.spec_from_proto(proto)
    assert back.pruning == d.Pruning(3, 128, 768) and back.distillation == d.Distillation(teacher, 4.0, 0.5)
    flat = d.flatten_hyper_parameters(
        dataclasses.replace(back, distillation=d.Distillation(dataclasses.replace(teacher, content_sha256="ab" * 32)))
    )
    assert flat["pruning.layers"] == "3" and flat["pruning.embedding_size"] == "128"
    assert flat["pruning.intermediate_size"] == "768"
    assert flat["distillation.teacher"] == "object_prefix:models/teacher/1"
    assert flat["distillation.teacher.content_sha256"] == "ab" * 32
    assert "distillation.hidden_weight" not in flat  # decided when resolved
    hidden = dataclasses.replace(back, distillation=d.Distillation(teacher, hidden_weight=0.0))
    assert d.flatten_hyper_parameters(hidden)["distillation.hidden_weight"] == "0.0"
    assert convert.spec_from_proto(convert.spec_to_proto(hidden)).distillation == d.Distillation(teacher, 2.0, 0.9, 0.0)
    with pytest.raises(InvalidArgumentError, match="spec.distillation.hidden_weight must be in"):
        d.build_distillation(given=True, teacher=teacher, hidden_weight=-1.0)
    proto.distillation.ClearField("teacher")
    with pytest.raises(InvalidArgumentError, match="spec.distillation.teacher is required"):
        convert.spec_from_proto(proto)


# -- resolving (before any Ray work) ---------------------------------------------------------------------------


def test_the_resolver_checks_the_cut_and_the_teacher_naming_the_field(
    objects: ObjectStore, dataset: DatasetRef, tiny_model: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    resolver = _resolver(objects, tmp_path)
    teacher = BaseModelRef(local_path=str(tiny_model))
    resolved = resolver.resolve(
        _spec(tiny_model, dataset, pruning=d.Pruning(1, 16), distillation=d.Distillation(teacher))
    )
    # The effective spec records the teacher's content checksum (the lineage's), and the run gets its files.
    assert resolved.spec.distillation is not None and len(resolved.spec.distillation.teacher.content_sha256) == 64
    assert resolved.spec.distillation.hidden_weight == d.DEFAULT_HIDDEN_WEIGHT  # the same hidden size
    assert resolved.side_models[d.TEACHER].local_dir == tiny_model

    def refused(error: type[Exception], match: str, **changes: object) -> None:
        with pytest.raises(error, match=match) as caught:
            resolver.resolve(_spec(tiny_model, dataset, **changes))
        assert caught.value.details["field"].startswith(match.split(" ")[0])  # type: ignore[attr-defined]

    refused(InvalidArgumentError, "spec.pruning.layers is 3 but the base model has 2 layers", pruning=d.Pruning(3))
    refused(
        InvalidArgumentError,
        "spec.pruning.embedding_size is 32 but the base model's hidden size is 32",
        pruning=d.Pruning(0, 32),
    )
    refused(
        InvalidArgumentError,
        "spec.pruning.intermediate_size is 64 but the base model's feed-forward has 64 neurons",
        pruning=d.Pruning(0, 0, 64),
    )
    with pytest.raises(NotFoundError, match="spec.distillation.teacher: base model directory") as missing:
        resolver.resolve(
            _spec(tiny_model, dataset, distillation=d.Distillation(BaseModelRef(local_path=str(tmp_path / "nope"))))
        )
    assert missing.value.details == {"field": "spec.distillation.teacher"}
    # A teacher over other labels (or none) cannot teach this label map.
    other = tmp_path / "other-labels"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "positive", "1": "negative"}, {"positive": 0, "negative": 1}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(FailedPreconditionError, match=r"teacher must be a classifier over the dataset's labels"):
        resolver.resolve(_spec(tiny_model, dataset, distillation=d.Distillation(BaseModelRef(local_path=str(other)))))
    # Hidden-state matching needs the same width: a wider teacher turns it off, unless asked for (refused).
    wide = tmp_path / "wide"
    S.slim_bert_classifier(_bert(layers=1, hidden=48), S.SlimShape()).save_pretrained(wide)  # type: ignore[operator]
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(wide)
    config = json.loads((wide / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "negative", "1": "positive"}, {"negative": 0, "positive": 1}
    (wide / "config.json").write_text(json.dumps(config))
    off = resolver.resolve(_spec(tiny_model, dataset, distillation=d.Distillation(BaseModelRef(local_path=str(wide)))))
    assert off.spec.distillation is not None and off.spec.distillation.hidden_weight == 0.0
    with pytest.raises(InvalidArgumentError, match="base model's is 32 and the teacher's 48") as caught:
        resolver.resolve(
            _spec(
                tiny_model, dataset, distillation=d.Distillation(BaseModelRef(local_path=str(wide)), hidden_weight=1.0)
            )
        )
    assert caught.value.details == {"field": "spec.distillation.hidden_weight"}
    # A Llama base cannot be cut (the pruning maps BERT encoders).
    with pytest.raises(FailedPreconditionError, match="spec.pruning cuts BERT-family encoders.*'llama'"):
        resolver.resolve(_spec(tiny_llama, dataset, pruning=d.Pruning(1)))
