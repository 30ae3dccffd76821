"""Text cleaning on import: Unicode and whitespace normalisation, and PII masking.

Masking uses the platform's one masker (``gristmill.core.pii.PiiMasker``) so that a text is masked the
same way here and in serving's prediction logs. Two things the shared masker does not (yet) cover are
added around it: IP addresses and a project's custom patterns. The API's kind names differ from the
shared masker's (``PAYMENT_CARD`` is its ``card``; ``ID_NUMBER`` covers its ``id`` and ``iban``); the
report always counts under the API names.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from gristmill.core import pii as shared_pii
from gristmill.labeling.domain.model import CustomPiiPattern, PiiKind, PiiSettings

# Which of the shared masker's kinds implement each API kind.
_SHARED_KINDS: dict[PiiKind, tuple[shared_pii.PiiKind, ...]] = {
    PiiKind.EMAIL: (shared_pii.PiiKind.EMAIL,),
    PiiKind.PHONE: (shared_pii.PiiKind.PHONE,),
    PiiKind.PAYMENT_CARD: (shared_pii.PiiKind.CARD,),
    PiiKind.ID_NUMBER: (shared_pii.PiiKind.ID, shared_pii.PiiKind.IBAN),
}
_API_NAME: dict[shared_pii.PiiKind, str] = {
    shared: api.value for api, shared_kinds in _SHARED_KINDS.items() for shared in shared_kinds
}

# IPv4 dotted quads (each part 0-255). Masked before the shared masker runs, whose phone pattern would
# otherwise claim "192.168.100.200" (twelve digits in groups).
_IPV4 = r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]|\.\d)"


# Every built-in kind needs a digit (phone, card, ID, IBAN, IP) or an "@" (e-mail) to match, so a text with
# neither skips those regexes: most texts have none, and the scan for these two is a fast C loop. The set
# of shared kinds this relies on is pinned by a unit test, so a new kind cannot slip past it unreviewed.
_MAY_HOLD_BUILTIN_PII = re.compile(r"[\d@]")


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
    """A project's masking rules: custom patterns first, then IP addresses, then the shared masker's kinds.

    Placeholders (``[EMAIL]``) contain no digits, so a later pass never re-masks an earlier one.
    """

    settings: PiiSettings
    _custom: tuple[_Pattern, ...] = field(init=False, repr=False, compare=False)
    _builtin: tuple[_Pattern, ...] = field(init=False, repr=False, compare=False)
    _shared: shared_pii.PiiMasker | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kinds = self.settings.effective_kinds
        builtin = []
        if PiiKind.IP_ADDRESS in kinds:
            builtin.append(_Pattern(PiiKind.IP_ADDRESS.value, re.compile(_IPV4), f"[{PiiKind.IP_ADDRESS.value}]"))
        shared_kinds = frozenset(s for kind in kinds for s in _SHARED_KINDS.get(kind, ()))
        object.__setattr__(self, "_custom", tuple(_custom(p) for p in self.settings.custom_patterns))
        object.__setattr__(self, "_builtin", tuple(builtin))
        object.__setattr__(self, "_shared", shared_pii.PiiMasker(shared_kinds) if shared_kinds else None)

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
        if not _MAY_HOLD_BUILTIN_PII.search(text):
            return text, found
        for pattern in self._builtin:
            text, count = pattern.regex.subn(pattern.placeholder, text)
            if count:
                found[pattern.name] += count
        if self._shared is not None:
            text, shared_found = self._shared.mask(text)
            for kind, count in shared_found.items():
                found[_API_NAME[kind]] += count
        return text, found


def _custom(pattern: CustomPiiPattern) -> _Pattern:
    name = pattern.name.upper()
    return _Pattern(name, re.compile(pattern.regex), f"[{name}]")


def merge_counts(total: dict[str, int], found: Iterable[tuple[str, int]]) -> None:
    for name, count in found:
        total[name] = total.get(name, 0) + count
