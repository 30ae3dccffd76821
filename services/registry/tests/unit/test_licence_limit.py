"""The licence's max_registered_models holds under concurrent creates: the count and the insert are one step for
every registry process sharing the database (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

from gristmill.core.errors import FailedPreconditionError
from gristmill.registry.domain.services import RegistryServices
from services.registry.tests.support import CALLER, make_env
from tests.support.concurrency import run_in_threads
from tests.support.licences import signed_license


def test_concurrent_creates_never_exceed_the_licensed_model_count(tmp_path: Path, database_url: str) -> None:
    first = make_env(tmp_path, database_url=database_url)
    second = make_env(tmp_path, database_url=database_url)  # its own engine: a second process
    with first.store.transaction() as tx:
        existing = tx.count_models()
    license_ = signed_license(limits={"max_registered_models": existing + 3})
    registries = [RegistryServices.create(env.store, env.objects, license_=license_) for env in (first, second)]
    start = threading.Barrier(8)
    created: list[str] = []
    refused: list[str] = []
    failed: list[BaseException] = []
    lock = threading.Lock()

    def create(index: int) -> None:
        name = f"m-{index}-{uuid.uuid4().hex[:8]}"
        start.wait()
        try:
            registries[index % 2].catalog.create_model(
                CALLER, name=name, description="", task="TASK_TYPE_TEXT_CLASSIFICATION", label_map=(), tags={}
            )
        except FailedPreconditionError as exc:
            with lock:
                refused.append(exc.message)
            return
        except BaseException as exc:  # anything else is the defect this test looks for
            with lock:
                failed.append(exc)
            return
        with lock:
            created.append(name)

    run_in_threads(create, range(8), timeout_s=60)
    assert not failed, failed
    assert len(created) == 3 and len(refused) == 5
    assert all("max_registered_models" in message for message in refused)
    with first.store.transaction() as tx:
        assert tx.count_models() == existing + 3
