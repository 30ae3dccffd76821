"""The chat demo's data and the rules its simulated users judge replies by (``gristmill.cli.chat_demo_data``)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from gristmill.cli import chat_demo_data as data
from gristmill.core.errors import FailedPreconditionError

GOOD = data.answer("positive", data.POLITE_REPLIES["positive"][0])


def test_a_reply_is_good_when_it_is_the_json_wanted_with_the_right_sentiment() -> None:
    assert data.judge(GOOD, GOOD)
    assert data.judge(' {"reply": "Thanks!", "sentiment": " Positive"} ', GOOD)  # another reply, case and spaces
    assert not data.judge(data.answer("negative", "Sorry."), GOOD)  # wrong sentiment
    assert not data.judge('{"sentiment": "positive"}', GOOD)  # not the keys wanted
    assert not data.judge(f"```json\n{GOOD}\n```", GOOD)  # a code fence is not JSON
    assert not data.judge("positive", GOOD)
    # Free text: the words of the reference.
    assert data.judge("the parcel arrives on monday", "Your parcel arrives on Monday.")
    assert not data.judge("no idea", "Your parcel arrives on Monday.")


def test_the_user_keeps_the_better_of_two_replies() -> None:
    wrong = data.answer("negative", data.POLITE_REPLIES["negative"][0])
    assert data.quality(GOOD, GOOD) > data.quality(wrong, GOOD) > data.quality("positive, thanks", GOOD)
    # Two poor replies still rank: the closer to the answer wanted.
    assert data.quality('{"sentiment": "posit', GOOD) > data.quality("zzz", GOOD)


def test_seed_conversations_have_drafts_to_fix_and_import_as_openai_messages() -> None:
    seeds = data.seed_conversations(200, seed=7)
    assert seeds == data.seed_conversations(200, seed=7)  # deterministic
    flaws = {s.flaw for s in seeds}
    assert flaws == {"", "wrong sentiment", "rude", "not JSON", "no reply"}
    assert 0.2 < sum(bool(s.flaw) for s in seeds) / len(seeds) < 0.6
    for s in seeds:
        record = s.record()
        assert record["messages"][0] == {"role": "system", "content": data.SYSTEM_PROMPT}
        assert data.score(s.reference, json.loads(s.reference)["sentiment"]) == (True, True)
        if s.flaw == "no reply":
            assert record["messages"][-1]["role"] == "user"
        else:
            assert record["messages"][-1] == {"role": "assistant", "content": s.draft}
            assert (s.draft == s.reference) == (not s.flaw)


def test_users_send_distinct_reviews() -> None:
    prompts = data.user_prompts(500, seed=8)
    texts = [p.prompt[-1]["content"] for p in prompts]
    assert len(set(texts)) == len(texts) > 450


def test_the_benchmarks_records_and_scoring() -> None:
    reviews = [data.Review("Great phone", "positive"), data.Review("Broke at once", "negative")]
    sft = data.sft_records(reviews, random.Random(1))
    assert [data.score(r["messages"][-1]["content"], rv.sentiment) for r, rv in zip(sft, reviews, strict=True)] == [
        (True, True),
        (True, True),
    ]
    for record in data.dpo_records(reviews, random.Random(1)):
        assert record["chosen"] != record["rejected"] and data.json_object(record["rejected"]) is not None


def test_users_data_is_openai_messages_ending_with_the_reply(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    good = {"id": "a", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    path.write_text(json.dumps(good) + "\n\n")
    [conversation] = data.load_conversations(path)
    assert (conversation.external_id, conversation.draft, conversation.reference) == ("a", "Hello!", "Hello!")
    assert not data.is_json_task([conversation.reference]) and data.match_keys([conversation.reference]) == []
    assert data.match_keys([GOOD, GOOD, "text"]) == ["sentiment"]
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    with pytest.raises(FailedPreconditionError, match="record 1 is not an OpenAI 'messages' conversation"):
        data.load_conversations(path)


def test_a_demo_that_fails_says_why_in_one_line(tmp_path: Path) -> None:
    # The data is checked while the platform would start (--no-start: none does); its error is the demo's one line.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nonsense": 1}\n', encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gristmill.cli.main",
            "demo",
            "--task",
            "chat",
            "--tiny",
            "--no-start",
            "--data",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gristmill: failed precondition: "), done.stderr
    assert "record 1 is not an OpenAI 'messages' conversation" in lines[0]
