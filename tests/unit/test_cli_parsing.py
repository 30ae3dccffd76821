"""What the CLI shows and parses without a platform: the labeling suggestion, search expressions, quotas, cards,
job spec files, key expiry times, project cleaning settings and a job's progress line."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer

from gristmill.api.admin.v1 import admin_pb2 as ad
from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.api.training.v1 import training_pb2 as tr
from gristmill.cli.admin_commands import expiry_time, parse_quota
from gristmill.cli.annotation_commands import prediction_input, suggestion, task_lines
from gristmill.cli.job_specs import job_spec, spec_from_file
from gristmill.cli.options import read_text_option
from gristmill.cli.project_settings import cleaning_settings, label_definitions, pii_pattern
from gristmill.cli.registry_commands import card_text_from_file
from gristmill.cli.training_commands import (
    ProgressLine,
    SearchSpecError,
    parse_search_expression,
    search_spec,
    watch_job,
)


def task(*predictions: lb.Prediction) -> lb.Task:
    schema = lb.LabelSchema(labels=[lb.LabelDefinition(name="negative"), lb.LabelDefinition(name="positive")])
    item = lb.Item(item_id="i1", text="It broke at once", predictions=list(predictions))
    return lb.Task(task_id="t1", item=item, label_schema=schema)


def prediction(label: str, p: float, version: int = 1, seconds: int = 100) -> lb.Prediction:
    other = "positive" if label == "negative" else "negative"
    made = lb.Prediction(model_name="sentiment", model_version=version, labels=[label])
    made.probabilities.update({label: p, other: 1 - p})
    made.create_time.FromSeconds(seconds)
    return made


def test_label_shows_the_newest_suggestion_with_its_probability() -> None:
    lines = task_lines(task(prediction("positive", 0.55, 1, 100), prediction("negative", 0.875, 2, 200)), 7)
    assert lines == [
        "\n[7 left] It broke at once",
        "  suggested: 1) negative (p=0.88) by sentiment v2",
        "  1) negative  2) positive  s) skip  q) quit",
    ]


def test_label_without_a_prediction_shows_no_suggestion() -> None:
    assert suggestion(task().item) is None
    assert not any("suggested" in line for line in task_lines(task(), 1))


def test_a_prediction_with_probabilities_only_suggests_the_most_probable_label() -> None:
    only_probabilities = lb.Prediction(model_name="m", probabilities={"negative": 0.3, "positive": 0.7})
    hint = suggestion(task(only_probabilities).item)
    assert hint is not None and (hint.label, hint.probability, hint.model) == ("positive", 0.7, "m")


def test_search_expressions() -> None:
    log = parse_search_expression("learning_rate=loguniform(1e-5, 1e-3)")
    assert (log.parameter, log.log_uniform.min, log.log_uniform.max) == ("learning_rate", 1e-5, 1e-3)
    rank = parse_search_expression("lora_rank=choice(4,8,16)")
    assert (rank.parameter, list(rank.choice.values)) == ("lora.rank", [4, 8, 16])
    for bad, message in [
        ("learning_rate", "expected NAME=uniform"),
        ("learning_rate=normal(1,2)", "unknown distribution"),
        ("learning_rate=uniform(1)", "two numbers"),
        ("learning_rate=uniform(3,1)", "MIN < MAX"),
        ("learning_rate=uniform(a,1)", "not a number"),
        ("lora.rank=choice()", "at least one value"),
    ]:
        with pytest.raises(SearchSpecError, match=message):
            parse_search_expression(bad)


def test_search_spec_needs_trials_and_refuses_duplicates() -> None:
    kwargs = {"search_file": None, "max_concurrent_trials": 0, "metric": "", "mode": "", "scheduler": ""}
    assert search_spec(expressions=[], trials=0, **kwargs) is None  # type: ignore[arg-type]
    with pytest.raises(SearchSpecError, match="--trials"):
        search_spec(expressions=["weight_decay=uniform(0,0.1)"], trials=0, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(SearchSpecError, match="more than once"):
        search_spec(expressions=["lora.rank=choice(4)", "lora_rank=choice(8)"], trials=2, **kwargs)  # type: ignore[arg-type]


def test_quotas() -> None:
    quota = parse_quota("training-worker-seconds/month=36000")
    assert (quota.kind, quota.period, quota.limit) == (
        ad.USAGE_KIND_TRAINING_WORKER_SECONDS,
        ad.QUOTA_PERIOD_MONTH,
        36000,
    )
    for bad in ("predictions/week=5", "predictions=5", "tokens/day=5", "predictions/day=lots", "predictions/day=-1"):
        with pytest.raises(typer.Exit):
            parse_quota(bad)


def test_card_markdown_keeps_the_editable_sections_only(tmp_path: Path) -> None:
    card = tmp_path / "model-card.md"
    card.write_text(
        "# m version 1\n\n## Intended use\n\nTriage.\n\n## Training\n\ngenerated\n\n"
        "## Limitations\n\nEnglish only.\n\n### Known gaps\n\nSarcasm.\n\n"
        "## Ethical considerations\n\n_Not written yet._\n"
    )
    assert card_text_from_file(card) == {
        "intended_use": "Triage.",
        "limitations": "English only.\n\n### Known gaps\n\nSarcasm.",
        "ethical_considerations": "",
    }


def test_prediction_lines() -> None:
    made = prediction_input({"id": "r-1", "probabilities": {"a": 0.2, "b": 0.8}}, "m", 2)
    assert made.external_id == "r-1" and list(made.prediction.labels) == ["b"] and made.prediction.model_version == 2
    for bad, message in [
        ({"label": "a"}, "no item"),
        ({"item_id": "x"}, "no prediction"),
        ({"item_id": "x", "labels": "a"}, "list of label names"),
        ({"item_id": "x", "label": "a", "probabilities": {"a": "high"}}, "label: number"),
    ]:
        with pytest.raises(ValueError, match=message):
            prediction_input(bad, "m", 1)


def test_a_spec_file_gives_the_fields_the_options_leave(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text(
        json.dumps(
            {
                "base_model": {"base_model_name": "minilm"},
                "method": "TRAINING_METHOD_LORA",
                "lora": {"rank": 8, "targetModules": ["query", "value"]},
                "hyper_parameters": {"epochs": 4, "warmup_ratio": 0.1, "seed": "7", "learning_rate": 1e-4},
                "resources": {"num_workers": 2},
                "tags": {"team": "search"},
            }
        )
    )
    spec = job_spec(project_id="p", dataset_version_id="v1", epochs=2, base=spec_from_file(path))
    assert spec.base_model.base_model_name == "minilm" and spec.method == tr.TRAINING_METHOD_LORA
    assert list(spec.lora.target_modules) == ["query", "value"] and spec.tags["team"] == "search"
    hp = spec.hyper_parameters
    assert (hp.epochs, hp.learning_rate, hp.warmup_ratio, hp.seed) == (2, 1e-4, 0.1, 7)  # --epochs wins
    assert spec.resources.num_workers == 2 and spec.dataset_version.dataset_version_id == "v1"
    overridden = job_spec(
        project_id="p", dataset_version_id="", base_model="/m", lora=False, workers=3, base=spec_from_file(path)
    )
    assert overridden.base_model.local_path == "/m" and overridden.method == tr.TRAINING_METHOD_FULL
    assert overridden.resources.num_workers == 3 and not overridden.resources.fsdp
    sharded = job_spec(project_id="p", dataset_version_id="", workers=2, fsdp=True, base=spec_from_file(path))
    assert sharded.resources.fsdp and sharded.resources.num_workers == 2

    with pytest.raises(typer.Exit):
        job_spec(project_id="p", dataset_version_id="")  # no base model anywhere
    for bad in ('{"hyper_parameters": {"epochs": "many"}}', '{"no_such_field": 1}', "not json"):
        path.write_text(bad)
        with pytest.raises(typer.Exit) as raised:
            spec_from_file(path)
        assert raised.value.exit_code == 2
    with pytest.raises(typer.Exit):
        spec_from_file(tmp_path / "missing.json")


def test_generative_job_options(tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    spec = job_spec(
        project_id="chats",
        dataset_version_id="v2",
        base_model_name="smollm2-135m",
        objective="dpo",
        qlora=True,
        chat_template=template,
        beta=0.25,
        dpo_loss="ipo",
        merged=True,
    )
    assert (spec.objective, spec.method, spec.chat_template) == (tr.OBJECTIVE_DPO, tr.TRAINING_METHOD_QLORA, template)
    assert spec.dpo.beta == 0.25 and spec.dpo.loss == tr.DPO_LOSS_IPO and spec.publish_merged
    # Unset options keep a spec file's values (--lora replaces its method); the dataset's task type picks the
    # objective when none is named.
    kept = job_spec(project_id="chats", dataset_version_id="v3", lora=True, base=spec)
    assert (kept.objective, kept.method, kept.dpo.beta, kept.chat_template) == (
        tr.OBJECTIVE_DPO,
        tr.TRAINING_METHOD_LORA,
        0.25,
        template,
    )
    plain = job_spec(project_id="chats", dataset_version_id="v2", base_model_name="m", lora=True)
    assert plain.objective == tr.OBJECTIVE_UNSPECIFIED and plain.method == tr.TRAINING_METHOD_LORA
    for bad in ({"objective": "rlhf"}, {"qlora": True, "lora": False}, {"dpo_loss": "kto"}):
        with pytest.raises(typer.Exit) as raised:
            job_spec(project_id="chats", dataset_version_id="v2", base_model_name="m", **bad)  # type: ignore[arg-type]
        assert raised.value.exit_code == 2
    assert read_text_option(None, "--chat-template") == ""

    (tmp_path / "t.jinja").write_text(template)
    assert read_text_option(tmp_path / "t.jinja", "--chat-template") == template
    (tmp_path / "bin.jinja").write_bytes(b"\xff\xfe")
    for path in (tmp_path / "missing.jinja", tmp_path / "bin.jinja"):
        with pytest.raises(typer.Exit) as raised:
            read_text_option(path, "--chat-template")
        assert raised.value.exit_code == 2


def test_key_expiry_times() -> None:
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    assert expiry_time("30d", now) == now + timedelta(days=30)
    assert expiry_time("90m", now) == now + timedelta(minutes=90)
    assert expiry_time("2027-01-31T00:00:00Z", now) == datetime(2027, 1, 31, tzinfo=UTC)
    assert expiry_time("2027-01-31T02:00:00+02:00", now) == datetime(2027, 1, 31, tzinfo=UTC)
    for bad in ("0d", "30", "30w", "soon", "2026-01-01T00:00:00Z", "2027-01-31T00:00:00", "99999999999d"):
        with pytest.raises(typer.Exit) as raised:
            expiry_time(bad, now)
        assert raised.value.exit_code == 2, bad


def test_cleaning_settings_and_label_descriptions() -> None:
    cleaning, paths = cleaning_settings(
        max_text_chars=500,
        near_duplicates="flag",
        near_duplicate_threshold=0.8,
        pii_kind_names="email, ip-address",
        pii_patterns=[r"customer-number=CU-\d{6}"],
        store_raw_text=False,
    )
    assert cleaning.max_text_chars == 500 and cleaning.near_duplicate_policy == lb.NEAR_DUPLICATE_POLICY_FLAG
    assert list(cleaning.pii.kinds) == [lb.PII_KIND_EMAIL, lb.PII_KIND_IP_ADDRESS]
    assert cleaning.pii.custom_patterns[0].regex == r"CU-\d{6}"
    assert paths == [
        "settings.cleaning.max_text_chars",
        "settings.cleaning.near_duplicate_policy",
        "settings.cleaning.near_duplicate_threshold",
        "settings.cleaning.pii.kinds",
        "settings.cleaning.pii.custom_patterns",
        "settings.cleaning.pii.store_raw_text",
    ]
    assert cleaning_settings(pii_kind_names="all")[0].pii.kinds == []
    tokens, token_paths = cleaning_settings(max_tokens=2048, tokenizer="smollm2-135m")
    assert (tokens.max_tokens, tokens.tokenizer) == (2048, "smollm2-135m")
    assert token_paths == ["settings.cleaning.max_tokens", "settings.cleaning.tokenizer"]
    assert cleaning_settings() == (lb.CleaningSettings(), [])
    bad_settings: list[dict[str, object]] = [
        {"near_duplicates": "keep"},
        {"near_duplicate_threshold": 0.0},
        {"near_duplicate_threshold": 1.5},
        {"pii_kind_names": "email,passport"},
        {"pii_kind_names": ","},
    ]
    for bad in bad_settings:
        with pytest.raises(typer.Exit):
            cleaning_settings(**bad)  # type: ignore[arg-type]
    for pattern in ("no-equals", "Bad Name=x", "empty=a*", "broken=(x"):
        with pytest.raises(typer.Exit):
            pii_pattern(pattern)

    current = [lb.LabelDefinition(name="bug", description="old"), lb.LabelDefinition(name="idea", description="new")]
    labels = label_definitions(["bug", "idea", "other"], ['bug="Something broken"'], current)
    assert [(x.name, x.description) for x in labels] == [
        ("bug", "Something broken"),
        ("idea", "new"),
        ("other", ""),
    ]
    for bad in ("bug", "=x", "feature=A wish"):
        with pytest.raises(typer.Exit):
            label_definitions(["bug"], [bad])


class _Training:
    """WatchJob replays ``events``; GetJob answers ``job``."""

    def __init__(self, events: list[tr.JobEvent], job: tr.Job) -> None:
        self.events, self.job = events, job

    def WatchJob(self, request: tr.WatchJobRequest, timeout: float) -> list[tr.JobEvent]:
        return self.events

    def GetJob(self, request: tr.GetJobRequest) -> tr.Job:
        return self.job


def test_the_progress_line_shows_tokens_per_second_once_the_job_reports_them() -> None:
    def state_change(sequence: int, state: int, **progress: Any) -> tr.JobEvent:
        change = tr.JobStateTransition(state=state, progress=tr.JobProgress(**progress))  # type: ignore[arg-type]
        return tr.JobEvent(job_id="j1", sequence=sequence, state_change=change)

    def metrics(
        sequence: int, step: int, split: int = common_pb2.DATASET_SPLIT_UNSPECIFIED, **values: float
    ) -> tr.JobEvent:
        report = tr.MetricsReport(
            step=step,
            metrics=[common_pb2.Metric(name=name, value=value, split=split) for name, value in values.items()],  # type: ignore[arg-type]
        )
        return tr.JobEvent(job_id="j1", sequence=sequence, metrics=report)

    # A token count over a window of steps: the loop divides it by the window's seconds.
    tokens, seconds = 3 * 8 * 41, 0.5
    events = [
        state_change(1, tr.JOB_STATE_RUNNING, total_steps=4),
        metrics(2, 2, loss=0.75, learning_rate=1e-3, samples_per_second=48.0, tokens_per_second=tokens / seconds),
        metrics(3, 2, common_pb2.DATASET_SPLIT_VALIDATION, loss=0.5),
        state_change(4, tr.JOB_STATE_SUCCEEDED, step=4, total_steps=4, tokens_per_second=2000.0),
    ]
    done = tr.Job(job_id="j1", state=tr.JOB_STATE_SUCCEEDED)
    gm = SimpleNamespace(training=_Training(events, done))
    stream = io.StringIO()
    line = ProgressLine(stream, width=4)
    assert watch_job(gm, "j1", line.show) == done  # type: ignore[arg-type]
    assert stream.getvalue().splitlines() == [
        "running   [....] 0/4",
        "running   [##..] 2/4 loss=0.75 1968 tok/s",
        # An evaluation's metrics replace the training ones; the latest throughput stays.
        "running   [##..] 2/4 loss/validation=0.5 1968 tok/s",
        "succeeded [####] 4/4 loss/validation=0.5 2000 tok/s",
    ]


def test_the_ready_line_names_every_service_the_openai_api_and_the_console() -> None:
    from gristmill.cli.context import parse_endpoints, parse_http_address

    line = (
        "READY admin=127.0.0.1:7004 registry=127.0.0.1:7002 labeling=127.0.0.1:7000 training=127.0.0.1:7001 "
        "serving=127.0.0.1:7003 openai=127.0.0.1:7005 console=127.0.0.1:7006"
    )
    endpoints = parse_endpoints(line)
    assert (endpoints.serving, endpoints.admin) == ("127.0.0.1:7003", "127.0.0.1:7004")
    assert parse_http_address(line) == "127.0.0.1:7005"
    assert parse_http_address(line, "console") == "127.0.0.1:7006"
    assert parse_http_address("READY serving=127.0.0.1:7003") == ""
    with pytest.raises(ValueError, match="expected NAME=HOST:PORT"):
        parse_endpoints("READY nonsense=1.2.3.4:5")


def test_few_labels_options() -> None:
    spec = job_spec(project_id="p", dataset_version_id="v1", base_model="/m", augment=4, adversarial=1.0)
    few = spec.hyper_parameters.few_labels
    assert (few.augmentation_copies, few.adversarial_epsilon) == (4, 1.0)
    assert not few.HasField("augmentation_probability")  # the service's default (0.1)
    # Unset options keep a spec file's values.
    kept = job_spec(project_id="p", dataset_version_id="v2", epochs=2, base=spec)
    assert (kept.hyper_parameters.few_labels.augmentation_copies, kept.hyper_parameters.epochs) == (4, 2)
    plain = job_spec(project_id="p", dataset_version_id="v1", base_model="/m")
    assert not plain.hyper_parameters.HasField("few_labels")
    ia3 = job_spec(project_id="p", dataset_version_id="v1", base_model="/m", ia3=True)
    assert ia3.method == tr.TRAINING_METHOD_IA3
    for clash in ({"lora": True}, {"lora": False}, {"qlora": True}):
        with pytest.raises(typer.Exit) as raised:
            job_spec(project_id="p", dataset_version_id="v1", base_model="/m", ia3=True, **clash)  # type: ignore[arg-type]
        assert raised.value.exit_code == 2


def test_pruning_and_distillation_options() -> None:
    spec = job_spec(
        project_id="p",
        dataset_version_id="v1",
        base_model="/m",
        prune_layers=3,
        prune_embedding_size=176,
        prune_intermediate_size=768,
        teacher_prefix="models/big/2",
        distil_weight=1.0,
    )
    assert (spec.pruning.layers, spec.pruning.embedding_size, spec.pruning.intermediate_size) == (3, 176, 768)
    assert spec.distillation.teacher.object_prefix == "models/big/2"
    assert spec.distillation.weight == 1.0 and spec.distillation.temperature == 0.0  # the service's default (2)
    plain = job_spec(project_id="p", dataset_version_id="v1", base_model="/m")
    assert not plain.HasField("pruning") and not plain.HasField("distillation")
    # A spec file's distillation is kept; options given replace its fields.
    para = job_spec(project_id="p", dataset_version_id="v1", paraphrase=2, paraphrase_model="smol", base=spec)
    few = para.hyper_parameters.few_labels
    assert few.paraphrase_copies == 2 and few.paraphrase_model.base_model_name == "smol"
    kept = job_spec(project_id="p", dataset_version_id="v1", distil_temperature=4.0, base=spec)
    assert kept.distillation.teacher.object_prefix == "models/big/2" and kept.distillation.temperature == 4.0
    assert kept.distillation.weight == 1.0
