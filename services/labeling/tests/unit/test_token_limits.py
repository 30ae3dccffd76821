"""Length limits in tokens of a named tokenizer: the cutting rule (with a word counter), the counter of a real
tokenizer (all-MiniLM-L6-v2's, from a local directory, without and with a chat template), imports that cut and
drop conversations with their report, and the validation of the settings."""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from gristmill.core.chat import ASSISTANT, SYSTEM, TOOL, USER, ChatMessage, Conversation
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.core.storage import LocalObjectStore
from gristmill.labeling.api import convert
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.service import LabelingService
from gristmill.labeling.domain.tokens import (
    TURN_OVERHEAD_TOKENS,
    TokenCounter,
    TokenLimit,
    Turns,
    cut_at,
    cut_points,
)
from gristmill.labeling.runtime.tokenizers import TOKENIZER_FILES, HfTokenCounter, LocalTokenizerSource
from gristmill.labeling.store import rows
from gristmill.labeling.store.sql import SqlLabelingStore
from tests.support.tiny_model import minilm_path

# A ChatML-like template (the shape of Qwen's or SmolLM's), on MiniLM's vocabulary.
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


class WordCounter(TokenCounter):
    """One token per word, one more per turn: the arithmetic of the tests is the reader's."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def count_many(self, conversations: Sequence[Turns]) -> list[int]:
        self.calls.append(len(conversations))
        return [sum(len(t.content.split()) + 1 for t in turns) for turns in conversations]


def words(count: int, word: str = "data") -> str:
    return " ".join([word] * count)


def turns(*spec: tuple[str, int]) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(role, words(n, f"w{i}")) for i, (role, n) in enumerate(spec))


# --------------------------------------------------------------------------- the rule


def test_the_oldest_exchanges_go_first_and_the_system_turns_and_last_exchange_stay() -> None:
    # system 3, then exchanges of (4+5), (4+5), (2+3): 3+1 + 10+10 + 10+10 + 3+4 = 51 words-and-turns
    conversation = Conversation(
        turns((SYSTEM, 3), (USER, 9), (ASSISTANT, 9), (USER, 9), (ASSISTANT, 9), (USER, 2), (ASSISTANT, 3))
    )
    counter = WordCounter()
    assert counter(conversation.messages) == 51
    [whole] = TokenLimit(counter, 51).apply([conversation])
    assert (whole.conversation, whole.removed_turns, whole.tokens) == (conversation, 0, 51)
    [cut] = TokenLimit(counter, 40).apply([conversation])
    assert cut.removed_turns == 2 and cut.tokens == 31
    assert cut.conversation is not None
    assert cut.conversation.messages == (conversation.messages[0], *conversation.messages[3:])
    [shortest] = TokenLimit(counter, 11).apply([conversation])
    assert shortest.removed_turns == 4 and shortest.tokens == 11
    assert shortest.conversation is not None
    assert [t.role for t in shortest.conversation.messages] == [SYSTEM, USER, ASSISTANT]
    [dropped] = TokenLimit(counter, 10).apply([conversation])
    assert dropped.dropped and dropped.tokens == 11  # the tokens of the shortest form it could have had


def test_an_exchange_keeps_its_tool_turns_and_a_single_exchange_cannot_be_cut() -> None:
    messages = turns((USER, 5), (ASSISTANT, 1), (TOOL, 5), (ASSISTANT, 2), (USER, 1), (ASSISTANT, 1))
    assert cut_points(messages) == [4]
    assert cut_at(Conversation(messages), 4).messages == messages[4:]
    [cut] = TokenLimit(WordCounter(), 6).apply([Conversation(messages)])
    assert cut.removed_turns == 4
    [single] = TokenLimit(WordCounter(), 5).apply([Conversation(turns((USER, 3), (ASSISTANT, 3)))])
    assert single.dropped and single.tokens == 8


def test_a_preference_item_must_fit_with_its_longest_candidate_and_candidates_are_never_cut() -> None:
    prompt = turns((USER, 4), (ASSISTANT, 4), (USER, 2))
    item = Conversation(prompt, ("short reply", words(6)))
    counter = WordCounter()
    # prompt 5+5+3, longest candidate 6+1
    assert TokenLimit(counter, 20).apply([item])[0].removed_turns == 0
    [cut] = TokenLimit(counter, 19).apply([item])
    assert cut.conversation == Conversation(prompt[2:], item.candidates) and cut.tokens == 10
    assert TokenLimit(counter, 9).apply([item])[0].dropped


def test_the_least_cut_is_found_for_a_batch_in_a_few_counter_calls() -> None:
    rng = random.Random(7)
    conversations = []
    for _ in range(200):
        spec: list[tuple[str, int]] = [(SYSTEM, rng.randint(1, 5))] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 12)):
            spec += [(USER, rng.randint(1, 30)), (ASSISTANT, rng.randint(1, 30))]
        conversations.append(Conversation(turns(*spec)))
    counter = WordCounter()
    limit = 60
    cuts = TokenLimit(counter, limit).apply(conversations)
    # At most: everything, the shortest cut of those over, then log2(11) rounds of binary search.
    assert len(counter.calls) <= 2 + 4
    for conversation, cut in zip(conversations, cuts, strict=True):
        # The brute force: the first cut point (fewest turns removed) that fits.
        options = [0, *cut_points(conversation.messages)]
        fitting = [p for p in options if counter((cut_at(conversation, p) if p else conversation).messages) <= limit]
        if not fitting:
            assert cut.dropped
            continue
        assert cut.conversation == (cut_at(conversation, fitting[0]) if fitting[0] else conversation)
        assert cut.tokens == counter(cut.conversation.messages) <= limit


# --------------------------------------------------------------------------- a real tokenizer


@pytest.fixture(scope="module")
def templated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM's tokenizer files with a chat template beside them."""
    directory = tmp_path_factory.mktemp("templated")
    for name in TOKENIZER_FILES:
        if (minilm_path() / name).is_file():
            shutil.copy(minilm_path() / name, directory / name)
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    return directory


@pytest.fixture(scope="module")
def tokenizers(templated_dir: Path) -> Iterator[LocalTokenizerSource]:
    source = LocalTokenizerSource({"minilm": minilm_path(), "minilm-chat": templated_dir})
    yield source
    source.close()


def test_without_a_chat_template_turns_are_summed_with_a_fixed_overhead(tokenizers: LocalTokenizerSource) -> None:
    counter = tokenizers.counter("", "minilm")
    assert isinstance(counter, HfTokenCounter) and not counter.chat_template
    conversation = (
        ChatMessage(SYSTEM, "You are nice."),
        ChatMessage(USER, "hello there how are you"),
        ChatMessage(ASSISTANT, "fine thanks"),
    )
    assert counter.lengths(["You are nice.", "hello there how are you", "fine thanks"]) == [4, 5, 2]
    assert counter(conversation) == 4 + 5 + 2 + 3 * TURN_OVERHEAD_TOKENS
    # Tool calls are text the model reads too; no truncation (the tokenizer.json says 128) and no [CLS]/[SEP].
    call = ChatMessage(ASSISTANT, "", tool_calls='{"name":"lookup"}')
    assert counter((*conversation, call)) == counter(conversation) + counter.lengths(['{"name":"lookup"}'])[0] + 4
    assert counter.lengths([words(300, "hello")]) == [300]


def test_with_a_chat_template_the_rendered_conversation_is_counted(tokenizers: LocalTokenizerSource) -> None:
    counter = tokenizers.counter("", "minilm-chat")
    assert isinstance(counter, HfTokenCounter) and counter.chat_template
    conversation = (ChatMessage(USER, "hello there"), ChatMessage(ASSISTANT, "fine thanks"))
    rendered = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nfine thanks<|im_end|>\n"
    assert counter.count_many([conversation, conversation[:1]]) == [
        counter.lengths([rendered])[0],
        counter.lengths([rendered.split("<|im_start|>assistant")[0]])[0],
    ]
    assert tokenizers.counter("", "minilm-chat") is counter  # loaded once


# --------------------------------------------------------------------------- imports


@pytest.fixture
def service(
    store: SqlLabelingStore, objects: LocalObjectStore, clock: Any, tokenizers: LocalTokenizerSource
) -> LabelingService:
    """The conftest's service, with MiniLM's tokenizer as base model ``minilm``."""
    return LabelingService(store, objects, clock=clock, tokenizers=tokenizers)


def _project(
    service: LabelingService,
    max_tokens: int,
    task_type: m.TaskType = m.TaskType.CHAT,
    project_id: str = "chat",
    tokenizer: str = "minilm",
    **cleaning: Any,
) -> m.Project:
    return service.create_project(
        "",
        project_id=project_id,
        display_name=project_id,
        description="",
        task_type=task_type,
        labels=[],
        settings=m.ProjectSettings(cleaning=m.CleaningSettings(max_tokens=max_tokens, tokenizer=tokenizer, **cleaning)),
    )


def _chat(record_id: str, *spec: tuple[str, str]) -> dict[str, Any]:
    return {"id": record_id, "messages": [{"role": role, "content": content} for role, content in spec]}


def _items(service: LabelingService, project_id: str = "chat") -> dict[str, m.Item]:
    items = service.list_items("", project_id, statuses=[], source=None, include_annotations=False, offset=0, limit=100)
    return {item.external_id: item for item in items}


def test_an_import_cuts_long_conversations_drops_hopeless_ones_and_reports_both(
    service: LabelingService, import_jsonl: Any
) -> None:
    # Every word below is one MiniLM token; a turn costs its words + 4.
    _project(service, 40)
    report = import_jsonl(
        "chat",
        [
            _chat("short", (USER, "how do i reset the router"), (ASSISTANT, "hold the button")),
            _chat(
                "long",
                (SYSTEM, "you help with the phone"),
                (USER, words(10, "first") + " mail me at ann@example.com"),
                (ASSISTANT, words(10, "answer")),
                (USER, "and the password"),
                (ASSISTANT, "it is on the label"),
            ),
            _chat("hopeless", (USER, "why"), (ASSISTANT, words(60, "because"))),
        ],
    )
    assert (report.received_count, report.accepted_count) == (3, 2)
    assert (report.truncated_count, report.truncated_turn_count, report.dropped_too_many_tokens_count) == (1, 2, 1)
    drops = {drop.external_id: drop for drop in report.drops}
    assert drops["long"].reason is m.DropReason.TRUNCATED
    assert (drops["long"].removed_turn_count, drops["long"].token_count) == (2, (5 + 4) + (3 + 4) + (5 + 4))
    assert drops["hopeless"].reason is m.DropReason.TOO_MANY_TOKENS and drops["hopeless"].token_count == 5 + 64
    assert "short" not in drops
    items = _items(service)
    long = items["long"].conversation
    assert long is not None
    assert [(t.role, t.content) for t in long.messages] == [
        (SYSTEM, "you help with the phone"),
        (USER, "and the password"),
        (ASSISTANT, "it is on the label"),
    ]
    # The e-mail address was in a removed turn: nothing of it is stored, and it is not counted as masked.
    assert report.pii_masked_item_count == 0 and report.pii_masked_by_kind == {}
    stored = service.get_import("", "chat", report.import_id)
    assert (stored.truncated_count, stored.truncated_turn_count, stored.dropped_too_many_tokens_count) == (1, 2, 1)
    assert stored.drops == report.drops


def test_masks_of_kept_turns_are_counted_and_the_limit_counts_the_masked_text(
    service: LabelingService, import_jsonl: Any
) -> None:
    _project(service, 30)
    report = import_jsonl(
        "chat",
        [
            _chat(
                "c",
                (USER, words(20, "old")),
                (ASSISTANT, "ok"),
                (USER, "write to bob@example.com"),
                (ASSISTANT, "done"),
            )
        ],
    )
    assert report.truncated_count == 1 and report.pii_masked_by_kind == {"EMAIL": 1}
    kept = _items(service)["c"].conversation
    assert kept is not None and kept.messages[0].content == "write to [EMAIL]"


def test_a_preference_import_keeps_the_candidates_whole(service: LabelingService, import_jsonl: Any) -> None:
    _project(service, 30, m.TaskType.PREFERENCE, "pref")
    report = import_jsonl(
        "pref",
        [
            {
                "id": "fits-when-cut",
                "prompt": [
                    {"role": USER, "content": words(12, "earlier")},
                    {"role": ASSISTANT, "content": "sure"},
                    {"role": USER, "content": "pick a colour"},
                ],
                "chosen": [{"role": ASSISTANT, "content": "blue"}],
                "rejected": [{"role": ASSISTANT, "content": words(15, "green")}],
            },
            {"id": "too-long-candidate", "prompt": "pick", "candidates": ["red", words(40, "yellow")]},
        ],
    )
    assert (report.accepted_count, report.truncated_count, report.dropped_too_many_tokens_count) == (1, 1, 1)
    item = _items(service, "pref")["fits-when-cut"].conversation
    assert item is not None
    assert [t.content for t in item.messages] == ["pick a colour"]
    assert sorted(item.candidates) == sorted(["blue", words(15, "green")])


def test_the_character_limit_still_applies_first(service: LabelingService, import_jsonl: Any) -> None:
    _project(service, 1_000, max_text_chars=50)
    report = import_jsonl("chat", [_chat("c", (USER, words(20, "word")), (ASSISTANT, "fine"))])
    assert (report.dropped_too_long_count, report.dropped_too_many_tokens_count, report.truncated_count) == (1, 0, 0)


def test_an_import_is_refused_when_the_tokenizer_is_gone(
    service: LabelingService, tokenizers: LocalTokenizerSource
) -> None:
    tokenizers.directories["short-lived"] = minilm_path()
    _project(service, 100, tokenizer="short-lived")
    del tokenizers.directories["short-lived"]
    with pytest.raises(FailedPreconditionError, match=r"'short-lived' \(settings.cleaning.tokenizer\), which no lon"):
        service.begin_import("", m.ImportOptions(project_id="chat", format=m.ImportFormat.JSONL))


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("task_type", "cleaning", "message"),
    [
        (m.TaskType.CHAT, {"max_tokens": 100}, r"^settings.cleaning.tokenizer is required when settings.cleaning.max"),
        (m.TaskType.CHAT, {"max_tokens": -1, "tokenizer": "minilm"}, r"^settings.cleaning.max_tokens must be 0-1,000,"),
        (m.TaskType.CHAT, {"max_tokens": 1_000_001, "tokenizer": "minilm"}, r"^settings.cleaning.max_tokens must be"),
        (m.TaskType.CHAT, {"max_tokens": 10, "tokenizer": "Mini LM"}, r"^settings.cleaning.tokenizer 'Mini LM' is not"),
        (
            m.TaskType.TEXT_CLASSIFICATION,
            {"max_tokens": 10, "tokenizer": "minilm"},
            r"^settings.cleaning.max_tokens: token limits apply to chat and preference projects",
        ),
        (m.TaskType.TEXT_CLASSIFICATION, {"tokenizer": "minilm"}, r"^settings.cleaning.tokenizer: token limits apply"),
        (
            m.TaskType.PREFERENCE,
            {"max_tokens": 10, "tokenizer": "no-such-model"},
            r"^settings.cleaning.tokenizer: base model 'no-such-model' does not exist in the registry$",
        ),
    ],
)
def test_bad_token_settings_are_refused_naming_the_field_and_nothing_is_stored(
    service: LabelingService, task_type: m.TaskType, cleaning: dict[str, Any], message: str
) -> None:
    labels = [m.LabelDefinition("a"), m.LabelDefinition("b")] if not task_type.generative else []
    with pytest.raises(InvalidArgumentError, match=message):
        service.create_project(
            "",
            project_id="p",
            display_name="p",
            description="",
            task_type=task_type,
            labels=labels,
            settings=m.ProjectSettings(cleaning=m.CleaningSettings(**cleaning)),
        )
    assert service.list_projects("", offset=0, limit=10) == []


def test_an_update_naming_a_missing_tokenizer_changes_nothing(service: LabelingService) -> None:
    project = _project(service, 0, tokenizer="")
    settings = m.ProjectSettings(cleaning=m.CleaningSettings(max_tokens=64, tokenizer="gone"))
    with pytest.raises(InvalidArgumentError, match=r"^settings.cleaning.tokenizer: base model 'gone' does not exist"):
        service.update_project("", "chat", display_name=None, description=None, settings=settings)
    assert service.get_project("", "chat").settings == project.settings
    good = m.ProjectSettings(cleaning=m.CleaningSettings(max_tokens=64, tokenizer="minilm"))
    updated = service.update_project("", "chat", display_name=None, description=None, settings=good)
    assert (updated.settings.cleaning.max_tokens, updated.settings.cleaning.tokenizer) == (64, "minilm")


def test_a_tokenizer_that_does_not_load_is_refused_naming_the_field(
    service: LabelingService, tokenizers: LocalTokenizerSource, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text("{}")
    tokenizers.directories["broken"] = tmp_path
    try:
        with pytest.raises(InvalidArgumentError, match=r"^settings.cleaning.tokenizer: the tokenizer of base model 'b"):
            _project(service, 100, tokenizer="broken")
    finally:
        del tokenizers.directories["broken"]
    assert service.list_projects("", offset=0, limit=10) == []


def test_without_a_tokenizer_source_a_token_limit_is_a_failed_precondition(
    store: SqlLabelingStore, objects: LocalObjectStore
) -> None:
    plain = LabelingService(store, objects)
    with pytest.raises(FailedPreconditionError, match="no registry to load tokenizers from"):
        _project(plain, 10)


def test_settings_and_reports_stored_before_token_limits_read_the_defaults() -> None:
    settings = rows.settings_to_json(m.ProjectSettings(cleaning=m.CleaningSettings(max_tokens=9, tokenizer="x")))
    assert rows.settings_from_json(settings).cleaning.max_tokens == 9
    for key in ("max_tokens", "tokenizer"):
        del settings["cleaning"][key]
    assert rows.settings_from_json(settings).cleaning == m.CleaningSettings()
    from datetime import UTC, datetime

    report = m.ImportReport("i", "p", "s", datetime(2026, 1, 1, tzinfo=UTC), truncated_count=2)
    report.drops.append(m.DroppedRecord(1, "e", m.DropReason.TRUNCATED, removed_turn_count=2, token_count=30))
    data = rows.report_to_json(report)
    assert rows.report_from_json(data) == report
    for key in ("truncated_count", "truncated_turn_count", "dropped_too_many_tokens_count"):
        del data[key]
    for drop in data["drops"]:
        del drop["removed_turn_count"], drop["token_count"]
    old = rows.report_from_json(data)
    assert old.truncated_count == 0 and old.drops[0].token_count == 0


def test_the_api_carries_the_settings_and_the_report() -> None:
    settings = m.ProjectSettings(cleaning=m.CleaningSettings(max_tokens=512, tokenizer="minilm"))
    message = convert.settings_out(settings)
    assert (message.cleaning.max_tokens, message.cleaning.tokenizer) == (512, "minilm")
    assert convert.settings_in(message) == settings
    from datetime import UTC, datetime

    report = m.ImportReport(
        "i",
        "p",
        "s",
        datetime(2026, 1, 1, tzinfo=UTC),
        truncated_count=1,
        truncated_turn_count=4,
        dropped_too_many_tokens_count=2,
    )
    report.drops.append(m.DroppedRecord(3, "e", m.DropReason.TOO_MANY_TOKENS, token_count=700))
    out = convert.report_out(report)
    assert (out.truncated_count, out.truncated_turn_count, out.dropped_too_many_tokens_count) == (1, 4, 2)
    assert out.drops[0].reason == convert.pb.DROP_REASON_TOO_MANY_TOKENS and out.drops[0].token_count == 700
