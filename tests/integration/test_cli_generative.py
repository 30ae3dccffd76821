"""The CLI for chat and preference projects, against the session's embedded platform: create (no labels), import
JSONL conversations, label in the terminal (keep/edit, rate, flag; choose, rank, tie), agreement, resolve a conflict,
publish, show the version's row format and export its rows in another format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import as_json, cli, ok, refused

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CHATS = [
    {
        "messages": [
            {"role": "system", "content": "You answer shop customers briefly."},
            {"role": "user", "content": "Where is my order 1234?"},
            {"role": "assistant", "content": "It ships tomorrow."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Can I return shoes after thirty days?"},
            {"role": "assistant", "content": "No."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Does the blender come with a warranty?"},
            {"role": "assistant", "content": "Blenders are dangerous, do not buy one."},
        ]
    },
]
PROMPTS = [
    {"prompt": "Greet the customer.", "candidates": ["What?", "Hello! How can I help?", "Hi."]},
    {"prompt": "Apologise for a late parcel.", "candidates": ["Sorry for the wait.", "Not our fault.", "Oops."]},
    {"prompt": "Thank a returning buyer.", "candidates": ["Thanks for coming back!", "Ok.", "Noted."]},
]


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_chat_project_in_the_terminal(platform: str, tmp_path: Path) -> None:
    create = ["projects", "create", "Chats", "--id", "cli-chat", "--task", "chat", "--annotators", "2"]
    created = as_json(cli(platform, *create, "--json"))
    assert created["task_type"] == "TASK_TYPE_CHAT" and created["label_schema"]["labels"] == []
    assert "chat" in ok(cli(platform, "projects", "show", "cli-chat"))
    updated = ok(
        cli(platform, "projects", "update", "cli-chat", "--feedback", "--feedback-preference-project", "cli-pref")
    )
    assert "feedback preference project" in updated and "cli-pref" in updated
    refused(
        cli(platform, "projects", "update", "cli-chat", "--feedback-review-at-or-below", "9"),
        "invalid argument",
        "review_at_or_below_rating",
    )
    refused(cli(platform, "projects", "create", "X", "--task", "chat", "--labels", "a,b"), "invalid argument", "label")
    refused(cli(platform, "projects", "create", "X", "--task", "summaries"), "--task must be one of", code=2)
    refused(cli(platform, "projects", "create", "X"), "--labels", code=2)

    report = as_json(cli(platform, "import", "cli-chat", str(jsonl(tmp_path / "chats.jsonl", CHATS)), "--json"))
    assert report["accepted_count"] == "3"

    # alice: keeps and rates the first reply, rewrites the second over two lines (after a bad answer), flags the third.
    alice = ok(
        cli(
            platform, "label", "cli-chat", "--annotator", "alice",
            input="\n5\n\n" "x\ne\nYes, within 60 days,\nwith the receipt.\n.\n4\n\n" "\n\nwrong\n",
        )
    )  # fmt: skip
    assert "  system: You answer shop customers briefly." in alice and "  reply: It ships tomorrow." in alice
    assert "press Enter to keep the reply, e to edit it" in alice and "labeled 3, skipped 0" in alice
    # bob: accepts the first, rejects the second (a rating of 1), flags the third, after an unknown flag.
    bob = ok(cli(platform, "label", "cli-chat", "--annotator", "bob", input="\n4\n\n\n1\n\n\n\nrude\nunsafe\n"))
    assert "'rude' is not a flag" in bob and "labeled 3, skipped 0" in bob

    agreement = ok(cli(platform, "agreement", "cli-chat"))
    assert "rating krippendorff alpha" in agreement and "(2 rated items)" in agreement
    conflicts = as_json(cli(platform, "items", "list", "cli-chat", "--status", "conflict", "--json"))
    assert len(conflicts) == 1
    item_id = conflicts[0]["item_id"]
    shown = ok(cli(platform, "items", "show", "cli-chat", item_id))
    assert "alice: reply 'Yes, within 60 days, with the receipt.', rating 4" in shown
    assert "bob: reply kept, rating 1" in shown and "  user: Can I return shoes after thirty days?" in shown

    refused(cli(platform, "items", "resolve", "cli-chat", item_id, "--reviewer", "rev"), "give --labels", code=2)
    refused(
        cli(platform, "items", "resolve", "cli-chat", item_id, "--reviewer", "rev", "--ranking", "1>2"),
        "invalid argument",
    )
    resolved = as_json(
        cli(
            platform, "items", "resolve", "cli-chat", item_id, "--reviewer", "rev",
            "--reply", "Yes: returns are accepted within 60 days.", "--rating", "5", "--json",
        )
    )  # fmt: skip
    assert resolved["status"] == "ITEM_STATUS_RESOLVED"
    assert "resolution   reply 'Yes: returns are accepted within 60 days.', rating 5" in ok(
        cli(platform, "items", "show", "cli-chat", item_id)
    )

    ok(cli(platform, "datasets", "publish", "cli-chat", "--train", "1", "--validation", "0", "--test", "0"))
    assert "row format          sft-messages" in ok(cli(platform, "datasets", "show", "cli-chat", "1"))
    out = tmp_path / "sharegpt"
    export = ["datasets", "export", "cli-chat"]
    written = as_json(cli(platform, *export, "latest", "--format", "sharegpt", "--out", str(out), "--json"))
    assert {Path(w["file"]).name: w["format"] for w in written}["manifest.json"] == "stored"
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    replies = sorted(row["conversations"][-1]["value"] for row in rows)
    assert replies == ["It ships tomorrow.", "Yes: returns are accepted within 60 days."]
    assert json.loads((out / "manifest.json").read_text())  # as published
    refused(cli(platform, *export, "1", "--format", "dpo", "--out", str(tmp_path / "d")), "--format dpo", code=2)
    refused(cli(platform, *export, "1", "--out", str(out)), "--out", "not an empty directory", code=2)


def test_preference_project_in_the_terminal(platform: str, tmp_path: Path) -> None:
    ok(cli(platform, "projects", "create", "Prefs", "--id", "cli-prefs", "--task", "preference", "--annotators", "2"))
    ok(cli(platform, "import", "cli-prefs", str(jsonl(tmp_path / "prefs.jsonl", PROMPTS))))

    alice = ok(cli(platform, "label", "cli-prefs", "--annotator", "alice", input="5\n2\nt\n1>3>2\n"))
    assert "  candidate 2: Hello! How can I help?" in alice
    assert "there is no candidate 5: the candidates are 1-3" in alice
    assert "labeled 3, skipped 0" in alice
    bob = ok(cli(platform, "label", "cli-prefs", "--annotator", "bob", input="2>1\n1\ns\n"))
    assert "labeled 2, skipped 1" in bob

    assert "ranking pair agreement" in ok(cli(platform, "agreement", "cli-prefs"))
    conflict = as_json(cli(platform, "items", "list", "cli-prefs", "--status", "conflict", "--json"))[0]["item_id"]
    assert "alice: tie" in ok(cli(platform, "items", "show", "cli-prefs", conflict))
    ok(cli(platform, "items", "resolve", "cli-prefs", conflict, "--reviewer", "rev", "--ranking", "1"))
    shown = ok(cli(platform, "items", "show", "cli-prefs", conflict))
    assert "candidate 1" in shown and "resolution   best 1" in shown

    ok(cli(platform, "datasets", "publish", "cli-prefs", "--train", "1", "--validation", "0", "--test", "0"))
    assert "row format          dpo-conversational" in ok(cli(platform, "datasets", "show", "cli-prefs", "latest"))
    out = tmp_path / "dpo"
    ok(cli(platform, "datasets", "export", "cli-prefs", "1", "--format", "dpo", "--out", str(out)))
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    pairs = {(r["prompt"][-1]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows}
    assert ("Greet the customer.", "Hello! How can I help?", "What?") in pairs
    assert ("Apologise for a late parcel.", "Sorry for the wait.", "Oops.") in pairs


def test_export_refuses_a_format_for_a_classification_version(
    platform: str, labeled: dict[str, str], tmp_path: Path
) -> None:
    export = ["datasets", "export", labeled["project"], "latest"]
    converted = cli(platform, *export, "--format", "openai", "--out", str(tmp_path / "x"))
    refused(converted, "--format openai", "classification", code=2)
    out = tmp_path / "stored"
    ok(cli(platform, *export, "--split", "test", "--out", str(out)))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.jsonl"]
    assert "row format          classification" in ok(cli(platform, "datasets", "show", labeled["project"], "latest"))
