"""Chat and preference items in the terminal: a conversation and what annotators said about it, shown for people,
and the answers ``gristmill label`` and ``items resolve`` read, parsed by pure functions.

A chat annotator keeps or rewrites the final assistant reply, rates it 1-5 and may flag it; a preference annotator
chooses the best candidate, ranks them, or calls a tie. People number candidates from 1, the API from 0
(``Response.ranking``): ``parse_ranking`` and ``ranking_text`` convert, nothing else does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import Enum

import typer

from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.cli.answers import AnswerError, Decision, Echo, EndOfInput, ReadLine, ask, echo, stdin_line
from gristmill.cli.options import comma_list
from gristmill.client.conversations import chat_response, conversation_of
from gristmill.core.chat import (
    CHAT_FLAGS,
    MAX_CANDIDATES,
    MAX_RATING,
    MIN_RATING,
    SYSTEM,
    USER,
    ChatMessage,
    Conversation,
)

__all__ = ["chat_response", "conversation_of"]  # where the CLI's callers have always found them

# Ends a reply typed over several lines.
END_OF_REPLY = "."
# Tool calls are shown as their JSON, cut to this length.
TOOL_CALLS_SHOWN_CHARS = 300
# The service names a preference item's choices "candidate-<index>" (0-based) or "tie".
_CANDIDATE_CHOICE = re.compile(r"candidate-([0-9]+)")
_NUMBER = re.compile(r"[0-9]+")


class ReplyChoice(Enum):
    KEEP = "keep"
    EDIT = "edit"


# --------------------------------------------------------------------------- showing


def shorten(text: str, width: int) -> str:
    """``text`` on one line (whitespace runs as one space), cut to ``width`` characters with '…'."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def turn_lines(label: str, text: str, *, dim: bool = False) -> list[str]:
    """``  label: text``, the further lines of a multi-line text indented under its first."""
    first, *rest = text.splitlines() or [""]
    indent = " " * (len(label) + 4)
    lines = [f"  {label}: {first}".rstrip(), *(f"{indent}{line}".rstrip() for line in rest)]
    return [typer.style(line, dim=True) for line in lines] if dim else lines


def message_lines(message: ChatMessage, *, styled: bool = False) -> list[str]:
    """One turn, prefixed with its role (and its name or the tool call it answers); a system turn dimmed when
    ``styled``; tool calls as their JSON, shortened."""
    who = message.name or message.tool_call_id
    label = f"{message.role} ({who})" if who else message.role
    text = message.content
    if message.tool_calls:
        calls = f"[calls tools] {shorten(message.tool_calls, TOOL_CALLS_SHOWN_CHARS)}"
        text = f"{text}\n{calls}" if text else calls
    return turn_lines(label, text, dim=styled and message.role == SYSTEM)


def conversation_lines(conversation: Conversation, *, styled: bool = False) -> list[str]:
    """Every turn, then the candidates numbered from 1."""
    lines = [line for message in conversation.messages for line in message_lines(message, styled=styled)]
    for number, candidate in enumerate(conversation.candidates, 1):
        lines += turn_lines(f"candidate {number}", candidate)
    return lines


def chat_task_lines(conversation: Conversation, remaining: int, *, styled: bool = False) -> list[str]:
    """What a chat annotator sees: the turns before the reply, the reply, and the choices."""
    lines = [f"\n[{remaining} left]"]
    lines += [line for message in conversation.prompt for line in message_lines(message, styled=styled)]
    if conversation.final_reply is None:
        lines += ["  (no assistant reply yet)", "  e) write the reply  s) skip  q) quit"]
    else:
        lines += turn_lines("reply", conversation.final_reply)
        lines.append("  Enter) keep the reply  e) edit it  s) skip  q) quit")
    return lines


def preference_task_lines(conversation: Conversation, remaining: int, *, styled: bool = False) -> list[str]:
    """What a preference annotator sees: the prompt, the numbered candidates, and the choices."""
    count = len(conversation.candidates)
    return [
        f"\n[{remaining} left]",
        *conversation_lines(conversation, styled=styled),
        f"  1-{count}) the best  2>1) a ranking, best first  t) a tie  s) skip  q) quit",
    ]


def ranking_text(ranking: Sequence[int]) -> str:
    """``[1, 0, 2]`` (the API's indices) → ``2>1>3`` (the candidates as people number them)."""
    return ">".join(str(index + 1) for index in ranking)


def response_text(response: lb.Response, reply_width: int = 40) -> str:
    """A response on one line: ``best 2``, ``ranking 2>1>3``, ``tie``, or ``reply kept, rating 4, flags wrong``
    (a rewritten reply shortened to ``reply_width``; '' for no response)."""
    if not response.ByteSize():
        return ""
    if response.tie:
        return "tie"
    if len(response.ranking) == 1:
        return f"best {response.ranking[0] + 1}"
    if response.ranking:
        return f"ranking {ranking_text(response.ranking)}"
    parts = [f"reply {shorten(response.reply, reply_width)!r}" if response.reply else "reply kept"]
    parts.append(f"rating {response.rating}" if response.rating else "unrated")
    if response.flags:
        parts.append(f"flags {','.join(response.flags)}")
    return ", ".join(parts)


def item_summary(item: lb.Item, width: int = 60) -> str:
    """An item on one line: its text, or a conversation's last user turn."""
    if item.WhichOneof("content") != "conversation":
        return item.text[:width]
    users = [m.content for m in item.conversation.messages if m.role == USER]
    return shorten(users[-1], width) if users else ""


def consensus_text(item: lb.Item) -> str:
    """An item's consensus for people: a preference item's choice ``candidate-<index>`` as ``candidate <number>``,
    numbered from 1 as the candidates are shown."""
    if not item.conversation.candidates:
        return ",".join(item.consensus.labels)
    return ",".join(
        f"candidate {int(m.group(1)) + 1}" if (m := _CANDIDATE_CHOICE.fullmatch(label)) else label
        for label in item.consensus.labels
    )


# --------------------------------------------------------------------------- parsing answers


def parse_ranking(text: str, count: int | None = None) -> list[int]:
    """``2>1>3`` (candidates numbered from 1, best first) → ``[1, 0, 2]`` (the API's 0-based indices); one number
    chooses the best. ``count``: the item's candidates (None: not known here; the service checks)."""
    parts = [part.strip() for part in text.split(">")]
    if not all(_NUMBER.fullmatch(part) for part in parts):
        raise AnswerError(
            f"{shorten(text, 40)!r} is not a ranking: candidate numbers separated by '>', best first (e.g. 2>1>3)"
        )
    numbers = [int(part) for part in parts]
    highest = count if count is not None else MAX_CANDIDATES
    for number in numbers:
        if not 1 <= number <= highest:
            where = f"the candidates are 1-{count}" if count is not None else f"an item has at most {highest}"
            raise AnswerError(f"there is no candidate {number}: {where}")
    repeated = next((n for i, n in enumerate(numbers) if n in numbers[:i]), None)
    if repeated is not None:
        raise AnswerError(f"candidate {repeated} appears twice in the ranking")
    return [number - 1 for number in numbers]


def parse_preference(answer: str, count: int) -> lb.Response | Decision:
    """A preference annotator's answer: ``2`` (the best), ``2>1>3`` (a ranking), ``t`` (a tie), ``s``, ``q``."""
    text = answer.strip().lower()
    if text in ("q", "quit"):
        return Decision.QUIT
    if text in ("s", "skip"):
        return Decision.SKIP
    if text in ("t", "tie"):
        return lb.Response(tie=True)
    if not text:
        raise AnswerError(f"answer the best candidate's number (1-{count}), a ranking such as 2>1, t (tie), s or q")
    return lb.Response(ranking=parse_ranking(text, count))


def parse_reply_choice(answer: str, has_reply: bool) -> ReplyChoice | Decision:
    """A chat annotator's first answer: Enter keeps the reply, ``e`` edits (or writes) it, ``s``, ``q``."""
    text = answer.strip().lower()
    if text in ("q", "quit"):
        return Decision.QUIT
    if text in ("s", "skip"):
        return Decision.SKIP
    if text in ("e", "edit"):
        return ReplyChoice.EDIT
    if not text and has_reply:
        return ReplyChoice.KEEP
    if not text:
        raise AnswerError("there is no reply to keep: e writes one, s skips, q quits")
    if has_reply:
        raise AnswerError("press Enter to keep the reply, e to edit it, s to skip or q to quit")
    raise AnswerError("e writes the reply, s skips, q quits")


def reply_from_lines(lines: Sequence[str]) -> str:
    """A reply typed over ``lines`` (without the closing '.'); an empty one is refused."""
    reply = "\n".join(lines).strip()
    if not reply:
        raise AnswerError("the new reply is empty; answer again")
    return reply


def parse_rating(answer: str) -> int:
    """``1``-``5``; Enter leaves the reply unrated (0)."""
    text = answer.strip()
    if not text:
        return 0
    if _NUMBER.fullmatch(text) and MIN_RATING <= int(text) <= MAX_RATING:
        return int(text)
    raise AnswerError(f"rate {MIN_RATING}-{MAX_RATING}, or press Enter to leave the reply unrated")


def parse_flags(answer: str) -> list[str]:
    """Comma-separated flags from ``CHAT_FLAGS`` (each once; Enter: none)."""
    flags: list[str] = []
    for name in comma_list(answer.lower()):
        if name not in CHAT_FLAGS:
            raise AnswerError(f"{shorten(name, 40)!r} is not a flag; flags: {', '.join(CHAT_FLAGS)} (or Enter: none)")
        if name not in flags:
            flags.append(name)
    return flags


# --------------------------------------------------------------------------- asking


def read_reply(read_line: ReadLine = stdin_line, out: Echo = echo) -> str:
    """A new reply, typed over lines up to one holding only '.'."""
    out(f"  the new reply; end it with a line holding only {END_OF_REPLY!r}:")
    lines: list[str] = []
    while (line := read_line()) is not None:
        if line.strip() == END_OF_REPLY:
            return reply_from_lines(lines)
        lines.append(line)
    raise EndOfInput


def ask_chat(conversation: Conversation, read_line: ReadLine = stdin_line, out: Echo = echo) -> lb.Response | Decision:
    """Ask a chat annotator: keep or rewrite the reply, then a rating, then flags."""
    own = conversation.final_reply
    while True:
        choice = ask("> ", lambda answer: parse_reply_choice(answer, own is not None), read_line, out)
        if isinstance(choice, Decision):
            return choice
        if choice is ReplyChoice.KEEP:
            new_reply = None
            break
        try:
            new_reply = read_reply(read_line, out)
            break
        except AnswerError as exc:
            out(f"  {exc}")
    rating = ask(f"  rating {MIN_RATING}-{MAX_RATING} (Enter: unrated)> ", parse_rating, read_line, out)
    flags = ask(f"  flags, comma-separated: {', '.join(CHAT_FLAGS)} (Enter: none)> ", parse_flags, read_line, out)
    return chat_response(own, new_reply, rating, flags)


def ask_conversation(
    conversation: Conversation,
    remaining: int,
    *,
    styled: bool = False,
    read_line: ReadLine = stdin_line,
    out: Echo = echo,
) -> lb.Response | Decision:
    """Show a chat or preference item (a preference item is the one with candidates) and read the answer."""
    if conversation.candidates:
        for line in preference_task_lines(conversation, remaining, styled=styled):
            out(line)
        count = len(conversation.candidates)
        return ask("> ", lambda answer: parse_preference(answer, count), read_line, out)
    for line in chat_task_lines(conversation, remaining, styled=styled):
        out(line)
    return ask_chat(conversation, read_line, out)
