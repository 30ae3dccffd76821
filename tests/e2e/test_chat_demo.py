"""End to end: ``gristmill demo --task chat --tiny``, the assistant flywheel on the embedded platform.

Seed conversations are annotated and published, the SFT auto-train job's adapter is registered and made candidate
and production by the promotion policy (floors, then the online gate with no baseline), a deployment serves it with
a canary on ``candidate``, simulated users chat through the OpenAI-compatible API and give feedback, labeling turns
their regenerates into preference pairs, the demo publishes them, the DPO auto-train job's adapter becomes the
candidate, serving's canary loads it, and the online gate promotes it or rolls it back on the users' feedback.

The test starts the embedded platform itself, on a block of free ports (serving's OpenAI port is its gRPC port + 2)
and with an enterprise licence signed by the test vendor key (trusted as a development key), so that the
deployment's canary is licensed; the demo runs against it with ``--no-start``. Afterwards the tests ask the
registry, labeling and serving what happened, and compare it with what the demo says the users sent.

One demo run (about 2.5 minutes on two busy cores) backs every test here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.api.serving.v1 import serving_pb2 as sv
from gristmill.api.training.v1 import training_pb2 as tr
from gristmill.cli.platforms import EmbeddedProcess
from gristmill.client import ClientOptions, Endpoints, Gristmill
from gristmill.core.tls import TLS_VARIABLES
from tests.conftest import REPO_ROOT
from tests.support.chat_demo import alias_history, feedback_items
from tests.support.licences import TEST_KEY_B64, signed_license_file
from tests.support.services import free_port_block

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

MIN_FEEDBACK = 20  # the --tiny default: feedback per version before the online gate decides
SERVICES = ("labeling", "training", "registry", "serving")


@dataclass
class ChatDemoRun:
    summary: dict[str, Any]
    endpoints: Endpoints
    log_file: Path
    progress: str

    def client(self) -> Gristmill:
        return Gristmill(self.endpoints, ClientOptions(timeout_s=30, tls=None))


@pytest.fixture(scope="module")
def chat_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatDemoRun]:
    work = tmp_path_factory.mktemp("chat-demo")
    licence = signed_license_file(work / "licence.json")
    platform = EmbeddedProcess(
        work / "platform",
        base_port=free_port_block(7),  # five services, serving's OpenAI-compatible API and the console
        env={"GRISTMILL_LICENSE_FILE": str(licence), "GRISTMILL_LICENSE_DEVELOPMENT_KEY": TEST_KEY_B64},
    )
    endpoints = platform.start()
    env = {k: v for k, v in os.environ.items() if k not in TLS_VARIABLES and k != "GRISTMILL_API_KEY"}
    command = [
        sys.executable, "-m", "gristmill.cli.main", "--endpoints", " ".join(f"{k}={v}" for k, v in
        vars(endpoints).items()), "demo", "--task", "chat", "--tiny", "--no-start", "--data-dir", str(work),
        "--json", "--timeout", "600",
    ]  # fmt: skip
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=720, env=env)
        assert done.returncode == 0, f"gristmill demo --task chat failed ({done.returncode}):\n{done.stderr[-6000:]}"
        yield ChatDemoRun(json.loads(done.stdout), endpoints, platform.log_file, done.stderr)
    finally:
        platform.stop()


def test_two_versions_registered_sft_then_dpo_from_the_sft_model(chat_demo: ChatDemoRun) -> None:
    s = chat_demo.summary
    with chat_demo.client() as gm:
        versions = gm.registry.ListModelVersions(rg.ListModelVersionsRequest(registered_model_name=s["model"]))
        base = gm.registry.GetBaseModel(rg.GetBaseModelRequest(name=s["base_model"]["name"]))
    v1, v2 = sorted(versions.model_versions, key=lambda v: v.version)
    assert (v1.version, v2.version) == (1, 2)
    assert v1.status == v2.status == rg.MODEL_VERSION_STATUS_READY
    # SFT on the chat version, from the registry's base model; DPO on the preference version, from the SFT model.
    assert v1.lineage.hyper_parameters["objective"] == "sft" and v2.lineage.hyper_parameters["objective"] == "dpo"
    assert v1.lineage.training_job_id == s["sft_job"]["id"] and v2.lineage.training_job_id == s["dpo_job"]["id"]
    assert v1.lineage.dataset_version.dataset_version_id == s["chat_dataset"]["id"]
    assert v2.lineage.dataset_version.dataset_version_id == s["preference_dataset"]["id"]
    assert v1.lineage.base_model.base_model_name == base.name
    assert v2.lineage.base_model.base_model_name == f"{s['model']}-sft"
    # Train = serve: both adapters carry the chat template of the base model they started from.
    assert v1.lineage.hyper_parameters["chat_template.sha256"] == base.chat_template_sha256
    assert v2.lineage.hyper_parameters["chat_template.sha256"] == base.chat_template_sha256
    # The offline gate's metrics are the test split's, reported by training for both objectives.
    for version in (v1, v2):
        names = {m.name for m in version.metrics if m.split == common_pb2.DATASET_SPLIT_TEST}
        assert {"json_valid", "json_match_sentiment"} <= names, names
    assert [v["version"] for v in s["versions"]] == [1, 2]


def test_the_alias_history_holds_the_online_gate_decision_with_its_numbers(chat_demo: ChatDemoRun) -> None:
    s = chat_demo.summary
    with chat_demo.client() as gm:
        history = alias_history(gm, s["model"])
        model = gm.registry.GetRegisteredModel(rg.GetRegisteredModelRequest(name=s["model"]))
        v2 = gm.registry.GetModelVersion(
            rg.GetModelVersionRequest(
                registered_model_name=s["model"], selector=common_pb2.ModelVersionSelector(version=2)
            )
        )
    moves = [(c.alias, c.to_version, c.cause) for c in history]
    # v1: floors passed (candidate), and with no production yet the online gate promoted it at once.
    assert moves[:3] == [
        ("candidate", 1, rg.ALIAS_CHANGE_CAUSE_POLICY),
        ("production", 1, rg.ALIAS_CHANGE_CAUSE_ONLINE_GATE),
        ("candidate", 2, rg.ALIAS_CHANGE_CAUSE_POLICY),
    ], moves
    decision = history[3]
    assert decision.cause == rg.ALIAS_CHANGE_CAUSE_ONLINE_GATE and decision.decision.HasField("online")
    online = decision.decision.online
    assert online.test == rg.ONLINE_TEST_TWO_PROPORTION_Z and online.alpha == pytest.approx(0.05)
    assert online.candidate_positive + online.candidate_negative >= MIN_FEEDBACK
    assert online.baseline_positive + online.baseline_negative >= MIN_FEEDBACK
    assert decision.decision.candidate_version == 2 and decision.decision.baseline_version == 1
    if decision.decision.passed:  # promoted: production moved to the candidate
        assert (decision.alias, decision.from_version, decision.to_version) == ("production", 1, 2)
        assert model.aliases["production"] == 2 and not v2.rolled_back_reason
    else:  # rolled back: the candidate alias went back to production's version, and v2 says why
        assert (decision.alias, decision.from_version, decision.to_version) == ("candidate", 2, 1)
        assert model.aliases["candidate"] == 1 and v2.rolled_back_reason
    # The demo's summary reports the same decision, and the gate counted no more than the users sent to each version
    # since the candidate moved (one verdict per reply: its latest feedback).
    gate = s["gate"]
    assert gate["sequence"] == decision.sequence and gate["decision"] == ("promoted" if decision.decision.passed
                                                                          else "rolled back")  # fmt: skip
    assert gate["online"]["candidate_positive"] == online.candidate_positive
    since = s["feedback"]["since_candidate"]
    assert online.candidate_positive <= since["2"]["positive"] and online.candidate_negative <= since["2"]["negative"]
    assert online.baseline_positive <= since["1"]["positive"] and online.baseline_negative <= since["1"]["negative"]


def test_labeling_made_an_item_of_every_piece_of_feedback_the_users_sent(chat_demo: ChatDemoRun) -> None:
    """Every thumbs-down is a chat item to review, every regenerate a preference pair and every edit both (a chat
    item ending with the edit, and a pair of the edit over the reply), on either version's replies (feedback on the
    DPO model, whose lineage names the preference project, goes to the chat project that feeds it)."""
    s = chat_demo.summary
    feedback = s["feedback"]
    assert feedback["sent"] == sum(feedback["by_kind"].values())
    assert feedback["sent"] == sum(n for kinds in feedback["kinds_by_version"].values() for n in kinds.values())
    downs = sum(kinds.get("thumbs_down", 0) for kinds in feedback["kinds_by_version"].values())
    regenerates = sum(kinds.get("regenerate", 0) for kinds in feedback["kinds_by_version"].values())
    edits = sum(kinds.get("edit", 0) for kinds in feedback["kinds_by_version"].values())
    wanted = {"thumbs_down": downs, "edit": edits}, {"regenerate": regenerates, "edit": edits}
    with chat_demo.client() as gm:
        deadline = time.monotonic() + 60
        while True:  # the last events may still be on their way
            reviews = feedback_items(gm, s["project"])
            pairs = feedback_items(gm, s["preference_project"])
            got = (
                dict(Counter(i.metadata["feedback_kind"] for i in reviews)),
                dict(Counter(i.metadata["feedback_kind"] for i in pairs)),
            )
            if got == tuple({k: n for k, n in w.items() if n} for w in wanted) or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert got == tuple({k: n for k, n in w.items() if n} for w in wanted), (got, wanted)
    assert regenerates + edits >= 24
    assert len({i.metadata["request_id"] for i in pairs}) == len(pairs)
    # The preference version the demo published holds the pairs that existed then, each ranked by the user.
    assert (
        s["preference_dataset"]["train"] + s["preference_dataset"]["validation"] + s["preference_dataset"]["test"]
        >= s["first_round"]["pairs"]
        >= 24
    )


def test_lineage_from_one_users_feedback_to_the_adapter_that_learned_from_it(chat_demo: ChatDemoRun) -> None:
    s = chat_demo.summary
    lineage = s["lineage"]
    assert lineage["in_published_rows"] is True and lineage["matches"] is True
    with chat_demo.client() as gm:
        item = gm.labeling.GetItem(
            lb.GetItemRequest(project_id=s["preference_project"], item_id=lineage["preference_item_id"])
        )
        job = gm.training.GetJob(tr.GetJobRequest(job_id=lineage["dpo_job_id"]))
        version = gm.registry.GetModelVersion(
            rg.GetModelVersionRequest(
                registered_model_name=s["model"], selector=common_pb2.ModelVersionSelector(version=lineage["version"])
            )
        )
    assert item.metadata["request_id"] == lineage["request_id"] and item.metadata["model_version"] == "1"
    assert job.trigger.auto_train_dataset_version_id == s["preference_dataset"]["id"]
    assert version.lineage.training_job_id == job.job_id
    assert version.lineage.dataset_version.dataset_version_id == s["preference_dataset"]["id"]


def test_serving_routes_a_share_to_the_candidate_through_the_deployments_canary(chat_demo: ChatDemoRun) -> None:
    s = chat_demo.summary
    assert s["routing"].startswith("canary")
    with chat_demo.client() as gm:
        deployment = gm.serving.GetDeployment(sv.GetDeploymentRequest(name=s["deployment"]))
    assert deployment.target.alias == "production"
    assert deployment.canary.target.alias == "candidate" and deployment.canary.weight == pytest.approx(0.2)
    # Both versions answered the users: the candidate through the canary.
    assert set(s["feedback"]["kinds_by_version"]) == {"1", "2"}


def test_the_demo_ran_in_one_trace(chat_demo: ChatDemoRun) -> None:
    trace_id = chat_demo.summary["trace"]["trace_id"]
    assert len(trace_id) == 32 and trace_id != "0" * 32
    lines = [
        line for line in chat_demo.log_file.read_text(errors="replace").splitlines() if f"trace={trace_id}" in line
    ]
    for service in SERVICES:
        assert any(f" gristmill.{service}." in line for line in lines), f"{service} logged nothing in trace {trace_id}"
