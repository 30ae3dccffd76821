"""The chat demo's simulated users: the feedback rule (what becomes a preference pair) and the pool that keeps a
fixed number of conversations in flight. The HTTP calls are replaced; the judging rules are the real ones."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from gristmill.cli import chat_demo_data as data
from gristmill.cli.chat_demo import Reply, SimulatedUsers
from gristmill.core.errors import FailedPreconditionError

GOOD = data.answer("positive", "Thank you for your kind words, we are glad you enjoyed it!")
WRONG = data.answer("negative", "We are sorry to hear about your experience.")
NOT_JSON = "positive, thanks"
PROMPT = data.UserPrompt(({"role": "user", "content": "Great blender, works well."},), GOOD)


class ScriptedUsers(SimulatedUsers):
    """Replies come from ``script`` in order; feedback is recorded as sent, with its fields."""

    def __init__(self, script: list[str], *, delay_s: float = 0.0) -> None:
        super().__init__("http://127.0.0.1:9/v1", "key", None, ["sentiment"], max_tokens=16, seed=1)
        self.script = iter(script)
        self.delay_s = delay_s
        self.sent: list[tuple[str, str, dict[str, str]]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._count_lock = threading.Lock()

    def ask(self, deployment: str, prompt: data.UserPrompt, seed: int) -> Reply:
        with self._count_lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            text = next(self.script, GOOD)
            request_id = f"r{seed}"
        time.sleep(self.delay_s)
        with self._count_lock:
            self.in_flight -= 1
        return Reply(request_id, 1, text, deployment)

    def feedback(self, reply: Reply, kind: str, **fields: str) -> None:
        self.sent.append((reply.request_id, kind, fields))
        self.ledger.record(reply.version, kind, reply.request_id)


def kinds(users: ScriptedUsers) -> list[str]:
    return [kind for _, kind, _ in users.sent]


def test_a_good_reply_gets_a_thumbs_up() -> None:
    users = ScriptedUsers([GOOD])
    users.converse("d", PROMPT)
    assert kinds(users) == ["thumbs_up"]
    assert users.ledger.paired == []


def test_a_bad_reply_then_a_good_one_makes_a_pair_choosing_the_good_one() -> None:
    users = ScriptedUsers([WRONG, GOOD])
    users.converse("d", PROMPT)
    assert kinds(users) == ["thumbs_down", "regenerate"]
    first_id, _, fields = users.sent[1]
    assert first_id == users.sent[0][0]
    assert fields == {"kept_reply": GOOD, "discarded_reply": WRONG}
    assert users.ledger.paired == [first_id]


def test_two_bad_replies_make_no_pair_of_them_the_better_one_is_edited_into_the_answer_wanted() -> None:
    users = ScriptedUsers([NOT_JSON, WRONG])
    users.converse("d", PROMPT)
    assert kinds(users) == ["thumbs_down", "edit"]
    # The second reply is the better one (valid JSON, wrong sentiment): it is the one edited, to the reference.
    (first_id, _, _), (edited_id, _, fields) = users.sent
    assert edited_id != first_id
    assert fields == {"edited_reply": GOOD}
    assert users.ledger.paired == [edited_id]
    assert users.ledger.by_version() == {1: {"positive": 0, "negative": 2}}


def test_when_the_first_of_two_bad_replies_is_better_it_is_the_one_edited() -> None:
    users = ScriptedUsers([WRONG, NOT_JSON])
    users.converse("d", PROMPT)
    assert kinds(users) == ["thumbs_down", "edit"]
    assert users.sent[0][0] == users.sent[1][0]
    assert users.ledger.by_version() == {1: {"positive": 0, "negative": 1}}


def prompts() -> Iterator[data.UserPrompt]:
    return itertools.repeat(PROMPT)


def test_the_pool_keeps_every_user_busy_and_stops_when_done() -> None:
    users = ScriptedUsers([], delay_s=0.02)
    ran = users.chat_until(
        lambda _rng: "d",
        prompts(),
        lambda: users.ledger.conversations >= 20,
        workers=4,
        max_conversations=1000,
        what="twenty conversations",
    )
    assert users.most_in_flight == 4
    # It stops starting conversations once done, and the ones under way finish (at most workers - 1 more).
    assert 20 <= users.ledger.conversations == ran <= 23


def test_the_pool_gives_up_after_max_conversations_with_the_reason() -> None:
    users = ScriptedUsers([])
    with pytest.raises(FailedPreconditionError, match="the gate's decision: not reached after 6 conversations"):
        users.chat_until(
            lambda _rng: "d", prompts(), lambda: False, workers=2, max_conversations=6, what="the gate's decision"
        )
    assert users.ledger.conversations == 6
