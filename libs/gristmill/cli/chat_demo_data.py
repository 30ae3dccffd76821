"""The chat demo's data: a customer-service assistant that reads a product review and answers in JSON.

The task (also the chat quality benchmark's, services/training/benchmarks/chat_quality_benchmark.py): the user
turn is a review, a short system prompt asks for JSON only, and the assistant answers
``{"sentiment": "positive"|"negative", "reply": "<one polite sentence>"}``. Reviews come from the classifier
demo's generator (``demo_data``: we cannot ship third-party data), replies from a few templated sentences.

Everything here is pure: records to import, seed conversations whose draft replies need an annotator's fixing,
reviews the simulated users send, and the rules that judge a reply (``judge``: the user's thumbs up or down;
``quality``: which of two replies a user keeps), the same rules the training service scores its test split
with (``json_valid``, ``json_match_<key>``).
"""

from __future__ import annotations

import difflib
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gristmill.cli import demo_data
from gristmill.core.errors import FailedPreconditionError

LABELS = ("negative", "positive")
# The keys training scores as json_match_<key> (the sentiment accuracy) and the simulated users check.
MATCH_KEYS = ("sentiment",)
SYSTEM_PROMPT = (
    "You are a customer-service assistant. Read the customer's review and answer with JSON only, exactly "
    '{"sentiment": "positive" or "negative", "reply": "<one polite sentence to the customer>"}.'
)
POLITE_REPLIES = {
    "positive": (
        "Thank you for your kind words, we are glad you enjoyed it!",
        "We really appreciate your feedback and hope to see you again soon.",
        "Thanks so much for sharing, it means a lot to our team.",
        "We are delighted to hear that, thank you for choosing us.",
    ),
    "negative": (
        "We are sorry to hear about your experience and would like to make it right.",
        "Thank you for telling us, we apologise and will look into this right away.",
        "We apologise for the trouble; please contact us so we can help.",
        "We are sorry we let you down and appreciate you letting us know.",
    ),
}
# What a preference rejects for the same review: a rude reply, or a long rambling one (still valid JSON, with the
# right sentiment: the preference is about the reply alone).
RUDE_REPLIES = {
    "positive": ("Fine, whatever, we already knew that.", "Okay. Not sure why you are telling us this."),
    "negative": ("That is not our problem, read the manual next time.", "Complaints like this are a waste of time."),
}
RAMBLING = (
    " Also, as you may or may not know, our company was founded many years ago and has since grown into a large "
    "organisation with offices in several countries, and we like to remind every customer about our loyalty "
    "programme, our newsletter, our seasonal offers and our many other products, which you can read about at length "
    "on our website whenever you happen to have a spare moment, which we hope you will."
)


@dataclass(frozen=True)
class Review:
    text: str
    sentiment: str


def prompt_messages(review: Review) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": review.text}]


def answer(sentiment: str, reply: str) -> str:
    return json.dumps({"sentiment": sentiment, "reply": reply})


def sft_records(reviews: Sequence[Review], rng: random.Random) -> list[dict[str, Any]]:
    """OpenAI ``messages`` records: system, the review, the JSON answer with a templated polite reply."""
    return [
        {
            "id": f"sft-{n:05d}",
            "messages": [
                *prompt_messages(r),
                {"role": "assistant", "content": answer(r.sentiment, rng.choice(POLITE_REPLIES[r.sentiment]))},
            ],
        }
        for n, r in enumerate(reviews)
    ]


def dpo_records(reviews: Sequence[Review], rng: random.Random) -> list[dict[str, Any]]:
    """DPO records (conversational prompt, string replies): the polite answer over a rude or a rambling one."""
    records = []
    for n, r in enumerate(reviews):
        polite = rng.choice(POLITE_REPLIES[r.sentiment])
        rejected = rng.choice(RUDE_REPLIES[r.sentiment]) if n % 2 else polite + RAMBLING
        records.append(
            {
                "id": f"dpo-{n:05d}",
                "prompt": prompt_messages(r),
                "chosen": answer(r.sentiment, polite),
                "rejected": answer(r.sentiment, rejected),
            }
        )
    return records


def score(reply: str, gold: str) -> tuple[bool, bool]:
    """(valid JSON answer, right sentiment): the whole reply must parse as an object with exactly the keys
    ``sentiment`` and ``reply``, sentiment one of the two labels and reply a string."""
    value = json_object(reply)
    valid = (
        value is not None
        and set(value) == {"sentiment", "reply"}
        and value["sentiment"] in LABELS
        and isinstance(value["reply"], str)
    )
    return valid, valid and value is not None and value["sentiment"] == gold


# --------------------------------------------------------------------------- judging replies


def json_object(text: str) -> dict[str, Any] | None:
    """``text`` parsed as a JSON object (after stripping whitespace; a markdown code fence is not JSON), or None."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().casefold() == b.strip().casefold()
    return bool(a == b)


_WORD = re.compile(r"\w+")


def word_f1(reply: str, reference: str) -> float:
    """Unigram F1 of lower-cased words (0 when either has none)."""
    got, want = _WORD.findall(reply.lower()), _WORD.findall(reference.lower())
    if not got or not want:
        return 0.0
    common = sum(min(got.count(w), want.count(w)) for w in set(got))
    if not common:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def judge(reply: str, reference: str, keys: Sequence[str] = MATCH_KEYS) -> bool:
    """A simulated user's thumbs up: for a JSON reference, the reply is a JSON object with the reference's top-level
    keys and the same value for each of ``keys`` (training's ``json_valid`` and ``json_match_<key>`` together);
    for free text, a word F1 with the reference of at least 0.5."""
    wanted = json_object(reference)
    if wanted is None:
        return word_f1(reply, reference) >= 0.5
    got = json_object(reply)
    if got is None or set(got) != set(wanted):
        return False
    return all(_same(got[k], wanted[k]) for k in keys if k in wanted)


def quality(reply: str, reference: str, keys: Sequence[str] = MATCH_KEYS) -> float:
    """Which of two replies a user keeps: a good one (``judge``) over valid JSON with the right keys over the rest,
    then the closer to the reference (character similarity), so that two poor replies still rank."""
    points = 2.0 if judge(reply, reference, keys) else 0.0
    wanted, got = json_object(reference), json_object(reply)
    if wanted is not None and got is not None and set(got) == set(wanted):
        points += 1.0
    return points + difflib.SequenceMatcher(None, reply.strip(), reference.strip()).ratio()


# --------------------------------------------------------------------------- the demo's conversations


@dataclass(frozen=True)
class SeedConversation:
    """An imported conversation: the prompt turns, the draft reply a previous bot wrote (None: none yet) and the
    reply a careful annotator settles on (``reference``)."""

    external_id: str
    prompt: tuple[dict[str, str], ...]
    draft: str | None
    reference: str
    # Why the draft needs fixing ('' when it is right as it is).
    flaw: str = ""

    def record(self) -> dict[str, Any]:
        """The OpenAI ``messages`` JSONL record the demo imports."""
        messages = list(self.prompt)
        if self.draft is not None:
            messages.append({"role": "assistant", "content": self.draft})
        return {"id": self.external_id, "messages": messages}


@dataclass(frozen=True)
class UserPrompt:
    """What a simulated user sends (the prompt turns) and the reply that user would be happy with."""

    prompt: tuple[dict[str, str], ...]
    reference: str


# How the previous bot's drafts go wrong, with their share of the seed conversations (the rest are right).
FLAWS = (("wrong sentiment", 0.15), ("rude", 0.10), ("not JSON", 0.10), ("no reply", 0.05))


def reviews(count: int, seed: int) -> list[Review]:
    """``count`` generated product reviews, half of each sentiment (``demo_data``'s sentences)."""
    return [Review(item.text, item.label) for item in demo_data.generate(count, seed=seed)]


def seed_conversations(count: int, seed: int) -> list[SeedConversation]:
    """``count`` conversations about generated reviews; about 40% of the drafts need fixing (``FLAWS``)."""
    rng = random.Random(f"seed-conversations-{seed}")  # not demo_data's sequence (it draws the reviews)
    out = []
    for n, review in enumerate(reviews(count, seed)):
        polite = rng.choice(POLITE_REPLIES[review.sentiment])
        reference = answer(review.sentiment, polite)
        roll, flaw, draft = rng.random(), "", reference
        for name, share in FLAWS:
            if roll < share:
                flaw = name
                break
            roll -= share
        if flaw == "wrong sentiment":
            other = LABELS[1 - LABELS.index(review.sentiment)]
            draft = answer(other, rng.choice(POLITE_REPLIES[other]))
        elif flaw == "rude":
            draft = answer(review.sentiment, rng.choice(RUDE_REPLIES[review.sentiment]))
        elif flaw == "not JSON":
            draft = f"The customer sounds {review.sentiment}. {polite}"
        out.append(
            SeedConversation(
                f"chat-{n:05d}",
                tuple(prompt_messages(review)),
                None if flaw == "no reply" else draft,
                reference,
                flaw,
            )
        )
    return out


def user_prompts(count: int, seed: int) -> list[UserPrompt]:
    """Up to ``count`` distinct reviews the simulated users send (other sentences than the seed's), with the answer
    each would like. Distinct, so that every piece of feedback makes an item of its own (labeling drops duplicates)."""
    rng = random.Random(f"user-prompts-{seed}")
    seen: set[str] = set()
    out = []
    for r in reviews(count, seed):
        if r.text not in seen:
            seen.add(r.text)
            out.append(
                UserPrompt(tuple(prompt_messages(r)), answer(r.sentiment, rng.choice(POLITE_REPLIES[r.sentiment])))
            )
    return out


def vocabulary_texts(seeds: Iterable[SeedConversation], prompts: Iterable[UserPrompt]) -> list[str]:
    """The texts a tiny tokenizer for the demo is trained on: every turn, the replies and their flaws."""
    texts = [SYSTEM_PROMPT, RAMBLING]
    texts += [reply for replies in (*POLITE_REPLIES.values(), *RUDE_REPLIES.values()) for reply in replies]
    for conversation in seeds:
        texts += [m["content"] for m in conversation.prompt] + [conversation.reference, conversation.draft or ""]
    for prompt in prompts:
        texts += [m["content"] for m in prompt.prompt] + [prompt.reference]
    return texts


def load_conversations(path: Path, limit: int = 0) -> list[SeedConversation]:
    """A user's ``--data``: OpenAI ``messages`` JSONL whose last turn is the assistant's reply (the reference:
    the careful annotator keeps it as written). ``limit`` 0: every record."""
    out: list[SeedConversation] = []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for n, line in enumerate(lines[: limit or None]):
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise FailedPreconditionError(f"{path.name}: line {n + 1} is not JSON ({exc})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if (
            not isinstance(messages, list)
            or len(messages) < 2
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
            or messages[-1].get("role") != "assistant"
        ):
            raise FailedPreconditionError(
                f"{path.name}: record {n + 1} is not an OpenAI 'messages' conversation ending with the assistant's "
                "reply (the simulated annotator and users judge replies against it)"
            )
        prompt = tuple({"role": str(m["role"]), "content": m["content"]} for m in messages[:-1])
        reply = messages[-1]["content"]
        external_id = str(record.get("id") or f"data-{n:06d}")
        out.append(SeedConversation(external_id, prompt, reply, reply))
    return out


def match_keys(references: Sequence[str]) -> list[str]:
    """The keys to score as ``json_match_<key>``: ``MATCH_KEYS`` when most references are JSON objects holding
    them (the demo's data), else none (free text is scored by ROUGE-L)."""
    objects = [json_object(r) for r in references]
    holding = [k for k in MATCH_KEYS if sum(o is not None and k in o for o in objects) * 2 > len(objects)]
    return holding


def is_json_task(references: Sequence[str]) -> bool:
    """Whether most references are JSON objects (the offline gate then checks ``json_valid``)."""
    return sum(json_object(r) is not None for r in references) * 2 > len(references)
