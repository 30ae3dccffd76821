"""Sentiment benchmark of the training service (a script, not a test; run it once, on a quiet machine).

Trains all-MiniLM-L6-v2 (full fine-tune, one epoch) on the Amazon + Yelp sentences of
../shared/data/sentiment (1600 train / 400 held out) through the real service: gRPC SubmitJob, a local
Ray cluster, TorchTrainer with one worker. Reports:

(a) accuracy on the 400 held-out sentences (the first job's test split);
(b) training throughput through the service divided by a plain PyTorch loop's, on the same model, batch,
    threads and batches, measured in the same run. Both sides are sampled in several processes: the same
    loop runs 2-4 % faster or slower from one process to the next on these machines (and keeps that speed
    within the process), so one process per side gives a ratio anywhere in about +-4 %. The plain loop runs
    ``--repeats`` times in fresh processes before the service starts and as many after it stopped; the
    service trains the epoch ``--repeats`` times (jobs one after the other). The ratio is mean over mean.
    Both per wall-clock second and per CPU second of the training process;
(c) seconds from SubmitJob to the first training step of the jobs after the first, with Ray warm.

    .venv/bin/python services/training/benchmarks/sentiment_benchmark.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
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


def plain_loop_in_a_fresh_process(args: argparse.Namespace) -> tuple[float, float]:
    """``plain_loop_throughput`` in a new Python process (this script with ``--plain-only``)."""
    command = [sys.executable, __file__, "--plain-only", "--threads", str(args.threads)]
    command += ["--batch-size", str(args.batch_size), "--plain-steps", str(args.plain_steps), "--seed", str(args.seed)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    wall, cpu = json.loads(done.stdout.strip().splitlines()[-1])
    return float(wall), float(cpu)


async def run_service(
    args: argparse.Namespace, work: Path, train: list[tuple[str, str]], held_out: list[tuple[str, str]]
) -> dict[str, Any]:
    import grpc

    from gristmill.api.common.v1.common_pb2 import DATASET_SPLIT_TEST as TEST
    from gristmill.api.common.v1.common_pb2 import DATASET_SPLIT_UNSPECIFIED as UNSPECIFIED
    from gristmill.api.training.v1 import training_pb2 as pb
    from gristmill.api.training.v1 import training_pb2_grpc as pb_grpc
    from gristmill.core.host import Infrastructure
    from gristmill.core.security import embedded_security
    from gristmill.core.settings import KafkaSettings, S3Settings
    from gristmill.training.app import build_app
    from gristmill.training.devtools import write_dataset_version
    from gristmill.training.settings import TrainingSettings
    from tests.support.tiny_model import minilm_path

    settings = TrainingSettings(data_dir=work / "service", grpc_port=0, ray_num_cpus=args.threads)
    infra = Infrastructure(kafka=KafkaSettings(), s3=S3Settings())
    host = build_app(settings, infra, embedded_security("training")).host
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

            def spec() -> pb.JobSpec:
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
                return s

            async def run(job_spec: pb.JobSpec) -> tuple[pb.Job, float]:
                submitted = time.time()
                job = await stub.SubmitJob(pb.SubmitJobRequest(spec=job_spec))
                async for _ in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id)):
                    pass
                done = await stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
                done_time = time.time()
                state = pb.JobState.Name(done.state)
                # From the client's SubmitJob call (validation included) to the loop's first step.
                start = done.start_time.ToNanoseconds() / 1e9 - submitted
                train = {(m.name, m.split): m.value for m in done.result.metrics}
                print(
                    f"  job {done.job_id}: {state} in {done_time - submitted:.1f}s, first step after {start:.1f}s, "
                    f"{train.get(('train_samples_per_second', UNSPECIFIED), 0.0):.1f} samples/s {done.state_reason}",
                    flush=True,
                )
                return done, start

            jobs = [await run(spec()) for _ in range(args.repeats)]
    finally:
        await host.stop()
    main = jobs[0][0]
    metrics = [{(m.name, m.split): m.value for m in job.result.metrics} for job, _ in jobs]
    return {
        "states": [pb.JobState.Name(job.state) for job, _ in jobs],
        "accuracy": metrics[0].get(("accuracy", TEST)),
        "f1": metrics[0].get(("f1", TEST)),
        "service_samples_per_second": [m.get(("train_samples_per_second", UNSPECIFIED), 0.0) for m in metrics],
        "service_samples_per_cpu_second": [m.get(("train_samples_per_cpu_second", UNSPECIFIED), 0.0) for m in metrics],
        "job_seconds": main.end_time.ToSeconds() - main.create_time.ToSeconds(),
        "submit_to_first_step_cold_s": jobs[0][1],
        "submit_to_first_step_warm_s": [start for _, start in jobs[1:]],
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
    parser.add_argument(
        "--repeats", type=int, default=3, help="service jobs, and plain-loop processes before and after (each)"
    )
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.support.tiny_model import minilm_path

    train, held_out = load_sentences(args.seed)
    texts, labels = [t for t, _ in train], [LABELS.index(label) for _, label in train]
    if args.plain_only:
        measured = plain_loop_throughput(
            minilm_path(),
            texts,
            labels,
            batch_size=args.batch_size,
            threads=args.threads,
            steps=args.plain_steps,
            seed=args.seed,
        )
        print(json.dumps(measured))
        return 0
    print(f"data: {len(train)} train / {len(held_out)} held-out sentences (amazon + yelp), threads={args.threads}")
    print(f"load average (1, 5, 15 min) at the start: {os.getloadavg()}")

    def plain_runs(when: str) -> list[tuple[float, float]]:
        runs = []
        for n in range(args.repeats):
            runs.append(plain_loop_in_a_fresh_process(args))
            print(f"plain loop ({when}, process {n + 1}): {runs[-1][0]:.1f} samples/s, {runs[-1][1]:.1f} samples/CPU-s")
        return runs

    plain = plain_runs("before")
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-") as tmp:
        result = asyncio.run(run_service(args, Path(tmp), train, held_out))
    plain += plain_runs("after")
    wall = statistics.mean(p[0] for p in plain)
    cpu = statistics.mean(p[1] for p in plain)
    service_wall = statistics.mean(result["service_samples_per_second"])
    service_cpu = statistics.mean(result["service_samples_per_cpu_second"])
    result["plain_samples_per_second"] = [p[0] for p in plain]
    result["plain_samples_per_cpu_second"] = [p[1] for p in plain]
    result["throughput_ratio"] = service_wall / wall
    result["throughput_ratio_cpu"] = service_cpu / cpu
    print(json.dumps(result, indent=2))
    warm = result["submit_to_first_step_warm_s"]
    print(
        f"(a) held-out accuracy {result['accuracy']:.4f} (target >= 0.90)\n"
        f"(b) throughput ratio {result['throughput_ratio']:.3f} per wall second (service {service_wall:.1f} over "
        f"{args.repeats} jobs / plain {wall:.1f} samples/s over {len(plain)} processes), "
        f"{result['throughput_ratio_cpu']:.3f} per CPU second (service {service_cpu:.1f} / plain {cpu:.1f}); "
        f"target >= 0.95\n"
        f"(c) SubmitJob -> first training step, warm Ray: "
        f"{', '.join(f'{w:.1f}s' for w in warm) or 'n/a (--repeats 1)'} "
        f"(cold: {result['submit_to_first_step_cold_s']:.1f}s; target <= 10s)"
    )
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
