"""The console on the embedded platform (``gristmill dev``), in headless Chromium: a team runs its loop in the
browser. A person labels with the keyboard only, a reviewer resolves a conflict between them and the data's own
labels, the project's version is published, a training job's curves grow live on its page, and the model it
trained shows as deployed. Screenshots of each page go to ``$GRISTMILL_CONSOLE_SHOTS`` (default: the test's
tmp_path)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from gristmill.cli import demo_data
from gristmill.cli.context import parse_http_address
from tests.support.browser import chromium, until
from tests.support.cli import as_json, cli, ok

pytestmark = pytest.mark.integration

PROJECT = "console-loop"
MODEL = "console-sentiment"
DEPLOYMENT = "console-serving"


def _js(browser: Any, script: str) -> Any:
    return browser.execute_script(script)


def _item_id(browser: Any) -> str:
    # Read in one script: an element found first and read later may have been swapped out by htmx in between.
    return str(_js(browser, "const e = document.querySelector('[data-item-id]'); return e ? e.dataset.itemId : '';"))


def _text(browser: Any, selector: str) -> str:
    """The text of the first element ``selector`` finds ("" while there is none)."""
    return str(
        browser.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : '';", selector
        )
    )


def _notice(browser: Any) -> str:
    return _text(browser, "#notice")


def _keys(browser: Any, *pressed: str) -> None:
    browser.switch_to.active_element.send_keys(*pressed)


def _label_with_the_keyboard(browser: Any, console: str, count: int) -> list[str]:
    """``count`` items labeled by number keys and Enter, alternating negative (1) and positive (2)."""
    from selenium.webdriver.common.keys import Keys

    browser.get(f"{console}/projects/{PROJECT}/label")
    seen = [until(lambda: _item_id(browser), "the first item")]
    # Enter before choosing: the error shows beside the item, which stays; the next answer clears it.
    _keys(browser, Keys.ENTER)
    until(lambda: "choose a label first" in _notice(browser), "the error notice")
    assert _item_id(browser) == seen[0]
    for i in range(count):
        _keys(browser, "2" if i % 2 else "1")
        _keys(browser, Keys.ENTER)
        seen.append(until(lambda: (new := _item_id(browser)) != seen[-1] and new, f"item {i + 2}"))
        assert _notice(browser) == ""
    return seen[:count]


def _curve(browser: Any) -> tuple[str, int]:
    state, points = _js(
        browser,
        "const s = document.getElementById('job-state'), c = document.getElementById('loss-chart');"
        "return [s ? s.textContent : '', c ? Number(c.dataset.points) : 0];",
    )
    return str(state), int(points)


def test_a_team_runs_its_loop_in_the_console(
    platform: str, labeled: dict[str, str], base_model: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    address = parse_http_address(platform, "console")
    assert address, platform
    console = f"http://{address}"
    shots = Path(os.environ.get("GRISTMILL_CONSOLE_SHOTS", str(tmp_path / "screenshots")))
    shots.mkdir(parents=True, exist_ok=True)

    # Every item needs two annotations: the data's own labels, imported as annotator "seed", and a person's in the
    # browser. Where they differ there is no majority: a conflict for the reviewer.
    ok(cli(platform, "projects", "create", "Console loop", "--id", PROJECT, "--labels", "negative,positive",
           "--annotators", "2"))  # fmt: skip
    items = demo_data.write_jsonl(tmp_path / "items.jsonl", 30, seed=5)
    report = as_json(cli(platform, "import", PROJECT, str(items), "--annotator", "seed", "--json"))
    assert int(report["accepted_count"]) > 20 and report["imported_label_count"] == report["accepted_count"]

    with chromium(1280, 1000) as browser:
        # Sign in with the keyboard: no key (auth is off in the embedded platform), Tab, a name, Enter.
        browser.get(f"{console}/sign-in")
        _keys(browser, Keys.TAB, "ann-a", Keys.ENTER)
        until(lambda: "Projects" in browser.title, "the projects page")
        labeled_by_a = _label_with_the_keyboard(browser, console, 20)
        assert len(set(labeled_by_a)) == 20
        browser.save_screenshot(str(shots / "label.png"))

        browser.get(f"{console}/projects/{PROJECT}/review")
        conflicts = until(lambda: _js(browser, "return document.querySelectorAll('section.conflict').length"),
                          "the conflicts")  # fmt: skip
        # Every conflict the project counts is on the page (a alternated labels, so about half disagree with seed).
        stats = as_json(cli(platform, "projects", "show", PROJECT, "--json"))["stats"]
        assert conflicts == int(stats["conflict_item_count"]) >= 5, (conflicts, stats)
        browser.save_screenshot(str(shots / "review.png"))
        first = browser.find_element(By.CSS_SELECTOR, "section.conflict")
        resolved_item = first.get_attribute("data-item-id")
        first.find_element(By.CSS_SELECTOR, "button[value=positive]").click()
        until(lambda: _js(browser, "return document.querySelectorAll('section.conflict').length") == conflicts - 1,
              "the resolved conflict to leave the queue")  # fmt: skip
        assert resolved_item not in browser.page_source

        # Publish from the project page.
        browser.get(f"{console}/projects/{PROJECT}")
        browser.find_element(By.CSS_SELECTOR, "form.publish input[name=description]").send_keys("from the console")
        browser.find_element(By.CSS_SELECTOR, "form.publish button").click()
        # Read in one script that tolerates the page being replaced meanwhile (the POST, then the redirect).
        until(lambda: "from the console" in _text(browser, "table.versions"), "the published version")
        # The charts are drawn: two labels in the version, two annotators (ann-a and the data's seed labels).
        script = "return ['labels-chart', 'annotators-chart'].map(i => document.getElementById(i)?.dataset.bars)"
        until(lambda: _js(browser, script) == ["2", "2"], "the project's two charts")
        assert "ann-a" in browser.find_element(By.CSS_SELECTOR, "table.matrix").text
        browser.save_screenshot(str(shots / "project.png"))

        # A training job: its page is open before it runs, and its curve grows as the job reports.
        job = as_json(
            cli(platform, "train", labeled["project"], "--base-model", str(base_model), "--model", MODEL,
                "--epochs", "6", "--batch-size", "8", "--max-length", "64", "--learning-rate", "0.003",
                "--no-wait", "--json")
        )["job_id"]  # fmt: skip
        browser.get(f"{console}/jobs/{job}")
        observed = [_curve(browser)]
        deadline = time.monotonic() + 300
        while observed[-1][0] != "succeeded" and time.monotonic() < deadline:
            time.sleep(0.05)
            if (now := _curve(browser)) != observed[-1]:
                observed.append(now)
        assert observed[-1][0] == "succeeded", observed
        assert observed[0][0] != "succeeded", observed  # the page was open while the job ran
        points = [p for _, p in observed]
        # The curve was drawn more than once while the page watched: at least two distinct non-empty sizes.
        assert len({p for p in points if p}) >= 2 and points == sorted(points), observed
        stream_status = _js(browser, "return document.getElementById('job-stream').textContent")
        assert stream_status.startswith("finished (succeeded)"), stream_status
        # The metrics table followed the stream: the validation accuracy the job reported is there.
        assert "validation accuracy" in browser.find_element(By.ID, "job-metrics").text
        browser.save_screenshot(str(shots / "job.png"))

        # The registry registered what the job trained; deployed, it shows on the deployments page. A version is
        # PENDING while the registry verifies its artifacts, and only a READY one can take an alias.
        version = until(lambda: next((v for v in as_json(cli(platform, "models", "versions", MODEL, "--json"))
                                      if v["lineage"]["training_job_id"] == job and v["status"].endswith("READY")),
                                     None),
                        "the registered version, READY", timeout_s=60, every_s=0.5)  # fmt: skip
        number = str(version["version"])
        ok(cli(platform, "models", "alias", "set", MODEL, "production", number, "--reason", "console e2e"))
        try:
            assert "ready" in ok(cli(platform, "deploy", MODEL, "--name", DEPLOYMENT))
            browser.get(f"{console}/deployments")
            text = browser.find_element(By.TAG_NAME, "main").text
            assert DEPLOYMENT in text and MODEL in text, text
            assert "ready" in text.lower(), text
            browser.save_screenshot(str(shots / "deployments.png"))
            browser.get(f"{console}/models/{MODEL}")
            text = browser.find_element(By.TAG_NAME, "main").text
            assert job in browser.page_source and "production" in text, text
            browser.save_screenshot(str(shots / "model.png"))
        finally:
            ok(cli(platform, "deployments", "delete", DEPLOYMENT, "--yes", "--json"))
    for name in ("label", "review", "project", "job", "deployments", "model"):
        assert (shots / f"{name}.png").stat().st_size > 5_000, name
