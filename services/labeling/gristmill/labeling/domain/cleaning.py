"""Text cleaning on import: Unicode and whitespace normalisation, and PII masking, of a text or of every
turn and candidate reply of a conversation.

Masking uses the platform's one masker (``gristmill.core.pii.PiiMasker``, whose kinds are the API's kinds)
so that a text is masked the same way here and in serving's prediction logs; a project's custom patterns
run before it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gristmill.core import pii as shared_pii
from gristmill.core.chat import ChatMessage, Conversation
from gristmill.labeling.domain.model import CustomPiiPattern, PiiSettings


def normalize_text(text: str) -> str:
    """NFKC, then trim and collapse every run of Unicode whitespace (including NEL, LS, PS) to one space."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.split())


# Every line boundary ``str.splitlines`` knows, as one "\n" (CR LF first, so it becomes one break).
_LINE_BREAK = re.compile(r"\r\n?|[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_TRAILING_SPACE = re.compile(r"[^\S\n]+\n")
# A run of spaces or tabs inside a line (after its first word): not the indentation that starts a line.
_INNER_SPACE = re.compile(r"(?<=\S)(?: [^\S\n]+|[^\S\n ][^\S\n]*)(?=\S)")


def normalize_turn(text: str) -> str:
    """A conversation turn's (or candidate reply's) text: NFKC and whitespace like ``normalize_text``, but
    its lines kept.

    Replies hold code, lists and tables, whose line breaks and indentation are their meaning (and what a
    model trained on them learns to write), so line breaks become "\n" instead of spaces and a line's
    leading indentation stays; a run of whitespace inside a line becomes one space, whitespace at the end
    of each line goes and the whole text is trimmed.
    """
    if not text.isascii():
        text = _LINE_BREAK.sub("\n", unicodedata.normalize("NFKC", text))
    elif "\r" in text or "\x0b" in text or "\x0c" in text or "\x1c" in text or "\x1d" in text or "\x1e" in text:
        # (Six substring tests: each a memchr, together faster than one character-class search.)
        text = _LINE_BREAK.sub("\n", text)
    if "  " in text or "\t" in text or not text.isascii():
        text = _INNER_SPACE.sub(" ", text)
    if " \n" in text or "\t\n" in text or not text.isascii():
        text = _TRAILING_SPACE.sub("\n", text)
    return text.strip()


def normalize_conversation(conversation: Conversation) -> Conversation:
    """Every turn's content and every candidate ``normalize_turn``-ed; the same object when nothing changed."""
    changed = False
    messages = []
    for message in conversation.messages:
        content = normalize_turn(message.content)
        if content != message.content:
            changed = True
            message = ChatMessage(message.role, content, message.tool_calls, message.tool_call_id, message.name)
        messages.append(message)
    candidates = tuple(normalize_turn(candidate) for candidate in conversation.candidates)
    if not changed and candidates == conversation.candidates:
        return conversation
    return Conversation(tuple(messages), candidates)


@dataclass(frozen=True)
class _Pattern:
    name: str
    regex: re.Pattern[str]
    placeholder: str


@dataclass(frozen=True)
class TextMasker:
    """A project's masking rules: custom patterns first, then the shared masker's kinds.

    Placeholders (``[EMAIL]``) contain no digits, so a later pass never re-masks an earlier one.
    """

    settings: PiiSettings
    _custom: tuple[_Pattern, ...] = field(init=False, repr=False, compare=False)
    _shared: shared_pii.PiiMasker = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kinds = frozenset(shared_pii.PiiKind(kind.value) for kind in self.settings.effective_kinds)
        object.__setattr__(self, "_custom", tuple(_custom(p) for p in self.settings.custom_patterns))
        object.__setattr__(self, "_shared", shared_pii.PiiMasker(kinds))

    @property
    def active(self) -> bool:
        """False when the project stores raw text: nothing is masked."""
        return not self.settings.store_raw_text

    def mask(self, text: str) -> tuple[str, Counter[str]]:
        """The masked text and the number of matches per API kind (or custom pattern name)."""
        found: Counter[str] = Counter()
        if not self.active:
            return text, found
        for pattern in self._custom:
            text, count = pattern.regex.subn(pattern.placeholder, text)
            if count:
                found[pattern.name] += count
        text, shared_found = self._shared.mask(text)
        for kind, count in shared_found.items():
            found[kind.value] += count
        return text, found

    def mask_conversation(self, conversation: Conversation) -> tuple[Conversation, Counter[str]]:
        """Every turn's content and tool calls and every candidate masked, and the matches of them all.

        Tool calls are JSON text: their string values are masked one by one (a number that looks like a
        phone number becomes the placeholder string), so the text stays JSON.
        """
        found: Counter[str] = Counter()
        if not self.active:
            return conversation, found
        changed = False
        messages = []
        for message in conversation.messages:
            content, count = self.mask(message.content)
            calls = message.tool_calls
            if calls:
                masked_calls = json.loads(calls)
                masked_calls = self._mask_json(masked_calls, count)
                calls = json.dumps(masked_calls, ensure_ascii=False, separators=(",", ":"))
            if count:
                found.update(count)
                changed = True
                message = ChatMessage(message.role, content, calls, message.tool_call_id, message.name)
            messages.append(message)
        candidates = []
        for candidate in conversation.candidates:
            masked, count = self.mask(candidate)
            if count:
                found.update(count)
                changed = True
            candidates.append(masked)
        if not changed:
            return conversation, found
        return Conversation(tuple(messages), tuple(candidates)), found

    def _mask_json(self, value: Any, found: Counter[str]) -> Any:
        if isinstance(value, str):
            masked, count = self.mask(value)
            found.update(count)
            return masked
        if isinstance(value, dict):
            return {key: self._mask_json(item, found) for key, item in value.items()}
        if isinstance(value, list):
            return [self._mask_json(item, found) for item in value]
        if isinstance(value, int | float) and not isinstance(value, bool):
            masked, count = self.mask(str(value))
            if count:
                found.update(count)
                return masked
        return value


def _custom(pattern: CustomPiiPattern) -> _Pattern:
    name = pattern.name.upper()
    return _Pattern(name, re.compile(pattern.regex), f"[{name}]")


def merge_counts(total: dict[str, int], found: Iterable[tuple[str, int]]) -> None:
    for name, count in found:
        total[name] = total.get(name, 0) + count
