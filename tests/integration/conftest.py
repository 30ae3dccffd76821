"""The embedded platform the CLI tests share (one per test session): started by ``gristmill dev --base-port 0``,
with one labeled, published project and one finished training run, made by the CLI itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gristmill.cli import demo_data
from tests.conftest import REPO_ROOT
from tests.support.cli import as_json, cli, ok
from tests.support.licences import TEST_KEY_B64, signed_license_file
from tests.support.tiny_model import make_tiny_bert


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``gristmill dev --base-port 0``: the embedded platform; yields its READY line (every endpoint).

    It runs under an enterprise licence (every feature, no limits) signed with the test key, trusted as the
    development key: the commands of licensed features (a canary) are walked for real, and ``gristmill license``
    shows how a development key is reported."""
    data = tmp_path_factory.mktemp("platform")
    licence = signed_license_file(data / "licence.json")
    out = (data / "dev.out").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gristmill.cli.main", "dev", "--base-port", "0", "--data-dir", str(data / "data")],
        cwd=REPO_ROOT,
        stdout=out,
        stderr=(data / "dev.log").open("w"),
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "GRISTMILL_LICENSE_FILE": str(licence),
            "GRISTMILL_LICENSE_DEVELOPMENT_KEY": TEST_KEY_B64,
        },
        start_new_session=True,
    )
    ready = ""
    deadline = time.monotonic() + 240
    while not ready and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        ready = next((line for line in Path(out.name).read_text().splitlines() if line.startswith("READY ")), "")
    assert ready, f"gristmill dev did not start: {(data / 'dev.log').read_text()[-3000:]}"
    yield ready
    # The happy path of `dev`: SIGTERM drains every service and the command exits 0.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert "STOPPED" in Path(out.name).read_text()


@pytest.fixture(scope="session")
def labeled(platform: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A project whose imported labels make every item labeled (one annotation per item), published once."""
    data = tmp_path_factory.mktemp("labeled") / "reviews.jsonl"
    demo_data.write_jsonl(data, 160, seed=11)
    ok(cli(platform, "projects", "create", "CLI reviews", "--id", "cli-reviews", "--labels", "negative,positive"))
    report = as_json(
        cli(
            platform, "import", "cli-reviews", str(data), "--id-field", "external_id", "--annotator", "import", "--json"
        )
    )
    assert int(report["accepted_count"]) > 100 and int(report["imported_label_count"]) == int(report["accepted_count"])
    published = as_json(cli(platform, "datasets", "publish", "cli-reviews", "--seed", "3", "--json"))
    return {
        "project": "cli-reviews",
        "dataset_version": published["dataset_version"]["dataset_version_id"],
        "data": str(data),
    }


@pytest.fixture(scope="session")
def base_model(labeled: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [json.loads(line)["text"] for line in Path(labeled["data"]).read_text().splitlines()]
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts, ["negative", "positive"])


@pytest.fixture(scope="session")
def trained(platform: str, labeled: dict[str, str], base_model: Path) -> dict[str, str]:
    """`gristmill train` (its happy path): submit, watch the live progress to the end, print the result."""
    result = cli(
        platform,
        "train",
        labeled["project"],
        "--base-model",
        str(base_model),
        "--model",
        "cli-sentiment",
        "--epochs",
        "2",
        "--learning-rate",
        "0.003",
        "--batch-size",
        "16",
        "--max-length",
        "64",
    )
    out = ok(result)
    assert "submitted; watching" in out and "succeeded" in out and "accuracy/test=" in out
    assert "[##############################]" in out  # the progress bar reached the end
    assert "cli-sentiment v1" in out  # the command waited for the registry to register the result
    job_id = out.split("job ", 1)[1].split()[0]
    return {"job": job_id, "model": "cli-sentiment"}
