"""FSDP's code on a CUDA device over NCCL (a check for a lent GPU machine, not a test: CI has no GPU).

``services/training/tests/unit/test_fsdp.py`` proves on CPU (two gloo processes) that a sharded run learns what an
unsharded one does and resumes from its gathered checkpoint. What it cannot prove is that ``ml/sharding.py`` and the
loop's FSDP paths work where FSDP is used: CUDA tensors, an NCCL process group, fused AdamW, bf16 autocast. This
script runs those checks on a GPU. A lent machine here has one GPU, and NCCL refuses two ranks on one device
("Duplicate GPU detected"), so the world is one rank: every collective runs through NCCL but has nobody to talk to.
A world of one does not shard in ``LoopRunner`` (nothing to share), so the script turns FSDP on after the runner is
built; everything else is the loop a Ray Train worker runs, here with a ``DirectorySession``.

Checks (each run a process of its own, as a Ray worker is):

1. LoRA SFT, bf16 autocast, gradient checkpointing: the sharded run logs the losses and the validation and test
   scores of the unsharded run and publishes the same adapter.
2. Full SFT: a sharded run killed after its first checkpoint (the process exits, as a crashed worker does) resumes
   from it and ends with the weights and test scores of an uninterrupted sharded run.

Two steps, as ``sft_gpu_benchmark.py``:

    .venv/bin/python services/training/benchmarks/fsdp_gpu_check.py prepare .gpu/fsdp       # here
    python3 services/training/benchmarks/fsdp_gpu_check.py run --prepared .gpu/fsdp --out-dir "$OUT"   # on the GPU
    .venv/bin/python services/training/benchmarks/fsdp_gpu_check.py run --prepared .gpu/fsdp --out-dir /tmp/o \\
        --device cpu    # the script's path on any machine (gloo)

``run`` prints one line per check and writes ``OUT/fsdp_gpu_check.json``; it exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Relative tolerances between a sharded and an unsharded run on the same device (the same batches and seeds): one
# rank's FSDP runs the same arithmetic, up to the order of a few reductions.
LOSS_RTOL = 1e-3
WEIGHT_ATOL = 1e-4


def progress(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def prepare(dest: Path) -> None:
    from gristmill.cli.tiny_model import make_tiny_llama
    from gristmill.training.devtools import chat_rows, chat_vocabulary_text

    make_tiny_llama(dest / "model", [chat_vocabulary_text()], initializer_range=0.5)
    rows = {"train": chat_rows(48, 1), "validation": chat_rows(65, 2), "test": chat_rows(6, 3)}
    (dest / "rows.json").write_text(json.dumps(rows))
    progress(f"prepared {dest}: a tiny Llama and {', '.join(f'{len(v)} {k}' for k, v in rows.items())} chats")


# --------------------------------------------------------------------------- one run (a process of its own)


def one_run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from gristmill.training.domain import spec as d
    from gristmill.training.ml.loop import DirectorySession, FaultInjection, ListSink, LoopConfig, LoopRunner

    cuda = args.device == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    if cuda:
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)
    method = d.Method(args.method)
    full = method is d.Method.FULL
    hyper = d.build_hyper_parameters(
        method=method,
        learning_rate=2e-3 if full else 2e-2,
        epochs=1,
        per_worker_batch_size=4,
        eval_every_steps=3,
        log_every_steps=1,
        early_stopping=d.build_early_stopping(metric="loss"),
        mixed_precision=d.Precision(args.precision),
        gradient_checkpointing=args.gradient_checkpointing,
        seed=7,
    )
    lora = None if full else d.build_lora(method=method, given=False, target_modules=["q_proj", "k_proj", "v_proj"])
    fault = None
    if args.kill_at_step:
        fault = FaultInjection(rank=0, at_step=args.kill_at_step, marker=str(Path(args.root) / "killed"), settle_s=0)
    sink = ListSink()
    config = LoopConfig(
        job_id="fsdp-gpu-check",
        model_dir=str(Path(args.prepared) / "model"),
        label_map=(),
        examples=json.loads((Path(args.prepared) / "rows.json").read_text()),
        method=method,
        lora=lora,
        hyper=hyper,
        use_gpu=cuda,
        sink=sink,
        task="TASK_TYPE_CHAT",
        fault=fault,
        fsdp=args.fsdp,
    )
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    runner = LoopRunner(config, 0, 1, 0, DirectorySession(root))
    # A world of one trains unsharded (LoopRunner); sharded here so that sharding's code runs on this device.
    runner.fsdp = args.fsdp
    try:
        runner.run()
    finally:
        (root / "records.json").write_text(json.dumps(sink.records))
    # FSDP2 swaps a sharded module's class for an FSDP subclass: proof that the run was sharded.
    facts: dict[str, Any] = {"model_class": type(runner.model).__name__}
    if cuda:
        facts["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    (root / "run.json").write_text(json.dumps(facts))
    dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------- the checks (the parent process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(args: argparse.Namespace, root: Path, **options: Any) -> tuple[int, list[dict[str, Any]]]:
    command = [sys.executable, __file__, "_one", "--prepared", args.prepared, "--device", args.device]
    command += ["--root", str(root), "--port", str(_free_port())]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        command += [flag] if value is True else [] if value is False else [flag, str(value)]
    started = time.perf_counter()
    code = subprocess.run(command, timeout=args.run_timeout_s).returncode
    progress(f"  {root.name}: exit {code} after {time.perf_counter() - started:.1f}s")
    records_file = root / "records.json"
    return code, json.loads(records_file.read_text()) if records_file.exists() else []


def _losses(records: list[dict[str, Any]]) -> list[float]:
    return [r["metrics"]["loss"] for r in records if r["type"] == "train"]


def _scores(records: list[dict[str, Any]], split: str) -> list[dict[str, float]]:
    return [r["metrics"] for r in records if r["type"] == "eval" and r["split"] == split]


def _weights(root: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from gristmill.training.ml.loop import FINAL_CHECKPOINT_NAME

    final = root / FINAL_CHECKPOINT_NAME
    files = list(final.glob("adapter_model.safetensors")) or list(final.glob("model.safetensors"))
    return load_file(str(files[0])) if files else {}


def _run_facts(root: Path) -> dict[str, Any]:
    facts = root / "run.json"
    return json.loads(facts.read_text()) if facts.exists() else {}


def _sharded(root: Path) -> bool:
    return str(_run_facts(root).get("model_class", "")).startswith("FSDP")


def _largest_relative_gap(ours: list[float], theirs: list[float]) -> float:
    return max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, theirs, strict=True)), default=0.0)


def _score_gap(ours: list[dict[str, float]], theirs: list[dict[str, float]]) -> float:
    gaps = [0.0]
    for a, b in zip(ours, theirs, strict=True):
        if a.keys() != b.keys():
            return float("inf")
        gaps += [abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for k in b]
    return max(gaps)


def _weight_gap(ours: dict[str, Any], theirs: dict[str, Any]) -> float:
    if not theirs or ours.keys() != theirs.keys():
        return float("inf")
    return max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in theirs)


def run(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gristmill-fsdp-check-"))
    environment = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else None,  # type: ignore[no-untyped-call]
    }
    progress(f"environment: {json.dumps(environment)}")
    checks: list[dict[str, Any]] = []

    def check(name: str, passed: bool, **facts: Any) -> None:
        checks.append({"check": name, "passed": passed, **facts})
        print(f"{'PASS' if passed else 'FAIL'} {name}: {json.dumps(facts)}", flush=True)

    # 1. LoRA, bf16 (on CUDA), gradient checkpointing under FSDP: the unsharded run's losses, scores and adapter.
    precision = "bf16" if args.device == "cuda" else "no"
    lora = {"method": "lora", "precision": precision}
    plain_code, plain = _launch(args, work / "lora-plain", **lora)
    sharded_code, sharded = _launch(args, work / "lora-fsdp", fsdp=True, gradient_checkpointing=True, **lora)
    facts: dict[str, Any] = {
        "exit_codes": [plain_code, sharded_code],
        "steps": [len(_losses(plain)), len(_losses(sharded))],
        "loss_first_last": [_losses(sharded)[:1], _losses(sharded)[-1:]],
        "largest_loss_gap": _largest_relative_gap(_losses(sharded), _losses(plain)) if plain and sharded else None,
        "largest_score_gap": {s: _score_gap(_scores(sharded, s), _scores(plain, s)) for s in ("validation", "test")},
        "largest_adapter_weight_gap": _weight_gap(_weights(work / "lora-fsdp"), _weights(work / "lora-plain")),
        "runs": [_run_facts(work / "lora-plain"), _run_facts(work / "lora-fsdp")],
    }
    check(
        "lora sft sharded = unsharded",
        plain_code == sharded_code == 0
        and len(_losses(sharded)) == len(_losses(plain)) >= 2
        and facts["largest_loss_gap"] is not None
        and facts["largest_loss_gap"] <= LOSS_RTOL
        and all(len(_scores(sharded, s)) >= 1 for s in ("validation", "test"))
        and max(facts["largest_score_gap"].values()) <= LOSS_RTOL
        and facts["largest_adapter_weight_gap"] <= WEIGHT_ATOL
        and _sharded(work / "lora-fsdp")
        and not _sharded(work / "lora-plain"),
        **facts,
    )

    # 2. Full fine-tune: killed after the first checkpoint (step 3), resumed, ends where an uninterrupted run ends.
    full = {"method": "full", "precision": precision, "fsdp": True}
    whole_code, whole = _launch(args, work / "full-whole", **full)
    killed_code, _ = _launch(args, work / "full-resumed", kill_at_step=4, **full)
    checkpoints = sorted(p.name for p in (work / "full-resumed").glob("checkpoint_*"))
    resumed_code, resumed = _launch(args, work / "full-resumed", kill_at_step=4, **full)
    started = [r for r in resumed if r["type"] == "started"]
    facts = {
        "exit_codes": [whole_code, killed_code, resumed_code],
        "checkpoints_after_kill": checkpoints,
        "resumed_at_step": started[0]["step"] if started else None,
        "test_score_gap": _score_gap(_scores(resumed, "test"), _scores(whole, "test")) if resumed else None,
        "largest_weight_gap": _weight_gap(_weights(work / "full-resumed"), _weights(work / "full-whole")),
        "runs": [_run_facts(work / "full-whole"), _run_facts(work / "full-resumed")],
    }
    check(
        "full sft sharded, killed and resumed = uninterrupted",
        whole_code == 0
        and killed_code == 1
        and resumed_code == 0
        and checkpoints == ["checkpoint_000000"]
        and facts["resumed_at_step"] == 3
        and len(_scores(resumed, "test")) == 1
        and facts["test_score_gap"] is not None
        and facts["test_score_gap"] <= LOSS_RTOL
        and facts["largest_weight_gap"] <= WEIGHT_ATOL
        and _sharded(work / "full-whole")
        and _sharded(work / "full-resumed"),
        **facts,
    )
    (out / "fsdp_gpu_check.json").write_text(json.dumps({"environment": environment, "checks": checks}, indent=2))
    return 0 if all(c["passed"] for c in checks) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="here: the tiny Llama and the chats into DIR")
    prep.add_argument("dest", type=Path)
    go = commands.add_parser("run", help="on the GPU machine: the checks")
    inner = commands.add_parser("_one")
    for sub in (go, inner):
        sub.add_argument("--prepared", required=True, help="the folder `prepare` wrote")
        sub.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    go.add_argument("--out-dir", required=True)
    go.add_argument("--run-timeout-s", type=float, default=180.0)
    inner.add_argument("--root", required=True)
    inner.add_argument("--port", type=int, required=True)
    inner.add_argument("--method", default="lora")
    inner.add_argument("--precision", default="no")
    inner.add_argument("--fsdp", action="store_true")
    inner.add_argument("--gradient-checkpointing", action="store_true")
    inner.add_argument("--kill-at-step", type=int, default=0)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dest)
        return 0
    return run(args) if args.command == "run" else one_run(args)


if __name__ == "__main__":
    sys.exit(main())
