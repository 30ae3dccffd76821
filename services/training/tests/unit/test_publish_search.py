"""A search's model is published as its winning trial trained it: the card's method line and hyper-parameter
table are the trial's, equal to the lineage the registry records, and the loop's own files stay unpublished."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from gristmill.core.storage import LocalObjectStore
from gristmill.training.domain import spec as d
from gristmill.training.domain.model import Job, JobState
from gristmill.training.domain.publish import MODEL_CARD, ModelPublisher
from gristmill.training.domain.runs import LOOP_REPORT_FILE, LOOP_STATE_FILE, RunOutcome
from gristmill.training.domain.search import trial_spec
from services.training.tests.service_support import card_hyper_parameters
from services.training.tests.unit.test_search import _dim, _spec


def test_the_card_and_the_lineage_are_the_winning_trials(tmp_path: Path) -> None:
    spec = _spec(_dim("lora.rank", d.Distribution.CHOICE, values=[4, 16]))
    assert spec.lora is not None and spec.lora.rank == 8
    trial = trial_spec(spec, {"lora.rank": 4.0})
    job = Job(job_id="job-1", organization_id="org", spec=spec, state=JobState.RUNNING, create_time=datetime.now(UTC))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    report = {"step": 12, "finished": True, "trial": 1, "validation_accuracy": 0.75, "test_accuracy": 0.5}
    (model_dir / LOOP_REPORT_FILE).write_text(json.dumps(report))
    (model_dir / LOOP_STATE_FILE).write_text("{}")
    outcome = RunOutcome(
        metrics=report, model_dir=model_dir, trainable_parameters=1, total_parameters=2, best_trial=1, spec=trial
    )

    result = ModelPublisher(LocalObjectStore(tmp_path / "objects"), code_version="test").publish(
        job, outcome, label_map=("negative", "positive"), dataset_files=()
    )

    card = (model_dir / MODEL_CARD).read_text()
    assert result.lineage.hyper_parameters["lora.rank"] == "4"
    assert card_hyper_parameters(card) == result.lineage.hyper_parameters
    assert "(LoRA rank 4, merged" in card and "LoRA rank 8" not in card
    assert "the best of 4 trials on validation accuracy (trial 1)" in card
    assert {f.key.rsplit("/", 1)[-1] for f in result.files} == {"config.json", MODEL_CARD}
    assert {(m.name, m.split.value) for m in result.metrics} == {("accuracy", "validation"), ("accuracy", "test")}
