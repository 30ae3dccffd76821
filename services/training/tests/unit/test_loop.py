"""The training loop on a tiny BERT, one worker, in-process (no Ray): learning, early stopping, resume, LoRA."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from gristmill.core.drift import PROFILE_FILE, PredictionProfile, input_length_bin
from gristmill.training.devtools import LABELS, sentiment_rows
from gristmill.training.domain import spec as d
from gristmill.training.domain.runs import LOOP_STATE_FILE
from gristmill.training.domain.supervisor import start_breakdown
from gristmill.training.ml import modeling
from gristmill.training.ml.loop import (
    FINAL_CHECKPOINT_NAME,
    DirectorySession,
    ListSink,
    LoopConfig,
    LoopRunner,
    autocast_dtype,
)
from gristmill.training.tasks.text_classification import LabelledText, TextClassification


def _split(rows: list[tuple[str, str]]) -> tuple[list[str], list[int]]:
    return [t for t, _ in rows], [LABELS.index(label) for _, label in rows]


def _examples(rows: list[tuple[str, str]]) -> list[LabelledText]:
    return [LabelledText(t, LABELS.index(label)) for t, label in rows]


def _config(model: Path, sink: Any = None, *, method: d.Method = d.Method.FULL, **hyper: Any) -> LoopConfig:
    train, validation, test = (
        _examples(sentiment_rows(96, 1)),
        _examples(sentiment_rows(32, 2)),
        _examples(sentiment_rows(32, 3)),
    )
    settings: dict[str, Any] = {
        "learning_rate": 1e-2,
        "epochs": 3,
        "per_worker_batch_size": 8,
        "eval_every_steps": 6,
        "log_every_steps": 3,
    }
    settings.update(hyper)
    lora = d.build_lora(method=method, given=False, target_modules=["query", "value"])
    return LoopConfig(
        job_id="job",
        model_dir=str(model),
        label_map=LABELS,
        examples={"train": train, "validation": validation, "test": test},
        method=method,
        lora=lora,
        hyper=d.build_hyper_parameters(method=method, **settings),
        sink=sink,
    )


def _records(sink: ListSink, kind: str) -> list[dict[str, Any]]:
    return [r for r in sink.records if r["type"] == kind]


def test_a_process_start_after_the_imports_is_reported_at_the_imports(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gristmill.training.ml import loop

    # The /proc start turned into wall time after the wall clock jumped forward (a paused VM catching up).
    monkeypatch.setattr(loop, "_process_start_time", lambda: loop._IMPORTED_AT + 30.0)
    sink = ListSink()
    LoopRunner(_config(tiny_model, sink, epochs=1), 0, 1, 0, DirectorySession(tmp_path)).run()
    timings = _records(sink, "started")[0]["timings"]
    assert timings["process_started"] == timings["imported"] == loop._IMPORTED_AT


def test_full_fine_tune_learns_and_reports_the_final_model(tiny_model: Path, tmp_path: Path) -> None:
    sink = ListSink()
    session = DirectorySession(tmp_path)
    config = _config(tiny_model, sink)
    LoopRunner(config, 0, 1, 0, session).run()
    started = _records(sink, "started")[0]
    assert started["step"] == 0 and started["total_steps"] == 36  # 12 batches of 8 per epoch, 3 epochs
    assert started["trainable_parameters"] == started["total_parameters"] > 0
    # Where the start went: this process's start, its imports and the loop's entry in order, then each phase.
    timings = started["timings"]
    assert 0 < timings["process_started"] <= timings["imported"] <= timings["loop_entered"] <= started["time"]
    phases = ("model_files_s", "tokenizer_s", "model_s", "encode_s", "optimizer_s", "restore_s")
    assert all(timings[p] >= 0 for p in phases) and sum(timings[p] for p in phases) <= started["setup_seconds"] + 0.01
    line = start_breakdown(started, submitted=timings["process_started"] - 1.0)
    assert line.startswith(f"{started['time'] - timings['process_started'] + 1.0:.1f}s after submission: worker")
    assert "worker process at +1.0s" in line and "setup model files" in line and "restore" in line
    train = _records(sink, "train")
    assert [r["step"] for r in train] == list(range(3, 37, 3))
    assert all(r["metrics"]["samples_per_second"] > 0 for r in train)
    # Short sentences of several tokens each: more tokens than samples per second.
    assert all(r["metrics"]["tokens_per_second"] > r["metrics"]["samples_per_second"] for r in train)
    assert train[0]["metrics"]["learning_rate"] > train[-1]["metrics"]["learning_rate"]  # linear decay
    validation = [r for r in _records(sink, "eval") if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [6, 12, 18, 24, 30, 36]
    assert validation[-1]["metrics"]["accuracy"] >= 0.9 > validation[0]["metrics"]["accuracy"] - 0.2
    final = session.reports[-1]
    assert final["finished"] and final["step"] == 36 and final["test_accuracy"] >= 0.9
    model_dir = session.checkpoints[-1]
    assert model_dir.name == FINAL_CHECKPOINT_NAME
    # Every epoch trains on every train example once: the tokens counted are three times the split's, padding left
    # out; the final throughputs share their seconds.
    tokenizer = modeling.load_tokenizer(tiny_model)
    encoded = TextClassification().encode(tokenizer, config.examples["train"], config.hyper.max_sequence_length)
    state = json.loads((model_dir / LOOP_STATE_FILE).read_text())
    assert state["train_samples"] == 3 * 96
    assert state["train_tokens"] == 3 * sum(len(ids) for ids in encoded.input_ids) > state["train_samples"]
    assert final["train_tokens_per_second"] / final["train_samples_per_second"] == pytest.approx(
        state["train_tokens"] / state["train_samples"]
    )
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    # The test split's prediction profile, published with the model (serving's drift reference): one count per
    # test example in each distribution, labels as predicted (accuracy >= 0.9 on a balanced split).
    profile = PredictionProfile.from_json((model_dir / PROFILE_FILE).read_text())
    assert profile.count == 32 and sum(profile.label_counts.values()) == 32
    assert set(profile.label_counts) == set(LABELS) and min(profile.label_counts.values()) >= 12
    assert sum(profile.top_probability_counts[5:]) == 32  # a top probability is at least 1/2 with two labels
    assert sum(profile.input_length_counts) == 32
    lengths = [len(ids) for ids in TextClassification().encode(tokenizer, config.examples["test"], 128).input_ids]
    assert profile.input_length_counts == tuple(
        sum(1 for n in lengths if input_length_bin(n) == b) for b in range(len(profile.input_length_counts))
    )


def test_early_stopping_keeps_the_best_weights(tiny_model: Path, tmp_path: Path) -> None:
    sink = ListSink()
    session = DirectorySession(tmp_path)
    # No later evaluation can beat the first by 10 points of F1, so patience 2 stops after the third.
    config = _config(
        tiny_model,
        sink,
        learning_rate=1e-3,
        eval_every_steps=4,
        early_stopping=d.build_early_stopping(patience=2, metric="f1", min_delta=10.0),
    )
    LoopRunner(config, 0, 1, 0, session).run()
    final = session.reports[-1]
    assert final["stopped_early"] and final["step"] == 12 and final["best_step"] == 4
    best = load_file(str(session.checkpoints[0] / "trainable.safetensors"))
    published = load_file(str(session.checkpoints[-1] / "model.safetensors"))
    assert best.keys() <= published.keys()
    assert all(torch.equal(best[name], published[name]) for name in best)
    # The later checkpoints carry the best weights along, so a resumed run can still publish them.
    assert (session.checkpoints[1] / "best.safetensors").exists()


class _FailingSink(ListSink):
    """Raises once at the first training log at or after ``step`` (a worker crash, in-process)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step
        self.failed = False

    def push(self, record: dict[str, Any]) -> None:
        super().push(record)
        if not self.failed and record["type"] == "train" and record["step"] >= self.step:
            self.failed = True
            raise RuntimeError("worker lost")


def test_a_restarted_run_resumes_from_the_latest_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    sink = _FailingSink(step=9)
    session = DirectorySession(tmp_path)
    config = _config(tiny_model, sink)
    with pytest.raises(RuntimeError, match="worker lost"):
        LoopRunner(config, 0, 1, 0, session).run()
    assert [r["step"] for r in session.reports] == [6]
    # Restarted in a new process (a session over the same folder), as Ray restarts a lost worker.
    session = DirectorySession(tmp_path)
    LoopRunner(config, 0, 1, 0, session).run()
    starts = _records(sink, "started")
    assert [s["step"] for s in starts] == [0, 6]
    resumed_steps = [r["step"] for r in _records(sink, "train")][3:]
    assert resumed_steps == list(range(9, 37, 3))  # continues after step 6, nothing repeated past it
    assert session.reports[-1]["finished"] and session.reports[-1]["step"] == 36
    # A run whose final model was reported has nothing left to do when restarted.
    reported = len(session.reports)
    LoopRunner(config, 0, 1, 0, session).run()
    assert _records(sink, "started")[-1]["step"] == 36 and len(session.reports) == reported


def test_lora_trains_only_adapters_and_head_and_publishes_a_merged_model(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    sink = ListSink()
    session = DirectorySession(tmp_path)
    LoopRunner(_config(tiny_model, sink, method=d.Method.LORA, learning_rate=3e-2, epochs=4), 0, 1, 0, session).run()
    started = _records(sink, "started")[0]
    config = AutoConfig.from_pretrained(str(tiny_model))
    hidden, layers, rank = config.hidden_size, config.num_hidden_layers, 8
    adapters = layers * 2 * (2 * rank * hidden)  # query and value: A (r x h) and B (h x r)
    head = hidden * 2 + 2  # the classifier (modules_to_save) stays trainable
    assert started["trainable_parameters"] == adapters + head
    assert started["total_parameters"] > started["trainable_parameters"]
    final_dir = session.checkpoints[-1]
    weights = load_file(str(final_dir / "model.safetensors"))
    assert not [name for name in weights if "lora" in name.lower()]
    model = AutoModelForSequenceClassification.from_pretrained(str(final_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(final_dir))
    texts, labels = _split(sentiment_rows(32, 3))
    with torch.inference_mode():
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        predictions = model(**batch).logits.argmax(dim=-1).tolist()
    accuracy = sum(int(p == y) for p, y in zip(predictions, labels, strict=True)) / len(labels)
    assert accuracy == pytest.approx(session.reports[-1]["test_accuracy"])
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_ia3_trains_only_its_vectors_and_the_head_and_publishes_them_merged(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    sink = ListSink()
    session = DirectorySession(tmp_path)
    LoopRunner(_config(tiny_model, sink, method=d.Method.IA3, learning_rate=3e-2, epochs=2), 0, 1, 0, session).run()
    started = _records(sink, "started")[0]
    config = AutoConfig.from_pretrained(str(tiny_model))
    hidden, layers, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    # PEFT's BERT defaults: a vector on each layer's key and value outputs (hidden) and on the inputs of the
    # modules named "output.dense" (the attention's, hidden; the feed-forward's, intermediate); and the classifier.
    assert started["trainable_parameters"] == layers * (3 * hidden + inner) + hidden * 2 + 2
    weights = load_file(str(session.checkpoints[-1] / "model.safetensors"))
    assert not [name for name in weights if "ia3" in name.lower()]
    merged = AutoModelForSequenceClassification.from_pretrained(str(session.checkpoints[-1]))
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    # The vectors trained and were folded in: the keys differ from the base model's by a per-row scale.
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model))
    before = base.bert.encoder.layer[0].attention.self.key.weight
    after = merged.bert.encoder.layer[0].attention.self.key.weight
    scale = (after / before).mean(dim=1)
    assert not torch.allclose(scale, torch.ones_like(scale), atol=1e-3)
    assert torch.allclose(after, before * scale[:, None], atol=1e-5)


def test_gradient_accumulation_and_bf16_on_cpu(tiny_model: Path, tmp_path: Path) -> None:
    sink = ListSink()
    config = _config(
        tiny_model,
        sink,
        gradient_accumulation_steps=3,
        mixed_precision=d.Precision.BF16,
        max_steps=5,
        log_every_steps=1,
    )
    LoopRunner(config, 0, 1, 0, DirectorySession(tmp_path)).run()
    started = _records(sink, "started")[0]
    assert started["steps_per_epoch"] == 4 and started["total_steps"] == 5
    assert [r["step"] for r in _records(sink, "train")] == [1, 2, 3, 4, 5]


def test_autocast_only_where_the_device_supports_it() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(d.Precision.AUTO, cpu) is None
    assert autocast_dtype(d.Precision.NO, cpu) is None
    assert autocast_dtype(d.Precision.BF16, cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA device"):
        autocast_dtype(d.Precision.FP16, cpu)


def test_a_loop_config_is_plain_data() -> None:
    # Ray ships the config to every worker: it must stay a picklable dataclass.
    import pickle

    config = _config(Path("/models/tiny"))
    assert pickle.loads(pickle.dumps(config)) == dataclasses.replace(config)


def test_a_remote_checkpoint_is_restored_from_one_download_per_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The workers of a node share one download, complete before anyone reads it, never rewritten while read (Ray's
    # own shared download could be, ray-project/ray#48726); the last reader removes it.
    import pyarrow.fs
    import ray.train

    from gristmill.training.ml import node_files
    from gristmill.training.ml.loop import RaySession

    saved = tmp_path / "stored"
    saved.mkdir()
    (saved / "optimizer.pt").write_bytes(b"x" * 4096)
    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    checkpoint = ray.train.Checkpoint("stored", filesystem=remote)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: checkpoint)
    monkeypatch.setattr(node_files, "RESTORE_DIR", tmp_path / "restores")
    session = RaySession()
    with session.latest_checkpoint() as first, session.latest_checkpoint() as second:
        assert first is not None and first == second and saved != first
        assert first.parent == tmp_path / "restores" and (first / "optimizer.pt").read_bytes() == b"x" * 4096
    assert not first.exists()


def test_a_local_checkpoint_is_read_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.train

    from gristmill.training.ml.loop import RaySession

    checkpoint = ray.train.Checkpoint.from_directory(str(tmp_path))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: checkpoint)
    with RaySession().latest_checkpoint() as path:
        assert path == tmp_path
