"""Drift, end to end on real data: MiniLM fine-tuned on the amazon and yelp sentences publishes its test split's
prediction profile; served, the same model scores its recent predictions against it. Reviews of another domain
(the imdb sentences) push the drift index over the alert threshold; held-out amazon and yelp sentences do not.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from gristmill.cli.tiny_model import minilm_path
from gristmill.core import drift
from gristmill.core.metrics import ServiceMetrics
from gristmill.serving.domain.deployments import DeploymentManager
from gristmill.serving.domain.model import DEFAULT_ORGANIZATION, DeploymentSpec
from gristmill.serving.domain.service import DeploymentService
from gristmill.serving.domain.sources import ResolvedVersion
from gristmill.serving.metrics import ServingMetrics
from gristmill.serving.runtime.classifier import load_transformers_classifier
from gristmill.serving.store.sql import SqlDeploymentStore
from gristmill.training.domain import spec as d
from gristmill.training.ml.loop import DirectorySession, LoopConfig, LoopRunner
from gristmill.training.tasks.text_classification import LabelledText
from services.serving.tests.support import ENTERPRISE, FakeSource
from tests.conftest import SHARED_DATA
from tests.support.databases import migrated_database

pytestmark = pytest.mark.slow

LABELS = ("negative", "positive")
SENTIMENT = Path(SHARED_DATA) / "sentiment"


def _sentences(name: str) -> list[tuple[str, int]]:
    rows = []
    for line in (SENTIMENT / f"{name}_labelled.txt").read_text().splitlines():
        text, _, label = line.rpartition("\t")
        if text.strip() and label.strip() in ("0", "1"):
            rows.append((text.strip(), int(label)))
    return rows


@dataclass
class DirectorySource(FakeSource):
    """The registry's part, reduced to one trained model directory."""

    directory: Path = Path()

    def fetch(self, resolved: ResolvedVersion) -> Path:
        return self.directory


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    """MiniLM fine-tuned on 1,200 amazon and yelp sentences (its profile from 400 others); 400 more held out, and
    the imdb sentences."""
    in_domain = _sentences("amazon_cells") + _sentences("yelp")
    random.Random(7).shuffle(in_domain)
    train, test, held_out = in_domain[:1200], in_domain[1200:1600], in_domain[1600:2000]
    config = LoopConfig(
        job_id="drift",
        model_dir=str(minilm_path()),
        label_map=LABELS,
        examples={
            "train": [LabelledText(t, y) for t, y in train],
            "test": [LabelledText(t, y) for t, y in test],
        },
        method=d.Method.FULL,
        lora=None,
        hyper=d.build_hyper_parameters(
            method=d.Method.FULL,
            learning_rate=5e-5,
            epochs=1,
            per_worker_batch_size=16,
            max_sequence_length=64,
            seed=7,
        ),
    )
    session = DirectorySession(tmp_path_factory.mktemp("drift-run"))
    LoopRunner(config, 0, 1, 0, session).run()
    assert session.reports[-1]["test_accuracy"] >= 0.8, session.reports[-1]
    imdb = [t for t, _ in _sentences("imdb")]
    return session.checkpoints[-1], [t for t, _ in held_out], imdb


async def _served_drift(model_dir: Path, tmp_path: Path, texts: list[str]) -> tuple[dict[str, float], int]:
    """Serve ``model_dir`` in a deployment, classify ``texts`` 16 at a time, and read the drift gauges."""
    source = DirectorySource(directory=model_dir)
    source.add("sentiment", 1)
    source.aliases[("sentiment", "production")] = 1
    service_metrics = ServiceMetrics("serving")
    metrics = ServingMetrics(service_metrics)
    loader = functools.partial(load_transformers_classifier, trace=False)
    manager = DeploymentManager(source, loader, drift_observer=metrics.drift, retry_delay_s=0.01)
    database = migrated_database(f"sqlite:///{tmp_path / 'serving.db'}", "serving")
    service = DeploymentService(SqlDeploymentStore(database), manager, source, license_=ENTERPRISE)
    await service.start()
    try:
        spec = DeploymentSpec(organization_id=DEFAULT_ORGANIZATION, name="reviews", registered_model_name="sentiment")
        await service.create(spec, wait_until_ready=True, timeout_s=120)
        for start in range(0, len(texts), 16):
            await service.predict(DEFAULT_ORGANIZATION, "reviews", texts[start : start + 16])
    finally:
        await service.close()
        database.dispose()
    registry = service_metrics.registry
    scores = {
        signal: registry.get_sample_value(
            "gristmill_serving_drift_psi",
            {"service": "serving", "deployment": "reviews", "version": "1", "signal": signal},
        )
        for signal in (drift.TOP_PROBABILITY, drift.LABEL, drift.INPUT_LENGTH)
    }
    window = registry.get_sample_value(
        "gristmill_serving_drift_window", {"service": "serving", "deployment": "reviews", "version": "1"}
    )
    assert window is not None and all(value is not None for value in scores.values()), (scores, window)
    return {signal: float(value or 0.0) for signal, value in scores.items()}, int(window)


async def test_another_domain_drifts_over_the_threshold_and_held_out_sentences_do_not(
    trained: tuple[Path, list[str], list[str]], tmp_path: Path
) -> None:
    model_dir, held_out, imdb = trained
    profile = drift.PredictionProfile.from_json((model_dir / drift.PROFILE_FILE).read_text())
    assert profile.count == 400

    same, same_window = await _served_drift(model_dir, tmp_path / "held-out", held_out)
    other, other_window = await _served_drift(model_dir, tmp_path / "imdb", imdb)
    print(f"\ndrift PSI: held-out amazon+yelp {same} over {same_window}; imdb {other} over {other_window}")

    assert same_window == 400 and other_window == 1000
    assert max(same.values()) < drift.ALERT_PSI, same
    # The longer film reviews: their inputs' lengths shift well past the threshold. (The model's confidence on them
    # shifts too, but on this data less: measured 0.08 for the top probability, 0.007 for the labels.)
    assert other[drift.INPUT_LENGTH] > drift.ALERT_PSI, other
    assert other[drift.TOP_PROBABILITY] > same[drift.TOP_PROBABILITY], (other, same)
