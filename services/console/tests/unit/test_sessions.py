"""Sessions sealed into cookies: they open only unaltered, with the same secret, within their age; CSRF tokens
and annotator names are checked."""

from __future__ import annotations

import time

import pytest

from gristmill.console.domain.sessions import Session, SessionCodec, annotator_id_from
from gristmill.core.auth import LABELING_READ, LABELING_WRITE
from gristmill.core.errors import InvalidArgumentError, PermissionDeniedError


def session(*scopes: str) -> Session:
    return Session("gmk_abc.secret", "ann-1", "acme", "k1", scopes or (LABELING_WRITE,), auth_disabled=False)


def test_a_sealed_session_opens_as_it_was_and_hides_the_key() -> None:
    codec = SessionCodec("s3cret", 3600)
    original = session()
    token = codec.seal(original)
    assert "gmk_abc" not in token and "acme" not in token
    assert codec.open(token) == original


def test_altered_foreign_expired_or_missing_values_open_as_nothing() -> None:
    codec = SessionCodec("s3cret", 60)
    token = codec.seal(session())
    flipped = token[:-5] + ("A" if token[-5] != "A" else "B") + token[-4:]
    assert codec.open(flipped) is None
    assert SessionCodec("another", 60).open(token) is None
    assert codec.open(token, now=time.time() + 120) is None
    assert codec.open(None) is None and codec.open("") is None and codec.open("x" * 5000) is None
    # Without a configured secret each process has its own: another process's cookie does not open.
    assert SessionCodec("", 60).open(SessionCodec("", 60).seal(session())) is None


def test_the_csrf_token_must_be_the_sessions_own() -> None:
    s = session()
    s.check_csrf(s.csrf_token)
    for bad in ("", "x", session().csrf_token):
        with pytest.raises(PermissionDeniedError, match="reload the page"):
            s.check_csrf(bad)


def test_a_read_only_key_may_not_label() -> None:
    assert session(LABELING_WRITE).can_label and session("admin").can_label
    reader = session(LABELING_READ)
    assert not reader.can_label
    with pytest.raises(PermissionDeniedError, match="read-only: it lacks labeling:write"):
        reader.require_label()


def test_annotator_names_are_slugs_defaulting_to_the_key() -> None:
    assert annotator_id_from("  Ann-1 ", "k1") == "ann-1"
    assert annotator_id_from("", "k1") == "k1"
    for bad in ("a b", "-lead", "x" * 129, "<b>"):
        with pytest.raises(InvalidArgumentError, match="annotator name"):
            annotator_id_from(bad, "k1")
