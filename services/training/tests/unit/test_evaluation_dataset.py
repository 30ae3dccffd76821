"""``spec.evaluation_dataset_version``: the chat version whose test conversations a generative job's generation
evaluation replies to instead of its own test split (a DPO job's own test pairs are the prompts users disliked
replies to). The spec field (proto and store round trips, refusals naming it), the resolver (the version pinned by
its manifest checksum, refused when it is missing, not a chat version or without test rows; the lineage names
it), and a DPO loop on the tiny Llama scored on it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gristmill.api.training.v1 import training_pb2 as pb
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from gristmill.core.serialization import from_plain, to_plain
from gristmill.core.storage import ObjectStore
from gristmill.training.api import convert
from gristmill.training.domain import spec as d
from gristmill.training.domain.refs import DatasetRef
from gristmill.training.domain.resolve import DatasetCatalog
from gristmill.training.ml.loop import DirectorySession, ListSink, LoopRunner
from gristmill.training.tasks.preference import PreferencePair
from services.training.tests.unit.test_chat_sft import _resolver, _spec
from services.training.tests.unit.test_dpo import _loop_config as _dpo_loop_config
from services.training.tests.unit.test_sft_generation import json_conversations

FIELD = "spec.evaluation_dataset_version"


def _proto(**fields: Any) -> pb.JobSpec:
    spec = pb.JobSpec(display_name="dpo", **fields)
    spec.base_model.local_path = "/models/llama"
    spec.dataset_version.project_id, spec.dataset_version.dataset_version_id = "prefs", "v1"
    spec.evaluation_dataset_version.project_id = "chats"
    spec.evaluation_dataset_version.dataset_version_id = "v1"
    return spec


def test_the_field_round_trips_through_proto_and_the_store_format() -> None:
    spec = convert.spec_from_proto(_proto(objective=pb.OBJECTIVE_DPO))
    assert spec.evaluation_dataset == DatasetRef("chats", "v1")
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec
    assert from_plain(d.JobSpec, to_plain(spec)) == spec
    # A spec stored before the field existed reads as none, and a spec without it writes none.
    stored = to_plain(spec)
    del stored["evaluation_dataset"]
    assert from_plain(d.JobSpec, stored).evaluation_dataset is None
    assert not convert.spec_to_proto(replace(spec, evaluation_dataset=None)).HasField("evaluation_dataset_version")


def test_a_classifier_or_a_bad_reference_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidArgumentError, match="only for generative objectives") as caught:
        convert.spec_from_proto(_proto(objective=pb.OBJECTIVE_CLASSIFY))
    assert caught.value.details["field"] == FIELD
    empty = _proto()
    empty.evaluation_dataset_version.dataset_version_id = ""
    with pytest.raises(InvalidArgumentError, match="^spec.evaluation_dataset_version is required") as caught:
        convert.spec_from_proto(empty)
    assert caught.value.details["field"] == FIELD
    bad = _proto()
    bad.evaluation_dataset_version.project_id = "no spaces allowed"
    with pytest.raises(InvalidArgumentError, match="spec.evaluation_dataset_version.project_id"):
        convert.spec_from_proto(bad)


def test_the_resolver_pins_the_version_and_the_lineage_names_it(
    objects: ObjectStore, chat_version: Any, preference_version: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    chat_version(objects, "chats", "v1", train=12, held_out=4)
    spec = _spec(tiny_llama, preference_version(objects), evaluation_dataset=DatasetRef("chats", "v1"))
    resolved = _resolver(objects, tmp_path).resolve(spec).spec
    evaluation = resolved.evaluation_dataset
    assert evaluation is not None and (evaluation.project_id, evaluation.dataset_version_id) == ("chats", "v1")
    # Pinned: a resumed or repeated run reads exactly this manifest.
    assert evaluation.manifest is not None and evaluation.manifest.sha256
    assert d.flatten_hyper_parameters(resolved)["evaluation_dataset_version"] == "chats/v1"
    assert "evaluation_dataset_version" not in d.flatten_hyper_parameters(replace(resolved, evaluation_dataset=None))
    # What the run replies to: the version's test conversations.
    test = DatasetCatalog(objects).evaluation_examples(evaluation)
    assert len(test) == 4 and all(isinstance(m, dict) and "role" in m for m in test[0])


def test_a_missing_a_non_chat_or_an_untested_version_is_refused_naming_the_field(
    objects: ObjectStore,
    chat_version: Any,
    preference_version: Any,
    sentiment_version: Any,
    tiny_llama: Path,
    tmp_path: Path,
) -> None:
    resolver = _resolver(objects, tmp_path)
    prefs = preference_version(objects)
    sentiment_version(objects, "reviews", "v1")
    chat_version(objects, "chats", "untested", train=12, held_out=0)
    cases = [
        (DatasetRef("chats", "nope"), NotFoundError, "not found"),
        (DatasetRef("reviews", "v1"), FailedPreconditionError, "is a TASK_TYPE_TEXT_CLASSIFICATION version"),
        (DatasetRef(prefs.project_id, prefs.dataset_version_id), FailedPreconditionError, "TASK_TYPE_PREFERENCE"),
        (DatasetRef("chats", "untested"), FailedPreconditionError, "has no test rows"),
    ]
    for ref, error, problem in cases:
        with pytest.raises(error, match=problem) as caught:
            resolver.resolve(_spec(tiny_llama, prefs, evaluation_dataset=ref))
        assert caught.value.details["field"] == FIELD, ref
        # An auto-train template naming it is refused the same way, when the policy is set.
        with pytest.raises(error, match=problem):
            resolver.resolve_template(_spec(tiny_llama, prefs, evaluation_dataset=ref, objective=d.Objective.DPO))


def test_a_dpo_job_replies_to_the_evaluation_conversations_not_its_own_test_prompts(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """The job's own test pairs have plain-text chosen replies (no JSON metric there); the evaluation conversations
    have JSON references: the JSON metrics appear, and the loss and reward metrics stay the job's own."""
    config = _dpo_loop_config(tiny_llama, ListSink(), max_steps=2)
    own_test = [
        PreferencePair(
            [{"role": "user", "content": f"review {n}"}],
            [{"role": "assistant", "content": "fine"}],
            [{"role": "assistant", "content": "bad"}],
        )
        for n in range(6)
    ]
    config = replace(config, examples={**config.examples, "test": own_test}, json_match_keys=("sentiment",))
    without = DirectorySession(tmp_path / "own")
    LoopRunner(config, 0, 1, 0, without).run()
    assert "test_json_valid" not in without.reports[-1]

    conversations = json_conversations(6)
    assert all(json.loads(c[-1]["content"]) for c in conversations)
    scored = DirectorySession(tmp_path / "evaluation")
    LoopRunner(replace(config, generation_examples=conversations), 0, 1, 0, scored).run()
    final = scored.reports[-1]
    generated = ("test_exact_match", "test_rouge_l", "test_json_valid", "test_json_match_sentiment")
    assert set(generated) <= set(final) and all(0.0 <= final[name] <= 1.0 for name in generated), final
    assert {"test_loss", "test_reward_accuracy"} <= set(final)
