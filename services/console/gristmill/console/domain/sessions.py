"""Who is signed in: a session sealed into a cookie, and the CSRF token every form carries.

The console keeps no session table: the session (the user's API key among it) is encrypted and authenticated
with the console's secret (Fernet: AES-128-CBC and HMAC-SHA256) and lives in an HttpOnly, SameSite=Strict
cookie, so a browser script cannot read it and another site cannot send it. Each session has its own random
CSRF token; every form that writes carries it, and a write whose token does not match the session's is refused
(a second line of defence behind SameSite).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field

from cryptography.fernet import Fernet, InvalidToken

from gristmill.core.auth import LABELING_WRITE, Principal
from gristmill.core.errors import InvalidArgumentError, PermissionDeniedError, UnauthenticatedError

COOKIE = "gristmill_session"
# A browser sends at most ~4 KB per cookie; a key and a few ids are far below it.
_MAX_TOKEN_CHARS = 3500
_ANNOTATOR = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Session:
    """A signed-in user: the key every call is made with, and the name they label under."""

    api_key: str
    annotator_id: str
    organization_id: str
    api_key_id: str
    scopes: tuple[str, ...]
    auth_disabled: bool
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @property
    def principal(self) -> Principal:
        return Principal(self.organization_id, self.api_key_id, frozenset(self.scopes), self.auth_disabled)

    @property
    def can_label(self) -> bool:
        """Pages show write buttons only to keys that may write (the services refuse the writes anyway)."""
        return self.principal.has_scope(LABELING_WRITE)

    def require_label(self) -> None:
        if not self.can_label:
            raise PermissionDeniedError(f"the key {self.api_key_id!r} is read-only: it lacks {LABELING_WRITE}")

    def check_csrf(self, token: str) -> None:
        """Refuse a write whose form did not come from this session's pages."""
        if not token or not hmac.compare_digest(token.encode(), self.csrf_token.encode()):
            raise PermissionDeniedError("the form is stale or came from another site: reload the page and try again")


def annotator_id_from(raw: str, default: str) -> str:
    """The name a user labels under: what they typed (lower-cased), else ``default``."""
    value = raw.strip().lower() or default
    if not _ANNOTATOR.match(value):
        raise InvalidArgumentError(
            f"annotator name {value!r}: use 1-128 lower-case letters, digits, '.', '-' or '_', starting with a letter "
            "or digit"
        )
    return value


class SessionCodec:
    """Seals sessions into cookie values and opens them; a value that was altered, sealed with another secret or
    is older than ``max_age_s`` opens as nothing."""

    def __init__(self, secret: str, max_age_s: int) -> None:
        # An empty secret: a random one, so that this process's cookies open only in this process.
        material = secret.encode() if secret else secrets.token_bytes(32)
        self._fernet = Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"gristmill-console\0" + material).digest()))
        self.max_age_s = max_age_s

    def seal(self, session: Session) -> str:
        body = {
            "k": session.api_key,
            "a": session.annotator_id,
            "o": session.organization_id,
            "i": session.api_key_id,
            "s": list(session.scopes),
            "d": session.auth_disabled,
            "c": session.csrf_token,
        }
        token = self._fernet.encrypt(json.dumps(body, separators=(",", ":")).encode()).decode()
        if len(token) > _MAX_TOKEN_CHARS:
            raise InvalidArgumentError("the API key is too long to keep in a session")
        return token

    def open(self, token: str | None, *, now: float | None = None) -> Session | None:
        if not token or len(token) > _MAX_TOKEN_CHARS:
            return None
        try:
            raw = self._fernet.decrypt_at_time(token.encode(), self.max_age_s, int(now or time.time()))
            body = json.loads(raw)
            return Session(
                api_key=str(body["k"]),
                annotator_id=str(body["a"]),
                organization_id=str(body["o"]),
                api_key_id=str(body["i"]),
                scopes=tuple(str(s) for s in body["s"]),
                auth_disabled=bool(body["d"]),
                csrf_token=str(body["c"]),
            )
        except (InvalidToken, ValueError, KeyError, TypeError):
            return None


def require(session: Session | None) -> Session:
    if session is None:
        raise UnauthenticatedError("sign in with an API key first")
    return session
