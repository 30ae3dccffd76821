"""Registry store contract: every port of ``gristmill.registry.domain.ports`` behaves the same on SQLite and
PostgreSQL (``database_url`` is a fresh, empty database of each).

Ports: models (uniqueness, locks, search and paging), versions (numbering, job idempotency, completion once,
filters), aliases (history sequences, compare-and-set under the model lock), promotions (policies, pending
promotions), cards (revisions), base models, and the events written into the same transaction's outbox.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text

from gristmill.api.events.v1 import events_pb2
from gristmill.core.errors import AlreadyExistsError, NotFoundError
from gristmill.core.events.outbox import OutboxEvent
from gristmill.core.events.topics import platform_catalog
from gristmill.core.paging import Page
from gristmill.core.sql import Database
from gristmill.core.values import FileRef, Signature, TensorSpec
from gristmill.registry.domain.common import artifact_prefix
from gristmill.registry.domain.model import (
    AliasCause,
    BaseModel,
    BaseModelSource,
    CardText,
    Comparison,
    Lineage,
    Metric,
    MetricFilter,
    MetricGoal,
    ModelCard,
    ModelQuery,
    PendingPromotion,
    PromotionDecision,
    PromotionMode,
    PromotionPolicy,
    PromotionState,
    VersionDraft,
    VersionQuery,
    VersionStatus,
)
from gristmill.registry.events.payloads import OutboxEventWriter
from gristmill.registry.store.sql import SqlRegistryStore
from tests.support.databases import migrated_database

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MANIFEST = FileRef("jobs/j/manifest.json", "0" * 64, 10)


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    database = migrated_database(database_url, "registry")
    yield database
    database.dispose()


@pytest.fixture
def store(database: Database) -> SqlRegistryStore:
    return SqlRegistryStore(database, OutboxEventWriter(platform_catalog(), "registry"))


@pytest.fixture
def org() -> str:
    return f"org-{uuid.uuid4().hex[:12]}"


def _draft(job_id: str = "", metrics: tuple[Metric, ...] = (), tags: dict[str, str] | None = None) -> VersionDraft:
    return VersionDraft(
        source_prefix="jobs/j/",
        source_manifest=MANIFEST,
        signature=None,
        task="TASK_TYPE_TEXT_CLASSIFICATION",
        label_map=("a", "b"),
        metrics=metrics,
        lineage=Lineage(training_job_id=job_id, hyper_parameters={"lr": "2e-5"}),
        description="d",
        tags=tags or {},
    )


def _model(store: SqlRegistryStore, org: str, name: str, tags: dict[str, str] | None = None) -> None:
    with store.transaction() as tx:
        tx.insert_model(
            org,
            name,
            description="",
            task="TASK_TYPE_TEXT_CLASSIFICATION",
            label_map=("a", "b"),
            tags=tags or {},
            created_by="alice",
            now=T0,
        )


def _version(store: SqlRegistryStore, org: str, name: str, **kwargs: object) -> int:
    with store.transaction() as tx:
        v = tx.add_version(org, name, _draft(**kwargs), artifact_prefix_for=artifact_prefix, created_by="t", now=T0)  # type: ignore[arg-type]
        return v.version


def _ready(store: SqlRegistryStore, org: str, name: str, version: int, metrics: tuple[Metric, ...] = ()) -> None:
    with store.transaction() as tx:
        done = tx.complete_version(
            org,
            name,
            version,
            status=VersionStatus.READY,
            reason="",
            files=(),
            manifest=None,
            signature=None,
            task="TASK_TYPE_TEXT_CLASSIFICATION",
            label_map=("a", "b"),
            metrics=metrics,
            now=T0,
        )
        assert done is not None


def test_models_are_unique_per_organisation_and_round_trip(store: SqlRegistryStore, org: str) -> None:
    _model(store, org, "m", tags={"team": "nlp"})
    with pytest.raises(AlreadyExistsError, match="already exists"):
        _model(store, org, "m")
    _model(store, org + "-other", "m")  # another organisation may use the name
    with store.transaction() as tx:
        got = tx.get_model(org, "m")
        assert tx.get_model(org, "missing") is None
    assert got is not None
    assert (got.name, got.tags, got.label_map, got.latest_version, got.created_by) == (
        "m",
        {"team": "nlp"},
        ("a", "b"),
        0,
        "alice",
    )
    assert got.create_time == T0


def test_version_numbers_are_monotonic_and_jobs_unique(store: SqlRegistryStore, org: str) -> None:
    _model(store, org, "m")
    assert [_version(store, org, "m", job_id=f"j{i}") for i in range(3)] == [1, 2, 3]
    with pytest.raises(AlreadyExistsError, match="j1"):
        _version(store, org, "m", job_id="j1")
    # A failed insert consumed nothing: the next version is 4, and manual registrations share no job id.
    assert _version(store, org, "m") == 4
    assert _version(store, org, "m") == 5
    with store.transaction() as tx:
        found = tx.find_version_by_job(org, "j1")
        assert tx.find_version_by_job(org + "-x", "j1") is None
        model = tx.get_model(org, "m")
    assert found is not None and found.version == 2 and found.lineage.hyper_parameters == {"lr": "2e-5"}
    assert model is not None and model.latest_version == 5
    with pytest.raises(NotFoundError):
        _version(store, org, "missing")


def test_complete_version_happens_once(store: SqlRegistryStore, org: str) -> None:
    _model(store, org, "m")
    v = _version(store, org, "m")
    _ready(store, org, "m", v, metrics=(Metric("accuracy", 0.8, "test"), Metric("accuracy", 0.9, "test")))
    with store.transaction() as tx:
        again = tx.complete_version(
            org,
            "m",
            v,
            status=VersionStatus.FAILED,
            reason="late",
            files=(),
            manifest=None,
            signature=None,
            task="",
            label_map=(),
            metrics=(),
            now=T0,
        )
        current = tx.get_version(org, "m", v)
        pending = [p for p in tx.pending_versions() if p.organization_id == org]
    assert again is None
    assert current is not None and current.status is VersionStatus.READY
    # The last value of a repeated metric is the one filters and policies see.
    assert current.metric("accuracy", "test") == 0.9
    assert pending == []


def test_aliases_history_and_sequences(store: SqlRegistryStore, org: str) -> None:
    _model(store, org, "m")
    for _ in range(2):
        _ready(store, org, "m", _version(store, org, "m"))
    with store.transaction() as tx:
        assert tx.lock_model(org, "m") and not tx.lock_model(org, "nope")
        c1 = tx.write_alias(
            org, "m", "prod", to_version=1, actor="a", reason="r1", cause=AliasCause.MANUAL, decision=None, now=T0
        )
        decision = PromotionDecision("accuracy", "test", 2, 0.9, 1, 0.8, 0.005, True, "0.9 >= 0.8 + 0.005")
        c2 = tx.write_alias(
            org,
            "m",
            "prod",
            to_version=2,
            actor="policy",
            reason="r2",
            cause=AliasCause.POLICY,
            decision=decision,
            now=T0 + timedelta(seconds=1),
        )
        c3 = tx.write_alias(
            org, "m", "staging", to_version=1, actor="a", reason="", cause=AliasCause.MANUAL, decision=None, now=T0
        )
        c4 = tx.write_alias(
            org,
            "m",
            "staging",
            to_version=None,
            actor="b",
            reason="gone",
            cause=AliasCause.MANUAL,
            decision=None,
            now=T0,
        )
        assert tx.get_alias(org, "m", "prod") == 2 and tx.get_alias(org, "m", "staging") is None
    assert [c.sequence for c in (c1, c2, c3, c4)] == [1, 2, 3, 4]
    assert (c1.from_version, c1.to_version, c2.from_version, c2.to_version) == (None, 1, 1, 2)
    assert (c4.from_version, c4.to_version) == (1, None)
    with store.transaction() as tx:
        everything, _ = tx.alias_history(org, "m", "", Page(size=10))
        prod_page, after = tx.alias_history(org, "m", "prod", Page(size=1))
        prod_rest, end = tx.alias_history(org, "m", "prod", Page(size=1, after=after))
        model = tx.get_model(org, "m")
        v2 = tx.get_version(org, "m", 2)
    assert [c.sequence for c in everything] == [4, 3, 2, 1]
    assert [c.sequence for c in prod_page + prod_rest] == [2, 1] and end is None
    assert prod_page[0].decision == decision and prod_page[0].cause is AliasCause.POLICY
    assert model is not None and model.aliases == {"prod": 2}
    assert v2 is not None and v2.aliases == ("prod",)


def test_search_models_filters_and_pages(store: SqlRegistryStore, org: str) -> None:
    for name in ("alpha", "alpha_1", "alphax", "beta"):
        _model(store, org, name, tags={"team": "nlp" if name != "beta" else "vision"})
    _ready(store, org, "beta", _version(store, org, "beta"))
    with store.transaction() as tx:
        tx.write_alias(
            org,
            "beta",
            "production",
            to_version=1,
            actor="a",
            reason="",
            cause=AliasCause.MANUAL,
            decision=None,
            now=T0,
        )
        # '_' is a LIKE wildcard: the prefix must match literally.
        literal, _ = tx.search_models(org, ModelQuery(name_prefix="alpha_"), Page(size=10))
        first, after = tx.search_models(org, ModelQuery(name_prefix="alpha"), Page(size=2))
        second, end = tx.search_models(org, ModelQuery(name_prefix="alpha"), Page(size=2, after=after))
        tagged, _ = tx.search_models(org, ModelQuery(tags={"team": "vision"}), Page(size=10))
        aliased, _ = tx.search_models(org, ModelQuery(has_alias="production"), Page(size=10))
        other_org, _ = tx.search_models(org + "-x", ModelQuery(), Page(size=10))
    assert [m.name for m in literal] == ["alpha_1"]
    assert [m.name for m in first] == ["alpha", "alpha_1"] and after == "alpha_1"
    assert [m.name for m in second] == ["alphax"] and end is None
    assert [m.name for m in tagged] == ["beta"] == [m.name for m in aliased]
    assert other_org == []


def test_list_versions_filters(store: SqlRegistryStore, org: str) -> None:
    _model(store, org, "m")
    for accuracy in (0.7, 0.9, 0.8):
        _ready(
            store,
            org,
            "m",
            _version(store, org, "m", tags={"acc": str(accuracy)}),
            metrics=(Metric("accuracy", accuracy, "test"),),
        )
    _version(store, org, "m")  # 4, PENDING
    with store.transaction() as tx:
        tx.write_alias(
            org, "m", "prod", to_version=2, actor="a", reason="", cause=AliasCause.MANUAL, decision=None, now=T0
        )

        def versions(query: VersionQuery) -> list[int]:
            return [v.version for v in tx.list_versions(org, "m", query, Page(size=10))[0]]

        assert versions(VersionQuery()) == [4, 3, 2, 1]
        assert versions(VersionQuery(statuses=(VersionStatus.PENDING,))) == [4]
        at_least = MetricFilter("accuracy", "test", Comparison.GREATER_OR_EQUAL, 0.8)
        assert versions(VersionQuery(metric_filters=(at_least,))) == [3, 2]
        above = MetricFilter("accuracy", "test", Comparison.GREATER, 0.8)
        assert versions(VersionQuery(metric_filters=(above,))) == [2]
        # A version lacking the metric (4) never matches, even "less than".
        below = MetricFilter("accuracy", "test", Comparison.LESS, 0.75)
        assert versions(VersionQuery(metric_filters=(below,))) == [1]
        assert versions(VersionQuery(tags={"acc": "0.8"})) == [3]
        assert versions(VersionQuery(alias="prod")) == [2]
        page, after = tx.list_versions(org, "m", VersionQuery(), Page(size=3))
        rest, end = tx.list_versions(org, "m", VersionQuery(), Page(size=3, after=after))
    assert [v.version for v in page + rest] == [4, 3, 2, 1] and end is None


def test_policies_and_pending_promotions(store: SqlRegistryStore, org: str) -> None:
    _model(store, org, "m")
    policy = PromotionPolicy(
        "m",
        True,
        "production",
        "accuracy",
        "test",
        MetricGoal.MAXIMIZE,
        "",
        0.005,
        None,
        PromotionMode.MANUAL_APPROVAL,
        T0,
    )
    decision = PromotionDecision("accuracy", "test", 1, 0.9, None, None, 0.005, True, "first")
    with store.transaction() as tx:
        assert tx.put_policy(org, policy) == policy
        for i in range(3):
            tx.add_pending_promotion(
                PendingPromotion(
                    f"{org}-p{i}",
                    org,
                    "m",
                    "production" if i < 2 else "staging",
                    1,
                    None,
                    decision,
                    PromotionState.PENDING,
                    "",
                    "",
                    T0,
                    None,
                )
            )
        assert tx.supersede_pending_promotions(org, "m", alias="production", reason="moved", now=T0) == 2
        tx.decide_pending_promotion(
            org, f"{org}-p2", state=PromotionState.REJECTED, decided_by="bob", reason="no", now=T0
        )
        pending, _ = tx.list_pending_promotions(org, "", False, Page(size=10))
        decided, after = tx.list_pending_promotions(org, "m", True, Page(size=2))
        decided_rest, _ = tx.list_pending_promotions(org, "m", True, Page(size=2, after=after))
        assert tx.delete_policy(org, "m") and not tx.delete_policy(org, "m")
        assert tx.get_policy(org, "m") is None
    assert pending == []
    assert [(p.promotion_id, p.state) for p in decided + decided_rest] == [
        (f"{org}-p0", PromotionState.SUPERSEDED),
        (f"{org}-p1", PromotionState.SUPERSEDED),
        (f"{org}-p2", PromotionState.REJECTED),
    ]


def test_card_revisions(store: SqlRegistryStore, org: str) -> None:
    _model(store, org, "m")
    card = ModelCard("m", 1, 1, CardText("use"), "summary", (Metric("f1", 0.5, "test"),), "# md", None, "r", T0)
    with store.transaction() as tx:
        tx.add_card(org, card)
        tx.add_card(org, ModelCard("m", 1, 2, CardText("use 2"), "summary", (), "# md2", None, "bob", T0))
    with pytest.raises(Exception, match="edited concurrently"), store.transaction() as tx:
        tx.add_card(org, card)
    with store.transaction() as tx:
        latest = tx.latest_card(org, "m", 1)
        assert tx.latest_card(org, "m", 2) is None
    assert latest is not None and (latest.revision, latest.text.intended_use, latest.updated_by) == (2, "use 2", "bob")


def test_base_models(store: SqlRegistryStore, org: str) -> None:
    base = BaseModel(
        org,
        "minilm",
        "bert",
        ("BertModel",),
        ("TASK_TYPE_TEXT_CLASSIFICATION",),
        22_000_000,
        "apache-2.0",
        "",
        "base-models/minilm/",
        (FileRef("base-models/minilm/config.json", "1" * 64, 3),),
        "2" * 64,
        T0,
    )
    with store.transaction() as tx:
        assert tx.insert_base_model(base) == base
    with pytest.raises(AlreadyExistsError), store.transaction() as tx:
        tx.insert_base_model(base)
    with store.transaction() as tx:
        assert tx.get_base_model(org, "minilm") == base
        assert tx.list_base_models(org, "TASK_TYPE_CAUSAL_LM", Page(size=5)) == ([], None)
        assert tx.list_base_models(org, "", Page(size=5)) == ([base], None)


def test_model_updates_count_and_locks(store: SqlRegistryStore, org: str) -> None:
    _model(store, org, "m", tags={"a": "1"})
    with store.transaction() as tx:
        before = tx.count_models()
        tx.lock_model_count()
        assert tx.lock_model(org, "m") and not tx.lock_model(org, "missing")
        changed = tx.update_model(org, "m", now=T0 + timedelta(seconds=5), tags={"b": "2"}, label_map=("x",))
        untouched = tx.update_model(org, "m", now=T0 + timedelta(seconds=6))
    assert (changed.tags, changed.label_map, changed.description) == ({"b": "2"}, ("x",), "")
    assert untouched.tags == {"b": "2"} and untouched.update_time == T0 + timedelta(seconds=6)
    _model(store, org, "n")
    with store.transaction() as tx:
        assert tx.count_models() == before + 1
        with pytest.raises(NotFoundError):
            tx.update_model(org, "missing", now=T0)


def test_version_updates_latest_ready_and_pending(store: SqlRegistryStore, org: str) -> None:
    _model(store, org, "m")
    _ready(store, org, "m", _version(store, org, "m", tags={"t": "1"}))
    _version(store, org, "m")  # 2 stays PENDING
    with store.transaction() as tx:
        latest = tx.latest_ready_version(org, "m")
        assert tx.latest_ready_version(org, "missing") is None and tx.get_version(org, "m", 9) is None
        pending = [v.version for v in tx.pending_versions() if v.organization_id == org]
        edited = tx.update_version(org, "m", 1, now=T0 + timedelta(seconds=1), description="new", tags={})
        with pytest.raises(NotFoundError):
            tx.update_version(org, "m", 9, now=T0)
    assert latest is not None and latest.version == 1 and latest.tags == {"t": "1"}
    assert pending == [2]
    assert (edited.description, edited.tags, edited.status) == ("new", {}, VersionStatus.READY)


def test_latest_alias_change_and_refusal_without_model(store: SqlRegistryStore, org: str) -> None:
    _model(store, org, "m")
    _ready(store, org, "m", _version(store, org, "m"))
    with store.transaction() as tx:
        assert tx.latest_alias_change(org, "m", "prod") is None
        change = tx.write_alias(
            org, "m", "prod", to_version=1, actor="a", reason="r", cause=AliasCause.MANUAL, decision=None, now=T0
        )
        assert tx.latest_alias_change(org, "m", "prod") == change
        with pytest.raises(NotFoundError):
            tx.alias_history(org, "missing", "", Page(size=5))


def test_events_commit_with_the_transaction(store: SqlRegistryStore, database: Database, org: str) -> None:
    _model(store, org, "m")
    _ready(store, org, "m", _version(store, org, "m"))
    catalog = platform_catalog()
    topic = catalog.topic_for(events_pb2.AliasChanged)

    def alias_events() -> list[int]:
        with database.transaction() as session:
            rows = session.execute(select(OutboxEvent).where(OutboxEvent.topic == topic)).scalars()
            return [catalog.decode(row.to_event(), events_pb2.AliasChanged).sequence for row in rows]

    with pytest.raises(RuntimeError), store.transaction() as tx:
        change = tx.write_alias(
            org, "m", "prod", to_version=1, actor="a", reason="", cause=AliasCause.MANUAL, decision=None, now=T0
        )
        tx.emit_alias_changed(change)
        raise RuntimeError("rolled back")
    assert alias_events() == []
    with store.transaction() as tx:
        assert tx.get_alias(org, "m", "prod") is None  # the alias rolled back with its event
        change = tx.write_alias(
            org, "m", "prod", to_version=1, actor="a", reason="", cause=AliasCause.MANUAL, decision=None, now=T0
        )
        tx.emit_alias_changed(change)
        version = tx.get_version(org, "m", 1)
        assert version is not None
        tx.emit_version_registered(version)
    assert alias_events() == [1]


def test_json_columns_keep_their_stored_format(store: SqlRegistryStore, database: Database, org: str) -> None:
    """Rows written before the columns were mapped by ``gristmill.core.serialization`` still read back, and new
    rows are written in the same shape."""
    signature = Signature((TensorSpec("text", "BYTES", (-1,)),), (TensorSpec("p", "FP32", (-1, 2)),))
    lineage = Lineage(
        training_job_id="j",
        dataset_manifest=MANIFEST,
        dataset_files=(MANIFEST,),
        base_model=BaseModelSource(base_model_name="minilm", content_sha256="3" * 64),
        hyper_parameters={"lr": "2e-5"},
    )
    draft = VersionDraft("jobs/j/", MANIFEST, signature, "TASK_TYPE_TEXT_CLASSIFICATION", ("a",), (), lineage, "", {})
    _model(store, org, "m")
    with store.transaction() as tx:
        tx.add_version(org, "m", draft, artifact_prefix_for=artifact_prefix, created_by="t", now=T0)
    manifest = {"key": MANIFEST.key, "sha256": MANIFEST.sha256, "size_bytes": MANIFEST.size_bytes}
    with database.transaction() as session:
        stored = session.execute(
            text("SELECT source_manifest, signature, lineage FROM registry_versions WHERE organization_id = :org"),
            {"org": org},
        ).one()
        raw = [value if isinstance(value, dict) else json.loads(value) for value in stored]
        assert raw[0] == manifest
        assert raw[1] == {
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1, 2]}],
        }
        assert raw[2]["dataset_files"] == [manifest] and raw[2]["base_model"]["base_model_name"] == "minilm"
        # An older row whose lineage lacks the fields added later reads with their defaults.
        session.execute(
            text("UPDATE registry_versions SET lineage = :lineage WHERE organization_id = :org"),
            {"org": org, "lineage": '{"training_job_id": "j", "project_id": "p"}'},
        )
    with store.transaction() as tx:
        version = tx.get_version(org, "m", 1)
    assert version is not None and version.signature == signature
    assert version.lineage == Lineage(training_job_id="j", project_id="p")
