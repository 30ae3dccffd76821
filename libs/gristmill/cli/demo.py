"""``gristmill demo``: the whole loop, label → train → register → serve → hard examples back to labeling.

The demo does only what a user does (create a project and the policies, import, label, publish, predict) and
waits on the platform's events for the rest: the published dataset version starts the auto-train job, the
registry registers its result from the job's success event, the promotion policy moves ``production``,
serving hot-loads the version from the alias change, and uncertain predictions come back to labeling as new
items. Everything runs in one trace started here.
"""

from __future__ import annotations

import contextvars
import json
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

from opentelemetry import trace

from gristmill.api.common.v1 import common_pb2
from gristmill.api.inference.v2 import grpc_predict_v2_pb2 as oip
from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.api.serving.v1 import serving_pb2 as sv
from gristmill.api.training.v1 import training_pb2 as tr
from gristmill.cli import demo_data
from gristmill.cli.job_specs import job_spec
from gristmill.cli.labeling_commands import create_project_request, import_file, import_options
from gristmill.cli.polling import registered_version, wait_until
from gristmill.cli.promotion_commands import promotion_policy
from gristmill.cli.serving_commands import deployment_request, predict_oip, predict_typed
from gristmill.cli.training_commands import TERMINAL, ProgressLine, metric_value, state_name, watch_job
from gristmill.client import Gristmill
from gristmill.core.errors import FailedPreconditionError

T = TypeVar("T")
CAREFUL, NOISY, REVIEWER = "sim-careful", "sim-noisy", "sim-reviewer"


@dataclass(frozen=True)
class DemoOptions:
    """What the demo builds. Defaults keep it well under 5 minutes on two cores."""

    work_dir: Path
    items: int = 300
    data: Path | None = None
    base_model: Path | None = None
    minilm: bool = False
    epochs: int = 5
    learning_rate: float = 0.0
    noise: float = 0.15
    uncertainty: float = 0.99
    predictions: int = 40
    seed: int = 7
    timeout_s: float = 600.0
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:6])


@dataclass(frozen=True)
class LabeledText:
    external_id: str
    text: str
    label: str


@dataclass
class StepClock:
    """Per-step wall times, printed as the demo goes."""

    out: TextIO
    steps: list[tuple[str, float, str]] = field(default_factory=list)

    @contextmanager
    def step(self, name: str, tracer: trace.Tracer) -> Iterator[dict[str, str]]:
        self.out.write(f"==> {name}\n")
        self.out.flush()
        note: dict[str, str] = {}
        began = time.monotonic()
        with tracer.start_as_current_span(f"demo: {name}"):
            yield note
        seconds = time.monotonic() - began
        self.steps.append((name, seconds, note.get("detail", "")))
        self.out.write(f"    {seconds:6.1f}s  {note.get('detail', '')}\n")
        self.out.flush()


def load_labeled(path: Path, limit: int) -> list[LabeledText]:
    """A user's ``--data`` file (JSONL, or CSV/TSV with a header) with a text and a label per record."""
    import csv

    rows: list[dict[str, str]] = []
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    else:
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
        with path.open(newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream, delimiter=delimiter))
    items = []
    for i, row in enumerate(rows[: limit or None]):
        text, label = str(row.get("text", "")), str(row.get("label", ""))
        if not label:
            raise FailedPreconditionError(
                f"{path.name}: record {i + 1} has no 'label' (the simulated annotators need one)"
            )
        external_id = str(row.get("external_id") or row.get("id") or f"data-{i:06d}")
        items.append(LabeledText(external_id, text, label))
    return items


def mixed_sentences(count: int, seed: int) -> list[str]:
    """Reviews that praise one thing and blame another: a model trained on one-sided reviews is unsure."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        product = rng.choice(demo_data.PRODUCTS)
        good, bad = rng.sample(demo_data.ASPECTS, 2)
        texts.append(
            f"The {good} of this {product} {rng.choice(demo_data.POSITIVE)}, "
            f"but the {bad} {rng.choice(demo_data.NEGATIVE)}."
        )
    return texts


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def auto_train_job(
    gm: Gristmill, project_id: str, dataset_version_id: str, out: TextIO, left: Callable[[], float]
) -> tr.Job:
    """The job the project's auto-train policy started for ``dataset_version_id``, followed to its end with a
    progress line on ``out``; ``left()`` is the time the demo has left. A job that did not succeed is an error."""

    def started() -> tr.Job | None:
        for job in gm.training.ListJobs(tr.ListJobsRequest(project_id=project_id)).jobs:
            if job.trigger.auto_train_dataset_version_id == dataset_version_id:
                return job
        return None

    job = wait_until("the auto-train job", started, left())
    out.write(f"    job {job.job_id} ({job.spec.display_name}) started by the event; progress:\n")
    bar = ProgressLine(out)

    def watched() -> tr.Job | None:
        done = watch_job(gm, job.job_id, bar.show, timeout_s=left())
        return done if done.state in TERMINAL else None

    done = wait_until("the training job to finish", watched, left())
    bar.done()
    if done.state != tr.JOB_STATE_SUCCEEDED:
        raise FailedPreconditionError(f"training job {done.job_id} ended {state_name(done.state)}: {done.state_reason}")
    return done


@dataclass(frozen=True)
class Prepared:
    """What the demo needs before it talks to any service: the labeled data and the base model directory."""

    items: list[LabeledText]
    base_model: Path
    seconds: float


def prepare(options: DemoOptions) -> Prepared:
    """Read or generate the data and build the base model (CPU work: runs while the platform starts)."""
    began = time.monotonic()
    o = options
    o.work_dir.mkdir(parents=True, exist_ok=True)
    if o.data is not None:
        items = load_labeled(o.data, o.items)
    else:
        items = [LabeledText(i.external_id, i.text, i.label) for i in demo_data.generate(o.items, seed=o.seed)]
    if o.base_model is not None:
        base_model = o.base_model
    elif o.minilm:
        from gristmill.cli.tiny_model import minilm_path

        base_model = minilm_path()
    else:
        from gristmill.cli.tiny_model import make_tiny_bert

        # The vocabulary covers the demo's texts and what predictions will send.
        texts = [i.text for i in items] + mixed_sentences(50, o.seed)
        texts += [i.text for i in demo_data.generate(o.predictions, seed=o.seed + 1)]
        labels = sorted({i.label for i in items})
        base_model = make_tiny_bert(o.work_dir / f"tiny-bert-{o.suffix}", texts, labels)
    return Prepared(items, base_model, time.monotonic() - began)


class Demo:
    """One run of the loop against running services (``gm``)."""

    def __init__(
        self, gm: Gristmill, options: DemoOptions, tracer: trace.Tracer, out: TextIO, prepared: Prepared
    ) -> None:
        self.gm = gm
        self.options = options
        self.prepared = prepared
        self.labels = sorted({item.label for item in prepared.items})
        self.tracer = tracer
        self.out = out
        self.clock = StepClock(out)
        name = f"demo-sentiment-{options.suffix}"
        self.project_id = name
        self.model = name
        self.deployment = name
        self.summary: dict[str, Any] = {"project": name, "model": name, "deployment": name}

    # -- helpers -------------------------------------------------------------------------------------------

    def _step(self, name: str) -> Any:
        return self.clock.step(name, self.tracer)

    def _left(self, started: float) -> float:
        return max(5.0, self.options.timeout_s - (time.monotonic() - started))

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        began = time.monotonic()
        o = self.options
        items = self.prepared.items

        with self._step("create the sentiment project") as note:
            project = self.gm.labeling.CreateProject(
                create_project_request(
                    "Demo sentiment",
                    self.labels,
                    project_id=self.project_id,
                    description="gristmill demo: two annotators per item, active learning on",
                    annotators=2,
                    active_learning=True,
                )
            )
            note["detail"] = (
                f"{project.project_id}: labels {', '.join(self.labels)}, 2 annotators per item, active learning"
            )

        with self._step("policies: auto-train, promotion, deployment") as note:
            base_model = self.prepared.base_model
            self._set_policies(base_model)
            note["detail"] = (
                f"auto-train {base_model.name} on every published version; promote to production when "
                f"accuracy/test >= 0; deployment {self.deployment} follows production"
            )

        with self._step("import with cleaning and PII masking") as note:
            report = self._import(items)
            pii = ", ".join(f"{k} {v}" for k, v in sorted(report.pii_masked_by_kind.items())) or "none"
            note["detail"] = (
                f"{report.received_count} received, {report.accepted_count} accepted; dropped "
                f"{report.dropped_exact_duplicate_count} exact + {report.dropped_near_duplicate_count} near "
                f"duplicates, {report.dropped_empty_count} empty; PII masked in {report.pii_masked_item_count} "
                f"items ({pii})"
            )
            self.summary["import"] = {
                "received": report.received_count,
                "accepted": report.accepted_count,
                "dropped_exact_duplicates": report.dropped_exact_duplicate_count,
                "dropped_near_duplicates": report.dropped_near_duplicate_count,
                "pii_masked_items": report.pii_masked_item_count,
                "pii_masked_by_kind": dict(report.pii_masked_by_kind),
            }

        with self._step("two simulated annotators label (one noisy)") as note:
            truth = {item.external_id: item.label for item in items}
            counts = self._annotate(truth)
            resolved = self._review(truth)
            note["detail"] = (
                f"{CAREFUL} {counts[CAREFUL]}, {NOISY} {counts[NOISY]} annotations (noise {o.noise:.0%}); "
                f"{resolved} conflicts resolved by {REVIEWER}"
            )

        with self._step("agreement") as note:
            agreement = self.gm.labeling.GetAgreement(lb.GetAgreementRequest(project_id=self.project_id))
            pair = agreement.pairs[0] if agreement.pairs else None
            kappa = pair.cohen_kappa if pair is not None and pair.HasField("cohen_kappa") else None
            fleiss = agreement.fleiss_kappa if agreement.HasField("fleiss_kappa") else None
            self.summary["agreement"] = {
                "items": agreement.item_count,
                "cohen_kappa": kappa,
                "fleiss_kappa": fleiss,
                "observed": agreement.observed_agreement,
            }
            note["detail"] = (
                f"Cohen's kappa {kappa:.3f} over {agreement.item_count} items, observed agreement "
                f"{agreement.observed_agreement:.3f}"
                if kappa is not None
                else f"{agreement.item_count} items (kappa undefined)"
            )

        with self._step("publish a dataset version") as note:
            published = self.gm.labeling.PublishDatasetVersion(
                lb.PublishDatasetVersionRequest(project_id=self.project_id, seed=o.seed, description="demo")
            ).dataset_version
            counts_by_split = {common_pb2.DatasetSplit.Name(s.split): s.item_count for s in published.splits}
            self.summary["dataset_version"] = {
                "id": published.dataset_version_id,
                "number": published.version_number,
                "train": counts_by_split.get("DATASET_SPLIT_TRAIN", 0),
                "validation": counts_by_split.get("DATASET_SPLIT_VALIDATION", 0),
                "test": counts_by_split.get("DATASET_SPLIT_TEST", 0),
            }
            note["detail"] = (
                f"version {published.version_number} ({published.dataset_version_id}): "
                f"train {self.summary['dataset_version']['train']} / validation "
                f"{self.summary['dataset_version']['validation']} / test {self.summary['dataset_version']['test']}"
            )

        with self._step("auto-train (started by the dataset-version-published event)") as note:
            job = self._train(published.dataset_version_id, began)
            accuracy = metric_value(job.result.metrics, "accuracy", common_pb2.DATASET_SPLIT_TEST)
            self.summary["job"] = {"id": job.job_id, "state": state_name(job.state), "test_accuracy": accuracy}
            note["detail"] = f"job {job.job_id} succeeded: accuracy/test {accuracy:.3f}" if accuracy is not None else ""

        with self._step("registry registers the result (job-state-changed event)") as note:
            version = self._registered(job.job_id, began)
            self.summary["model_version"] = version.version
            note["detail"] = f"{self.model} v{version.version} READY, lineage: job {version.lineage.training_job_id}"

        with self._step("promotion policy moves production (model-version-registered event)") as note:
            change = self._promoted(version.version, began)
            note["detail"] = f"production -> v{version.version}: {change}"

        with self._step("serving hot-loads it (alias-changed event)") as note:
            self._served(version.version, began)
            note["detail"] = f"deployment {self.deployment} READY on v{version.version}; ModelReady true"

        with self._step("predictions: typed Predict and Open Inference Protocol") as note:
            uncertain = self._predict()
            p = self.summary["predictions"]
            note["detail"] = (
                f"{p['typed']} typed, {p['oip']} OIP (labels agree: {p['oip_agrees']}); {uncertain} uncertain; "
                f"latency p50 {p['latency_p50_ms']:.1f} ms, p95 {p['latency_p95_ms']:.1f} ms"
            )

        with self._step("uncertain predictions come back as labeling tasks (prediction-logged event)") as note:
            flowed = self._active_learning(began)
            note["detail"] = (
                f"{flowed['items']} new items from prediction logs; next task offers one: {flowed['task_text'][:60]!r}"
            )

        with self._step("lineage, checked through the registry") as note:
            lineage = self._lineage()
            note["detail"] = (
                f"production = {self.model} v{lineage['version']} <- job {lineage['training_job_id']} <- dataset "
                f"{lineage['project_id']}/{lineage['dataset_version_id']} (matches the published one: "
                f"{lineage['matches_published']})"
            )

        self.summary["steps"] = [{"name": n, "seconds": round(s, 2), "detail": d} for n, s, d in self.clock.steps]
        self.summary["total_seconds"] = round(time.monotonic() - began, 2)
        return self.summary

    # -- steps ---------------------------------------------------------------------------------------------

    def _set_policies(self, base_model: Path) -> None:
        o = self.options
        tiny = o.base_model is None and not o.minilm
        template = job_spec(
            project_id=self.project_id,
            dataset_version_id="",
            base_model=str(base_model.resolve()),
            model=self.model,
            display_name="demo auto-train",
            epochs=o.epochs,
            learning_rate=o.learning_rate or (3e-3 if tiny else 5e-5),
            batch_size=16,
            max_length=64,
            log_every_steps=5,
        )
        template.ClearField("dataset_version")
        # The result is the weights with the lowest validation loss (not the first to reach the best accuracy):
        # a confident model, so that only genuinely unclear inputs count as uncertain.
        template.hyper_parameters.early_stopping.metric = "loss"
        self.gm.training.SetAutoTrainPolicy(
            tr.SetAutoTrainPolicyRequest(
                policy=tr.AutoTrainPolicy(project_id=self.project_id, enabled=True, job_template=template)
            )
        )
        # The promotion policy needs the registered model: create it now (the first version registers into it).
        self.gm.registry.CreateRegisteredModel(
            rg.CreateRegisteredModelRequest(
                name=self.model,
                description="gristmill demo: sentiment of product reviews",
                task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
                label_map=common_pb2.LabelMap(labels=self.labels),
            )
        )
        self.gm.registry.SetPromotionPolicy(
            rg.SetPromotionPolicyRequest(
                policy=promotion_policy(
                    self.model, alias="production", metric="accuracy", split="test", min_value=0.0, min_improvement=0.0
                )
            )
        )
        # Declared now, before any version exists: it goes live on the first `alias changed` event.
        self.gm.serving.CreateDeployment(
            sv.CreateDeploymentRequest(
                deployment=deployment_request(
                    self.deployment,
                    self.model,
                    alias="production",
                    version=0,
                    uncertainty=o.uncertainty,
                    sample_rate=0.0,
                )
            )
        )

    def _import(self, items: list[LabeledText]) -> lb.ImportReport:
        # Texts only: the labels are the simulated annotators' ground truth, not imported annotations.
        path = self.options.work_dir / f"demo-import-{self.options.suffix}.jsonl"
        path.write_text("".join(json.dumps({"external_id": i.external_id, "text": i.text}) + "\n" for i in items))
        options = import_options(
            self.project_id, path, id_field="external_id", request_id=f"demo-{self.options.suffix}"
        )
        return import_file(self.gm, options, path)

    def _annotate(self, truth: dict[str, str]) -> dict[str, int]:
        """Both annotators label at once (threads that keep the demo's trace context)."""
        counts = {CAREFUL: 0, NOISY: 0}
        labels = sorted(set(truth.values()))
        errors: list[BaseException] = []

        def annotator(name: str, noise: float, seed: int) -> None:
            rng = random.Random(seed)
            try:
                while True:
                    reply = self.gm.labeling.NextTask(lb.NextTaskRequest(project_id=self.project_id, annotator_id=name))
                    if not reply.HasField("task"):
                        return
                    item = reply.task.item
                    label = truth.get(item.external_id) or rng.choice(labels)
                    if rng.random() < noise:
                        label = rng.choice([x for x in labels if x != label])
                    self.gm.labeling.SubmitAnnotation(
                        lb.SubmitAnnotationRequest(
                            project_id=self.project_id,
                            item_id=item.item_id,
                            annotator_id=name,
                            task_id=reply.task.task_id,
                            labels=[label],
                        )
                    )
                    counts[name] += 1
            except BaseException as exc:  # reported in the main thread
                errors.append(exc)

        threads = []
        for name, noise, seed in ((CAREFUL, 0.0, 1), (NOISY, self.options.noise, 2)):
            ctx = contextvars.copy_context()
            threads.append(threading.Thread(target=ctx.run, args=(annotator, name, noise, seed), name=name))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return counts

    def _review(self, truth: dict[str, str]) -> int:
        """Adjudicate the items the two annotators disagreed on (a tie with two annotators)."""
        resolved = 0
        token = ""
        while True:
            page = self.gm.labeling.ListItems(
                lb.ListItemsRequest(
                    project_id=self.project_id,
                    statuses=[lb.ITEM_STATUS_CONFLICT],
                    page=common_pb2.PageRequest(page_size=500, page_token=token),
                )
            )
            for item in page.items:
                if item.external_id in truth:
                    self.gm.labeling.ResolveItem(
                        lb.ResolveItemRequest(
                            project_id=self.project_id,
                            item_id=item.item_id,
                            reviewer_id=REVIEWER,
                            labels=[truth[item.external_id]],
                            comment="demo review",
                        )
                    )
                    resolved += 1
            token = page.next_page_token
            if not token:
                return resolved

    def _train(self, dataset_version_id: str, began: float) -> tr.Job:
        return auto_train_job(self.gm, self.project_id, dataset_version_id, self.out, lambda: self._left(began))

    def _registered(self, job_id: str, began: float) -> rg.ModelVersion:
        return registered_version(self.gm, self.model, job_id, self._left(began))

    def _promoted(self, version: int, began: float) -> str:
        def moved() -> str | None:
            model = self.gm.registry.GetRegisteredModel(rg.GetRegisteredModelRequest(name=self.model))
            if model.aliases.get("production") != version:
                return None
            history = self.gm.registry.GetAliasHistory(
                rg.GetAliasHistoryRequest(registered_model_name=self.model, alias="production")
            ).changes
            latest = history[0] if history else None
            return (latest.decision.explanation or latest.reason) if latest is not None else "moved"

        return wait_until("the promotion policy to move production", moved, self._left(began))

    def _served(self, version: int, began: float) -> None:
        def loaded() -> bool:
            deployment = self.gm.serving.GetDeployment(sv.GetDeploymentRequest(name=self.deployment))
            if deployment.status.state != sv.DEPLOYMENT_STATE_READY:
                return False
            serving = [v.version for v in deployment.status.versions if v.traffic_weight > 0]
            if version not in serving:
                return False
            return bool(self.gm.inference.ModelReady(oip.ModelReadyRequest(name=self.deployment)).ready)

        wait_until(f"deployment {self.deployment} to serve v{version}", loaded, self._left(began))

    def _predict(self) -> int:
        o = self.options
        fresh = [i.text for i in demo_data.generate(o.predictions, seed=o.seed + 1)]
        texts = fresh[: max(1, o.predictions - o.predictions // 4)] + mixed_sentences(
            max(1, o.predictions // 4), o.seed
        )
        latencies: list[float] = []
        uncertain = 0
        typed: dict[str, str] = {}
        for i, text in enumerate(texts):
            began = time.perf_counter()
            [prediction] = predict_typed(self.gm, self.deployment, [text], request_id=f"demo-{o.suffix}-{i}")
            latencies.append((time.perf_counter() - began) * 1000)
            uncertain += bool(prediction.uncertain)
            typed[text] = prediction.label
        batch = texts[:8]
        through_oip = predict_oip(self.gm, self.deployment, batch, request_id=f"demo-{o.suffix}-oip")
        deployment = self.gm.serving.GetDeployment(sv.GetDeploymentRequest(name=self.deployment))
        server_p50 = next((v.latency_p50_ms for v in deployment.status.versions if v.traffic_weight > 0), 0.0)
        self.summary["predictions"] = {
            "typed": len(texts),
            "oip": len(through_oip),
            "oip_labels": [p.label for p in through_oip],
            "oip_agrees": all(typed[p.text] == p.label for p in through_oip),
            "uncertain": uncertain,
            "uncertainty_threshold": o.uncertainty,
            "latency_p50_ms": round(statistics.median(latencies), 2),
            "latency_p95_ms": round(_percentile(latencies, 0.95), 2),
            "server_latency_p50_ms": round(server_p50, 2),
        }
        return uncertain

    def _active_learning(self, began: float) -> dict[str, Any]:
        if not self.summary["predictions"]["uncertain"]:
            raise FailedPreconditionError(
                "no prediction was uncertain, so nothing can flow back to labeling: raise --uncertainty"
            )

        def items() -> list[lb.Item] | None:
            found = self.gm.labeling.ListItems(
                lb.ListItemsRequest(project_id=self.project_id, source=lb.ITEM_SOURCE_PREDICTION_LOG)
            ).items
            return list(found) or None

        found = wait_until("uncertain predictions to become labeling items", items, self._left(began))
        # A fresh annotator is offered one of them: every imported item already has its two annotations.
        reply = self.gm.labeling.NextTask(lb.NextTaskRequest(project_id=self.project_id, annotator_id="demo-check"))
        task_source = lb.ItemSource.Name(reply.task.item.source) if reply.HasField("task") else ""
        text = reply.task.item.text if reply.HasField("task") else ""
        if reply.HasField("task"):
            self.gm.labeling.SkipTask(
                lb.SkipTaskRequest(
                    project_id=self.project_id, task_id=reply.task.task_id, annotator_id="demo-check", reason="demo"
                )
            )
        result = {"items": len(found), "task_item_source": task_source, "task_text": text}
        self.summary["active_learning"] = result
        return result

    def _lineage(self) -> dict[str, Any]:
        version = self.gm.registry.GetModelVersion(
            rg.GetModelVersionRequest(
                registered_model_name=self.model, selector=common_pb2.ModelVersionSelector(alias="production")
            )
        )
        all_versions = self.gm.registry.ListModelVersions(
            rg.ListModelVersionsRequest(registered_model_name=self.model)
        ).model_versions
        lineage = {
            "version": version.version,
            "training_job_id": version.lineage.training_job_id,
            "project_id": version.lineage.dataset_version.project_id,
            "dataset_version_id": version.lineage.dataset_version.dataset_version_id,
            "matches_published": version.lineage.dataset_version.dataset_version_id
            == self.summary["dataset_version"]["id"]
            and version.lineage.training_job_id == self.summary["job"]["id"],
            "model_versions": len(all_versions),
        }
        self.summary["lineage"] = lineage
        return lineage
