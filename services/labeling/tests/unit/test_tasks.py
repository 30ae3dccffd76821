"""NextTask ordering, N distinct annotators, leases that expire, submit / update / skip."""

from __future__ import annotations

from typing import Any

import pytest

from gristmill.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.ports import PredictionTarget
from gristmill.labeling.domain.service import LabelingService


def _texts(n: int) -> list[dict[str, str]]:
    # Distinct vocabulary per item, so that no two count as near duplicates.
    words = [
        "alpha",
        "bravo",
        "charlie",
        "delta",
        "echo",
        "foxtrot",
        "golf",
        "hotel",
        "india",
        "juliet",
        "kilo",
        "lima",
    ]
    return [{"id": f"e{i}", "text": f"{words[i]} {words[(i + 5) % 12]} review {i}"} for i in range(n)]


def _drain(service: LabelingService, annotator: str, project_id: str = "p1") -> list[str]:
    """Label everything the annotator is offered (always 'pos'); the external ids in the order offered."""
    seen = []
    while True:
        task, _ = service.next_task("", project_id, annotator, None)
        if task is None:
            return seen
        seen.append(task.item.external_id)
        service.submit_annotation(
            "", project_id, task.item.item_id, annotator, task_id=task.task_id, labels=["pos"], spans=(), comment=""
        )


def test_sequential_order_and_n_distinct_annotators(
    make_project: Any, import_jsonl: Any, service: LabelingService
) -> None:
    make_project(annotations_per_item=2)
    import_jsonl("p1", _texts(4))
    assert _drain(service, "ann-a") == ["e0", "e1", "e2", "e3"]
    # An annotator never gets an item twice.
    assert _drain(service, "ann-a") == []
    assert _drain(service, "ann-b") == ["e0", "e1", "e2", "e3"]
    # Two annotations per item reached: nothing left for a third annotator.
    assert _drain(service, "ann-c") == []
    assert service.get_project("", "p1").stats.labeled_item_count == 4


def test_random_order_is_stable_per_annotator_and_differs_between_annotators(
    make_project: Any, import_jsonl: Any, service: LabelingService, clock: Any
) -> None:
    make_project(annotations_per_item=3, task_ordering=m.TaskOrdering.RANDOM)
    import_jsonl("p1", _texts(12))
    orders = {}
    for annotator in ("ann-a", "ann-b"):
        order = []
        # Peek the whole order by skipping: a skipped item is not offered again, so each call moves on.
        while (task := service.next_task("", "p1", annotator, None)[0]) is not None:
            order.append(task.item.external_id)
            service.skip_task("", "p1", task.task_id, annotator, "peeking")
        orders[annotator] = order
    assert sorted(orders["ann-a"]) == sorted(f"e{i}" for i in range(12))
    assert orders["ann-a"] != orders["ann-b"]
    assert orders["ann-a"] != sorted(orders["ann-a"], key=lambda e: int(e[1:]))
    # Stable across calls: after its lease lapses, an annotator is offered the same first item again.
    first, _ = service.next_task("", "p1", "ann-c", None)
    clock.advance(3600)
    again, _ = service.next_task("", "p1", "ann-c", None)
    assert first is not None and again is not None
    assert again.task_id != first.task_id and again.item.item_id == first.item.item_id


def test_uncertainty_first_order(make_project: Any, import_jsonl: Any, service: LabelingService) -> None:
    make_project(task_ordering=m.TaskOrdering.UNCERTAINTY_FIRST)
    import_jsonl("p1", _texts(4))

    def predict(external_id: str, top: float) -> tuple[PredictionTarget, m.Prediction]:
        return PredictionTarget(external_id=external_id), m.Prediction("clf", 1, ("pos",), {"pos": top, "neg": 1 - top})

    assert service.attach_predictions("", "p1", [predict("e0", 0.99), predict("e2", 0.55), predict("e3", 0.8)]) == 3
    # Least confident first (e2 0.55, e3 0.8, e0 0.99), then items without predictions in import order (e1).
    assert _drain(service, "ann-a") == ["e2", "e3", "e0", "e1"]


def test_a_later_prediction_of_the_same_model_version_replaces_the_earlier(
    make_project: Any, import_jsonl: Any, service: LabelingService
) -> None:
    make_project()
    import_jsonl("p1", _texts(1))
    target = PredictionTarget(external_id="e0")
    service.attach_predictions("", "p1", [(target, m.Prediction("clf", 1, ("pos",), {"pos": 0.6}))])
    service.attach_predictions("", "p1", [(target, m.Prediction("clf", 1, ("neg",), {"neg": 0.7}))])
    service.attach_predictions("", "p1", [(target, m.Prediction("clf", 2, ("pos",), {"pos": 0.9}))])
    item = service.list_items("", "p1", statuses=[], source=None, include_annotations=False, offset=0, limit=1)[0]
    assert [(p.model_version, p.labels) for p in item.predictions] == [(1, ("neg",)), (2, ("pos",))]


def test_attach_predictions_is_all_or_nothing(make_project: Any, import_jsonl: Any, service: LabelingService) -> None:
    make_project()
    import_jsonl("p1", _texts(1))
    good = (PredictionTarget(external_id="e0"), m.Prediction("clf", 1, ("pos",), {"pos": 0.9}))
    with pytest.raises(NotFoundError, match="external id 'missing'"):
        service.attach_predictions("", "p1", [good, (PredictionTarget(external_id="missing"), good[1])])
    with pytest.raises(InvalidArgumentError, match=r"outside \[0, 1\]"):
        service.attach_predictions("", "p1", [(good[0], m.Prediction("clf", 1, ("pos",), {"pos": 1.5}))])
    with pytest.raises(InvalidArgumentError, match="'maybe' is not a label"):
        service.attach_predictions("", "p1", [(good[0], m.Prediction("clf", 1, ("maybe",), {}))])
    item = service.list_items("", "p1", statuses=[], source=None, include_annotations=False, offset=0, limit=1)[0]
    assert item.predictions == ()


def test_leases_hold_an_item_and_expire(
    make_project: Any, import_jsonl: Any, service: LabelingService, clock: Any
) -> None:
    make_project(lease_seconds=60)
    import_jsonl("p1", _texts(2))
    task_a, remaining = service.next_task("", "p1", "ann-a", None)
    assert task_a is not None and task_a.item.external_id == "e0" and remaining == 2
    # Asking again while the lease holds returns the same task (safe to retry).
    again, _ = service.next_task("", "p1", "ann-a", None)
    assert again is not None and again.task_id == task_a.task_id
    # With one annotation needed, the leased item is not offered to anyone else meanwhile.
    task_b, _ = service.next_task("", "p1", "ann-b", None)
    assert task_b is not None and task_b.item.external_id == "e1"
    clock.advance(61)
    # ann-a abandoned e0: its lease expired, so it returns to the queue.
    task_c, _ = service.next_task("", "p1", "ann-c", None)
    assert task_c is not None and task_c.item.external_id == "e0"
    assert (task_c.lease_expire_time - clock.now).total_seconds() == 60


def test_a_renewed_lease_keeps_the_item_until_its_new_expiry_and_only_its_holder_renews(
    make_project: Any, import_jsonl: Any, service: LabelingService, clock: Any
) -> None:
    make_project(lease_seconds=60)
    import_jsonl("p1", _texts(2))
    task, _ = service.next_task("", "p1", "ann-a", None)
    assert task is not None
    clock.advance(50)
    expire = service.renew_task("", "p1", task.task_id, "ann-a", None)
    assert (expire - clock.now).total_seconds() == 60  # the project's lease, from now
    clock.advance(50)  # 100 s after the lease was taken: past the first expiry, within the renewed one
    other, _ = service.next_task("", "p1", "ann-b", None)
    assert other is not None and other.item.item_id != task.item.item_id
    assert (service.renew_task("", "p1", task.task_id, "ann-a", 5) - clock.now).total_seconds() == 5
    with pytest.raises(FailedPreconditionError, match="leased to annotator 'ann-a'"):
        service.renew_task("", "p1", task.task_id, "ann-b", None)
    with pytest.raises(NotFoundError, match="task"):
        service.renew_task("", "p1", "0" * 32, "ann-a", None)
    with pytest.raises(InvalidArgumentError, match="lease_seconds must be 1-86400"):
        service.renew_task("", "p1", task.task_id, "ann-a", 0)
    clock.advance(6)
    # Expired: the item went back to the queue (ann-c may hold it now); renewing cannot take it back.
    with pytest.raises(FailedPreconditionError, match="expired"):
        service.renew_task("", "p1", task.task_id, "ann-a", None)
    taken, _ = service.next_task("", "p1", "ann-c", None)
    assert taken is not None and taken.item.item_id == task.item.item_id
    # A submitted task has nothing left to renew.
    service.submit_annotation(
        "", "p1", taken.item.item_id, "ann-c", task_id=taken.task_id, labels=["pos"], spans=(), comment=""
    )
    with pytest.raises(FailedPreconditionError, match="already submitted or skipped"):
        service.renew_task("", "p1", taken.task_id, "ann-c", None)


def test_lease_seconds_override_is_validated(
    make_project: Any, import_jsonl: Any, service: LabelingService, clock: Any
) -> None:
    make_project()
    import_jsonl("p1", _texts(1))
    task, _ = service.next_task("", "p1", "ann-a", 5)
    assert task is not None and (task.lease_expire_time - clock.now).total_seconds() == 5
    with pytest.raises(InvalidArgumentError, match="lease_seconds must be 1-86400"):
        service.next_task("", "p1", "ann-b", 0)
    with pytest.raises(InvalidArgumentError, match="annotator_id"):
        service.next_task("", "p1", "Not A Slug", None)


def test_resubmitting_is_a_retry_other_labels_are_already_exists_and_update_changes_them(
    make_project: Any, import_jsonl: Any, service: LabelingService
) -> None:
    make_project()
    import_jsonl("p1", _texts(1))
    item_id = service.list_items("", "p1", statuses=[], source=None, include_annotations=False, offset=0, limit=1)[
        0
    ].item_id
    first = service.submit_annotation("", "p1", item_id, "ann-a", task_id="", labels=["neg"], spans=(), comment="")
    retried = service.submit_annotation("", "p1", item_id, "ann-a", task_id="", labels=["neg"], spans=(), comment="")
    assert retried == first, "the same submission again is a retry: the first annotation, nothing added"
    with pytest.raises(AlreadyExistsError, match="use UpdateAnnotation"):
        service.submit_annotation("", "p1", item_id, "ann-a", task_id="", labels=["pos"], spans=(), comment="")
    updated = service.update_annotation(
        "", "p1", first.annotation_id, "ann-a", labels=["pos"], spans=(), comment="sure"
    )
    assert updated.labels == ("pos",) and updated.comment == "sure"
    item = service.get_item("", "p1", item_id)
    assert len(item.annotations) == 1
    assert item.consensus.labels == ("pos",) and item.status is m.ItemStatus.LABELED
    with pytest.raises(PermissionDeniedError, match="only its author"):
        service.update_annotation("", "p1", first.annotation_id, "ann-b", labels=["neg"], spans=(), comment="")
    with pytest.raises(NotFoundError):
        service.update_annotation("", "p1", "0" * 32, "ann-a", labels=["neg"], spans=(), comment="")


@pytest.mark.parametrize(
    ("labels", "message"),
    [([], "exactly one label"), (["neg", "pos"], "exactly one label"), (["maybe"], "'maybe' is not a label")],
)
def test_bad_labels_are_refused(
    make_project: Any, import_jsonl: Any, service: LabelingService, labels: list[str], message: str
) -> None:
    make_project()
    import_jsonl("p1", _texts(1))
    item_id = service.list_items("", "p1", statuses=[], source=None, include_annotations=False, offset=0, limit=1)[
        0
    ].item_id
    with pytest.raises(InvalidArgumentError, match=message):
        service.submit_annotation("", "p1", item_id, "ann-a", task_id="", labels=labels, spans=(), comment="")


def test_submit_checks_the_item_and_the_task(make_project: Any, import_jsonl: Any, service: LabelingService) -> None:
    make_project(annotations_per_item=2)
    import_jsonl("p1", _texts(2))
    task, _ = service.next_task("", "p1", "ann-a", None)
    assert task is not None
    with pytest.raises(NotFoundError, match="item"):
        service.submit_annotation("", "p1", "0" * 32, "ann-a", task_id="", labels=["pos"], spans=(), comment="")
    with pytest.raises(NotFoundError, match="task"):
        service.submit_annotation(
            "", "p1", task.item.item_id, "ann-a", task_id="f" * 32, labels=["pos"], spans=(), comment=""
        )
    with pytest.raises(FailedPreconditionError, match="another annotator"):
        service.submit_annotation(
            "", "p1", task.item.item_id, "ann-b", task_id=task.task_id, labels=["pos"], spans=(), comment=""
        )


def test_skip_gives_the_item_back_to_others_only(
    make_project: Any, import_jsonl: Any, service: LabelingService
) -> None:
    make_project()
    import_jsonl("p1", _texts(1))
    task, _ = service.next_task("", "p1", "ann-a", None)
    assert task is not None
    with pytest.raises(FailedPreconditionError, match="leased to annotator 'ann-a'"):
        service.skip_task("", "p1", task.task_id, "ann-b", "")
    service.skip_task("", "p1", task.task_id, "ann-a", "not English")
    assert service.next_task("", "p1", "ann-a", None) == (None, 0)
    other, _ = service.next_task("", "p1", "ann-b", None)
    assert other is not None and other.item.item_id == task.item.item_id
    with pytest.raises(NotFoundError, match="task"):
        service.skip_task("", "p1", "0" * 32, "ann-a", "")


def test_resolving_an_item_overrides_the_vote(make_project: Any, import_jsonl: Any, service: LabelingService) -> None:
    make_project(annotations_per_item=2)
    import_jsonl("p1", _texts(1))
    item_id = service.list_items("", "p1", statuses=[], source=None, include_annotations=False, offset=0, limit=1)[
        0
    ].item_id
    service.submit_annotation("", "p1", item_id, "ann-a", task_id="", labels=["pos"], spans=(), comment="")
    service.submit_annotation("", "p1", item_id, "ann-b", task_id="", labels=["neg"], spans=(), comment="")
    conflict = service.list_items(
        "", "p1", statuses=[m.ItemStatus.CONFLICT], source=None, include_annotations=False, offset=0, limit=5
    )
    assert [i.item_id for i in conflict] == [item_id] and conflict[0].consensus.tied
    resolved = service.resolve_item("", "p1", item_id, "reviewer", ["neg"], "sarcasm")
    assert resolved.status is m.ItemStatus.RESOLVED
    assert resolved.consensus == m.Consensus(labels=("neg",), agreement=0.5, tied=False, resolved_by="reviewer")
    with pytest.raises(InvalidArgumentError, match="'maybe' is not a label"):
        service.resolve_item("", "p1", item_id, "reviewer", ["maybe"], "")
    with pytest.raises(NotFoundError):
        service.resolve_item("", "p1", "0" * 32, "reviewer", ["neg"], "")


def test_remaining_is_counted_up_to_its_cap(make_project: Any, import_jsonl: Any, service: LabelingService) -> None:
    import random

    from gristmill.labeling.store.annotations import REMAINING_COUNT_CAP

    rng = random.Random(5)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word() -> str:
        return "".join(rng.choice(letters) for _ in range(7))

    make_project()
    n = REMAINING_COUNT_CAP + 10
    import_jsonl("p1", [{"id": f"e{i}", "text": " ".join(word() for _ in range(8))} for i in range(n)])
    task, remaining = service.next_task("", "p1", "ann-a", None)
    # The held item and at least the cap: an exact count over every item would cost each call a full scan.
    assert task is not None and remaining == REMAINING_COUNT_CAP
    again, remaining = service.next_task("", "p1", "ann-a", None)
    assert again is not None and again.task_id == task.task_id and remaining == REMAINING_COUNT_CAP + 1
