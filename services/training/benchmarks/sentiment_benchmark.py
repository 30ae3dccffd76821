"""Sentiment benchmark of the training service (a script, not a test; run it once, on a quiet machine).

Trains all-MiniLM-L6-v2 (full fine-tune, one epoch) on the Amazon + Yelp sentences of
../shared/data/sentiment (1600 train / 400 held out) through the real service: gRPC SubmitJob, a local
Ray cluster, TorchTrainer with one worker. Reports:

(a) accuracy on the 400 held-out sentences (the job's test split);
(b) training throughput through the service divided by a plain PyTorch loop's, on the same model, batch,
    threads and batches, measured in the same run (the plain loop runs before and after the service, and
    its two measurements are averaged). Both per wall-clock second and per CPU second of the training
    process: on a shared machine other people's load moves the wall-clock numbers by a factor of several
    between measurements, the CPU-time ones much less;
(c) seconds from SubmitJob to the first training step of a second job, with Ray warm.

    .venv/bin/python services/training/benchmarks/sentiment_benchmark.py [--threads 2] [--plain-steps N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[3]
DATA = REPO.parent / "shared" / "data" / "sentiment"
LABELS = ("negative", "positive")


def load_sentences(seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    rows: list[tuple[str, str]] = []
    for name in ("amazon_cells_labelled.txt", "yelp_labelled.txt"):
        for line in (DATA / name).read_text(encoding="utf-8").splitlines():
            text, _, label = line.rstrip().rpartition("\t")
            if text and label in ("0", "1"):
                rows.append((text.strip(), LABELS[int(label)]))
    random.Random(seed).shuffle(rows)
    return rows[:1600], rows[1600:2000]


def plain_loop_throughput(
    model_dir: Path, texts: list[str], labels: list[int], *, batch_size: int, threads: int, steps: int, seed: int
) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second) of a plain PyTorch loop: the same model, optimiser,
    schedule, clipping and padded batches."""
    import torch

    from gristmill.training.ml import data as D
    from gristmill.training.ml import modeling

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = modeling.load_tokenizer(model_dir)
    model = modeling.load_classifier(model_dir, LABELS)
    model.train()
    split = D.EncodedSplit(tokenizer(texts, truncation=True, max_length=128)["input_ids"], labels)
    order = D.batches(D.epoch_shard(len(split), epoch=0, seed=seed, rank=0, world_size=1), batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    samples = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for chunk in order[: steps or None]:
        batch = D.collate(split, chunk, int(tokenizer.pad_token_id or 0))
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        samples += batch.size
    float(loss.detach())  # wait for the last step
    return samples / (time.perf_counter() - started), samples / (time.process_time() - cpu_started)


async def run_service(
    args: argparse.Namespace, work: Path, train: list[tuple[str, str]], held_out: list[tuple[str, str]]
) -> dict[str, Any]:
    import grpc

    from gristmill.api.training.v1 import training_pb2 as pb
    from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
    from gristmill.core.security import embedded_security
    from gristmill.core.settings import KafkaSettings, S3Settings
    from gristmill.training.app import build_host
    from gristmill.training.devtools import write_dataset_version
    from gristmill.training.settings import TrainingSettings
    from tests.support.tiny_model import minilm_path

    settings = TrainingSettings(data_dir=work / "service", grpc_port=0, ray_num_cpus=args.threads)
    host = build_host(settings, kafka=KafkaSettings(), s3=S3Settings(), security=embedded_security("training"))
    port = await host.start()
    try:
        write_dataset_version(
            host.platform.objects,
            project_id="sentiment",
            dataset_version_id="amazon-yelp",
            label_map=LABELS,
            splits={"train": train, "test": held_out},
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)

            def spec(max_steps: int | None = None) -> pb.JobSpec:
                s = pb.JobSpec(display_name="sentiment benchmark")
                s.base_model.local_path = str(minilm_path())
                s.dataset_version.project_id = "sentiment"
                s.dataset_version.dataset_version_id = "amazon-yelp"
                s.method = pb.TRAINING_METHOD_FULL
                s.hyper_parameters.learning_rate = args.learning_rate
                s.hyper_parameters.per_worker_batch_size = args.batch_size
                s.hyper_parameters.epochs = 1
                s.hyper_parameters.seed = args.seed
                s.resources.num_workers = 1
                s.resources.cpus_per_worker = args.threads
                if max_steps is not None:
                    s.hyper_parameters.max_steps = max_steps
                return s

            async def run(job_spec: pb.JobSpec) -> tuple[pb.Job, float]:
                submitted = time.time()
                job = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec))
                async for _ in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id)):
                    pass
                done = await stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
                done_time = time.time()
                state = pb.JobState.Name(done.state)
                print(f"  job {done.job_id}: {state} in {done_time - submitted:.1f}s {done.state_reason}")
                # From the client's SubmitJob call (validation included) to the loop's first step.
                return done, done.start_time.ToNanoseconds() / 1e9 - submitted

            main, cold = await run(spec())
            warm, warm_start = await run(spec(max_steps=3))
    finally:
        await host.stop()
    metrics = {(m.name, m.split): m.value for m in main.result.metrics}
    return {
        "state": pb.JobState.Name(main.state),
        "accuracy": metrics.get(("accuracy", 3)),
        "f1": metrics.get(("f1", 3)),
        "service_samples_per_second": metrics.get(("train_samples_per_second", 0)),
        "service_samples_per_cpu_second": metrics.get(("train_samples_per_cpu_second", 0)),
        "job_seconds": main.end_time.ToSeconds() - main.create_time.ToSeconds(),
        "submit_to_first_step_cold_s": cold,
        "submit_to_first_step_warm_s": warm_start,
        "warm_state": pb.JobState.Name(warm.state),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads = CPUs of the Ray worker")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument(
        "--plain-steps",
        type=int,
        default=0,
        help="steps of each plain-loop measurement (default 0: the whole epoch, the very batches the service trains)",
    )
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.support.tiny_model import minilm_path

    train, held_out = load_sentences(args.seed)
    texts, labels = [t for t, _ in train], [LABELS.index(label) for _, label in train]
    print(f"data: {len(train)} train / {len(held_out)} held-out sentences (amazon + yelp), threads={args.threads}")
    print(f"load average (1, 5, 15 min) at the start: {os.getloadavg()}")
    plain = [
        plain_loop_throughput(
            minilm_path(),
            texts,
            labels,
            batch_size=args.batch_size,
            threads=args.threads,
            steps=args.plain_steps,
            seed=args.seed,
        )
    ]
    print(f"plain loop (before): {plain[0][0]:.1f} samples/s, {plain[0][1]:.1f} samples/CPU-s")
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-") as tmp:
        result = asyncio.run(run_service(args, Path(tmp), train, held_out))
    plain.append(
        plain_loop_throughput(
            minilm_path(),
            texts,
            labels,
            batch_size=args.batch_size,
            threads=args.threads,
            steps=args.plain_steps,
            seed=args.seed,
        )
    )
    print(f"plain loop (after): {plain[1][0]:.1f} samples/s, {plain[1][1]:.1f} samples/CPU-s")
    wall = sum(p[0] for p in plain) / len(plain)
    cpu = sum(p[1] for p in plain) / len(plain)
    result["plain_samples_per_second"] = wall
    result["plain_samples_per_cpu_second"] = cpu
    result["throughput_ratio"] = (result["service_samples_per_second"] or 0.0) / wall
    result["throughput_ratio_cpu"] = (result["service_samples_per_cpu_second"] or 0.0) / cpu
    print(json.dumps(result, indent=2))
    print(
        f"(a) held-out accuracy {result['accuracy']:.4f} (target >= 0.90)\n"
        f"(b) throughput ratio {result['throughput_ratio']:.3f} per wall second (service "
        f"{result['service_samples_per_second']:.1f} / plain {wall:.1f} samples/s), "
        f"{result['throughput_ratio_cpu']:.3f} per CPU second (service {result['service_samples_per_cpu_second']:.1f} "
        f"/ plain {cpu:.1f}); target >= 0.95\n"
        f"(c) SubmitJob -> first training step, warm Ray: {result['submit_to_first_step_warm_s']:.1f}s "
        f"(cold: {result['submit_to_first_step_cold_s']:.1f}s; target <= 10s)"
    )
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
