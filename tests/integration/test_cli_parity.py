"""The CLI commands for every write the SDK can make (issue 24, CLI parity), against the session's embedded platform.

Each command runs once; its effect is checked through the SDK, its ``--json`` output is parsed, and one bad input
gets a one-line error and a non-zero exit status (2 for what the command line gets wrong, 1 for what the platform
refuses).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf import json_format

from gristmill.api.admin.v1 import admin_pb2 as ad
from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.api.serving.v1 import serving_pb2 as sv
from gristmill.api.training.v1 import training_pb2 as tr
from gristmill.cli.context import parse_endpoints
from gristmill.client import ClientOptions, Gristmill, NotFoundError
from tests.support.cli import as_json, cli, ok, refused, usage_error

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def gm(platform: str) -> Iterator[Gristmill]:
    """The SDK on the same platform: what each command did, seen from the API."""
    with Gristmill(parse_endpoints(platform), ClientOptions(timeout_s=30)) as client:
        yield client


# --------------------------------------------------------------------------- admin: organisations and plans


def test_orgs_create_list_and_plans_set(platform: str, gm: Gristmill, tmp_path: Path) -> None:
    created = as_json(
        cli(
            platform,
            "orgs",
            "create",
            "parity-org",
            "--name",
            "Parity Org",
            "--plan",
            "team",
            "--quota",
            "predictions/day=1000",
            "--rate-limit",
            "5",
            "--json",
        )
    )
    assert created["organization_id"] == "parity-org" and created["plan"]["name"] == "team"
    assert "parity-org" in [o["organization_id"] for o in as_json(cli(platform, "orgs", "list", "--json"))]
    assert "predictions/day=1000" in ok(cli(platform, "orgs", "list"))
    org = gm.admin.GetOrganization(ad.GetOrganizationRequest(organization_id="parity-org"))
    assert org.display_name == "Parity Org" and org.plan.prediction_rate_limit.requests_per_second == 5
    assert [(q.kind, q.period, q.limit) for q in org.plan.quotas] == [
        (ad.USAGE_KIND_PREDICTIONS, ad.QUOTA_PERIOD_DAY, 1000)
    ]

    changed = as_json(
        cli(
            platform,
            "plans",
            "set",
            "parity-org",
            "--name",
            "free",
            "--quota",
            "training-worker-seconds/month=60",
            "--json",
        )
    )
    assert changed["plan"]["name"] == "free"
    plan = gm.admin.GetOrganization(ad.GetOrganizationRequest(organization_id="parity-org")).plan
    assert plan.name == "free" and not plan.HasField("prediction_rate_limit")  # replaced as a whole
    assert [(q.kind, q.limit) for q in plan.quotas] == [(ad.USAGE_KIND_TRAINING_WORKER_SECONDS, 60)]
    # `plans show --json` prints what `plans set --from-file` reads.
    saved = tmp_path / "plan.json"
    saved.write_text(ok(cli(platform, "plans", "show", "parity-org", "--json")))
    assert "free" in ok(cli(platform, "plans", "set", "parity-org", "--from-file", str(saved)))

    refused(cli(platform, "plans", "set", "parity-org", "--quota", "predictions/week=5"), "--quota", "PERIOD", code=2)
    refused(cli(platform, "orgs", "create", "Not An Id!"), "invalid argument", "organization_id")
    refused(cli(platform, "plans", "set", "no-such-org", "--name", "free"), "not found")


def test_keys_create_with_an_expiry_time(platform: str, gm: Gristmill) -> None:
    soon = as_json(
        cli(platform, "keys", "create", "expiring", "--scopes", "registry:read", "--expires", "30d", "--json")
    )
    fixed = as_json(
        cli(
            platform,
            "keys",
            "create",
            "fixed",
            "--scopes",
            "registry:read",
            "--expires",
            "2099-01-31T00:00:00Z",
            "--json",
        )
    )
    keys = {k.api_key_id: k for k in gm.admin.ListApiKeys(ad.ListApiKeysRequest()).api_keys}
    in_30_days = keys[soon["api_key"]["api_key_id"]].expire_time.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(days=29, hours=23) < in_30_days <= timedelta(days=30)
    assert keys[fixed["api_key"]["api_key_id"]].expire_time.ToDatetime(tzinfo=UTC) == datetime(2099, 1, 31, tzinfo=UTC)
    assert "2099-01-31 00:00:00" in ok(cli(platform, "keys", "list"))
    for key in (soon, fixed):
        ok(cli(platform, "keys", "revoke", key["api_key"]["api_key_id"]))

    bad = ["keys", "create", "late", "--scopes", "registry:read", "--expires"]
    refused(cli(platform, *bad, "2020-01-01T00:00:00Z"), "--expires", "has passed", code=2)
    refused(cli(platform, *bad, "a fortnight"), "--expires", "RFC 3339", code=2)


# --------------------------------------------------------------------------- labeling


def test_projects_create_with_lease_and_update(platform: str, gm: Gristmill) -> None:
    created = as_json(
        cli(
            platform,
            "projects",
            "create",
            "Leases",
            "--id",
            "parity-leases",
            "--labels",
            "a,b",
            "--lease-seconds",
            "90",
            "--json",
        )
    )
    assert created["settings"]["lease_seconds"] == 90
    assert gm.labeling.GetProject(lb.GetProjectRequest(project_id="parity-leases")).settings.lease_seconds == 90
    assert "lease seconds        90" in ok(cli(platform, "projects", "show", "parity-leases"))

    updated = as_json(
        cli(platform, "projects", "update", "parity-leases", "--lease-seconds", "30", "--ordering", "random", "--json")
    )
    assert updated["settings"]["lease_seconds"] == 30
    project = gm.labeling.GetProject(lb.GetProjectRequest(project_id="parity-leases"))
    assert project.settings.lease_seconds == 30 and project.settings.task_ordering == lb.TASK_ORDERING_RANDOM
    schema = as_json(cli(platform, "projects", "set-labels", "parity-leases", "--labels", "a,b,c", "--json"))
    assert schema["version"] == 2
    assert [x.name for x in project.label_schema.labels] == ["a", "b"]
    current = gm.labeling.GetProject(lb.GetProjectRequest(project_id="parity-leases")).label_schema
    assert [x.name for x in current.labels] == ["a", "b", "c"]

    usage_error(
        cli(platform, "projects", "create", "X", "--labels", "a,b", "--lease-seconds", "100000"), "--lease-seconds"
    )
    refused(cli(platform, "projects", "update", "parity-leases"), "nothing to change", code=2)
    refused(cli(platform, "projects", "update", "no-such-project", "--lease-seconds", "5"), "not found")


def test_predictions_attach_and_label_shows_the_suggestion(platform: str, gm: Gristmill, tmp_path: Path) -> None:
    ok(cli(platform, "projects", "create", "Suggest", "--id", "parity-suggest", "--labels", "negative,positive"))
    items = tmp_path / "items.jsonl"
    items.write_text('{"id": "s1", "text": "The screen cracked on day one"}\n{"id": "s2", "text": "It is a phone"}\n')
    ok(cli(platform, "import", "parity-suggest", str(items)))
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(
        '{"external_id": "s1", "label": "negative", "probabilities": {"negative": 0.91, "positive": 0.09}}\n'
    )
    attached = as_json(
        cli(
            platform,
            "predictions",
            "attach",
            "parity-suggest",
            str(predictions),
            "--model",
            "m",
            "--model-version",
            "3",
            "--json",
        )
    )
    assert attached["attached"] == 1
    listed = gm.labeling.ListItems(lb.ListItemsRequest(project_id="parity-suggest")).items
    with_prediction = [i for i in listed if i.predictions]
    assert [i.external_id for i in with_prediction] == ["s1"]
    prediction = with_prediction[0].predictions[0]
    assert (prediction.model_name, prediction.model_version, list(prediction.labels)) == ("m", 3, ["negative"])

    shown = ok(cli(platform, "label", "parity-suggest", "--annotator", "ann", input="1\n1\n"))
    assert "suggested: 1) negative (p=0.91) by m v3" in shown
    assert shown.count("suggested:") == 1  # the item without a prediction shows none

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"external_id": "s1", "label": "negative"}\n{"external_id": "s2" "label": "x"}\n')
    refused(
        cli(platform, "predictions", "attach", "parity-suggest", str(bad), "--model", "m"), "bad.jsonl line 2", code=2
    )
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"external_id": "nope", "label": "negative"}\n')
    refused(cli(platform, "predictions", "attach", "parity-suggest", str(unknown), "--model", "m"), "not found", "nope")


def test_projects_cleaning_pii_and_label_descriptions(platform: str, gm: Gristmill) -> None:
    created = cli(
        platform,
        "projects",
        "create",
        "Tickets",
        "--id",
        "parity-cleaning",
        "--labels",
        "bug,idea",
        "--label-description",
        'bug="Something broken"',
        "--max-text-chars",
        "500",
        "--near-duplicates",
        "flag",
        "--near-duplicate-threshold",
        "0.8",
        "--pii-kinds",
        "email,phone",
        "--pii-pattern",
        r"customer=CU-\d{6}",
    )
    assert "email,phone +customer" in ok(created)
    project = gm.labeling.GetProject(lb.GetProjectRequest(project_id="parity-cleaning"))
    cleaning = project.settings.cleaning
    assert list(cleaning.pii.kinds) == [lb.PII_KIND_EMAIL, lb.PII_KIND_PHONE]
    assert (cleaning.max_text_chars, cleaning.near_duplicate_threshold) == (500, 0.8)
    assert cleaning.near_duplicate_policy == lb.NEAR_DUPLICATE_POLICY_FLAG
    assert [(p.name, p.regex) for p in cleaning.pii.custom_patterns] == [("customer", r"CU-\d{6}")]
    assert [(x.name, x.description) for x in project.label_schema.labels] == [("bug", "Something broken"), ("idea", "")]

    ok(cli(platform, "projects", "update", "parity-cleaning", "--near-duplicates", "off", "--store-raw-text"))
    cleaning = gm.labeling.GetProject(lb.GetProjectRequest(project_id="parity-cleaning")).settings.cleaning
    assert cleaning.near_duplicate_policy == lb.NEAR_DUPLICATE_POLICY_OFF and cleaning.pii.store_raw_text
    assert cleaning.max_text_chars == 500 and len(cleaning.pii.custom_patterns) == 1  # untouched
    ok(
        cli(
            platform,
            "projects",
            "set-labels",
            "parity-cleaning",
            "--labels",
            "bug,idea,question",
            "--label-description",
            "question=Asks for help",
        )
    )
    labels = gm.labeling.GetProject(lb.GetProjectRequest(project_id="parity-cleaning")).label_schema.labels
    assert [x.description for x in labels] == ["Something broken", "", "Asks for help"]

    refused(
        cli(platform, "projects", "update", "parity-cleaning", "--pii-kinds", "email,passport"), "--pii-kinds", code=2
    )
    refused(
        cli(platform, "projects", "create", "X", "--labels", "a", "--label-description", "b=not a label"),
        "--label-description",
        code=2,
    )


# --------------------------------------------------------------------------- training


def test_train_search(platform: str, gm: Gristmill, labeled: dict[str, str], base_model: Path, tmp_path: Path) -> None:
    args = ["train", labeled["project"], "--base-model", str(base_model), "--epochs", "1", "--max-length", "32"]
    job = as_json(
        cli(
            platform,
            *args,
            "--lora",
            "--search",
            "learning_rate=loguniform(1e-4,1e-2)",
            "--search",
            "lora_rank=choice(4,8)",
            "--trials",
            "2",
            "--metric",
            "f1",
            "--mode",
            "max",
            "--scheduler",
            "fifo",
            "--no-wait",
            "--json",
        )
    )
    search = gm.training.GetJob(tr.GetJobRequest(job_id=job["job_id"])).spec.search
    assert search.num_trials == 2 and search.metric == "f1" and search.goal == common_pb2.METRIC_GOAL_MAXIMIZE
    assert search.scheduler == tr.SEARCH_SCHEDULER_FIFO
    assert [(d.parameter, d.WhichOneof("domain")) for d in search.dimensions] == [
        ("learning_rate", "log_uniform"),
        ("lora.rank", "choice"),
    ]
    assert list(search.dimensions[1].choice.values) == [4, 8]
    # One search is enough: the trials themselves are the training service's tests.
    ok(cli(platform, "jobs", "cancel", job["job_id"]))

    # A search file, here as an auto-train policy's template (nothing runs until the project publishes).
    ok(cli(platform, "projects", "create", "Search auto", "--id", "parity-search", "--labels", "negative,positive"))
    spec = tmp_path / "search.json"
    spec.write_text(json.dumps({"trials": 3, "metric": "accuracy", "dimensions": {"per_worker_batch_size": [8, 16]}}))
    ok(cli(platform, "train", "parity-search", "--auto", "--base-model", str(base_model), "--search-file", str(spec)))
    policy = gm.training.GetAutoTrainPolicy(tr.GetAutoTrainPolicyRequest(project_id="parity-search"))
    assert policy.job_template.search.num_trials == 3
    assert list(policy.job_template.search.dimensions[0].choice.values) == [8, 16]

    refused(
        cli(platform, *args, "--search", "learning_rate=normal(1,2)", "--trials", "2"), "--search", "normal", code=2
    )
    refused(
        cli(platform, *args, "--search", "learning_rate=loguniform(0,1)", "--trials", "2"),
        "--search",
        "MIN > 0",
        code=2,
    )
    refused(cli(platform, *args, "--search", "learning_rate=uniform(1e-5,1e-3)"), "a search needs --trials", code=2)
    refused(
        cli(platform, *args, "--search", "dropout=uniform(0,0.3)", "--trials", "2", "--no-wait"),
        "invalid argument",
        "not a searchable hyper-parameter",
    )


def test_train_spec_file_and_jobs_show_spec(
    platform: str, gm: Gristmill, labeled: dict[str, str], base_model: Path, tmp_path: Path
) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(
        json.dumps(
            {
                "display_name": "from a file",
                "method": "TRAINING_METHOD_LORA",
                "lora": {"rank": 4, "target_modules": ["query", "value"]},
                "hyper_parameters": {"epochs": 3, "warmup_ratio": 0.1, "weight_decay": 0.01, "seed": "7"},
                "tags": {"team": "parity"},
            }
        )
    )
    args = ["train", labeled["project"], "--base-model", str(base_model), "--spec-file", str(spec_file)]
    job = as_json(cli(platform, *args, "--epochs", "1", "--max-length", "32", "--no-wait", "--json"))
    spec = gm.training.GetJob(tr.GetJobRequest(job_id=job["job_id"])).spec
    ok(cli(platform, "jobs", "cancel", job["job_id"]))
    assert spec.display_name == "from a file" and spec.method == tr.TRAINING_METHOD_LORA
    assert list(spec.lora.target_modules) == ["query", "value"] and dict(spec.tags) == {"team": "parity"}
    hp = spec.hyper_parameters
    assert (hp.epochs, hp.max_sequence_length, hp.warmup_ratio, hp.weight_decay, hp.seed) == (1, 32, 0.1, 0.01, 7)
    # What `jobs show --spec` prints is the spec itself, ready for --spec-file.
    shown = ok(cli(platform, "jobs", "show", job["job_id"], "--spec"))
    assert json_format.Parse(shown, tr.JobSpec()) == spec

    spec_file.write_text('{"hyper_parameters": {"epochs": "three"}}')
    refused(cli(platform, *args, "--no-wait"), "--spec-file", "not a job spec", code=2)


# --------------------------------------------------------------------------- registry


def test_models_create_and_list_pages(platform: str, gm: Gristmill) -> None:
    for name in ("parity-a", "parity-b", "parity-c"):
        created = as_json(cli(platform, "models", "create", name, "--labels", "x,y", "--tag", "suite=parity", "--json"))
        assert created["name"] == name and created["tags"] == {"suite": "parity"}
    first = cli(platform, "models", "list", "--prefix", "parity-", "--page-size", "2", "--json")
    assert [m["name"] for m in as_json(first)] == ["parity-a", "parity-b"]
    assert "--page-token" in first.stderr  # there is more, and how to get it
    every = as_json(cli(platform, "models", "list", "--prefix", "parity-", "--page-size", "2", "--all", "--json"))
    found = gm.registry.SearchRegisteredModels(rg.SearchRegisteredModelsRequest(name_prefix="parity-"))
    assert (
        [m["name"] for m in every] == [m.name for m in found.registered_models] == ["parity-a", "parity-b", "parity-c"]
    )
    assert "parity-c" in ok(cli(platform, "models", "list", "--all"))
    usage_error(cli(platform, "models", "list", "--page-size", "5000"), "--page-size")
    refused(cli(platform, "models", "create", "parity-a"), "already exists")


def test_models_card_edit(platform: str, gm: Gristmill, trained: dict[str, str], tmp_path: Path) -> None:
    model = trained["model"]
    before = gm.registry.GetModelCard(rg.GetModelCardRequest(registered_model_name=model)).revision
    edited = as_json(cli(platform, "models", "card", "edit", model, "--intended-use", "Routing reviews.", "--json"))
    assert edited["revision"] == before + 1 and edited["intended_use"] == "Routing reviews."
    markdown = tmp_path / "card.md"
    markdown.write_text(
        "# edited\n\n## Limitations\n\nEnglish only.\n\n## Ethical considerations\n\n_Not written yet._\n"
    )
    assert "English only." in ok(
        cli(platform, "models", "card", "edit", model, "--version", "1", "--from-file", str(markdown))
    )
    card = gm.registry.GetModelCard(rg.GetModelCardRequest(registered_model_name=model))
    assert (card.intended_use, card.limitations, card.ethical_considerations) == (
        "Routing reviews.",
        "English only.",
        "",
    )
    assert "English only." in ok(cli(platform, "models", "card", "show", model))

    bad = tmp_path / "card.json"
    bad.write_text('{"metrics": []}')
    refused(
        cli(platform, "models", "card", "edit", model, "--from-file", str(bad)), str(bad), "cannot be edited", code=2
    )
    refused(cli(platform, "models", "card", "edit", model), "nothing to change", code=2)
    refused(cli(platform, "models", "card", "edit", model, "--version", "99", "--limitations", "x"), "not found")


# --------------------------------------------------------------------------- serving


def test_deploy_options_update_and_delete(
    platform: str, gm: Gristmill, trained: dict[str, str], tmp_path: Path
) -> None:
    model = trained["model"]
    deployed = as_json(
        cli(
            platform,
            "deploy",
            model,
            "--name",
            "parity-int8",
            "--version",
            "1",
            "--quantization",
            "int8",
            "--max-batch-size",
            "8",
            "--over-length",
            "reject",
            "--json",
        )
    )
    assert deployed["quantization"] == "QUANTIZATION_DYNAMIC_INT8" and deployed["batching"]["max_batch_size"] == 8
    seen = gm.serving.GetDeployment(sv.GetDeploymentRequest(name="parity-int8"))
    assert seen.quantization == sv.QUANTIZATION_DYNAMIC_INT8
    assert seen.length_policy.over_length_action == sv.OVER_LENGTH_ACTION_REJECT
    assert "int8" in ok(cli(platform, "deployments", "show", "parity-int8"))

    updated = as_json(cli(platform, "deployments", "update", "parity-int8", "--max-delay-ms", "1", "--json"))
    assert updated["batching"]["max_delay_ms"] == 1 and updated["batching"]["max_batch_size"] == 8
    # A second version for the canary: version 1's verified artifacts registered again through the CLI
    # (`models register --from-file` takes the request as JSON, as the SDK would send it).
    v1 = gm.registry.GetModelVersion(
        rg.GetModelVersionRequest(registered_model_name=model, selector=common_pb2.ModelVersionSelector(version=1))
    )
    request = rg.RegisterModelVersionRequest(
        registered_model_name=model,
        source_prefix=v1.artifact_prefix,
        manifest=v1.manifest,
        signature=v1.signature,
        task=v1.task,
        label_map=v1.label_map,
        description="version 1's artifacts again, for the canary",
        wait_for_verification=True,
    )
    request_file = tmp_path / "register.json"
    request_file.write_text(json_format.MessageToJson(request))
    registered = as_json(cli(platform, "models", "register", model, "--from-file", str(request_file), "--json"))
    canary_version = int(registered["version"])
    assert canary_version > 1 and registered["status"] == "MODEL_VERSION_STATUS_READY"
    # The canary (a licensed feature: the platform runs an enterprise licence) takes 20 % of the traffic.
    canaried = as_json(
        cli(
            platform, "deployments", "update", "parity-int8", "--canary-version", str(canary_version),
            "--canary-weight", "0.2", "--json",
        )
    )  # fmt: skip
    assert canaried["canary"]["weight"] == pytest.approx(0.2)
    seen = gm.serving.GetDeployment(sv.GetDeploymentRequest(name="parity-int8"))
    assert (seen.canary.target.version, seen.canary.weight) == (canary_version, pytest.approx(0.2))
    assert f"v{canary_version} 20%" in ok(cli(platform, "deployments", "show", "parity-int8"))
    uncanaried = as_json(cli(platform, "deployments", "update", "parity-int8", "--no-canary", "--json"))
    assert "canary" not in uncanaried
    assert not gm.serving.GetDeployment(sv.GetDeploymentRequest(name="parity-int8")).HasField("canary")
    # An ensemble: the canary's version averaged with the target's (one batch each).
    ok(cli(platform, "deployments", "update", "parity-int8", "--ensemble", str(canary_version)))
    seen = gm.serving.GetDeployment(sv.GetDeploymentRequest(name="parity-int8"))
    assert list(seen.ensemble_versions) == [canary_version]
    assert {(v.version, v.traffic_weight) for v in seen.status.versions} >= {(canary_version, 1.0)}
    assert f"v{canary_version}" in ok(cli(platform, "deployments", "show", "parity-int8"))
    [answer] = as_json(cli(platform, "predict", "parity-int8", "The battery is great", "--json"))
    assert answer["label"] in ("negative", "positive") and answer["model"].endswith(" v1")
    ok(cli(platform, "deployments", "update", "parity-int8", "--ensemble", "none"))
    assert not gm.serving.GetDeployment(sv.GetDeploymentRequest(name="parity-int8")).ensemble_versions
    refused(cli(platform, "deployments", "update", "parity-int8", "--ensemble", "two"), "--ensemble takes", code=2)
    refused(
        cli(platform, "deploy", model, "--canary-version", "1", "--canary-weight", "1.5"), "--canary-weight", code=2
    )
    refused(cli(platform, "deploy", model, "--quantization", "int4"), "--quantization must be one of", code=2)

    refused(cli(platform, "deployments", "delete", "parity-int8"), "delete deployment", "--yes", code=2)
    assert gm.serving.GetDeployment(sv.GetDeploymentRequest(name="parity-int8")).name == "parity-int8"
    assert as_json(cli(platform, "deployments", "delete", "parity-int8", "--yes", "--json")) == {
        "deployment": "parity-int8",
        "deleted": True,
    }
    with pytest.raises(NotFoundError):
        gm.serving.GetDeployment(sv.GetDeploymentRequest(name="parity-int8"))
    assert "parity-int8" not in [d["name"] for d in as_json(cli(platform, "deployments", "list", "--json"))]
    refused(cli(platform, "deployments", "delete", "parity-int8", "--yes"), "not found", "parity-int8")


# --------------------------------------------------------------------------- the other writes


def test_items_annotations_and_import_from_object(platform: str, gm: Gristmill, labeled: dict[str, str]) -> None:
    # An object already in the platform's bucket: the published test split of the session's project.
    version = gm.labeling.GetDatasetVersion(
        lb.GetDatasetVersionRequest(project_id=labeled["project"], dataset_version_id=labeled["dataset_version"])
    )
    key = f"datasets/{labeled['project']}/{labeled['dataset_version']}/test.jsonl"
    test_split = next(s for s in version.splits if s.split == common_pb2.DATASET_SPLIT_TEST)
    ok(cli(platform, "projects", "create", "Review", "--id", "parity-review", "--labels", "negative,positive"))
    report = as_json(cli(platform, "import", "parity-review", key, "--from-object", "--annotator", "import", "--json"))
    assert int(report["accepted_count"]) == test_split.item_count
    refused(cli(platform, "import", "parity-review", "datasets/none.jsonl", "--from-object"), "not found")

    items = as_json(cli(platform, "items", "list", "parity-review", "--status", "labeled", "--json"))
    assert len(items) == test_split.item_count
    item_id = items[0]["item_id"]
    shown = as_json(cli(platform, "items", "show", "parity-review", item_id, "--json"))
    annotation = shown["annotations"][0]
    other = "positive" if annotation["labels"] == ["negative"] else "negative"
    changed = as_json(
        cli(
            platform,
            "annotations",
            "update",
            "parity-review",
            annotation["annotation_id"],
            "--annotator",
            "import",
            "--labels",
            other,
            "--json",
        )
    )
    assert changed["labels"] == [other]
    resolved = as_json(
        cli(
            platform,
            "items",
            "resolve",
            "parity-review",
            item_id,
            "--labels",
            "negative",
            "--reviewer",
            "rev",
            "--json",
        )
    )
    assert resolved["status"] == "ITEM_STATUS_RESOLVED"
    item = gm.labeling.GetItem(lb.GetItemRequest(project_id="parity-review", item_id=item_id))
    assert list(item.consensus.labels) == ["negative"] and item.consensus.resolved_by == "rev"
    assert [a.labels for a in item.annotations] == [[other]]
    usage_error(cli(platform, "items", "list", "parity-review", "--status", "weird"), "--status must be one of")


def test_registry_and_training_policies(
    platform: str, gm: Gristmill, trained: dict[str, str], base_model: Path
) -> None:
    model = trained["model"]
    updated = as_json(cli(platform, "models", "update", model, "--description", "Review sentiment", "--json"))
    assert updated["description"] == "Review sentiment"
    ok(cli(platform, "models", "update", model, "--version", "1", "--tag", "checked=yes"))
    version = gm.registry.GetModelVersion(
        rg.GetModelVersionRequest(registered_model_name=model, selector=common_pb2.ModelVersionSelector(version=1))
    )
    assert dict(version.tags)["checked"] == "yes"

    ok(cli(platform, "models", "alias", "set", model, "parity-temp", "1"))
    deleted = as_json(cli(platform, "models", "alias", "delete", model, "parity-temp", "--json"))
    assert deleted["alias"] == "parity-temp" and "to_version" not in deleted
    assert "parity-temp" not in gm.registry.GetRegisteredModel(rg.GetRegisteredModelRequest(name=model)).aliases

    policy = as_json(cli(platform, "models", "policy", model, "--alias", "parity-staging", "--manual", "--json"))
    assert policy["mode"] == "PROMOTION_MODE_MANUAL_APPROVAL"
    assert as_json(cli(platform, "models", "promotions", "list", model, "--json")) == []
    refused(cli(platform, "models", "promotions", "approve", "no-such-promotion"), "not found")
    refused(cli(platform, "models", "promotions", "reject", "no-such-promotion"), "not found")
    ok(cli(platform, "models", "policy", model, "--delete"))
    with pytest.raises(NotFoundError):
        gm.registry.GetPromotionPolicy(rg.GetPromotionPolicyRequest(registered_model_name=model))

    # Both local platforms run on the user's machine: the registry imports base models from its directories.
    imported = as_json(cli(platform, "base-models", "import", "tiny", "--local-path", str(base_model), "--json"))
    assert imported["name"] == "tiny" and imported["model_type"] == "bert"
    refused(cli(platform, "base-models", "import", "tiny", "--local-path", str(base_model)), "already exists")
    usage_error(cli(platform, "base-models", "import", "tiny"), "exactly one of")
    assert [b["name"] for b in as_json(cli(platform, "base-models", "list", "--json"))] == ["tiny"]
    refused(cli(platform, "models", "register", model, "--from-file", "/nonexistent.json"), "/nonexistent.json", code=2)

    ok(cli(platform, "projects", "create", "Auto off", "--id", "parity-autotrain", "--labels", "a,b"))
    ok(cli(platform, "train", "parity-autotrain", "--auto", "--base-model", str(base_model), "--model", "x"))
    assert as_json(cli(platform, "autotrain", "show", "parity-autotrain", "--json"))["enabled"] is True
    ok(cli(platform, "autotrain", "delete", "parity-autotrain"))
    with pytest.raises(NotFoundError):
        gm.training.GetAutoTrainPolicy(tr.GetAutoTrainPolicyRequest(project_id="parity-autotrain"))
    refused(cli(platform, "autotrain", "delete", "parity-autotrain"), "not found")
