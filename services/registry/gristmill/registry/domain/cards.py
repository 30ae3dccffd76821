"""Model cards: a generated part (training data, base model, method, metrics) and an editable part.

The generated part is written once, when a version's artifacts are verified; edits change only the
free-text fields and re-render the whole card as Markdown (what ``model-card.md`` holds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime

from gristmill.core.errors import FailedPreconditionError, NotFoundError
from gristmill.core.storage import ObjectStore, object_key
from gristmill.core.values import FileRef
from gristmill.registry.domain import names
from gristmill.registry.domain.common import check_mask, resolve_version
from gristmill.registry.domain.model import Caller, CardText, Metric, ModelCard, ModelVersion
from gristmill.registry.domain.policy import metric_label
from gristmill.registry.domain.ports import RegistryStore

EDITABLE_FIELDS = ("intended_use", "limitations", "ethical_considerations")
_SPLIT_ORDER = {"train": 0, "validation": 1, "test": 2, "": 3}


def card_key_name(revision: int) -> str:
    """The object name of a revision beside the artifacts: model-card.md first, then model-card-r<N>.md.

    Every revision keeps its own immutable object, so an older card's recorded checksum stays true.
    """
    return "model-card.md" if revision == 1 else f"model-card-r{revision}.md"


def training_summary(
    version: ModelVersion,
    *,
    dataset_counts: Mapping[str, tuple[int, Mapping[str, int]]] | None,
    dataset_note: str = "",
    training_notes: str = "",
) -> str:
    """Markdown describing where the version came from. ``dataset_counts``: split → (items, items per label)."""
    lineage = version.lineage
    lines = ["### Training data", ""]
    if lineage.project_id or lineage.dataset_version_id:
        lines.append(f"- Labeling project: `{lineage.project_id or 'unknown'}`")
        lines.append(f"- Dataset version: `{lineage.dataset_version_id or 'unknown'}`")
        if lineage.dataset_manifest is not None:
            lines.append(
                f"- Dataset manifest: `{lineage.dataset_manifest.key}` (sha256 `{lineage.dataset_manifest.sha256}`)"
            )
    else:
        lines.append("- Not recorded (registered without a dataset lineage).")
    if dataset_counts:
        lines += ["", "| split | items | per label |", "| --- | --- | --- |"]
        for split, (count, labels) in sorted(dataset_counts.items(), key=lambda kv: _SPLIT_ORDER.get(kv[0], 9)):
            per_label = ", ".join(f"{label}: {n}" for label, n in sorted(labels.items())) or "-"
            lines.append(f"| {split} | {count} | {per_label} |")
    elif dataset_note:
        lines += ["", f"Counts per split: {dataset_note}"]
    lines += ["", "### Base model and method", ""]
    base = lineage.base_model
    if base is not None and base.description:
        checksum = f" (content sha256 `{base.content_sha256}`)" if base.content_sha256 else ""
        lines.append(f"- Base model: `{base.description}`{checksum}")
    else:
        lines.append("- Base model: not recorded")
    if lineage.training_job_id:
        lines.append(f"- Training job: `{lineage.training_job_id}`")
    if lineage.code_version:
        lines.append(f"- Training code: `{lineage.code_version}`")
    if lineage.hyper_parameters:
        lines += ["", "| hyper-parameter | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(lineage.hyper_parameters.items())]
    if version.label_map:
        lines += ["", "### Labels", "", ", ".join(f"`{label}`" for label in version.label_map)]
    if training_notes.strip():
        lines += ["", "### Notes from the training run", "", training_notes.strip()]
    return "\n".join(lines)


def render(model_name: str, version: int, task: str, text: CardText, summary: str, metrics: tuple[Metric, ...]) -> str:
    """The whole card as Markdown."""
    task_name = task.removeprefix("TASK_TYPE_").replace("_", " ").lower() if task else "unspecified"
    lines = [f"# {model_name} version {version}", "", f"Task: {task_name}", ""]
    lines += ["## Intended use", "", text.intended_use.strip() or "_Not written yet._", ""]
    lines += ["## Training", "", summary, ""]
    lines += ["## Metrics", ""]
    final: dict[str, float] = {}
    for metric in metrics:
        final[metric_label(metric.name, metric.split)] = metric.value
    if final:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {label} | {value:.4f} |" for label, value in sorted(final.items())]
    else:
        lines.append("_No metrics recorded._")
    lines += ["", "## Limitations", "", text.limitations.strip() or "_Not written yet._", ""]
    lines += ["## Ethical considerations", "", text.ethical_considerations.strip() or "_Not written yet._", ""]
    return "\n".join(lines)


class ModelCards:
    """The model-card aggregate: each edit is a new revision, rendered and stored beside the artifacts."""

    def __init__(self, store: RegistryStore, objects: ObjectStore, *, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.objects = objects
        self.clock = clock

    def get_card(self, caller: Caller, name: str, *, version: int | None, alias: str | None) -> ModelCard:
        names.validate_model_name(name)
        with self.store.transaction() as tx:
            found = resolve_version(tx, caller.organization_id, name, version=version, alias=alias)
            card = tx.latest_card(caller.organization_id, name, found.version)
        if card is None:
            raise FailedPreconditionError(
                f"version {found.version} of {name!r} is {found.status.value}; its card is written once it is READY"
            )
        return card

    def update_card(self, caller: Caller, name: str, version: int, paths: list[str], text: CardText) -> ModelCard:
        names.validate_model_name(name)
        names.validate_version_number(version)
        check_mask(paths, EDITABLE_FIELDS, what="model card", read_only=("training_summary", "metrics", "markdown"))
        for path in paths:
            names.validate_text(getattr(text, path), what=path, limit=20_000)
        org = caller.organization_id
        with self.store.transaction() as tx:
            if not tx.lock_model(org, name):
                raise NotFoundError(f"registered model {name!r} does not exist")
            found = resolve_version(tx, org, name, version=version, alias=None)
            latest = tx.latest_card(org, name, version)
            if latest is None:
                raise FailedPreconditionError(
                    f"version {version} of {name!r} is {found.status.value}; its card is written once it is READY"
                )
            new_text = replace(latest.text, **{path: getattr(text, path) for path in paths})
            revision = latest.revision + 1
            markdown = render(name, version, found.task, new_text, latest.training_summary, latest.metrics)
            # Written under the model lock: a leftover object of a crashed attempt at this revision is ours.
            info = self.objects.put_bytes(
                object_key(found.artifact_prefix.rstrip("/"), card_key_name(revision)),
                markdown.encode(),
                content_type="text/markdown",
                overwrite=True,
            )
            card = replace(
                latest,
                revision=revision,
                text=new_text,
                markdown=markdown,
                object=FileRef(info.key, info.sha256, info.size),
                updated_by=caller.actor,
                update_time=self.clock(),
            )
            return tx.add_card(org, card)
