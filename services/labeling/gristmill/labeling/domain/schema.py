"""Validation of projects, label schemas and settings, and the rules for changing a schema."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

from gristmill.core.chat import MAX_RATING, MIN_RATING
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.core.ids import validate_id
from gristmill.labeling.domain.model import (
    CleaningSettings,
    CustomPiiPattern,
    FeedbackSettings,
    LabelDefinition,
    LabelSchema,
    ProjectSettings,
    TaskType,
)
from gristmill.labeling.domain.tokens import MAX_TOKENS_LIMIT
from gristmill.labeling.tasks import labeling_task

MAX_LABEL_CHARS = 64
MAX_LABELS = 1_000
MAX_ANNOTATIONS_PER_ITEM = 100
MAX_LEASE_SECONDS = 86_400
# A text can never be longer than an import line (1 MiB), so a larger limit would mean nothing.
MAX_TEXT_CHARS_LIMIT = 1_048_576
MAX_DESCRIPTION_CHARS = 10_000
MAX_CUSTOM_PATTERNS = 50


def validate_labels(task_type: TaskType, labels: Sequence[LabelDefinition]) -> tuple[LabelDefinition, ...]:
    """The labels if they form a valid schema for ``task_type``; else ``InvalidArgumentError`` naming the problem."""
    labeling_task(task_type).check_schema(labels)
    if len(labels) > MAX_LABELS:
        raise InvalidArgumentError(f"labels: at most {MAX_LABELS} labels per schema, got {len(labels)}")
    seen: set[str] = set()
    for index, label in enumerate(labels):
        where = f"labels[{index}].name"
        name = label.name
        if not name or len(name) > MAX_LABEL_CHARS:
            raise InvalidArgumentError(f"{where}: a label name needs 1-{MAX_LABEL_CHARS} characters, got {len(name)}")
        if any(unicodedata.category(ch) == "Cc" for ch in name):
            raise InvalidArgumentError(f"{where} {name!r} contains a control character")
        if name != name.strip():
            raise InvalidArgumentError(f"{where} {name!r} has leading or trailing whitespace")
        if name in seen:
            raise InvalidArgumentError(f"{where}: label {name!r} appears twice; label names must be unique")
        if len(label.description) > MAX_DESCRIPTION_CHARS:
            raise InvalidArgumentError(f"labels[{index}].description is longer than {MAX_DESCRIPTION_CHARS} characters")
        seen.add(name)
    return tuple(labels)


def schema_change_needed(current: LabelSchema, proposed: Sequence[LabelDefinition], used: Iterable[str]) -> bool:
    """Whether ``proposed`` makes a new schema version: False when equal to ``current``;
    ``FailedPreconditionError`` when it drops a label that annotations (or resolutions) use."""
    if tuple(proposed) == current.labels:
        return False
    check_schema_change(current.names, [label.name for label in proposed], used)
    return True


def check_schema_change(current: Sequence[str], proposed: Sequence[str], used: Iterable[str]) -> None:
    """Refuse removing (or renaming, which is a removal) a label that annotations already use."""
    kept = set(proposed)
    missing = [name for name in current if name not in kept]
    used_set = set(used)
    for name in missing:
        if name in used_set:
            raise FailedPreconditionError(
                f"label {name!r} is used by existing annotations and cannot be removed or renamed; "
                "add the new label instead (or relabel those items first)"
            )


def validate_settings(settings: ProjectSettings, task_type: TaskType) -> ProjectSettings:
    """The settings of a ``task_type`` project if every value is in range; else ``InvalidArgumentError`` naming
    the field. (Whether ``cleaning.tokenizer`` exists is the registry's to say: ``ProjectUseCases`` asks it.)"""
    if not 1 <= settings.annotations_per_item <= MAX_ANNOTATIONS_PER_ITEM:
        raise InvalidArgumentError(
            f"settings.annotations_per_item must be 1-{MAX_ANNOTATIONS_PER_ITEM} (0 means 1), "
            f"got {settings.annotations_per_item}"
        )
    validate_lease_seconds(settings.lease_seconds, "settings.lease_seconds")
    validate_cleaning(settings.cleaning)
    validate_token_limit(settings.cleaning, task_type)
    validate_feedback(settings.feedback)
    return settings


def validate_lease_seconds(value: int, where: str) -> int:
    if not 1 <= value <= MAX_LEASE_SECONDS:
        raise InvalidArgumentError(f"{where} must be 1-{MAX_LEASE_SECONDS} seconds, got {value}")
    return value


def validate_cleaning(cleaning: CleaningSettings) -> None:
    if not 1 <= cleaning.max_text_chars <= MAX_TEXT_CHARS_LIMIT:
        raise InvalidArgumentError(
            f"settings.cleaning.max_text_chars must be 1-{MAX_TEXT_CHARS_LIMIT} (0 means 10000), "
            f"got {cleaning.max_text_chars}"
        )
    threshold = cleaning.near_duplicate_threshold
    if not 0.0 < threshold <= 1.0:
        raise InvalidArgumentError(
            f"settings.cleaning.near_duplicate_threshold must be in (0, 1] (0 means 0.9), got {threshold}"
        )
    patterns = cleaning.pii.custom_patterns
    if len(patterns) > MAX_CUSTOM_PATTERNS:
        raise InvalidArgumentError(f"settings.cleaning.pii.custom_patterns: at most {MAX_CUSTOM_PATTERNS} patterns")
    names: set[str] = set()
    for index, pattern in enumerate(patterns):
        validate_custom_pattern(pattern, f"settings.cleaning.pii.custom_patterns[{index}]")
        if pattern.name in names:
            raise InvalidArgumentError(
                f"settings.cleaning.pii.custom_patterns[{index}].name {pattern.name!r} appears twice"
            )
        names.add(pattern.name)


def validate_token_limit(cleaning: CleaningSettings, task_type: TaskType) -> None:
    """``max_tokens`` in range, with a ``tokenizer`` (a base-model name) to count them, on a chat or preference
    project only."""
    if not 0 <= cleaning.max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidArgumentError(
            f"settings.cleaning.max_tokens must be 0-{MAX_TOKENS_LIMIT:,} (0 means no token limit), "
            f"got {cleaning.max_tokens}",
            details={"field": "settings.cleaning.max_tokens"},
        )
    if not task_type.generative and (cleaning.max_tokens or cleaning.tokenizer):
        field = "settings.cleaning.max_tokens" if cleaning.max_tokens else "settings.cleaning.tokenizer"
        raise InvalidArgumentError(
            f"{field}: token limits apply to chat and preference projects; this project classifies texts "
            "(use settings.cleaning.max_text_chars)",
            details={"field": field},
        )
    if cleaning.max_tokens and not cleaning.tokenizer:
        raise InvalidArgumentError(
            "settings.cleaning.tokenizer is required when settings.cleaning.max_tokens is set: name the registry "
            "base model whose tokenizer counts the tokens",
            details={"field": "settings.cleaning.tokenizer"},
        )
    if cleaning.tokenizer:
        validate_id(cleaning.tokenizer, what="settings.cleaning.tokenizer")


def validate_feedback(feedback: FeedbackSettings) -> None:
    """Only the form here: whether the preference project exists and is one is checked when feedback arrives
    (it may be created later, or deleted)."""
    if feedback.preference_project_id:
        validate_id(feedback.preference_project_id, what="settings.feedback.preference_project_id")
    if not MIN_RATING <= feedback.review_at_or_below_rating <= MAX_RATING:
        raise InvalidArgumentError(
            f"settings.feedback.review_at_or_below_rating must be {MIN_RATING}-{MAX_RATING} (0 means 2), "
            f"got {feedback.review_at_or_below_rating}"
        )


def validate_custom_pattern(pattern: CustomPiiPattern, where: str) -> re.Pattern[str]:
    validate_id(pattern.name, what=f"{where}.name")
    try:
        compiled = re.compile(pattern.regex)
    except re.error as exc:
        raise InvalidArgumentError(f"{where}.regex does not compile: {exc}") from None
    if compiled.fullmatch("") is not None or compiled.search("") is not None:
        raise InvalidArgumentError(f"{where}.regex can match the empty string; it would mask nothing useful")
    return compiled


_SLUG_BAD = re.compile(r"[^a-z0-9._-]+")


def slug_from(display_name: str) -> str:
    """A project id derived from a display name ("Support Tickets (EN)" → "support-tickets-en")."""
    folded = unicodedata.normalize("NFKD", display_name).encode("ascii", "ignore").decode().lower()
    slug = _SLUG_BAD.sub("-", folded).strip("-._")
    slug = re.sub(r"\.{2,}", ".", slug)[:120].strip("-._")
    if not slug:
        raise InvalidArgumentError(
            "project_id is empty and display_name has no letters or digits to derive one from; set project_id"
        )
    return slug
