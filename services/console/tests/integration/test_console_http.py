"""The console over real HTTP, in front of the real admin and labeling services (API keys on, Kafka and S3 real).

A person's path through it with a browser's requests (cookies, forms, htmx's header): sign in with a key,
label 20 items from the queue, undo one and change it, skip one; and what must never happen: text from the data
run as markup, a write without the page's CSRF token, a read-only key labeling, one organisation seeing
another's project.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import httpx2 as httpx
import pytest

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as pb
from services.admin.tests.support import bearer
from services.console.tests.support import Stack

pytestmark = pytest.mark.integration

HTMX = {"HX-Request": "true"}


@asynccontextmanager
async def signed_in(stack: Stack, key: str, annotator: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.console.url, follow_redirects=False, timeout=30) as client:
        reply = await client.post("/sign-in", data={"api_key": stack.keys[key], "annotator": annotator})
        assert reply.status_code == 303 and reply.headers["location"] == "/", reply.text
        cookie = reply.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        yield client


def _field(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert found is not None, f"no {name} in {html[:2000]}"
    return found.group(1)


def _item(html: str) -> str:
    found = re.search(r'data-item-id="([^"]+)"', html)
    return found.group(1) if found else ""


async def _annotations(stack: Stack) -> int:
    project = await stack.labeling.GetProject(
        pb.GetProjectRequest(project_id=stack.project_id), metadata=bearer(stack.keys["writer"])
    )
    return int(project.stats.annotation_count)


async def test_an_annotator_labels_twenty_items_undoes_one_and_skips_one(stack: Stack) -> None:
    async with signed_in(stack, "writer", "ann-1") as client:
        projects = await client.get("/")
        assert projects.status_code == 200
        # The display name is data: escaped, not markup.
        assert "Phone &lt;b&gt;reviews&lt;/b&gt;" in projects.text and "<b>reviews" not in projects.text
        assert f'href="/projects/{stack.project_id}/label"' in projects.text
        assert "script-src 'self'" in projects.headers["content-security-policy"]

        page = await client.get(f"/projects/{stack.project_id}/label")
        assert page.status_code == 200, page.text
        html = page.text
        csrf = _field(html, "csrf")
        seen: list[str] = []
        last: dict[str, Any] = {}
        for i in range(20):
            item_id, task_id = _field(html, "item_id"), _field(html, "task_id")
            assert item_id not in seen
            seen.append(item_id)
            label = "positive" if i % 2 else "negative"
            form = {"csrf": csrf, "action": "submit", "task_id": task_id, "item_id": item_id, "label": label}
            reply = await client.post(f"/projects/{stack.project_id}/label", data=form, headers=HTMX)
            assert reply.status_code == 200, reply.text
            # One submission and one NextTask per key press, each timed in Server-Timing, then the whole.
            timing = [m.split(";dur=") for m in reply.headers["server-timing"].split(", ")]
            assert [name for name, _ in timing] == ["labeling-SubmitAnnotation", "labeling-NextTask", "app"]
            assert float(timing[-1][1]) >= float(timing[0][1]) + float(timing[1][1]) > 0
            html = reply.text
            last = {"item_id": item_id, "label": label}
        assert await _annotations(stack) == 20

        # u: back to the last item, its label chosen; change it.
        undo = {
            "csrf": csrf,
            "action": "undo",
            "last_item_id": _field(html, "last_item_id"),
            "last_annotation_id": _field(html, "last_annotation_id"),
        }
        assert undo["last_item_id"] == last["item_id"]
        back = await client.post(f"/projects/{stack.project_id}/label", data=undo, headers=HTMX)
        assert back.status_code == 200, back.text
        assert _item(back.text) == last["item_id"]
        assert re.search(rf'value="{last["label"]}" data-key="\d" checked', back.text)
        change = {
            "csrf": csrf,
            "action": "change",
            "annotation_id": _field(back.text, "annotation_id"),
            "label": "positive",
        }
        changed = await client.post(f"/projects/{stack.project_id}/label", data=change, headers=HTMX)
        assert changed.status_code == 200, changed.text
        item = await stack.labeling.GetItem(
            pb.GetItemRequest(project_id=stack.project_id, item_id=last["item_id"]),
            metadata=bearer(stack.keys["writer"]),
        )
        assert [list(a.labels) for a in item.annotations] == [["positive"]]
        assert await _annotations(stack) == 20

        # s: the item is skipped and not offered again.
        html = changed.text
        skipped = _field(html, "item_id")
        form = {"csrf": csrf, "action": "skip", "task_id": _field(html, "task_id")}
        after = await client.post(f"/projects/{stack.project_id}/label", data=form, headers=HTMX)
        assert after.status_code == 200 and _item(after.text) not in ("", skipped)

        # Without htmx (no JavaScript), the same form answers with a redirect to the page.
        html = after.text
        plain = {"csrf": csrf, "action": "submit", "task_id": _field(html, "task_id"), "item_id": _item(html)}
        plain["label"] = "negative"
        reply = await client.post(f"/projects/{stack.project_id}/label", data=plain)
        assert reply.status_code == 303 and reply.headers["location"] == f"/projects/{stack.project_id}/label"
        assert await _annotations(stack) == 21

        # Signed out, the pages send the browser to sign in.
        out = await client.post("/sign-out", data={"csrf": csrf})
        assert out.status_code == 303
        client.cookies.clear()
        assert (await client.get("/")).headers["location"] == "/sign-in"


async def test_the_open_page_renews_its_lease_and_a_wrong_press_shows_an_error_beside_the_item(stack: Stack) -> None:
    label_url = f"/projects/{stack.project_id}/label"
    async with signed_in(stack, "writer", "ann-renew") as client:
        html = (await client.get(label_url)).text
        csrf, task_id, item_id = _field(html, "csrf"), _field(html, "task_id"), _field(html, "item_id")
        every = re.search(r'hx-trigger="every (\d+)s"', html)
        # Half of the project's 600 s lease: the page renews long before the item could go to someone else.
        assert every is not None and int(every.group(1)) in range(290, 301), html

        async def expiry() -> float:
            held = await stack.labeling.NextTask(
                pb.NextTaskRequest(project_id=stack.project_id, annotator_id="ann-renew"),
                metadata=bearer(stack.keys["writer"]),
            )
            assert held.task.task_id == task_id  # the same lease, still held
            return float(held.task.lease_expire_time.ToNanoseconds())

        before = await expiry()
        renewed = await client.post(label_url, data={"csrf": csrf, "action": "renew", "task_id": task_id}, headers=HTMX)
        assert renewed.status_code == 204, renewed.text
        assert await expiry() > before

        annotations = await _annotations(stack)
        # Enter with no label chosen: a 400 whose message htmx puts in the page's notice; the item stays.
        empty = {"csrf": csrf, "action": "submit", "task_id": task_id, "item_id": item_id, "label": ""}
        reply = await client.post(label_url, data=empty, headers=HTMX)
        assert reply.status_code == 400 and "choose a label first" in reply.text
        assert reply.headers["hx-retarget"] == "#notice" and reply.headers["hx-reswap"] == "innerHTML"
        reply = await client.post(label_url, data={"csrf": csrf, "action": "dance"}, headers=HTMX)
        assert reply.status_code == 400 and "unknown action &#39;dance&#39;" in reply.text
        # Someone else's lease cannot be renewed from this session.
        async with signed_in(stack, "writer", "ann-other") as other:
            other_csrf = _field((await other.get(label_url)).text, "csrf")
            reply = await other.post(
                label_url, data={"csrf": other_csrf, "action": "renew", "task_id": task_id}, headers=HTMX
            )
            assert reply.status_code == 400 and "leased to annotator" in reply.text
        assert await _annotations(stack) == annotations


async def test_text_from_the_data_is_shown_as_text(stack: Stack) -> None:
    async with signed_in(stack, "writer", "ann-2") as client:
        html = (await client.get(f"/projects/{stack.project_id}/label")).text
        csrf = _field(html, "csrf")
        for _ in range(40):
            if "hostile review" in html:
                break
            form = {"csrf": csrf, "action": "skip", "task_id": _field(html, "task_id")}
            html = (await client.post(f"/projects/{stack.project_id}/label", data=form, headers=HTMX)).text
        assert "hostile review" in html
        assert "<script>alert" not in html and "<img src=x" not in html and 'onerror="alert' not in html
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html


async def test_a_write_without_the_pages_csrf_token_is_refused_and_changes_nothing(stack: Stack) -> None:
    async with signed_in(stack, "writer", "ann-3") as client:
        html = (await client.get(f"/projects/{stack.project_id}/label")).text
        form = {"action": "submit", "task_id": _field(html, "task_id"), "item_id": _item(html), "label": "negative"}
        for token in ("", "forged"):
            reply = await client.post(f"/projects/{stack.project_id}/label", data={**form, "csrf": token})
            assert reply.status_code == 403 and "reload the page" in reply.text
        assert await _annotations(stack) == 0


async def test_a_read_only_key_sees_no_write_buttons_and_its_writes_are_refused(stack: Stack) -> None:
    async with signed_in(stack, "reader", "viewer") as client:
        projects = await client.get("/")
        assert stack.project_id in projects.text and "/label" not in projects.text and "read-only key" in projects.text
        page = await client.get(f"/projects/{stack.project_id}")
        assert page.status_code == 200 and "/label" not in page.text
        csrf = _field(projects.text, "csrf")
        form = {"csrf": csrf, "action": "submit", "task_id": "t", "item_id": "i", "label": "negative"}
        reply = await client.post(f"/projects/{stack.project_id}/label", data=form)
        assert reply.status_code == 403 and "lacks labeling:write" in reply.text
    # ... and the service refuses the key's writes anyway.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.labeling.NextTask(
            pb.NextTaskRequest(project_id=stack.project_id, annotator_id="viewer"),
            metadata=bearer(stack.keys["reader"]),
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await _annotations(stack) == 0


async def test_another_organisation_sees_none_of_the_project(stack: Stack) -> None:
    async with signed_in(stack, "other", "outsider") as client:
        projects = await client.get("/")
        assert projects.status_code == 200 and stack.project_id not in projects.text
        for path in (f"/projects/{stack.project_id}", f"/projects/{stack.project_id}/label"):
            reply = await client.get(path)
            assert reply.status_code == 404, (path, reply.status_code)


async def test_sign_in_refuses_a_wrong_or_missing_key_in_one_line(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.console.url) as client:
        wrong = await client.post("/sign-in", data={"api_key": "gmk_nope.nope", "annotator": "x"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        empty = await client.post("/sign-in", data={"api_key": "", "annotator": "x"})
        assert empty.status_code == 401 and "set-cookie" not in empty.headers
        bad_name = await client.post("/sign-in", data={"api_key": stack.keys["writer"], "annotator": "a b"})
        assert bad_name.status_code == 400 and "annotator name" in bad_name.text
        assert (await client.get("/healthz")).text == "ok"


async def test_a_reviewer_resolves_conflicts_and_publishes_a_version(stack: Stack) -> None:
    writer = bearer(stack.keys["writer"])
    project_id = f"{stack.project_id}-votes"
    await stack.labeling.CreateProject(
        pb.CreateProjectRequest(
            project_id=project_id,
            task_type=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
            labels=[pb.LabelDefinition(name="negative"), pb.LabelDefinition(name="positive")],
            settings=pb.ProjectSettings(annotations_per_item=2),
        ),
        metadata=writer,
    )
    texts = [
        "The battery died in a day.",
        "Great sound, fair price.",
        "Arrived broken and late.",
        "Works as described.",
        "The screen scratches easily.",
        "Best headset I have owned.",
    ]
    options = pb.ImportOptions(
        project_id=project_id,
        format=pb.IMPORT_FORMAT_CSV,
        source_name="votes.txt",
        csv=pb.CsvOptions(delimiter="\t", column_names=["text"], disable_quoting=True),
    )
    chunk = pb.ImportItemsRequest(chunk=("\n".join(texts) + "\n").encode())
    await stack.labeling.ImportItems(iter([pb.ImportItemsRequest(options=options), chunk]), metadata=writer)
    # Two annotators disagree on the first three items: three 1-1 ties, the review queue.
    for annotator in ("ann-a", "ann-b"):
        for _ in range(len(texts)):
            task = (
                await stack.labeling.NextTask(
                    pb.NextTaskRequest(project_id=project_id, annotator_id=annotator), metadata=writer
                )
            ).task
            position = texts.index(task.item.text)
            label = "positive" if annotator == "ann-b" and position < 3 else "negative"
            await stack.labeling.SubmitAnnotation(
                pb.SubmitAnnotationRequest(
                    project_id=project_id,
                    item_id=task.item.item_id,
                    annotator_id=annotator,
                    task_id=task.task_id,
                    labels=[label],
                ),
                metadata=writer,
            )

    async with signed_in(stack, "reader", "viewer") as reader:
        review = await reader.get(f"/projects/{project_id}/review")
        assert review.status_code == 200 and review.text.count('class="conflict"') == 3
        assert 'name="label"' not in review.text
        csrf = _field((await reader.get("/")).text, "csrf")
        refused = await reader.post(f"/projects/{project_id}/publish", data={"csrf": csrf})
        assert refused.status_code == 403

    async with signed_in(stack, "writer", "reviewer") as client:
        project = await client.get(f"/projects/{project_id}")
        assert "Review 3 conflicts" in project.text and "None published yet" in project.text
        review = await client.get(f"/projects/{project_id}/review")
        assert review.text.count('class="conflict"') == 3
        assert "<strong>ann-a</strong>: negative" in review.text and "<strong>ann-b</strong>: positive" in review.text
        item_id = re.findall(r'class="conflict" data-item-id="([^"]+)"', review.text)[0]
        form = {"csrf": _field(review.text, "csrf"), "item_id": item_id, "label": "positive"}
        resolved = await client.post(f"/projects/{project_id}/review", data=form)
        assert resolved.status_code == 303
        assert (await client.get(f"/projects/{project_id}/review")).text.count('class="conflict"') == 2
        item = await stack.labeling.GetItem(pb.GetItemRequest(project_id=project_id, item_id=item_id), metadata=writer)
        assert item.status == pb.ITEM_STATUS_RESOLVED and list(item.consensus.labels) == ["positive"]
        assert item.consensus.resolved_by == "reviewer"

        published = await client.post(
            f"/projects/{project_id}/publish", data={"csrf": form["csrf"], "description": "first <i>cut</i>"}
        )
        assert published.status_code == 303, published.text
        page = await client.get(f"/projects/{project_id}")
        assert "first &lt;i&gt;cut&lt;/i&gt;" in page.text and "None published yet" not in page.text
    versions = await stack.labeling.ListDatasetVersions(
        pb.ListDatasetVersionsRequest(project_id=project_id), metadata=writer
    )
    assert [v.version_number for v in versions.dataset_versions] == [1]
