"""End to end: ``gristmill demo --task chat --stack local --tiny``, the assistant flywheel on a networked stack, with
the registry and serving each SIGKILLed and restarted once mid-run, then a deliberately bad adapter that the online
gate must roll back.

The flywheel: seed conversations are annotated and published, the SFT auto-train job's adapter is registered and
made candidate and production by the promotion policy (floors, then the online gate with no baseline), a deployment
serves it with a canary on ``candidate``, simulated users chat through the OpenAI-compatible API and give feedback,
labeling turns their feedback into review items and preference pairs, the demo publishes the pairs, the DPO
auto-train job's adapter becomes the candidate, serving's canary loads it, and the online gate promotes it or rolls
it back on the users' feedback.

The demo starts a local stack of its own (a process per service on a block of free ports, pid files and logs in a
temporary run directory, consumer groups with a unique suffix that start at the topics' end, its own PostgreSQL
databases, dropped at the end) on the shared Kafka, S3 server and PostgreSQL (deploy/local/stack.sh). The services
inherit the demo's environment: an enterprise licence signed by the test vendor key (trusted as a development key),
so that the deployment's canary is licensed.

The faults, each while the demo waits on something the killed service takes part in but does not call it:

- the registry, once the DPO auto-train job has started: the job's state and result events (and the registration
  and the offline gate's move of ``candidate`` they cause) reach the restarted registry;
- serving, once the DPO job has succeeded (the demo waits for the registry to register the next adapter): the
  ``candidate`` alias change reaches the restarted serving, which must load the canary beside production before
  the users' second round.

Serving is not killed while the users chat: their OpenAI client retries a refused connection twice within a few
seconds, less than a serving restart takes, so such a run would test the client, not the platform.

Afterwards the tests ask the services what happened: the two versions' lineage, nothing lost or done twice (one job
per published version, one registered version per job, one alias move per decision, one labeling item per piece of
feedback), the alias history holds the online gate's decision with its numbers, the lineage from one user's feedback
to the adapter that learned from it, and every service logged its part in the demo's trace. The last test registers
a garbage adapter on the demo's tiny base model with metrics above the floors, drives users until the online gate
decides, and expects it rolled back.

One demo run (about 2.5-4 minutes on two cores, the whole module included) backs every test here. On the embedded
platform (``make run DEMO_ARGS="--task chat"``) the demo's steps are the same; only how the services start differs,
and tests/integration/test_cli.py and test_cli_generative.py run the classifier demo and chat projects on one.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.api.serving.v1 import serving_pb2 as sv
from gristmill.api.training.v1 import training_pb2 as tr
from gristmill.cli import chat_demo_data as chat_data
from gristmill.cli.chat_demo import SimulatedUsers, openai_base_url
from gristmill.cli.platforms import LocalStack
from gristmill.cli.processes import wait_serving
from gristmill.client import ClientOptions, Gristmill
from gristmill.core.settings import S3Settings
from gristmill.core.storage import open_object_store
from gristmill.core.tls import TLS_VARIABLES
from tests.conftest import REPO_ROOT
from tests.support.chat_demo import alias_history, feedback_items
from tests.support.job_output import upload_job_output
from tests.support.licences import TEST_KEY_B64, signed_license_file
from tests.support.services import LocalRunFiles, free_port_block, gristmill_process, restart_service
from tests.support.tiny_model import make_tiny_lora_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

MIN_FEEDBACK = 20  # the --tiny default: feedback per version before the online gate decides
SERVICES = ("labeling", "training", "registry", "serving")
DPO_STEP = "==> DPO auto-train"
JOB_STARTED = "started by the event; progress:"
AFTER_DPO_STEP = "==> registry registers the next adapter"


@dataclass
class FaultyRun(LocalRunFiles):
    summary: dict[str, Any]
    run_dir: Path
    work: Path
    s3: dict[str, str]
    killed: dict[str, tuple[int, int]]  # service: (old pid, new pid)
    progress: str

    def client(self) -> Gristmill:
        return Gristmill(
            self.endpoints, ClientOptions(timeout_s=60, api_key=self.api_key, tls=None, max_attempts=20, backoff_s=0.5)
        )


def _wait_progress(
    proc: subprocess.Popen[bytes], stderr: Path, reached: Callable[[str], bool], what: str, timeout_s: float = 420
) -> None:
    deadline = time.monotonic() + timeout_s
    while not reached(stderr.read_text(errors="replace")):
        assert proc.poll() is None, f"the demo ended before {what}:\n{stderr.read_text()[-6000:]}"
        assert time.monotonic() < deadline, f"the demo did not reach {what}:\n{stderr.read_text()[-6000:]}"
        time.sleep(0.2)


def _dpo_job_started(progress: str) -> bool:
    at = progress.find(DPO_STEP)
    return at >= 0 and JOB_STARTED in progress[at:]


@pytest.fixture(scope="module")
def faulty(
    kafka_bootstrap: str, s3_endpoint: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultyRun]:
    run_dir = tmp_path_factory.mktemp("run")
    work = tmp_path_factory.mktemp("work")
    licence = signed_license_file(work / "licence.json")
    # Five services, serving's OpenAI-compatible API at serving + 2 (base + 5), and room to spare.
    base_port = free_port_block(8)
    common = ["--run-dir", str(run_dir), "--base-port", str(base_port)]
    suffix = f"e2e-{uuid.uuid4().hex[:8]}"
    stdout, stderr = work / "demo.out", work / "demo.err"
    command = [
        sys.executable, "-m", "gristmill.cli.main", "demo", "--task", "chat", "--tiny", "--stack", "local", *common,
        "--group-suffix", suffix, "--data-dir", str(work), "--keep-running", "--json", "--timeout", "600",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in TLS_VARIABLES and k != "GRISTMILL_API_KEY"} | {
        "GRISTMILL_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "GRISTMILL_S3_ENDPOINT": s3_endpoint["endpoint"],
        "GRISTMILL_S3_ACCESS_KEY": s3_endpoint["access_key"],
        "GRISTMILL_S3_SECRET_KEY": s3_endpoint["secret_key"],
        # The services the demo starts inherit these (and keep them across the restarts below).
        "GRISTMILL_LICENSE_FILE": str(licence),
        "GRISTMILL_LICENSE_DEVELOPMENT_KEY": TEST_KEY_B64,
    }
    killed: dict[str, tuple[int, int]] = {}
    try:
        with stdout.open("w") as out, stderr.open("w") as err:
            proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=err, env=env)
            try:
                _wait_progress(proc, stderr, _dpo_job_started, "the DPO job's start")
                killed["registry"] = restart_service(run_dir, "registry")
                wait_serving(f"127.0.0.1:{base_port + 2}", 180)
                _wait_progress(proc, stderr, lambda text: AFTER_DPO_STEP in text, "the DPO job's end")
                killed["serving"] = restart_service(run_dir, "serving")
                code = proc.wait(timeout=600)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        progress = stderr.read_text()
        assert code == 0, f"gristmill demo --task chat failed ({code}):\n{progress[-6000:]}"
        yield FaultyRun(json.loads(stdout.read_text()), run_dir, work, s3_endpoint, killed, progress)
    finally:
        # `down` stops every service of this run (the restarted ones included); the stack stays up.
        gristmill_process("down", "--keep-stack", *common, env=env)
        with contextlib.suppress(Exception):
            LocalStack(run_dir, base_port=base_port, group_suffix=suffix).drop_databases()


def test_both_services_were_killed_mid_run_and_came_back(faulty: FaultyRun) -> None:
    for service in ("registry", "serving"):
        old, new = faulty.killed[service]
        assert old != new
        assert faulty.log(service).count(f"{service} serving gRPC on") == 2, service
        assert int((faulty.run_dir / "pids" / f"{service}.pid").read_text()) == new
    assert faulty.summary["stack"] == "local"
    assert faulty.summary["routing"].startswith("canary"), "the licence's canary feature was not granted"


def test_one_job_per_published_version_and_one_version_per_job(faulty: FaultyRun) -> None:
    s = faulty.summary
    with faulty.client() as gm:
        versions = gm.registry.ListModelVersions(rg.ListModelVersionsRequest(registered_model_name=s["model"]))
        jobs = {
            project: gm.training.ListJobs(tr.ListJobsRequest(project_id=project)).jobs
            for project in (s["project"], s["preference_project"])
        }
    # The redelivered job events (the registry died mid-job) made no second job and no second version.
    assert [(j.job_id, j.state) for j in jobs[s["project"]]] == [(s["sft_job"]["id"], tr.JOB_STATE_SUCCEEDED)]
    assert [(j.job_id, j.state) for j in jobs[s["preference_project"]]] == [
        (s["dpo_job"]["id"], tr.JOB_STATE_SUCCEEDED)
    ]
    found = sorted((v.version, v.lineage.training_job_id, v.status) for v in versions.model_versions)
    assert found == [
        (1, s["sft_job"]["id"], rg.MODEL_VERSION_STATUS_READY),
        (2, s["dpo_job"]["id"], rg.MODEL_VERSION_STATUS_READY),
    ]


def test_v1_is_sft_from_the_base_model_and_v2_dpo_from_the_sft_model(faulty: FaultyRun) -> None:
    s = faulty.summary
    with faulty.client() as gm:
        versions = gm.registry.ListModelVersions(rg.ListModelVersionsRequest(registered_model_name=s["model"]))
        base = gm.registry.GetBaseModel(rg.GetBaseModelRequest(name=s["base_model"]["name"]))
    v1, v2 = sorted(versions.model_versions, key=lambda v: v.version)
    # SFT on the chat version, from the registry's base model; DPO on the preference version, from the SFT model.
    assert v1.lineage.hyper_parameters["objective"] == "sft" and v2.lineage.hyper_parameters["objective"] == "dpo"
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


def test_the_alias_history_holds_the_online_gate_decision_with_its_numbers(faulty: FaultyRun) -> None:
    s = faulty.summary
    with faulty.client() as gm:
        history = alias_history(gm, s["model"])
        model = gm.registry.GetRegisteredModel(rg.GetRegisteredModelRequest(name=s["model"]))
        v2 = gm.registry.GetModelVersion(
            rg.GetModelVersionRequest(
                registered_model_name=s["model"], selector=common_pb2.ModelVersionSelector(version=2)
            )
        )
    moves = [(c.alias, c.to_version, c.cause) for c in history]
    # Exactly one move per decision: no redelivered event moved an alias twice.
    assert len(moves) == 4, moves
    assert moves[:3] == [
        ("candidate", 1, rg.ALIAS_CHANGE_CAUSE_POLICY),
        ("production", 1, rg.ALIAS_CHANGE_CAUSE_ONLINE_GATE),
        ("candidate", 2, rg.ALIAS_CHANGE_CAUSE_POLICY),
    ], moves
    decision = history[3]
    assert decision.cause == rg.ALIAS_CHANGE_CAUSE_ONLINE_GATE and decision.decision.HasField("online")
    online = decision.decision.online
    assert online.test == rg.ONLINE_TEST_TWO_PROPORTION_Z and online.alpha == pytest.approx(0.05)
    assert decision.decision.candidate_version == 2 and decision.decision.baseline_version == 1
    if decision.decision.passed:
        assert (decision.alias, decision.from_version, decision.to_version) == ("production", 1, 2)
        assert model.aliases["production"] == 2 and not v2.rolled_back_reason
    else:
        assert (decision.alias, decision.from_version, decision.to_version) == ("candidate", 2, 1)
        assert model.aliases["candidate"] == 1 and v2.rolled_back_reason
    # The gate decided as soon as both versions had MIN_FEEDBACK verdicts in the window that began when candidate
    # moved to v2; the users kept chatting until the demo saw the decision. So for each version the gate counted at
    # least MIN_FEEDBACK and at most the verdicts the users sent since the move (one per reply, its latest), each
    # of positive and negative separately; the summary reports the gate's own numbers.
    since = s["feedback"]["since_candidate"]
    assert online.candidate_positive + online.candidate_negative >= MIN_FEEDBACK
    assert online.baseline_positive + online.baseline_negative >= MIN_FEEDBACK
    assert online.candidate_positive <= since["2"]["positive"] and online.candidate_negative <= since["2"]["negative"]
    assert online.baseline_positive <= since["1"]["positive"] and online.baseline_negative <= since["1"]["negative"]
    gate = s["gate"]
    assert gate["sequence"] == decision.sequence
    assert gate["decision"] == ("promoted" if decision.decision.passed else "rolled back")
    counted = ("candidate_positive", "candidate_negative", "baseline_positive", "baseline_negative")
    assert {k: gate["online"][k] for k in counted} == {k: getattr(online, k) for k in counted}


def test_every_piece_of_feedback_made_exactly_one_item(faulty: FaultyRun) -> None:
    """Every thumbs-down is a review item of the chat project, every regenerate a preference pair, every edit one
    of each (feedback on v2, trained on the preference project, goes to the chat project that feeds it); each
    request id once per project and kind, though serving was killed and restarted between the users' two rounds."""
    s = faulty.summary
    feedback = s["feedback"]
    assert feedback["sent"] == sum(feedback["by_kind"].values())
    assert set(feedback["kinds_by_version"]) == {"1", "2"}
    sent = feedback["by_kind"]
    wanted = (
        {k: sent[k] for k in ("thumbs_down", "edit") if sent.get(k)},
        {k: sent[k] for k in ("regenerate", "edit") if sent.get(k)},
    )
    with faulty.client() as gm:
        deadline = time.monotonic() + 60
        while True:  # the last events may still be on their way
            reviews = feedback_items(gm, s["project"])
            pairs = feedback_items(gm, s["preference_project"])
            got = (
                dict(Counter(i.metadata["feedback_kind"] for i in reviews)),
                dict(Counter(i.metadata["feedback_kind"] for i in pairs)),
            )
            if got == wanted or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert got == wanted
    # The preference version the demo published holds the pairs that existed then, each ranked by the user.
    published = s["preference_dataset"]
    assert published["train"] + published["validation"] + published["test"] >= s["first_round"]["pairs"] >= 24
    for items in (reviews, pairs):
        for kind in {i.metadata["feedback_kind"] for i in items}:
            of_kind = [i for i in items if i.metadata["feedback_kind"] == kind]
            assert len({i.metadata["request_id"] for i in of_kind}) == len(of_kind), kind
            per_version = {v: sum(i.metadata["model_version"] == v for i in of_kind) for v in ("1", "2")}
            assert per_version == {v: feedback["kinds_by_version"][v].get(kind, 0) for v in ("1", "2")}, kind


def test_lineage_from_one_users_feedback_to_the_adapter_that_learned_from_it(faulty: FaultyRun) -> None:
    s = faulty.summary
    lineage = s["lineage"]
    assert lineage["in_published_rows"] is True and lineage["matches"] is True
    with faulty.client() as gm:
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


def test_serving_routes_a_share_to_the_candidate_through_the_deployments_canary(faulty: FaultyRun) -> None:
    s = faulty.summary
    with faulty.client() as gm:
        deployment = gm.serving.GetDeployment(sv.GetDeploymentRequest(name=s["deployment"]))
    # The deployment survived serving's restart as it was created.
    assert deployment.target.alias == "production"
    assert deployment.canary.target.alias == "candidate" and deployment.canary.weight == pytest.approx(0.2)


def test_every_service_logged_its_part_in_the_demos_trace(faulty: FaultyRun) -> None:
    trace_id = faulty.summary["trace"]["trace_id"]
    assert len(trace_id) == 32 and trace_id != "0" * 32
    needle = f"trace={trace_id}"
    for service in SERVICES:
        assert needle in faulty.log(service), f"{service} logged nothing in trace {trace_id}"
    # The restarted registry registered the DPO adapter and ran the policy in the demo's trace (from the job's
    # event, whose headers carry it).
    restarted = faulty.log("registry").split("registry serving gRPC on")[-1]
    lines = [line for line in restarted.splitlines() if needle in line]
    assert any("registered as" in line for line in lines), "the restarted registry's registration is not traced"
    assert any("promotion policy" in line for line in lines)
    assert set(faulty.summary["trace"]["services"]) >= set(SERVICES)


# -- last: it changes the model's aliases ------------------------------------------------------------------------


def _register_bad_adapter(run: FaultyRun, gm: Gristmill, tmp_path: Path) -> int:
    """A random LoRA adapter of the demo's tiny base model (untrained: it writes noise, never the JSON users want),
    registered with v1's base model lineage and test metrics that pass the policy's floors."""
    s = run.summary
    v1 = gm.registry.GetModelVersion(
        rg.GetModelVersionRequest(registered_model_name=s["model"], selector=common_pb2.ModelVersionSelector(version=1))
    )
    base_dir = run.work / f"tiny-llama-{s['model'].removeprefix('demo-assistant-')}"
    assert (base_dir / "config.json").is_file(), base_dir
    adapter = make_tiny_lora_adapter(base_dir, tmp_path / "bad-adapter", seed=99)
    objects = open_object_store(
        S3Settings(
            endpoint=run.s3["endpoint"], access_key=run.s3["access_key"], secret_key=SecretStr(run.s3["secret_key"])
        ),
        tmp_path,
    )
    job = f"bad-adapter-{uuid.uuid4().hex[:8]}"
    prefix = f"uploads/{job}"
    manifest = upload_job_output(objects, adapter, prefix, task_type="TASK_TYPE_CHAT", label_map=())
    floors = [m.name for m in v1.metrics if m.split == common_pb2.DATASET_SPLIT_TEST]
    assert {"json_valid", "json_match_sentiment"} <= set(floors), floors
    lineage = common_pb2.Lineage(training_job_id=job, base_model=v1.lineage.base_model)
    lineage.hyper_parameters.update(v1.lineage.hyper_parameters)
    version = gm.registry.RegisterModelVersion(
        rg.RegisterModelVersionRequest(
            registered_model_name=s["model"],
            source_prefix=prefix,
            manifest=manifest,
            task=common_pb2.TASK_TYPE_CHAT,
            signature=v1.signature,
            metrics=[common_pb2.Metric(name=n, value=1.0, split=common_pb2.DATASET_SPLIT_TEST) for n in floors],
            lineage=lineage,
            description="e2e: a deliberately bad adapter",
            wait_for_verification=True,
        ),
        timeout=120,
    )
    assert version.status == rg.MODEL_VERSION_STATUS_READY, version.status_reason
    return int(version.version)


def _poll(what: str, probe: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_the_online_gate_rolls_back_a_bad_adapter(faulty: FaultyRun, tmp_path: Path) -> None:
    s = faulty.summary
    model, deployment = s["model"], s["deployment"]
    with faulty.client() as gm:
        aliases = dict(gm.registry.GetRegisteredModel(rg.GetRegisteredModelRequest(name=model)).aliases)
        assert aliases["candidate"] == aliases["production"], aliases  # the demo's gate decided: both on one version
        # The baseline is the SFT adapter, which users like (a third to a half of its replies get a thumbs up). The
        # demo's DPO adapter learned from ~20 pairs: when the gate promoted it (its 20 verdicts not significantly
        # worse), users liked it far less, and against a baseline at ~0.07 not even 0/20 is significantly worse. So
        # the test moves both aliases back to v1, as an operator rolls back by hand.
        production = 1
        for alias in ("candidate", "production"):
            if aliases[alias] != production:
                gm.registry.SetAlias(
                    rg.SetAliasRequest(
                        registered_model_name=model, alias=alias, version=production, reason="e2e: the SFT baseline"
                    )
                )
        bad = _register_bad_adapter(faulty, gm, tmp_path)

        # The offline gate (floors only) moves candidate to it; serving's canary loads it beside production.
        def candidate_moved() -> rg.AliasChange | None:
            return next(
                (
                    c
                    for c in alias_history(gm, model)
                    if c.alias == "candidate" and c.to_version == bad and c.cause == rg.ALIAS_CHANGE_CAUSE_POLICY
                ),
                None,
            )

        moved: rg.AliasChange = _poll(f"candidate to move to v{bad}", candidate_moved, 120)

        def serving_both() -> bool:
            status = gm.serving.GetDeployment(sv.GetDeploymentRequest(name=deployment)).status
            served = {v.version for v in status.versions if v.traffic_weight > 0}
            return status.state == sv.DEPLOYMENT_STATE_READY and {production, bad} <= served

        _poll(f"{deployment} to serve v{production} and v{bad}", serving_both, 180)

        # Users chat by the demo's rule until the online gate decides.
        def decision() -> rg.AliasChange | None:
            return next(
                (
                    c
                    for c in alias_history(gm, model)
                    if c.sequence > moved.sequence and c.cause == rg.ALIAS_CHANGE_CAUSE_ONLINE_GATE
                ),
                None,
            )

        seeds = chat_data.seed_conversations(96, 7)
        users = SimulatedUsers(
            openai_base_url(s["endpoints"]["serving"]),
            faulty.api_key,
            None,
            chat_data.match_keys([c.reference for c in seeds]),
            max_tokens=48,
            seed=11,
        )
        prompts = iter(chat_data.user_prompts(2000, 12))
        users.chat_until(
            lambda _rng: deployment,
            prompts,
            lambda: decision() is not None,
            workers=4,
            max_conversations=1200,
            what="the online gate's decision on the bad adapter",
        )
        change = decision()
        assert change is not None
        after = dict(gm.registry.GetRegisteredModel(rg.GetRegisteredModelRequest(name=model)).aliases)
        version = gm.registry.GetModelVersion(
            rg.GetModelVersionRequest(
                registered_model_name=model, selector=common_pb2.ModelVersionSelector(version=bad)
            )
        )
    sent = users.ledger.by_version()
    assert not change.decision.passed, change.decision.explanation
    assert (change.alias, change.from_version, change.to_version) == ("candidate", bad, production)
    assert change.decision.candidate_version == bad and change.decision.baseline_version == production
    online = change.decision.online
    assert online.candidate_positive + online.candidate_negative >= MIN_FEEDBACK
    assert online.baseline_positive + online.baseline_negative >= MIN_FEEDBACK
    assert online.candidate_positive <= sent[bad]["positive"] and online.candidate_negative <= sent[bad]["negative"]
    assert online.p_value < online.alpha
    assert after == {"candidate": production, "production": production}, after
    assert version.rolled_back_reason
