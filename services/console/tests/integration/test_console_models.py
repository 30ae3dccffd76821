"""The console's registry and serving pages over real HTTP, in front of the real admin, registry and serving
services on real ports with API keys on.

The registry runs on the Kafka broker and the S3 server, with two versions registered from real artifacts in S3
(verified, READY), aliases moved with reasons and a model card edited; serving runs its real gRPC API and
deployment manager over the serving tests' fake model source and classifier (no torch), with a canary and real
predictions, so the deployments page shows real counters. What must hold: the pages show what the services say,
text from the data (a description, a model card, a name in the URL) is shown as text, another organisation sees
none of it, and nothing is shown without signing in.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from pydantic import SecretStr

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as rpb
from gristmill.api.registry.v1 import registry_pb2_grpc as rpb_grpc
from gristmill.api.serving.v1 import serving_pb2 as spb
from gristmill.api.serving.v1 import serving_pb2_grpc as spb_grpc
from gristmill.console.app import ConsoleApp, build_app
from gristmill.console.domain.models import human_bytes
from gristmill.console.settings import ConsoleSettings
from gristmill.core.auth import ADMIN, LABELING_READ, REGISTRY_PROMOTE, REGISTRY_READ, SERVING_PREDICT, AuthSettings
from gristmill.core.host import Infrastructure, ServiceHost
from gristmill.core.license_service import LICENSE_METHOD_SCOPES
from gristmill.core.security import Security, build_auth_hook
from gristmill.core.settings import KafkaSettings, S3Settings
from gristmill.registry.app import METHOD_SCOPES as REGISTRY_SCOPES
from gristmill.registry.app import build_app as build_registry
from gristmill.registry.settings import RegistrySettings
from gristmill.serving.app import METHOD_SCOPES as SERVING_SCOPES
from gristmill.serving.app import PUBLIC_METHODS
from services.admin.tests.support import ROOT, RunningAdmin, bearer, running_admin
from services.registry.tests.support import upload_model
from services.serving.tests.support import ENTERPRISE, FakeLoader, build_fake_host
from tests.support.browser import chromium
from tests.support.browser import until_async as until

pytestmark = pytest.mark.integration

HOSTILE = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
LABELS = ["negative", "positive"]
SIGNATURE = common_pb2.ModelSignature(
    inputs=[common_pb2.TensorSpec(name="text", datatype="BYTES", shape=[-1])],
    outputs=[common_pb2.TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2])],
)
# The serving tests' fake source holds this model (versions 1 and 2, "production" on 1).
DEPLOYED = "sentiment"
PREDICTIONS = 12
FAILURES = 2
# What the deployments page shows for a number not measured yet.
DASH = "\u2013"


@dataclass
class ModelStack:
    admin: RunningAdmin
    registry: rpb_grpc.RegistryServiceStub
    serving: spb_grpc.ServingServiceStub
    loader: FakeLoader
    console: ConsoleApp
    keys: dict[str, str]
    model: str  # registered in the registry, organisation acme, versions 1 and 2


def _security(admin: RunningAdmin, scopes: dict[str, str], public: tuple[str, ...] = ()) -> Security:
    auth = AuthSettings(admin_address=admin.address, root_organization_id=ROOT, cache_ttl_s=0)
    hook = build_auth_hook(auth, method_scopes={**scopes, **LICENSE_METHOD_SCOPES}, embedded=False, public=public)
    return Security(hook, ENTERPRISE, auth=auth)


@asynccontextmanager
async def running_models(
    tmp_path: Path, kafka_bootstrap: str, s3_endpoint: dict[str, str]
) -> AsyncIterator[ModelStack]:
    run = uuid.uuid4().hex[:8]
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    s3 = S3Settings(
        endpoint=s3_endpoint["endpoint"],
        access_key=s3_endpoint["access_key"],
        secret_key=SecretStr(s3_endpoint["secret_key"]),
        bucket="gristmill-test",
    )
    async with running_admin(tmp_path, kafka=kafka, metering_group=f"console-models-{run}") as admin:
        await admin.create_org("acme")
        await admin.create_org("globex")
        keys = {
            "reader": await admin.create_key("acme", REGISTRY_READ, SERVING_PREDICT),
            "operator": await admin.create_key("acme", REGISTRY_PROMOTE, ADMIN),
            "other": await admin.create_key("globex", REGISTRY_READ, SERVING_PREDICT),
            "labeler": await admin.create_key("acme", LABELING_READ),
        }
        settings = RegistrySettings(
            data_dir=tmp_path / "registry",
            grpc_port=0,
            job_events_group=f"console-models-jobs-{run}",
            promotion_group=f"console-models-promotion-{run}",
            online_gate_group=f"console-models-gate-{run}",
        )
        registry_app = build_registry(settings, Infrastructure(kafka=kafka, s3=s3), _security(admin, REGISTRY_SCOPES))
        # Without the registry's consumers: the platform topics are shared with everyone's tests, and these pages
        # need none of the events (versions are registered over gRPC here).
        registry_host = ServiceHost(
            registry_app.host.platform,
            registry_app.host.registrations,
            settings,
            [],
            auth_hook=registry_app.host.auth_hook,
        )
        serving_host, _, loader = build_fake_host(
            tmp_path / "serving", security=_security(admin, SERVING_SCOPES, PUBLIC_METHODS)
        )
        registry_port = await registry_host.start()
        try:
            serving_port = await serving_host.start()
            try:
                console = build_app(
                    ConsoleSettings(
                        http_port=0,
                        admin_address=admin.address,
                        registry_address=f"127.0.0.1:{registry_port}",
                        serving_address=f"127.0.0.1:{serving_port}",
                        session_secret=SecretStr("t"),
                    )
                )
                await console.open()
                try:
                    async with (
                        grpc.aio.insecure_channel(f"127.0.0.1:{registry_port}") as registry_channel,
                        grpc.aio.insecure_channel(f"127.0.0.1:{serving_port}") as serving_channel,
                    ):
                        registry = rpb_grpc.RegistryServiceStub(registry_channel)
                        model = f"reviews-{run}"
                        await _register(registry, registry_app.host.platform.objects, keys["operator"], model)
                        serving = spb_grpc.ServingServiceStub(serving_channel)
                        await _deploy(serving, keys, loader)
                        yield ModelStack(admin, registry, serving, loader, console, keys, model)
                finally:
                    await console.close()
            finally:
                await serving_host.stop()
        finally:
            await registry_host.stop()


async def _register(stub: rpb_grpc.RegistryServiceStub, objects: object, key: str, model: str) -> None:
    """Two READY versions from artifacts in S3 (v2 the better one), production moved from v1 to v2 with a reason,
    staging on v2, and v2's card edited by a person with hostile markup in it."""
    operator = bearer(key)
    await stub.CreateRegisteredModel(
        rpb.CreateRegisteredModelRequest(
            name=model,
            description=f"Phone reviews {HOSTILE}",
            task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
            label_map=common_pb2.LabelMap(labels=LABELS),
        ),
        metadata=operator,
    )
    for number, accuracy in ((1, 0.85), (2, 0.91)):
        prefix = f"jobs/{model}-job-{number}"
        ref = upload_model(objects, prefix, metrics={"accuracy/test": accuracy})  # type: ignore[arg-type]
        version = await stub.RegisterModelVersion(
            rpb.RegisterModelVersionRequest(
                registered_model_name=model,
                source_prefix=prefix,
                manifest=common_pb2.ObjectRef(key=ref.key, sha256=ref.sha256, size_bytes=ref.size_bytes),
                signature=SIGNATURE,
                task=common_pb2.TASK_TYPE_TEXT_CLASSIFICATION,
                label_map=common_pb2.LabelMap(labels=LABELS),
                metrics=[
                    common_pb2.Metric(name="accuracy", value=accuracy, split=common_pb2.DATASET_SPLIT_TEST),
                    common_pb2.Metric(name="f1", value=accuracy - 0.02, split=common_pb2.DATASET_SPLIT_TEST),
                    common_pb2.Metric(name="loss", value=1 - accuracy, split=common_pb2.DATASET_SPLIT_VALIDATION),
                ],
                lineage=common_pb2.Lineage(
                    training_job_id=f"{model}-job-{number}",
                    dataset_version=common_pb2.DatasetVersionRef(
                        project_id="phones", dataset_version_id=f"dv-{number}"
                    ),
                    base_model=common_pb2.BaseModelRef(base_model_name="minilm"),
                    hyper_parameters={"learning_rate": "2e-05", "epochs": "3"},
                ),
                description=f"trained on phones {HOSTILE}",
                wait_for_verification=True,
            ),
            metadata=operator,
            timeout=60,
        )
        assert version.version == number and version.status == rpb.MODEL_VERSION_STATUS_READY, version
    await stub.SetAlias(
        rpb.SetAliasRequest(registered_model_name=model, alias="production", version=1), metadata=operator
    )
    await stub.SetAlias(
        rpb.SetAliasRequest(registered_model_name=model, alias="production", version=2, reason="better on test"),
        metadata=operator,
    )
    await stub.SetAlias(rpb.SetAliasRequest(registered_model_name=model, alias="staging", version=2), metadata=operator)
    await stub.UpdateModelCard(
        rpb.UpdateModelCardRequest(
            registered_model_name=model,
            version=2,
            model_card=rpb.ModelCard(intended_use=f"Route reviews. {HOSTILE}"),
            update_mask=FieldMask(paths=["intended_use"]),
        ),
        metadata=operator,
    )


async def _deploy(stub: spb_grpc.ServingServiceStub, keys: dict[str, str], loader: FakeLoader) -> None:
    """The fake model deployed on its production alias (v1) with v2 as a 25% canary, real predictions, and
    ``FAILURES`` of them failing in v2's model (its error count and rate)."""
    deployment = spb.Deployment(
        name=DEPLOYED,
        registered_model_name=DEPLOYED,
        canary=spb.CanaryRoute(target=common_pb2.ModelVersionSelector(version=2), weight=0.25),
    )
    created = await stub.CreateDeployment(
        spb.CreateDeploymentRequest(deployment=deployment, wait_until_ready=True), metadata=bearer(keys["operator"])
    )
    assert created.status.state == spb.DEPLOYMENT_STATE_READY, created.status
    for i in range(PREDICTIONS):
        pinned = common_pb2.ModelVersionSelector(version=2) if i < 2 else None
        request = spb.PredictRequest(model=DEPLOYED, texts=["great phone"], target=pinned)
        await stub.Predict(request, metadata=bearer(keys["reader"]))
    loader.of_version(2).fail_with = RuntimeError("the model broke")
    for _ in range(FAILURES):
        pinned = common_pb2.ModelVersionSelector(version=2)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Predict(
                spb.PredictRequest(model=DEPLOYED, texts=["great"], target=pinned), metadata=bearer(keys["reader"])
            )
    loader.of_version(2).fail_with = None


@pytest.fixture
async def models_stack(tmp_path: Path, kafka_bootstrap: str, s3_endpoint: dict[str, str]) -> AsyncIterator[ModelStack]:
    async with running_models(tmp_path, kafka_bootstrap, s3_endpoint) as built:
        yield built


@asynccontextmanager
async def signed_in(stack: ModelStack, key: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.console.url, follow_redirects=False, timeout=30) as client:
        reply = await client.post("/sign-in", data={"api_key": stack.keys[key], "annotator": "ann"})
        assert reply.status_code == 303, reply.text
        yield client


def _json_block(html: str, canvas: str) -> dict[str, object]:
    found = re.search(
        rf'<script type="application/json" class="chart-data" data-canvas="{canvas}">(.*?)</script>', html, re.S
    )
    assert found is not None, html[:3000]
    data: dict[str, object] = json.loads(found.group(1))
    return data


def _row(html: str, marker: str) -> str:
    found = re.search(rf"<tr\b(?:(?!</tr>).)*?{re.escape(marker)}(?:(?!</tr>).)*</tr>", html, re.S)
    assert found is not None, f"no row with {marker!r} in {html[:3000]}"
    return found.group(0)


async def test_the_models_page_lists_the_organisations_models_with_their_aliases(models_stack: ModelStack) -> None:
    stack = models_stack
    async with signed_in(stack, "reader") as client:
        page = await client.get("/models")
        assert page.status_code == 200, page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        row = _row(page.text, f'href="/models/{stack.model}"')
        assert "text classification" in row
        assert f'href="/models/{stack.model}/versions/2">v2</a>' in row
        assert "production &rarr; v2" in row and "staging &rarr; v2" in row
        # The description is data: escaped.
        assert f"Phone reviews {ESCAPED}" in row and HOSTILE not in page.text


async def test_a_models_page_shows_versions_metrics_lineage_chart_and_alias_history(models_stack: ModelStack) -> None:
    stack = models_stack
    async with signed_in(stack, "reader") as client:
        page = await client.get(f"/models/{stack.model}")
        assert page.status_code == 200, page.text
        html = page.text
        assert '<script src="/static/chart.umd.min.js" defer></script>' in html
        assert '<script src="/static/models.js" defer></script>' in html
        # Versions newest first, with their aliases, metrics and lineage.
        assert html.index('id="v2"') < html.index('id="v1"')
        v2, v1 = _row(html, 'id="v2"'), _row(html, 'id="v1"')
        assert "ready" in v2 and "production" in v2 and "staging" in v2
        assert "test accuracy 0.91" in v2 and "test f1 0.89" in v2 and "validation loss 0.09" in v2
        assert "phones" in v2 and "dv-2" in v2 and f"{stack.model}-job-2" in v2
        assert "production" not in v1 and "test accuracy 0.85" in v1 and "dv-1" in v1
        # The chart's data: the main metric (test accuracy), oldest version first.
        assert _json_block(html, "metric-chart") == {
            "metric": "test accuracy",
            "labels": ["v1", "v2"],
            "values": [0.85, 0.91],
        }
        # The alias history, newest first: staging set, production moved v1 -> v2 with its reason, production set.
        history = html[html.index("Alias history") :]
        staging, moved, created = (
            history.index("staging"),
            history.index("v1 &rarr; v2"),
            history.index("(new) &rarr; v1"),
        )
        assert staging < moved < created
        moved_row = _row(history, "v1 &rarr; v2")
        assert "better on test" in moved_row and "production" in moved_row and "manual" in moved_row
        assert HOSTILE not in html and ESCAPED in html


async def test_a_version_page_shows_its_metrics_lineage_and_model_card_as_text(models_stack: ModelStack) -> None:
    stack = models_stack
    async with signed_in(stack, "reader") as client:
        page = await client.get(f"/models/{stack.model}/versions/2")
        assert page.status_code == 200, page.text
        html = page.text
        assert "<td>test accuracy</td><td>0.91</td>" in html and "<td>validation loss</td><td>0.09</td>" in html
        assert f'href="/jobs/{stack.model}-job-2"' in html and "<code>dv-2</code>" in html and "minilm" in html
        assert "<code>learning_rate=2e-05</code>" in html
        card = re.search(r'<pre class="model-card">(.*?)</pre>', html, re.S)
        assert card is not None, html
        # The card's Markdown, with the person's hostile text, shown as text (never as markup).
        assert f"Route reviews. {ESCAPED}" in card.group(1)
        assert HOSTILE not in html
        assert "production" in html and "staging" in html

        v1 = await client.get(f"/models/{stack.model}/versions/1")
        assert v1.status_code == 200 and "test accuracy" in v1.text and "dv-1" in v1.text


async def test_hostile_or_unknown_names_and_versions_are_error_pages_with_escaped_text(
    models_stack: ModelStack,
) -> None:
    stack = models_stack
    async with signed_in(stack, "reader") as client:
        # A name with markup (no "/": it must reach the registry, not miss the route): the registry's
        # INVALID_ARGUMENT, whose message names it, as text.
        hostile = await client.get("/models/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
        assert hostile.status_code == 400, hostile.text
        assert "&lt;img src=x onerror=alert(1)&gt;" in hostile.text and "<img src=x" not in hostile.text

        for url in (f"/models/{stack.model}/versions/9", "/models/no-such-model"):
            missing = await client.get(url)
            assert missing.status_code == 404, (url, missing.text)
            assert 'class="error"' in missing.text
        bad = await client.get(f"/models/{stack.model}/versions/%3Cb%3E1")
        assert bad.status_code == 400 and "&lt;b&gt;1" in bad.text and "<b>1" not in bad.text


async def test_another_organisation_sees_none_of_it(models_stack: ModelStack) -> None:
    stack = models_stack
    async with signed_in(stack, "other") as client:
        listed = await client.get("/models")
        assert listed.status_code == 200 and stack.model not in listed.text
        for url in (f"/models/{stack.model}", f"/models/{stack.model}/versions/1", f"/models/{stack.model}/versions/2"):
            page = await client.get(url)
            assert page.status_code == 404, (url, page.text)
            assert "Phone reviews" not in page.text and "Route reviews" not in page.text
        deployments = await client.get("/deployments")
        assert deployments.status_code == 200 and f'id="deployment-{DEPLOYED}"' not in deployments.text
        assert "Nothing is deployed yet" in deployments.text


async def test_the_pages_need_a_session_and_the_scopes(models_stack: ModelStack) -> None:
    stack = models_stack
    async with httpx.AsyncClient(base_url=stack.console.url, follow_redirects=False, timeout=30) as client:
        for url in ("/models", f"/models/{stack.model}", f"/models/{stack.model}/versions/1", "/deployments"):
            reply = await client.get(url)
            assert reply.status_code == 303 and reply.headers["location"] == "/sign-in", url
    # A key without registry:read: the registry's PERMISSION_DENIED, as a page.
    async with signed_in(stack, "labeler") as client:
        denied = await client.get("/models")
        assert denied.status_code == 403, denied.text


async def test_the_deployments_page_shows_routing_and_each_loaded_versions_numbers(models_stack: ModelStack) -> None:
    stack = models_stack
    # What serving says now (after the page: the counters do not move in between, no request runs).
    async with signed_in(stack, "reader") as client:
        page = await client.get("/deployments")
    assert page.status_code == 200, page.text
    html = page.text
    deployment = await stack.serving.GetDeployment(
        spb.GetDeploymentRequest(name=DEPLOYED), metadata=bearer(stack.keys["reader"])
    )
    section = html[html.index(f'id="deployment-{DEPLOYED}"') :]
    assert "ready" in section[:300]
    assert "<dt>Target</dt><dd>alias production</dd>" in section
    assert "<dt>Canary</dt><dd>version 2, 25% of requests</dd>" in section
    loaded = {v.version: v for v in deployment.status.versions}
    assert set(loaded) == {1, 2}
    assert sum(v.request_count for v in loaded.values()) == PREDICTIONS + FAILURES
    assert (loaded[1].error_count, loaded[2].error_count) == (0, FAILURES)
    for number, v in loaded.items():
        row = _row(section, f">v{number}</a>")
        cells = re.findall(r'<td class="num">([^<]*)</td>', row)
        rate = f"{100 * v.error_count / v.request_count:.1f}%" if v.request_count else DASH
        latency = [f"{v.latency_p50_ms:.1f} ms", f"{v.latency_p99_ms:.1f} ms"] if v.request_count else [DASH, DASH]
        assert cells == [
            f"{100 * v.traffic_weight:.0f}%",
            str(v.request_count),
            str(v.error_count),
            rate,
            *latency,
            human_bytes(v.memory_bytes) or DASH,
        ], (number, row)
        assert "ready" in row
    assert "75%" in _row(section, ">v1</a>") and "25%" in _row(section, ">v2</a>")
    assert loaded[2].request_count >= 2 + FAILURES  # the pinned predictions at least
    assert f"{100 * FAILURES / loaded[2].request_count:.1f}%" in _row(section, ">v2</a>")
    # The traffic split's chart data, oldest version first.
    assert _json_block(html, "traffic-1") == {"metric": "traffic %", "labels": ["v1", "v2"], "values": [75.0, 25.0]}
    assert '<script src="/static/models.js" defer></script>' in html


async def test_a_text_is_explained_on_the_deployments_page_with_shaded_escaped_tokens(models_stack: ModelStack) -> None:
    stack = models_stack

    async def requests() -> int:
        got = await stack.serving.GetDeployment(
            spb.GetDeploymentRequest(name=DEPLOYED), metadata=bearer(stack.keys["reader"])
        )
        return sum(v.request_count for v in got.status.versions)

    async with signed_in(stack, "reader") as client:
        html = (await client.get("/deployments")).text
        section = html[html.index(f'id="deployment-{DEPLOYED}"') :]
        assert f'action="/deployments/{DEPLOYED}/explain"' in section
        found = re.search(r'name="csrf" value="([^"]+)"', section)
        assert found is not None
        csrf = found.group(1)
        before = await requests()
        text = "good food, awful <b>staff</b>"
        reply = await client.post(
            f"/deployments/{DEPLOYED}/explain", data={"csrf": csrf, "text": text}, headers={"HX-Request": "true"}
        )
        assert reply.status_code == 200, reply.text
        fragment = reply.text
        assert "<html" not in fragment and "<strong>positive</strong> (p=0.900)" in fragment
        # The fake model's explanation: +0.4 for "good", -0.4 for "awful"; text from the data shown as text.
        assert '<span class="attr-pos-4" title="+0.400">good</span>' in fragment
        assert '<span class="attr-neg-4" title="-0.400">awful</span>' in fragment
        assert '<span class="attr-0" title="+0.000">&lt;b&gt;staff&lt;/b&gt;</span>' in fragment
        assert "<b>" not in fragment
        assert await requests() == before + 1
        # Without JavaScript: the same form answers a whole page.
        page = await client.post(f"/deployments/{DEPLOYED}/explain", data={"csrf": csrf, "text": "bad"})
        assert page.status_code == 200 and "<html" in page.text and 'class="attr-pos-4"' in page.text
        # Refused, and nothing predicted: a form without the page's token, an empty text, an unknown deployment.
        counted = await requests()
        stale = await client.post(f"/deployments/{DEPLOYED}/explain", data={"csrf": "forged", "text": "good"})
        assert stale.status_code == 403 and "reload the page" in stale.text
        empty = await client.post(f"/deployments/{DEPLOYED}/explain", data={"csrf": csrf, "text": "  "})
        assert empty.status_code == 400 and "enter a text to explain" in empty.text
        unknown = await client.post("/deployments/nope/explain", data={"csrf": csrf, "text": "good"})
        assert unknown.status_code == 404 and "does not exist" in unknown.text
        assert await requests() == counted
    async with httpx.AsyncClient(base_url=stack.console.url, follow_redirects=False, timeout=30) as anonymous:
        signed_out = await anonymous.post(f"/deployments/{DEPLOYED}/explain", data={"csrf": csrf, "text": "good"})
        assert signed_out.status_code in (303, 401) and await requests() == counted


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


async def test_the_charts_draw_in_a_browser_under_the_content_security_policy(
    models_stack: ModelStack, browser: Any, tmp_path: Path
) -> None:
    stack = models_stack

    def bars(canvas: str) -> str:
        # models.js sets data-bars once Chart.js drew the chart: the scripts ran, the JSON parsed.
        script = f"const c = document.getElementById('{canvas}'); return c ? (c.dataset.bars || '') : '';"
        return str(browser.execute_script(script))

    shots = tmp_path / "screenshots"
    shots.mkdir()
    await asyncio.to_thread(browser.get, f"{stack.console.url}/sign-in")
    field = await asyncio.to_thread(browser.find_element, "name", "api_key")
    await asyncio.to_thread(field.send_keys, stack.keys["reader"] + "\n")
    await until(lambda: "/sign-in" not in browser.current_url, "the first page after signing in")
    # The projects page after signing in has no labeling service here (503): only the pages below count.
    await asyncio.to_thread(browser.get_log, "browser")
    await asyncio.to_thread(browser.get, f"{stack.console.url}/models/{stack.model}")
    assert await until(lambda: bars("metric-chart"), "the metric chart") == "2"
    await asyncio.to_thread(browser.save_screenshot, str(shots / "model.png"))
    await asyncio.to_thread(browser.get, f"{stack.console.url}/deployments")
    assert await until(lambda: bars("traffic-1"), "the traffic chart") == "2"
    await asyncio.to_thread(browser.save_screenshot, str(shots / "deployments.png"))
    # Nothing the page tried was refused (a CSP violation is logged as a SEVERE console message).
    log = await asyncio.to_thread(browser.get_log, "browser")
    projects = f"{stack.console.url}/ "  # the 503 above, should it be logged late
    errors = [
        e
        for e in log
        if e["level"] == "SEVERE" and "favicon.ico" not in e["message"] and not e["message"].startswith(projects)
    ]
    assert errors == [], errors
