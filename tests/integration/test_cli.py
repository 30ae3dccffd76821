"""The ``gristmill`` CLI against a running embedded platform (started once per session, by ``gristmill dev``, on free
ports: tests/integration/conftest.py).

Every command: its happy path, and one bad input answered by a clear message and a non-zero exit status
(one line ``gristmill: <status in words>: <message>`` for what the platform refuses, exit 1; Typer's usage
error, exit 2, for what the command line itself gets wrong).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from gristmill.cli.main import app
from tests.support.cli import as_json, cli, free_port, ok, refused, runner, usage_error

# The platform, the labeled project and the training run are the session's (tests/integration/conftest.py), shared
# with test_cli_parity.py.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


# --------------------------------------------------------------------------- running the platform


def test_status_and_dev(platform: str) -> None:
    rows = as_json(cli(platform, "status", "--json"))
    assert {r["service"]: r["health"] for r in rows} == dict.fromkeys(
        ["labeling", "training", "registry", "serving", "admin"], "SERVING"
    )
    down = cli(platform, "--labeling", f"127.0.0.1:{free_port()}", "status")
    assert down.exit_code == 1 and "DOWN" in down.stdout
    usage_error(runner.invoke(app, ["dev", "--base-port", "99999"]), "--base-port")


def test_up_and_down_refuse_bad_ports() -> None:
    usage_error(runner.invoke(app, ["up", "--base-port", "70000"]), "--base-port")
    usage_error(runner.invoke(app, ["down", "--base-port", "-5"]), "--base-port")
    refused(runner.invoke(app, ["up", "--group-suffix", "Bad Suffix"]), "invalid argument", "group suffix")


def test_global_options_are_checked(platform: str) -> None:
    refused(
        runner.invoke(app, ["--endpoints", "labeling=nowhere", "projects", "list"]),
        "--endpoints",
        "NAME=HOST:PORT",
        code=2,
    )


# --------------------------------------------------------------------------- labeling


def test_projects(platform: str) -> None:
    created = as_json(
        cli(
            platform,
            "projects",
            "create",
            "Tickets",
            "--labels",
            "bug,question,praise",
            "--annotators",
            "2",
            "--ordering",
            "random",
            "--active-learning",
            "--json",
        )
    )
    assert created["project_id"] == "tickets" and created["settings"]["annotations_per_item"] == 2
    assert "tickets" in [p["project_id"] for p in as_json(cli(platform, "projects", "list", "--json"))]
    table = ok(cli(platform, "projects", "list"))
    assert "PROJECT" in table and "tickets" in table and "bug,question,praise" in table
    assert "text-classification" in ok(cli(platform, "projects", "show", "tickets"))
    refused(cli(platform, "projects", "create", "Lonely", "--labels", "only"), "invalid argument", "label")
    refused(cli(platform, "projects", "show", "no-such-project"), "not found", "no-such-project")


def test_import_jsonl_and_tsv_with_cleaning_report(platform: str, tmp_path: Path) -> None:
    ok(cli(platform, "projects", "create", "Imports", "--id", "cli-imports", "--labels", "negative,positive"))
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(
        '{"id": "a1", "text": "Great phone, mail me at ann@example.com"}\n'
        '{"id": "a2", "text": "Terrible   battery"}\n'
        '{"id": "a3", "text": "Terrible battery"}\n'
    )
    out = ok(cli(platform, "import", "cli-imports", str(jsonl)))
    assert "accepted" in out and "pii masked items          1 (EMAIL 1)" in out
    assert "dropped exact duplicates  1" in out
    tsv = tmp_path / "b.txt"  # plain "text<TAB>label" lines, no header
    tsv.write_text('"Quoted" start is fine\tpositive\nAwful service\tnegative\n')
    report = as_json(cli(platform, "import", "cli-imports", str(tsv), "--json"))
    assert report["accepted_count"] == "2" and report["imported_label_count"] == "2"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    refused(cli(platform, "import", "cli-imports", str(bad)), "invalid argument", "line 2")
    refused(cli(platform, "import", "cli-imports", str(tmp_path / "notes.md")), "cannot tell the format", code=2)


def test_label_from_stdin_and_agreement(platform: str, tmp_path: Path) -> None:
    ok(
        cli(
            platform,
            "projects",
            "create",
            "Pairs",
            "--id",
            "cli-pairs",
            "--labels",
            "negative,positive",
            "--annotators",
            "2",
        )
    )
    data = tmp_path / "pairs.csv"
    data.write_text("text\nI love it\nI hate it\nIt broke\n")
    ok(cli(platform, "import", "cli-pairs", str(data)))
    # Answers by number, by name, a skip, an invalid one (asked again) and the end of input.
    alice = ok(cli(platform, "label", "cli-pairs", "--annotator", "alice", input="2\nnegative\nmaybe\ns\n"))
    assert "I love it" in alice and "answer 1-2" in alice and "labeled 2, skipped 1" in alice
    bob = ok(cli(platform, "label", "cli-pairs", "--annotator", "bob", input="positive\n1\n1\n"))
    assert "labeled 3, skipped 0" in bob
    assert "nothing left to label" in ok(cli(platform, "label", "cli-pairs", "--annotator", "bob"))
    report = as_json(cli(platform, "agreement", "cli-pairs", "--json"))
    assert report["item_count"] == "2" and report["pairs"][0]["cohen_kappa"] == pytest.approx(1.0)
    assert "alice~bob 1.000" in ok(cli(platform, "agreement", "cli-pairs"))
    refused(cli(platform, "label", "no-such-project", "--annotator", "alice", input="q\n"), "not found")
    refused(cli(platform, "agreement", "no-such-project"), "not found")


def test_datasets(platform: str, labeled: dict[str, str]) -> None:
    rows = as_json(cli(platform, "datasets", "list", labeled["project"], "--json"))
    assert [r["dataset_version_id"] for r in rows] == [labeled["dataset_version"]]
    again = as_json(cli(platform, "datasets", "publish", labeled["project"], "--seed", "3", "--json"))
    assert again["created"] is False  # nothing changed: the same version
    assert "TRAIN  VALIDATION  TEST" in ok(cli(platform, "datasets", "list", labeled["project"]))
    refused(
        cli(
            platform,
            "datasets",
            "publish",
            labeled["project"],
            "--train",
            "0.5",
            "--validation",
            "0.5",
            "--test",
            "0.5",
        ),
        "invalid argument",
        "sum",
    )
    ok(cli(platform, "projects", "create", "Empty", "--id", "cli-empty", "--labels", "a,b"))
    refused(cli(platform, "datasets", "publish", "cli-empty"), "failed precondition")
    refused(cli(platform, "datasets", "list", "no-such-project"), "not found")


# --------------------------------------------------------------------------- training


def test_train_and_jobs(platform: str, labeled: dict[str, str], trained: dict[str, str], base_model: Path) -> None:
    job = trained["job"]
    listed = as_json(cli(platform, "jobs", "list", "--project", labeled["project"], "--json"))
    assert job in [j["job_id"] for j in listed]
    shown = ok(cli(platform, "jobs", "show", job))
    assert "succeeded" in shown and "accuracy/test=" in shown
    watched = ok(cli(platform, "jobs", "watch", job))  # a finished job: the snapshot, then the end
    assert "succeeded" in watched
    refused(cli(platform, "jobs", "cancel", job), "failed precondition", "already succeeded")
    refused(cli(platform, "train", labeled["project"], "--base-model", "/nonexistent/model", "--no-wait"), "not found")
    refused(
        cli(platform, "train", labeled["project"], "--base-model", str(base_model), "--base-model-name", "x"),
        "give exactly one of --base-model",
        code=2,
    )


def test_train_a_pruned_student_from_a_registered_teacher(
    platform: str, labeled: dict[str, str], trained: dict[str, str], base_model: Path
) -> None:
    """--teacher MODEL:VERSION resolves the registered version's artifacts; the student is cut and distilled."""
    refused(
        cli(platform, "train", labeled["project"], "--base-model", str(base_model), "--teacher", "no-such-model"),
        "not found",
    )
    student = as_json(
        cli(
            platform,
            "train",
            labeled["project"],
            "--base-model",
            str(base_model),
            "--teacher",
            f"{trained['model']}:1",
            "--prune-layers",
            "1",
            "--prune-embedding-size",
            "16",
            "--prune-intermediate-size",
            "32",
            "--epochs",
            "1",
            "--max-length",
            "64",
            "--json",
        )
    )
    assert student["state"].endswith("SUCCEEDED"), student
    lineage = student["result"]["lineage"]["hyper_parameters"]
    assert lineage["distillation.teacher"].startswith(f"object_prefix:models/{trained['model']}/1")
    assert (lineage["pruning.layers"], lineage["pruning.embedding_size"]) == ("1", "16")
    assert lineage["pruning.intermediate_size"] == "32"


def test_train_from_a_registered_version(platform: str, labeled: dict[str, str], trained: dict[str, str]) -> None:
    """--base-model-version MODEL:VERSION starts from the registered version's weights (its artifacts' prefix)."""
    model = trained["model"]
    job = as_json(
        cli(platform, "train", labeled["project"], "--base-model-version", f"{model}:1", "--epochs", "1", "--json")
    )
    assert job["state"].endswith("SUCCEEDED"), job
    assert job["result"]["lineage"]["base_model"]["object_prefix"] == f"models/{model}/1"
    refused(cli(platform, "train", labeled["project"], "--base-model-version", f"{model}:99"), "not found", "99")
    refused(
        cli(platform, "train", labeled["project"], "--base-model-version", f"{model}:x"),
        "--base-model-version must be MODEL or MODEL:VERSION",
        code=2,
    )


def test_train_auto_sets_the_projects_policy(platform: str, base_model: Path) -> None:
    ok(cli(platform, "projects", "create", "Auto", "--id", "cli-auto", "--labels", "negative,positive"))
    policy = as_json(
        cli(
            platform,
            "train",
            "cli-auto",
            "--auto",
            "--base-model",
            str(base_model),
            "--model",
            "cli-auto-model",
            "--epochs",
            "1",
            "--json",
        )
    )
    assert policy["project_id"] == "cli-auto" and policy["enabled"] is True
    refused(
        cli(platform, "train", "cli-auto", "--auto", "--base-model", str(base_model), "--learning-rate", "-1"),
        "invalid argument",
        "learning_rate",
    )


# --------------------------------------------------------------------------- registry and serving


def test_models(platform: str, trained: dict[str, str]) -> None:
    model = trained["model"]
    listed = as_json(cli(platform, "models", "list", "--json"))
    assert model in [m["name"] for m in listed]
    # Version 1 is the trained one (test_cli_parity.py registers more versions of this model on the shared platform).
    versions = as_json(cli(platform, "models", "versions", model, "--json"))
    first = next(v for v in versions if int(v["version"]) == 1)
    assert first["lineage"]["training_job_id"] == trained["job"] and first["status"].endswith("READY")
    card = ok(cli(platform, "models", "show", model, "--version", "1"))
    assert "ready" in card and "accuracy" in card and "cli-reviews" in card
    policy = ok(cli(platform, "models", "policy", model, "--min-value", "0.5"))
    assert "accuracy/test >= 0.5" in policy
    moved = ok(cli(platform, "models", "alias", "set", model, "production", "1", "--reason", "first"))
    assert "v1" in moved and "changed" in moved
    history = as_json(cli(platform, "models", "alias", "history", model, "--json"))
    latest = next(h for h in history if h["alias"] == "production")
    assert latest["to_version"] == 1 and latest["reason"] == "first"
    refused(cli(platform, "models", "show", "no-such-model"), "not found")
    refused(cli(platform, "models", "alias", "set", model, "production", "99"), "not found", "99")


def test_deploy_and_predict(platform: str, trained: dict[str, str]) -> None:
    model = trained["model"]
    ok(cli(platform, "models", "alias", "set", model, "production", "1"))
    deployed = ok(cli(platform, "deploy", model, "--name", "cli-serving", "--uncertainty", "0.99"))
    assert "ready" in deployed and "v1" in deployed
    assert "cli-serving" in ok(cli(platform, "deployments"))
    typed = as_json(
        cli(platform, "predict", "cli-serving", "The battery life is excellent", "It broke at once", "--json")
    )
    assert [p["model"] for p in typed] == [f"{model} v1"] * 2 and all("uncertain" in p for p in typed)
    assert {p["label"] for p in typed} <= {"negative", "positive"}
    oip = as_json(
        cli(platform, "predict", "cli-serving", "The battery life is excellent", "It broke at once", "--oip", "--json")
    )
    assert [p["label"] for p in oip] == [p["label"] for p in typed]  # the same version answers both APIs
    text = "The battery life is excellent"
    [explained] = as_json(cli(platform, "predict", "cli-serving", text, "--explain", "--explain-steps", "8", "--json"))
    assert explained["label"] == typed[0]["label"] and isinstance(explained["attribution_delta"], float)
    spans = [(a["start"], a["end"]) for a in explained["attributions"]]
    # Every token in order, from the text's first character to its last, none overlapping.
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a < b <= c for (a, b), (c, _) in itertools.pairwise(spans)), spans
    # The table names the strongest tokens with signed scores, as the JSON gives them. Not which sign: this tiny model
    # is barely trained, so a token's direction is not something it reliably learns. Scores are compared within a
    # rounding step, since the two calls may be batched differently on the server.
    [negative] = as_json(cli(platform, "predict", "cli-serving", "It broke at once", "--explain", "--json"))
    scores = {a["token"]: a["score"] for a in negative["attributions"]}
    table = ok(cli(platform, "predict", "cli-serving", "It broke at once", "--explain"))
    assert "EXPLANATION" in table
    shown = re.findall(r"(\S+) ([+-]\d+\.\d{3})(?:,|\s*$)", table.splitlines()[1].split("It broke at once", 1)[1])
    assert "broke" in dict(shown) and 1 <= len(shown) <= 5, table
    assert all(abs(float(score) - scores[token]) <= 0.0015 for token, score in shown), (shown, scores)
    refused(cli(platform, "predict", "cli-serving", "hello", "--explain", "--oip"), "--explain needs", "--oip", code=2)
    refused(cli(platform, "deploy", "no-such-model"), "not found")
    refused(cli(platform, "predict", "no-such-deployment", "hello"), "not found")
    refused(cli(platform, "predict", "cli-serving", "  "), "every text must be non-empty", code=2)
    # Deleted at the end: the community edition serves two deployments at most, and later tests deploy their own.
    assert json.loads(ok(cli(platform, "deployments", "delete", "cli-serving", "--yes", "--json")))["deleted"] is True
    assert "cli-serving" not in ok(cli(platform, "deployments"))


# --------------------------------------------------------------------------- admin


def test_keys_and_usage(platform: str) -> None:
    created = as_json(cli(platform, "keys", "create", "ci-bot", "--scopes", "serving:predict,registry:read", "--json"))
    key_id, secret = created["api_key"]["api_key_id"], created["secret"]
    assert secret.startswith("gmk_") and sorted(created["api_key"]["scopes"]) == ["registry:read", "serving:predict"]
    assert key_id in ok(cli(platform, "keys", "list"))
    # Rotating: a new key (id and secret) with the same scopes; the old one stops at once without a grace period.
    rotated = as_json(cli(platform, "keys", "rotate", key_id, "--json"))
    new_id = rotated["api_key"]["api_key_id"]
    assert new_id != key_id and rotated["secret"] not in (secret, "")
    assert sorted(rotated["api_key"]["scopes"]) == ["registry:read", "serving:predict"]
    assert new_id in ok(cli(platform, "keys", "list"))
    key_id = new_id
    refused(cli(platform, "keys", "rotate", "0000000000000000"), "not found")
    revoked = as_json(cli(platform, "keys", "revoke", key_id, "--json"))
    assert revoked["revoke_time"]
    assert key_id not in ok(cli(platform, "keys", "list"))
    assert key_id in ok(cli(platform, "keys", "list", "--include-revoked"))
    refused(cli(platform, "keys", "create", "bad", "--scopes", "everything"), "invalid argument", "unknown scope")
    refused(cli(platform, "keys", "revoke", "0000000000000000"), "not found")
    usage = as_json(cli(platform, "usage", "--json"))
    assert "usage" in usage and "quotas" in usage
    ok(cli(platform, "usage"))
    refused(cli(platform, "usage", "--organization", "Not An Org!"), "invalid argument")


def test_license(platform: str) -> None:
    # The platform runs a licence signed with the development key (conftest); every service answers for itself
    # and none hides that a development key is trusted.
    for service in ("admin", "registry", "serving"):
        info = as_json(cli(platform, "license", "--service", service, "--json"))
        assert info["service"] == service and info["state"] == "LICENSE_STATE_VALID"
        assert info["key_id"] == "development" and info["development_key"] is True
        assert "serving.canary" in info["features"]
    shown = ok(cli(platform, "license"))
    assert "lic-test" in shown and "TRUSTED (development mode)" in shown
    usage_error(cli(platform, "license", "--service", "billing"), "--service")


# --------------------------------------------------------------------------- the demo


def test_demo_on_the_running_platform(platform: str, tmp_path: Path) -> None:
    result = cli(platform, "demo", "--no-start", "--items", "120", "--data-dir", str(tmp_path), "--json")
    summary = json.loads(ok(result))
    assert summary["lineage"]["matches_published"] is True and summary["lineage"]["model_versions"] == 1
    assert summary["predictions"]["oip"] == 8 and summary["predictions"]["oip_agrees"] is True
    assert summary["active_learning"]["items"] >= 1
    assert summary["active_learning"]["task_item_source"] == "ITEM_SOURCE_PREDICTION_LOG"
    assert len(summary["trace"]["trace_id"]) == 32 and summary["trace"]["span_tree"][0].startswith("gristmill demo")
    assert "==> auto-train" in result.stderr  # progress goes to stderr with --json
    usage_error(cli(platform, "demo", "--stack", "kubernetes"), "--stack must be embedded or local")
    usage_error(cli(platform, "demo", "--data", str(tmp_path / "missing.jsonl")), "no such file")


def test_the_embedded_platform_serves_the_console(platform: str, labeled: dict[str, str]) -> None:
    import httpx2

    from gristmill.cli.context import parse_http_address

    address = parse_http_address(platform, "console")
    assert address, platform
    with httpx2.Client(base_url=f"http://{address}", timeout=30) as browser:
        assert browser.get("/", follow_redirects=False).headers["location"] == "/sign-in"
        # Auth is off in the embedded platform: sign in with a name only.
        signed = browser.post("/sign-in", data={"api_key": "", "annotator": "dev"}, follow_redirects=False)
        assert signed.status_code == 303, signed.text
        projects = browser.get("/")
        assert projects.status_code == 200 and f'href="/projects/{labeled["project"]}"' in projects.text
        assert "auth off (embedded)" in projects.text
        page = browser.get(f"/projects/{labeled['project']}")
        assert page.status_code == 200 and "Dataset versions" in page.text
        # Every item already has its one annotation (imported labels): nothing is left to label.
        assert "Nothing left for you" in browser.get(f"/projects/{labeled['project']}/label").text
