"""Chat and preference items in the console, over real HTTP in front of the real labeling service (keys on): an
annotator keeps or rewrites a reply, rates and flags it, chooses between candidates or calls a tie, and goes back
to change an answer; bad answers are refused before anything is recorded; text from the conversations is shown as
text."""

from __future__ import annotations

import html as html_text
import json
import re
import uuid

import pytest

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as pb
from services.admin.tests.support import bearer
from services.console.tests.integration.test_console_http import HTMX, _field, signed_in
from services.console.tests.support import HOSTILE, Stack

pytestmark = pytest.mark.integration

CHATS = [
    ("How do I reset my password?", "Open Settings, then Security, then Reset password."),
    ("Can I return shoes?", "Yes, within 30 days."),
    (HOSTILE, "I am sorry to hear that."),
]
PREFERENCES = [
    ("Name a primary colour", "red", "green"),
    ("Is the parcel insured?", "Yes, every parcel is insured up to 500 EUR.", "Maybe."),
]


async def _project(stack: Stack, task: int, rows: list[dict[str, object]]) -> str:
    key = bearer(stack.keys["writer"])
    project_id = f"gen-{uuid.uuid4().hex[:8]}"
    await stack.labeling.CreateProject(
        pb.CreateProjectRequest(project_id=project_id, display_name=project_id, task_type=task), metadata=key
    )
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    options = pb.ImportOptions(project_id=project_id, format=pb.IMPORT_FORMAT_JSONL, source_name="rows.jsonl")
    report = await stack.labeling.ImportItems(
        iter([pb.ImportItemsRequest(options=options), pb.ImportItemsRequest(chunk=data)]), metadata=key
    )
    assert report.accepted_count == len(rows), report
    return project_id


async def _mine(stack: Stack, project_id: str, item_id: str) -> list[pb.Annotation]:
    item = await stack.labeling.GetItem(
        pb.GetItemRequest(project_id=project_id, item_id=item_id), metadata=bearer(stack.keys["writer"])
    )
    return list(item.annotations)


async def test_a_chat_reply_is_kept_rated_rewritten_flagged_and_changed(stack: Stack) -> None:
    rows = [
        {"id": f"c{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for i, (q, a) in enumerate(CHATS)
    ]
    project_id = await _project(stack, common_pb2.TASK_TYPE_CHAT, rows)
    url = f"/projects/{project_id}/label"
    async with signed_in(stack, "writer", "ann-chat") as client:
        html = (await client.get(url)).text
        csrf = _field(html, "csrf")
        assert _field(html, "kind") == "chat" and 'id="reply"' in html
        answered: dict[str, str] = {}
        for _ in CHATS:
            item_id, task_id, own = _field(html, "item_id"), _field(html, "task_id"), _field(html, "own_reply")
            # The item's own reply is in the editor, the turns before it are shown as text.
            assert re.search(r'<textarea name="reply" id="reply" rows="5">([^<]*)</textarea>', html)
            assert "<script>alert" not in html
            form = {"csrf": csrf, "action": "submit", "kind": "chat", "task_id": task_id, "item_id": item_id}
            if own.startswith("Open Settings"):
                fields = form | {"own_reply": own, "reply": own, "rating": "4"}  # kept, rated
            elif own.startswith("Yes, within"):
                fields = form | {"own_reply": own, "reply": "Yes, within 60 days of delivery.", "rating": "5"}
            else:
                assert "&lt;script&gt;alert" in html  # the hostile user turn, escaped
                fields = form | {"own_reply": own, "reply": own, "flags": ["off-topic", "wrong"]}
            # Bad answers first: refused (400, one line), nothing recorded.
            for bad, message in (({"rating": "7"}, "a rating is 1-5"), ({"flags": ["rude"]}, "'rude' is not a flag")):
                reply = await client.post(url, data=fields | bad, headers=HTMX)
                assert reply.status_code == 400 and message in html_text.unescape(reply.text), reply.text
            assert await _mine(stack, project_id, item_id) == []
            reply = await client.post(url, data=fields, headers=HTMX)
            assert reply.status_code == 200, reply.text
            answered[own] = item_id
            html = reply.text
        assert "Nothing left for you" in html

        kept = (await _mine(stack, project_id, answered[CHATS[0][1]]))[0].response
        assert (kept.reply, kept.rating, list(kept.flags)) == ("", 4, [])  # '' keeps the item's own reply
        rewritten = (await _mine(stack, project_id, answered[CHATS[1][1]]))[0].response
        assert (rewritten.reply, rewritten.rating) == ("Yes, within 60 days of delivery.", 5)
        flagged = (await _mine(stack, project_id, answered[CHATS[2][1]]))[0].response
        assert sorted(flagged.flags) == ["off-topic", "wrong"]

        # u: back to the last answer, its flags ticked; change it to a plain rating of 2.
        undo = {"csrf": csrf, "action": "undo", "last_item_id": _field(html, "last_item_id"),
                "last_annotation_id": _field(html, "last_annotation_id")}  # fmt: skip
        back = (await client.post(url, data=undo, headers=HTMX)).text
        assert re.search(r'value="wrong" checked', back) and re.search(r'value="off-topic" checked', back)
        own = _field(back, "own_reply")
        change = {"csrf": csrf, "action": "change", "kind": "chat", "annotation_id": _field(back, "annotation_id"),
                  "own_reply": own, "reply": own, "rating": "2"}  # fmt: skip
        assert (await client.post(url, data=change, headers=HTMX)).status_code == 200
        changed = (await _mine(stack, project_id, answered[CHATS[2][1]]))[0].response
        assert (changed.rating, list(changed.flags)) == (2, [])


async def test_a_preference_is_a_chosen_candidate_or_a_tie(stack: Stack) -> None:
    rows = [{"id": f"p{i}", "prompt": q, "candidates": [a, b]} for i, (q, a, b) in enumerate(PREFERENCES)]
    project_id = await _project(stack, common_pb2.TASK_TYPE_PREFERENCE, rows)
    url = f"/projects/{project_id}/label"
    async with signed_in(stack, "writer", "ann-pref") as client:
        html = (await client.get(url)).text
        csrf = _field(html, "csrf")
        assert _field(html, "kind") == "preference" and 'data-key="t"' in html
        chosen: dict[str, pb.Response] = {}
        for _ in PREFERENCES:
            item_id, task_id = _field(html, "item_id"), _field(html, "task_id")
            form = {"csrf": csrf, "action": "submit", "kind": "preference", "task_id": task_id, "item_id": item_id}
            refused = await client.post(url, data=form, headers=HTMX)  # nothing chosen
            assert refused.status_code == 400 and "choose the better reply first" in refused.text
            choice = "tie" if "primary colour" in html else "0"
            reply = await client.post(url, data=form | {"choice": choice}, headers=HTMX)
            assert reply.status_code == 200, reply.text
            chosen[choice] = (await _mine(stack, project_id, item_id))[0].response
            html = reply.text
        assert chosen["tie"].tie is True and list(chosen["0"].ranking) == [0]
