"""Chat and preference items between the API's messages and the platform's one internal form, for every client
(the CLI, the console, scripts): a conversation as ``gristmill.core.chat.Conversation``, and a chat annotator's
answer as the API's ``Response``."""

from __future__ import annotations

from collections.abc import Sequence

from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.core.chat import ChatMessage, Conversation


def conversation_of(message: lb.Conversation) -> Conversation:
    """The API's conversation as the platform's one internal form (its final reply, its prompt)."""
    return Conversation(
        tuple(ChatMessage(m.role, m.content, m.tool_calls, m.tool_call_id, m.name) for m in message.messages),
        tuple(message.candidates),
    )


def chat_response(own_reply: str | None, new_reply: str | None, rating: int, flags: Sequence[str]) -> lb.Response:
    """What a chat annotator said (``new_reply`` None: the reply was kept). A kept reply is sent as '' (the item's
    own) unless nothing else was said: the service needs a reply, a rating or a flag, and keeping the reply
    unrated and unflagged accepts it as written, so it is sent as the reply."""
    kept = "" if rating or flags else own_reply or ""
    return lb.Response(reply=kept if new_reply is None else new_reply, rating=rating, flags=list(flags))
