"""PII masking, shared by labeling (on import) and serving (before logging a prediction).

One implementation so that a text is masked the same way wherever it enters the platform. Each kind
is replaced by a placeholder named like the labeling API's kinds (``[EMAIL]``, ``[PHONE]``,
``[PAYMENT_CARD]``, ``[ID_NUMBER]`` for IBANs and SSN-style ids, ``[IP_ADDRESS]``); card numbers
are only masked when they pass the Luhn check, so ordinary long numbers (order ids) stay readable.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class PiiKind(StrEnum):
    """The kinds, named as in the labeling API (``PiiKind`` in labeling.proto); the placeholder is ``[NAME]``."""

    EMAIL = "EMAIL"
    PHONE = "PHONE"
    PAYMENT_CARD = "PAYMENT_CARD"
    ID_NUMBER = "ID_NUMBER"
    IP_ADDRESS = "IP_ADDRESS"


# (kind, regex group, pattern), in matching order: at one position the first alternative wins, so IP
# addresses and ids come before phones and cards come before phones.
_PATTERNS: tuple[tuple[PiiKind, str, str], ...] = (
    (PiiKind.EMAIL, "EMAIL", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    # IPv4 dotted quads, each part 0-255.
    (
        PiiKind.IP_ADDRESS,
        "IP_ADDRESS",
        r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]|\.\d)",
    ),
    # IBANs and US SSN style ids (123-45-6789).
    (PiiKind.ID_NUMBER, "IBAN", r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
    (PiiKind.ID_NUMBER, "SSN", r"\b\d{3}-\d{2}-\d{4}\b"),
    # 13-19 digits, optionally grouped by spaces or dashes (checked with Luhn below).
    (PiiKind.PAYMENT_CARD, "PAYMENT_CARD", r"\b(?:\d[ -]?){12,18}\d\b"),
    # International or national phone numbers with at least 9 digits: +1 (555) 010-9999, 0612 345 678.
    (
        PiiKind.PHONE,
        "PHONE",
        r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)",
    ),
)
_KIND_OF_GROUP = {group: kind for kind, group, _ in _PATTERNS}
# Every kind needs a digit or an '@' to match: most texts have neither, and this scan is a fast C loop.
_MAY_HOLD_PII = re.compile(r"[\d@]")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class PiiMasker:
    """Masks the configured kinds. Build once (the regex is compiled here) and reuse; thread-safe."""

    kinds: frozenset[PiiKind] = frozenset(PiiKind)
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        alternatives = [f"(?P<{group}>{pattern})" for kind, group, pattern in _PATTERNS if kind in self.kinds]
        object.__setattr__(self, "_regex", re.compile("|".join(alternatives) if alternatives else r"(?!x)x"))

    @classmethod
    def of(cls, kinds: Iterable[str | PiiKind]) -> PiiMasker:
        """From kind names (``["EMAIL", "phone"]``, any case); an unknown name raises ``ValueError`` naming it."""
        chosen = set()
        for kind in kinds:
            try:
                chosen.add(PiiKind(str(kind).upper()))
            except ValueError:
                raise ValueError(
                    f"unknown PII kind {kind!r}; use any of {', '.join(k.value for k in PiiKind)}"
                ) from None
        return cls(frozenset(chosen))

    def mask(self, text: str) -> tuple[str, Counter[PiiKind]]:
        """The masked text and how many of each kind were masked."""
        found: Counter[PiiKind] = Counter()

        def replace(match: re.Match[str]) -> str:
            kind = _KIND_OF_GROUP[match.lastgroup or ""]
            value = match.group()
            if kind is PiiKind.PAYMENT_CARD and not _luhn_ok(re.sub(r"\D", "", value)):
                return value
            if kind is PiiKind.PHONE and sum(c.isdigit() for c in value) < 9:
                return value
            found[kind] += 1
            return f"[{kind.value}]"

        if not self.kinds or not _MAY_HOLD_PII.search(text):
            return text, found
        return self._regex.sub(replace, text), found
