"""Publishing a finished run: the model files, a model card and a manifest under ``jobs/<job-id>/model/``.

The manifest (``gristmill.core.manifests.ModelManifest``) lists every file with its sha256, the Open
Inference Protocol signature, the label map, the final metrics and the lineage; the registry verifies
and copies exactly this. Nothing refers to these objects before the job is SUCCEEDED, so a retried
publish (after a crash) overwrites what a failed attempt left.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gristmill.core.chat_templates import LINEAGE_KEY, chat_template_sha256, read_chat_template
from gristmill.core.errors import FailedPreconditionError
from gristmill.core.manifests import ModelManifest, upload_files
from gristmill.core.serialization import to_plain
from gristmill.core.storage import ObjectStore, object_key
from gristmill.training.domain.model import (
    Job,
    JobResult,
    Lineage,
    Metric,
    Split,
)
from gristmill.training.domain.objectives import model_task_type
from gristmill.training.domain.refs import FileRef
from gristmill.training.domain.runs import LOOP_FILES, LOOP_SAMPLES_FILE, MERGED_MODEL_DIR, RunOutcome
from gristmill.training.domain.spec import JobSpec, flatten_hyper_parameters
from gristmill.training.tasks import training_task
from gristmill.training.tasks.base import SampleGeneration

MODEL_CARD = "model-card.md"

_CONTENT_TYPES = {".json": "application/json", ".md": "text/markdown", ".txt": "text/plain"}
_SPLIT_PREFIXES = (("test_", Split.TEST), ("validation_", Split.VALIDATION))
# Final-report entries that are bookkeeping, not model metrics.
_NOT_METRICS = frozenset(
    {"step", "epoch", "finished", "stopped_early", "best_step", "trainable_parameters", "total_parameters", "trial"}
)


def artifact_prefix(job_id: str) -> str:
    return object_key("jobs", job_id, "model")


def final_metrics(report: Mapping[str, Any]) -> tuple[Metric, ...]:
    """The final report as metrics: ``test_accuracy`` -> accuracy on the test split, and so on."""
    metrics = []
    for name, value in sorted(report.items()):
        if name in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        split = Split.NONE
        for prefix, candidate in _SPLIT_PREFIXES:
            if name.startswith(prefix):
                name, split = name[len(prefix) :], candidate
                break
        metrics.append(Metric(name=name, value=float(value), split=split))
    return tuple(metrics)


def read_samples(model_dir: Path) -> tuple[SampleGeneration, ...]:
    """The sample generations the loop left beside the final model (none when the task generates no text)."""
    path = Path(model_dir) / LOOP_SAMPLES_FILE
    if not path.is_file():
        return ()
    return tuple(
        SampleGeneration(
            prompt=list(item["prompt"]), reference=str(item["reference"]), generation=str(item["generation"])
        )
        for item in json.loads(path.read_text())
    )


# Characters of a prompt, reference or generation the card shows (in one table cell).
_CARD_TEXT_CHARS = 300


def _cell(text: str) -> str:
    """``text`` on one line, cut to ``_CARD_TEXT_CHARS``, with the characters that would break a table escaped."""
    line = " ".join(text.split())
    if len(line) > _CARD_TEXT_CHARS:
        line = line[: _CARD_TEXT_CHARS - 1] + "…"
    return line.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;") or "(empty)"


def _prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    # The last turns matter most when a long conversation is cut: the card shows its end.
    text = " / ".join(f"{m.get('role', '')}: {m.get('content') or ''}" for m in messages)
    return text if len(text) <= _CARD_TEXT_CHARS else "…" + text[-(_CARD_TEXT_CHARS - 1) :]


def _sample_lines(samples: Sequence[SampleGeneration]) -> list[str]:
    if not samples:
        return []
    rows = [
        f"| {n} | {_cell(_prompt_text(s.prompt))} | {_cell(s.reference)} | {_cell(s.generation)} |"
        for n, s in enumerate(samples, start=1)
    ]
    return [
        "## Sample generations",
        "",
        "Greedy replies to test conversations (the prompt is the conversation up to its last assistant turn; the "
        "reference is that turn, for preference pairs the chosen reply). `exact_match`, `rouge_l` and any `json_` "
        "metrics above score such replies.",
        "",
        "| # | prompt | reference | generation |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
    ]


def metric_key(metric: Metric) -> str:
    return f"{metric.split.value}_{metric.name}" if metric.split.value else metric.name


def render_model_card(
    job: Job,
    lineage: Lineage,
    metrics: tuple[Metric, ...],
    label_map: tuple[str, ...],
    *,
    spec: JobSpec | None = None,
    best_trial: int | None = None,
    samples: Sequence[SampleGeneration] = (),
) -> str:
    """The card of the model ``spec`` trained (a search's winning trial's spec; the job's by default): its
    hyper-parameters are ``lineage``'s, which the same spec produced, so card and lineage cannot disagree.
    ``samples``: generations on the test split (a generative objective's)."""
    search = job.spec.search
    spec = spec or job.spec
    text = training_task(spec.task.value, error=FailedPreconditionError).card(label_map)
    title = spec.display_name or spec.registered_model_name or f"training job {job.job_id}"
    dataset = spec.dataset
    lines = [
        f"# {title}",
        "",
        f"{text.summary} fine-tuned by the Gristmill training service (job `{job.job_id}`, Ray run "
        f"`{lineage.ray_run_name}`, {lineage.code_version}).",
        "",
        "## Data",
        "",
        f"- Dataset version: `{dataset.project_id}/{dataset.dataset_version_id}`"
        + (f" (manifest sha256 `{dataset.manifest.sha256}`)" if dataset.manifest else ""),
        *text.data,
        *(f"- `{f.key}`: sha256 `{f.sha256}`, {f.size_bytes} bytes" for f in lineage.dataset_files),
        "",
        "## Base model",
        "",
        f"- {spec.base_model.describe()}, content sha256 `{spec.base_model.content_sha256}`",
        f"- Method: {spec.method.value}" + (f" (LoRA rank {spec.lora.rank}, {text.lora_weights})" if spec.lora else ""),
        *(
            [
                f"- Merged model: `{MERGED_MODEL_DIR}/` holds the base weights with the adapter folded in (load it "
                f"with `AutoModelForCausalLM.from_pretrained(<this directory>/{MERGED_MODEL_DIR})`); its test metrics "
                "are the `merged_*` ones"
            ]
            if spec.publish_merged
            else []
        ),
        *(
            [
                f"- Hyper-parameter search: the best of {search.num_trials} trials on validation {search.metric} "
                f"(trial {best_trial}); the hyper-parameters below are that trial's"
            ]
            if search is not None and best_trial is not None
            else []
        ),
        "",
        "## Hyper-parameters",
        "",
        "| name | value |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in sorted(lineage.hyper_parameters.items())),
        "",
        "## Metrics",
        "",
        "| metric | split | value |",
        "| --- | --- | --- |",
        *(f"| {m.name} | {m.split.value or '-'} | {m.value:.4f} |" for m in metrics),
        "",
        *_sample_lines(samples),
        "## Use",
        "",
        text.use,
        "",
    ]
    return "\n".join(lines)


class ModelPublisher:
    def __init__(self, objects: ObjectStore, *, code_version: str) -> None:
        self._objects = objects
        self.code_version = code_version

    def lineage(self, job: Job, dataset_files: tuple[FileRef, ...], spec: JobSpec | None = None) -> Lineage:
        return Lineage(
            training_job_id=job.job_id,
            dataset=job.spec.dataset,
            dataset_files=dataset_files,
            base_model=job.spec.base_model,
            hyper_parameters=flatten_hyper_parameters(spec or job.spec),
            ray_run_name=job.ray_run_name,
            code_version=self.code_version,
        )

    def publish(
        self, job: Job, outcome: RunOutcome, *, label_map: tuple[str, ...], dataset_files: tuple[FileRef, ...]
    ) -> JobResult:
        prefix = artifact_prefix(job.job_id)
        lineage = self.lineage(job, dataset_files, outcome.spec)
        metrics = final_metrics(outcome.metrics)
        model_dir = Path(outcome.model_dir)
        template = read_chat_template(model_dir)
        if template and LINEAGE_KEY not in lineage.hyper_parameters:
            # The template the published tokenizer carries (the base model's, when the spec named none) is the one
            # training rendered with; serving refuses a version whose tokenizer carries another.
            lineage = replace(
                lineage, hyper_parameters={**lineage.hyper_parameters, LINEAGE_KEY: chat_template_sha256(template)}
            )
        card = render_model_card(
            job,
            lineage,
            metrics,
            label_map,
            spec=outcome.spec,
            best_trial=outcome.best_trial,
            samples=read_samples(model_dir),
        )
        (model_dir / MODEL_CARD).write_text(card)
        entries = upload_files(
            self._objects,
            model_dir,
            prefix,
            skip=lambda relative: relative.name in LOOP_FILES,
            content_type=lambda path: _CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
        )
        signature = training_task(job.spec.task.value, error=FailedPreconditionError).signature(label_map)
        manifest = ModelManifest(
            files=entries,
            task_type=model_task_type(job.spec.task).value,
            label_map=list(label_map),
            signature=to_plain(signature),
            lineage=to_plain(lineage),
            metrics={metric_key(m): m.value for m in metrics},
            base_model=job.spec.base_model.describe(),
        )
        manifest_ref = manifest.put(self._objects, prefix)
        return JobResult(
            artifact_prefix=prefix,
            files=tuple(FileRef(e.key, e.sha256, e.size_bytes) for _, e in sorted(entries.items())),
            manifest=manifest_ref,
            metrics=metrics,
            signature=signature,
            label_map=label_map,
            lineage=lineage,
            trainable_parameter_count=outcome.trainable_parameters,
            total_parameter_count=outcome.total_parameters,
            best_trial=outcome.best_trial,
        )
