"""The console in headless Chromium (Debian's ``chromium`` and ``chromedriver``, driven by Selenium): a person signs
in and labels with the keyboard only. The pages' screenshots are saved beside the test's files."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gristmill.api.labeling.v1 import labeling_pb2 as pb
from services.admin.tests.support import bearer
from services.console.tests.support import Stack
from tests.support.browser import chromium
from tests.support.browser import until_async as until

pytestmark = pytest.mark.integration


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


async def test_sign_in_and_label_with_the_keyboard_only(stack: Stack, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    def run(fn: Callable[..., Any], *args: Any) -> Any:
        return asyncio.to_thread(fn, *args)

    def item_id() -> str:
        # Read in one script: an element found first and read later may have been swapped out in between.
        return str(
            browser.execute_script(
                "const e = document.querySelector('[data-item-id]'); return e ? e.dataset.itemId : '';"
            )
        )

    def chosen() -> str:
        return str(
            browser.execute_script(
                "const e = document.querySelector('input[type=radio]:checked'); return e ? e.value : '';"
            )
        )

    def keys(*pressed: str) -> None:
        browser.switch_to.active_element.send_keys(*pressed)

    shots = tmp_path / "screenshots"
    shots.mkdir()
    await run(browser.get, f"{stack.console.url}/sign-in")
    await run(browser.save_screenshot, str(shots / "sign-in.png"))
    # Typing, Tab and Enter: the sign-in form without the mouse.
    await run(keys, stack.keys["writer"], Keys.TAB, "ann-kb", Keys.ENTER)
    await until(lambda: "Projects" in browser.title, "the projects page")
    assert stack.project_id in browser.page_source
    await run(browser.save_screenshot, str(shots / "projects.png"))

    await run(browser.get, f"{stack.console.url}/projects/{stack.project_id}/label")
    first = await until(item_id, "the first item")
    await run(browser.save_screenshot, str(shots / "label.png"))
    seen = [first]
    for i in range(20):
        # A number key chooses the label, Enter submits; htmx swaps the next item in.
        await run(keys, "2" if i % 2 else "1")
        await run(keys, Keys.ENTER)
        seen.append(await until(lambda: (new := item_id()) != seen[-1] and new, f"item {i + 2}"))
    labeled = seen[:20]
    assert len(set(labeled)) == 20

    # u: back to the 20th item, its label (positive, key 2) chosen; 1 and Enter change it to negative.
    await run(keys, "u")
    await until(lambda: item_id() == labeled[-1], "the undone item")
    assert await run(chosen) == "positive"
    await run(keys, "1")
    await run(keys, Keys.ENTER)
    current = await until(lambda: (new := item_id()) not in ("", labeled[-1]) and new, "the queue again")
    # s: skipped, and the next one comes.
    await run(keys, "s")
    await until(lambda: (new := item_id()) not in ("", current) and new, "the item after the skip")

    project = await stack.labeling.GetProject(
        pb.GetProjectRequest(project_id=stack.project_id), metadata=bearer(stack.keys["writer"])
    )
    assert project.stats.annotation_count == 20
    changed = await stack.labeling.GetItem(
        pb.GetItemRequest(project_id=stack.project_id, item_id=labeled[-1]), metadata=bearer(stack.keys["writer"])
    )
    assert [list(a.labels) for a in changed.annotations] == [["negative"]]
    for name in ("sign-in", "projects", "label"):
        assert (shots / f"{name}.png").stat().st_size > 5_000
