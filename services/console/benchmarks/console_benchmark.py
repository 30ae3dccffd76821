"""Console latency as people feel it, in headless Chromium, against the networked configuration.

    .venv/bin/python services/console/benchmarks/console_benchmark.py [--items 100000] [--presses 60]

What runs: the local stack's admin and labeling services as their own processes (PostgreSQL, Kafka, the S3 server
from deploy/local/stack.sh; API keys checked by admin), the console as its own process
(``python -m gristmill.console``), and Debian's Chromium driven by Selenium. Two projects: a small one (500
reviews) and a large one (``--items`` generated reviews).

What it measures (issue 21's targets):

- **key press to next item**: on the labeling page, from the Enter key's ``keydown`` to htmx's ``afterSettle`` of
  the next item, timed inside the page (``performance.now()``), one label key then Enter per item; p50 and p90
  over ``--presses`` items, on the small and on the large project;
- **project page**: the large project's page, in the browser (navigation start to ``loadEventEnd``) and at the
  console (one HTTP GET, server time included), p50 of 7 loads.

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx2

from gristmill.api.admin.v1 import admin_pb2, admin_pb2_grpc
from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as pb
from gristmill.api.labeling.v1 import labeling_pb2_grpc as pb_grpc
from gristmill.cli.platforms import LocalStack
from gristmill.cli.processes import wait_serving
from gristmill.core.auth import LABELING_WRITE

REPO = Path(__file__).resolve().parents[3]
REVIEWS = REPO.parent / "shared" / "data" / "sentiment"
WORDS = [
    "battery",
    "screen",
    "sound",
    "price",
    "delivery",
    "case",
    "charger",
    "signal",
    "camera",
    "keyboard",
    "strap",
    "button",
    "menu",
    "color",
    "size",
    "weight",
    "speaker",
    "cable",
    "manual",
    "warranty",
    "support",
    "fit",
    "finish",
    "design",
]
OPINIONS = [
    "great",
    "terrible",
    "fine",
    "awful",
    "excellent",
    "poor",
    "decent",
    "broken",
    "solid",
    "flimsy",
    "lovely",
    "useless",
]

# Timed inside the page: Enter's keydown starts a timer, htmx's afterSettle of the swapped item stops it. On the way:
# when the response arrived (htmx:beforeSwap, with the console's Server-Timing header: its own time and each service
# call's) and when the item was swapped in.
PROBE = """
window.__lat = []; window.__parts = [];
document.addEventListener('keydown', e => {
  if (e.key === 'Enter') { window.__t0 = performance.now(); window.__cur = {}; }
}, true);
document.body.addEventListener('htmx:beforeSwap', e => {
  if (window.__t0 === undefined) return;
  window.__cur.response = performance.now() - window.__t0;
  window.__cur.server = e.detail.xhr.getResponseHeader('server-timing') || '';
});
document.body.addEventListener('htmx:afterSwap', () => {
  if (window.__t0 !== undefined) window.__cur.swap = performance.now() - window.__t0;
});
document.body.addEventListener('htmx:afterSettle', () => {
  if (window.__t0 === undefined) return;
  const total = performance.now() - window.__t0;
  window.__lat.push(total); window.__cur.settle = total; window.__parts.push(window.__cur);
  window.__t0 = undefined;
});
"""


def reviews() -> list[str]:
    lines: list[str] = []
    for name in ("amazon_cells_labelled.txt", "yelp_labelled.txt"):
        lines += [line.split("\t")[0] for line in (REVIEWS / name).read_text().splitlines() if line.strip()]
    return lines


def generated(n: int, seed: int = 7) -> Iterator[str]:
    rng = random.Random(seed)
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(6))
        yield f"Review {i}: the {words} is {rng.choice(OPINIONS)}, {rng.choice(OPINIONS)} overall (#{rng.random():.8f})"


def import_items(stub: pb_grpc.LabelingServiceStub, key: str, project_id: str, texts: Iterator[str] | list[str]) -> int:
    meta = (("authorization", f"Bearer {key}"),)
    stub.CreateProject(
        pb.CreateProjectRequest(
            project_id=project_id,
            display_name=project_id,
            task_type=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
            labels=[pb.LabelDefinition(name="negative"), pb.LabelDefinition(name="positive")],
        ),
        metadata=meta,
    )
    options = pb.ImportOptions(
        project_id=project_id,
        format=pb.IMPORT_FORMAT_CSV,
        source_name=f"{project_id}.txt",
        csv=pb.CsvOptions(delimiter="\t", column_names=["text"], disable_quoting=True),
    )

    def chunks() -> Iterator[pb.ImportItemsRequest]:
        yield pb.ImportItemsRequest(options=options)
        buffer: list[str] = []
        for text in texts:
            buffer.append(text)
            if len(buffer) == 2000:
                yield pb.ImportItemsRequest(chunk=("\n".join(buffer) + "\n").encode())
                buffer = []
        if buffer:
            yield pb.ImportItemsRequest(chunk=("\n".join(buffer) + "\n").encode())

    report = stub.ImportItems(chunks(), metadata=meta, timeout=3600)
    return int(report.accepted_count)


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def item_id(driver: Any) -> str:
    return str(
        driver.execute_script("const e = document.querySelector('[data-item-id]'); return e ? e.dataset.itemId : '';")
    )


# Resolves when the item shown is no longer ``arguments[0]`` (an event listener, not polling: a harness that asked
# the browser every few milliseconds would take the CPU the measured page needs on a 2-core machine).
NEXT_ITEM = """
const before = arguments[0], done = arguments[arguments.length - 1];
const shown = () => { const e = document.querySelector('[data-item-id]'); return e ? e.dataset.itemId : ''; };
if (shown() !== '' && shown() !== before) { done(shown()); return; }
const check = () => {
  const now = shown();
  if (now !== '' && now !== before) { document.body.removeEventListener('htmx:afterSettle', check); done(now); }
};
document.body.addEventListener('htmx:afterSettle', check);
"""


def key_presses(driver: Any, url: str, presses: int) -> tuple[list[float], list[dict[str, Any]]]:
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    driver.set_script_timeout(30)
    driver.execute_script(PROBE)
    for i in range(presses):
        before = item_id(driver)
        body = driver.switch_to.active_element
        body.send_keys("1" if i % 2 else "2")
        body.send_keys(Keys.ENTER)
        driver.execute_async_script(NEXT_ITEM, before)
    # The last swap may still be settling: wait for its measurement.
    deadline = time.monotonic() + 5
    while len(driver.execute_script("return window.__lat")) < presses and time.monotonic() < deadline:
        time.sleep(0.01)
    latencies = [float(x) for x in driver.execute_script("return window.__lat")]
    return latencies, driver.execute_script("return window.__parts")


def breakdown(parts: list[dict[str, Any]]) -> dict[str, float]:
    """p50 of each stage of a key press: the response's arrival, the swap, the settle (from the keydown), and the
    console's own time and each service call's (from its Server-Timing header)."""
    series: dict[str, list[float]] = {}
    for part in parts:
        for stage in ("response", "swap", "settle"):
            if stage in part:
                series.setdefault(stage, []).append(float(part[stage]))
        for metric in filter(None, (m.strip() for m in str(part.get("server", "")).split(","))):
            name, _, duration = metric.partition(";dur=")
            series.setdefault(f"server {name}", []).append(float(duration))
    return {name: round(statistics.median(values), 1) for name, values in series.items()}


def page_loads(driver: Any, client: httpx2.Client, url: str, path: str, n: int = 7) -> tuple[list[float], list[float]]:
    in_browser, at_console = [], []
    for _ in range(n):
        driver.get(url + path)
        nav = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd - n.startTime;"
        )
        in_browser.append(float(nav))
        started = time.perf_counter()
        reply = client.get(path)
        at_console.append((time.perf_counter() - started) * 1000)
        assert reply.status_code == 200, reply.text[:300]
    return in_browser, at_console


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000, help="items in the large project")
    parser.add_argument("--presses", type=int, default=60, help="items labeled per project")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gristmill-console-bench-"))
    suffix = uuid.uuid4().hex[:8]
    local = LocalStack(work / "run", base_port=23100, group_suffix=f"bench-{suffix}")
    local.start_infrastructure()
    local.create_databases()
    # As `gristmill up` does for an installation with a group suffix: the new consumer groups start at the topics'
    # end, so the services do not replay the broker's history (other runs' events) while the key presses are timed.
    local.create_topics()
    local.start_groups_at_end()
    env = local.env()
    procs = {p.name: p for p in local.processes()}
    console: subprocess.Popen[bytes] | None = None
    try:
        admin = procs["admin"]
        admin.start(env | local.process_env(admin))
        wait_serving(local.address_of(admin), 120, process=admin)
        root = local.root_key()
        env["GRISTMILL_AUTH_SERVICE_KEY"] = root
        labeling = procs["labeling"]
        labeling.start(env | local.process_env(labeling))
        wait_serving(local.address_of(labeling), 120, process=labeling)
        with grpc.insecure_channel(local.address_of(admin)) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            meta = (("authorization", f"Bearer {root}"),)
            stub.CreateOrganization(admin_pb2.CreateOrganizationRequest(organization_id="bench"), metadata=meta)
            key = stub.CreateApiKey(
                admin_pb2.CreateApiKeyRequest(organization_id="bench", display_name="bench", scopes=[LABELING_WRITE]),
                metadata=meta,
            ).secret
        with grpc.insecure_channel(local.address_of(labeling)) as channel:
            stub = pb_grpc.LabelingServiceStub(channel)
            small = import_items(stub, key, "small", reviews()[:500])
            started = time.monotonic()
            print(f"importing {args.items:,} items into 'large' ...", flush=True)
            large = import_items(stub, key, "large", generated(args.items))
            print(f"  {large:,} accepted in {time.monotonic() - started:.0f} s", flush=True)

        http_port = 23190
        console = subprocess.Popen(
            [sys.executable, "-m", "gristmill.console"],
            env=env
            | {
                "GRISTMILL_CONSOLE_HTTP_PORT": str(http_port),
                "GRISTMILL_CONSOLE_LABELING_ADDRESS": local.address_of(labeling),
                "GRISTMILL_CONSOLE_ADMIN_ADDRESS": local.address_of(admin),
                "GRISTMILL_CONSOLE_SESSION_SECRET": "bench",
            },
            stderr=(work / "console.log").open("wb"),
        )
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx2.get(url + "/healthz").status_code == 200:
                    break
            except httpx2.HTTPError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

        driver = browser()
        try:
            with httpx2.Client(base_url=url, timeout=60) as client:
                client.post("/sign-in", data={"api_key": key, "annotator": "bench"})
                driver.get(url + "/sign-in")
                for name, value in client.cookies.items():
                    driver.add_cookie({"name": name, "value": value, "path": "/"})
                results: dict[str, Any] = {"small_items": small, "large_items": large}
                for project in ("small", "large"):
                    lat, parts = key_presses(driver, f"{url}/projects/{project}/label", args.presses)
                    results[f"keypress_{project}_ms"] = {
                        "p50": pct(lat, 0.5),
                        "p90": pct(lat, 0.9),
                        "n": len(lat),
                        "p50_by_stage": breakdown(parts),
                    }
                in_browser, at_console = page_loads(driver, client, url, "/projects/large")
                results["project_page_large_ms"] = {
                    "browser_p50": statistics.median(in_browser),
                    "console_http_p50": statistics.median(at_console),
                }
        finally:
            driver.quit()
    finally:
        if console is not None:
            console.terminate()
            console.wait(30)
        for proc in (procs["labeling"], procs["admin"]):
            proc.stop()
        local.drop_databases()

    print()
    print("| measure | p50 ms | p90 ms | target |")
    print("| --- | --- | --- | --- |")
    for project in ("small", "large"):
        r = results[f"keypress_{project}_ms"]
        items = results[f"{project}_items"]
        print(f"| key press to next item, {items:,}-item project | {r['p50']:.1f} | {r['p90']:.1f} | p50 <= 100 |")
    page = results["project_page_large_ms"]
    print(f"| project page, {large:,} items, in the browser | {page['browser_p50']:.1f} | | <= 500 |")
    print(f"| project page, {large:,} items, one HTTP GET | {page['console_http_p50']:.1f} | | |")
    print()
    for project in ("small", "large"):
        stages = results[f"keypress_{project}_ms"]["p50_by_stage"]
        print(f"key press stages, {project} project (p50 ms): " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
