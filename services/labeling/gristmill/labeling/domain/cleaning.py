"""Text cleaning on import: Unicode and whitespace normalisation, and PII masking.

Masking uses the platform's one masker (``gristmill.core.pii.PiiMasker``, whose kinds are the API's kinds)
so that a text is masked the same way here and in serving's prediction logs; a project's custom patterns
run before it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from gristmill.core import pii as shared_pii
from gristmill.labeling.domain.model import CustomPiiPattern, PiiSettings


def normalize_text(text: str) -> str:
    """NFKC, then trim and collapse every run of Unicode whitespace (including NEL, LS, PS) to one space."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.split())


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


def _custom(pattern: CustomPiiPattern) -> _Pattern:
    name = pattern.name.upper()
    return _Pattern(name, re.compile(pattern.regex), f"[{name}]")


def merge_counts(total: dict[str, int], found: Iterable[tuple[str, int]]) -> None:
    for name, count in found:
        total[name] = total.get(name, 0) + count
