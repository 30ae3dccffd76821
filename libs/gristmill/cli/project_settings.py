"""A project's cleaning and PII settings and its label descriptions, as ``projects create``/``update`` and
``set-labels`` take them: the options, their parsing and checks, and how ``show`` prints them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import typer

from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.cli.options import choice, comma_list
from gristmill.cli.output import enum_name, fail

DEFAULT_MAX_TEXT_CHARS = 10_000
DEFAULT_NEAR_DUPLICATE_THRESHOLD = 0.9
NEAR_DUPLICATE_POLICIES = {
    "drop": lb.NEAR_DUPLICATE_POLICY_DROP,
    "flag": lb.NEAR_DUPLICATE_POLICY_FLAG,
    "off": lb.NEAR_DUPLICATE_POLICY_OFF,
}
PII_KINDS = {enum_name(name, "PII_KIND_"): number for name, number in lb.PiiKind.items() if number}
_PATTERN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

MAX_TEXT_CHARS_OPTION = typer.Option(
    None, "--max-text-chars", min=1, help=f"drop imported texts longer than this (default {DEFAULT_MAX_TEXT_CHARS})"
)
MAX_TOKENS_OPTION = typer.Option(
    None,
    "--max-tokens",
    min=0,
    help="chat/preference: cut (oldest exchanges first) or drop conversations over this many tokens (0: no limit)",
)
TOKENIZER_OPTION = typer.Option(
    None, "--tokenizer", help="the registry base model whose tokenizer counts --max-tokens (base-models list)"
)
NEAR_DUPLICATES_OPTION = typer.Option(
    None, "--near-duplicates", help="near-duplicate texts: drop (default), flag (keep, marked) or off"
)
NEAR_DUPLICATE_THRESHOLD_OPTION = typer.Option(
    None,
    "--near-duplicate-threshold",
    help=f"similarity in (0, 1] from which texts are near duplicates (default {DEFAULT_NEAR_DUPLICATE_THRESHOLD})",
)
PII_KINDS_OPTION = typer.Option(
    None, "--pii-kinds", help=f"comma-separated PII to mask: {', '.join(PII_KINDS)}, or 'all' (the default)"
)
PII_PATTERN_OPTION = typer.Option(
    [], "--pii-pattern", help="NAME=REGEX, repeatable: also mask matches as [NAME] (update: replaces the list)"
)
STORE_RAW_TEXT_OPTION = typer.Option(
    None, "--store-raw-text/--mask-pii", help="store texts unmasked, or mask PII before storing (the default)"
)
FEEDBACK_OPTION = typer.Option(
    None,
    "--feedback/--no-feedback",
    help="chat projects: users' feedback on the models trained from this project becomes review items and SFT rows",
)
FEEDBACK_PREFERENCE_PROJECT_OPTION = typer.Option(
    None, "--feedback-preference-project", help="preference project that edits and regenerations become pairs in"
)
FEEDBACK_REVIEW_AT_OR_BELOW_OPTION = typer.Option(
    None, "--feedback-review-at-or-below", help="a rating at or below this (1-5, default 2) becomes a review item"
)
DEFAULT_FEEDBACK_REVIEW_AT_OR_BELOW = 2
LABEL_DESCRIPTION_OPTION = typer.Option(
    [], "--label-description", help='NAME="TEXT", repeatable: what a label means, shown to annotators'
)


def pii_pattern(text: str) -> lb.CustomPiiPattern:
    """``customer-number=CU-\\d{6}`` → a ``CustomPiiPattern``; the regex must compile and not match ''."""
    name, sep, regex = text.partition("=")
    name = name.strip()
    if not sep or not _PATTERN_NAME.match(name) or not regex:
        fail(f"--pii-pattern {text!r}: expected NAME=REGEX with NAME a slug (a-z, 0-9, '-', '_')", code=2)
    try:
        compiled = re.compile(regex)
    except re.error as exc:
        fail(f"--pii-pattern {text!r}: the regex does not compile: {exc}", code=2)
    if compiled.fullmatch(""):
        fail(f"--pii-pattern {text!r}: the regex matches the empty string", code=2)
    return lb.CustomPiiPattern(name=name, regex=regex)


def pii_kinds(text: str) -> list[lb.PiiKind.ValueType]:
    """``email,phone`` → the kinds; ``all`` → [] (every built-in kind)."""
    names = comma_list(text)
    if names == ["all"]:
        return []
    if not names:
        fail(f"--pii-kinds: name at least one of {', '.join(PII_KINDS)}, or 'all'", code=2)
    return [choice(name, PII_KINDS, "--pii-kinds") for name in names]


def cleaning_settings(
    *,
    max_text_chars: int | None = None,
    max_tokens: int | None = None,
    tokenizer: str | None = None,
    near_duplicates: str | None = None,
    near_duplicate_threshold: float | None = None,
    pii_kind_names: str | None = None,
    pii_patterns: Sequence[str] = (),
    store_raw_text: bool | None = None,
) -> tuple[lb.CleaningSettings, list[str]]:
    """The cleaning settings the options give, and the update-mask paths (under ``settings.cleaning``) they set."""
    cleaning = lb.CleaningSettings()
    paths: list[str] = []
    if max_text_chars is not None:
        cleaning.max_text_chars = max_text_chars
        paths.append("max_text_chars")
    if max_tokens is not None:
        cleaning.max_tokens = max_tokens
        paths.append("max_tokens")
    if tokenizer is not None:
        cleaning.tokenizer = tokenizer
        paths.append("tokenizer")
    if near_duplicates is not None:
        cleaning.near_duplicate_policy = choice(near_duplicates, NEAR_DUPLICATE_POLICIES, "--near-duplicates")
        paths.append("near_duplicate_policy")
    if near_duplicate_threshold is not None:
        if not 0 < near_duplicate_threshold <= 1:
            fail(f"--near-duplicate-threshold must be in (0, 1], got {near_duplicate_threshold:g}", code=2)
        cleaning.near_duplicate_threshold = near_duplicate_threshold
        paths.append("near_duplicate_threshold")
    if pii_kind_names is not None:
        cleaning.pii.kinds.extend(pii_kinds(pii_kind_names))
        paths.append("pii.kinds")
    if pii_patterns:
        cleaning.pii.custom_patterns.extend(pii_pattern(p) for p in pii_patterns)
        paths.append("pii.custom_patterns")
    if store_raw_text is not None:
        cleaning.pii.store_raw_text = store_raw_text
        paths.append("pii.store_raw_text")
    return cleaning, [f"settings.cleaning.{path}" for path in paths]


def feedback_settings(
    *, import_feedback: bool | None = None, preference_project: str | None = None, review_at_or_below: int | None = None
) -> tuple[lb.FeedbackSettings, list[str]]:
    """The feedback settings the options give, and the update-mask paths (under ``settings.feedback``) they set."""
    feedback = lb.FeedbackSettings()
    paths: list[str] = []
    if import_feedback is not None:
        feedback.import_feedback = import_feedback
        paths.append("import_feedback")
    if preference_project is not None:
        feedback.preference_project_id = preference_project
        paths.append("preference_project_id")
    if review_at_or_below is not None:
        feedback.review_at_or_below_rating = review_at_or_below
        paths.append("review_at_or_below_rating")
    return feedback, [f"settings.feedback.{path}" for path in paths]


def feedback_fields(feedback: lb.FeedbackSettings) -> dict[str, Any]:
    """The feedback settings for ``projects show`` (only when feedback is on: classification never has it)."""
    if not feedback.import_feedback:
        return {}
    return {
        "feedback": True,
        "feedback preference project": feedback.preference_project_id or "-",
        "feedback review at or below": feedback.review_at_or_below_rating or DEFAULT_FEEDBACK_REVIEW_AT_OR_BELOW,
    }


def label_definitions(
    names: Sequence[str], descriptions: Sequence[str], current: Sequence[lb.LabelDefinition] = ()
) -> list[lb.LabelDefinition]:
    """The labels ``names`` with their descriptions: ``NAME=TEXT`` given, else ``current``'s (kept across
    ``set-labels``); a description for a label not in ``names`` is a usage error."""
    described = {label.name: label.description for label in current}
    for text in descriptions:
        name, sep, description = text.partition("=")
        name = name.strip()
        if not sep or not name:
            fail(f'--label-description {text!r}: expected NAME="TEXT"', code=2)
        if name not in names:
            fail(f"--label-description {text!r}: {name!r} is not one of the labels ({', '.join(names)})", code=2)
        description = description.strip()
        if len(description) >= 2 and description[0] == description[-1] and description[0] in "\"'":
            description = description[1:-1]  # quotes that reached us (a quoted NAME="TEXT" in a script)
        described[name] = description
    return [lb.LabelDefinition(name=name, description=described.get(name, "")) for name in names]


def cleaning_fields(cleaning: lb.CleaningSettings) -> dict[str, Any]:
    """The cleaning settings for ``projects show`` (defaults filled in)."""
    policy = enum_name(lb.NearDuplicatePolicy.Name(cleaning.near_duplicate_policy), "NEAR_DUPLICATE_POLICY_")
    threshold = cleaning.near_duplicate_threshold or DEFAULT_NEAR_DUPLICATE_THRESHOLD
    pii = cleaning.pii
    kinds = ",".join(enum_name(lb.PiiKind.Name(k), "PII_KIND_") for k in pii.kinds) or "all"
    patterns = "".join(f" +{p.name}" for p in pii.custom_patterns)
    return {
        "max text chars": cleaning.max_text_chars or DEFAULT_MAX_TEXT_CHARS,
        "max tokens": f"{cleaning.max_tokens} ({cleaning.tokenizer})" if cleaning.max_tokens else "no limit",
        "near duplicates": f"{'drop' if policy == 'unspecified' else policy} (>= {threshold:g})",
        "pii masking": "off (raw text stored)" if pii.store_raw_text else f"{kinds}{patterns}",
    }
