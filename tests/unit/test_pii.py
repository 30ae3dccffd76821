from __future__ import annotations

import pytest

from gristmill.core.pii import PiiKind, PiiMasker

MASKER = PiiMasker()


@pytest.mark.parametrize(
    ("text", "masked", "kind"),
    [
        ("mail me at jane.doe+x@example.co.uk today", "mail me at [EMAIL] today", PiiKind.EMAIL),
        ("call +1 (555) 010-9999 now", "call [PHONE] now", PiiKind.PHONE),
        ("or 0612 345 678.", "or [PHONE].", PiiKind.PHONE),
        ("card 4111 1111 1111 1111 ok", "card [PAYMENT_CARD] ok", PiiKind.PAYMENT_CARD),
        ("card 4111-1111-1111-1111", "card [PAYMENT_CARD]", PiiKind.PAYMENT_CARD),
        ("ssn 123-45-6789", "ssn [ID_NUMBER]", PiiKind.ID_NUMBER),
        ("iban DE89 3704 0044 0532 0130 00 paid", "iban [ID_NUMBER] paid", PiiKind.ID_NUMBER),
        ("from 192.168.100.200 today", "from [IP_ADDRESS] today", PiiKind.IP_ADDRESS),
    ],
)
def test_each_kind_is_masked_and_counted(text: str, masked: str, kind: PiiKind) -> None:
    out, found = MASKER.mask(text)
    assert out == masked
    assert found == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "order 4111 1111 1111 1112 shipped",  # fails the Luhn check: not a card
        "great phone, 5 stars, bought 2 in 2024",
        "version 1.2.3 works",
        "the price is 1999",
        "version 1.2.3.4.5 of the app",
    ],
)
def test_ordinary_text_and_numbers_are_left_alone(text: str) -> None:
    assert MASKER.mask(text) == (text, {})


def test_only_configured_kinds_are_masked() -> None:
    masker = PiiMasker.of(["email"])
    out, found = masker.mask("a@b.io +1 555 010 9999")
    assert out == "[EMAIL] +1 555 010 9999"
    assert found == {PiiKind.EMAIL: 1}
    assert PiiMasker.of([]).mask("a@b.io") == ("a@b.io", {})


def test_unknown_kind_is_named() -> None:
    assert PiiMasker.of(["email", "IP_ADDRESS"]).kinds == {PiiKind.EMAIL, PiiKind.IP_ADDRESS}
    with pytest.raises(ValueError, match="unknown PII kind 'passport'"):
        PiiMasker.of(["passport"])
