"""Normalisation and PII masking as the import applies them."""

from __future__ import annotations

import pytest

from gristmill.core import pii as shared_pii
from gristmill.labeling.domain.cleaning import TextMasker, normalize_text
from gristmill.labeling.domain.model import CustomPiiPattern, PiiKind, PiiSettings


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  Great\t\tphone \n", "Great phone"),
        ("\ufb01ne \uff50\uff48\uff4f\uff4e\uff45", "fine phone"),  # NFKC: ligature, full-width letters
        ("line\u2028break\x85next", "line break next"),  # Unicode line separators count as whitespace
        ("e\u0301", "\u00e9"),  # combining accent composed
        ("   ", ""),
        ("plain ascii stays", "plain ascii stays"),
    ],
)
def test_normalize_text(raw: str, clean: str) -> None:
    assert normalize_text(raw) == clean


def test_every_builtin_kind_is_masked_and_counted_under_the_api_name() -> None:
    masker = TextMasker(PiiSettings())
    text = (
        "mail jane@example.com, call +1 (555) 010-9999, card 4111 1111 1111 1111, ssn 123-45-6789, "
        "iban DE89 3704 0044 0532 0130 00, host 192.168.100.200"
    )
    masked, found = masker.mask(text)
    assert masked == (
        "mail [EMAIL], call [PHONE], card [PAYMENT_CARD], ssn [ID_NUMBER], iban [ID_NUMBER], host [IP_ADDRESS]"
    )
    assert found == {"EMAIL": 1, "PHONE": 1, "PAYMENT_CARD": 1, "ID_NUMBER": 2, "IP_ADDRESS": 1}


def test_only_the_configured_kinds_are_masked() -> None:
    masker = TextMasker(PiiSettings(kinds=frozenset({PiiKind.EMAIL})))
    masked, found = masker.mask("jane@example.com or +1 555 010 9999 from 10.0.0.1")
    assert masked == "[EMAIL] or +1 555 010 9999 from 10.0.0.1"
    assert found == {"EMAIL": 1}


def test_custom_patterns_are_masked_first_under_their_upper_cased_name() -> None:
    settings = PiiSettings(
        kinds=frozenset({PiiKind.PHONE}),
        custom_patterns=(CustomPiiPattern("customer-number", r"CUST-\d{9}"),),
    )
    masked, found = TextMasker(settings).mask("ticket for CUST-123456789, call 0612 345 678")
    # The nine digits of the customer number would also look like a phone number: the custom pattern wins.
    assert masked == "ticket for [CUSTOMER-NUMBER], call [PHONE]"
    assert found == {"CUSTOMER-NUMBER": 1, "PHONE": 1}


def test_store_raw_text_masks_nothing() -> None:
    masked, found = TextMasker(PiiSettings(store_raw_text=True)).mask("jane@example.com")
    assert (masked, dict(found)) == ("jane@example.com", {})


@pytest.mark.parametrize("text", ["version 1.2.3.4.5 released", "rated 4.5 of 5", "999.1.1.1 is no address"])
def test_ip_pattern_leaves_other_dotted_numbers(text: str) -> None:
    masker = TextMasker(PiiSettings(kinds=frozenset({PiiKind.IP_ADDRESS})))
    assert masker.mask(text) == (text, {})


def test_the_api_kinds_are_the_shared_masker_kinds() -> None:
    # Labeling masks with the platform's one masker: every API kind must exist there under the same name.
    assert {kind.value for kind in PiiKind} == {kind.value for kind in shared_pii.PiiKind}


def test_custom_patterns_run_on_texts_without_digits() -> None:
    settings = PiiSettings(custom_patterns=(CustomPiiPattern("codename", r"Project [A-Z][a-z]+"),))
    assert TextMasker(settings).mask("about Project Falcon today") == ("about [CODENAME] today", {"CODENAME": 1})
