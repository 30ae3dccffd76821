"""Import benchmark: N synthetic items through the whole import pipeline (not a test).

Parse JSONL → normalise → length checks → PII masking → spool, then exact duplicates (project + import),
MinHash signatures, LSH near-duplicate detection, and the one-transaction insert into SQLite. Prints
items/s for the pipeline phases and end to end, and the process's peak RSS.

    .venv/bin/python services/labeling/benchmarks/import_benchmark.py --items 100000

The synthetic items: 8-24 words from a 5,000-word vocabulary; 2% exact duplicates (after whitespace
noise), 2% near duplicates (case and punctuation changes), 5% with an e-mail, phone or card number;
``--labeled 1`` gives every item an existing label (stored as an annotation: one more row per item).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from gristmill.core.sql import Database
from gristmill.core.storage import LocalObjectStore
from gristmill.labeling.domain import model as m
from gristmill.labeling.domain.service import LabelingService
from gristmill.labeling.store import tables
from gristmill.labeling.store.sql import SqlLabelingStore

CHUNK = 1 << 20


def synthetic_jsonl(count: int, seed: int = 7, labeled: float = 0.0) -> bytes:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "du", "zi", "ba", "ho", "qe", "fy"]
    vocabulary = list({"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(6_000)})[:5_000]
    texts: list[str] = []
    lines = []
    for i in range(count):
        roll = rng.random()
        if texts and roll < 0.02:
            text = "  " + rng.choice(texts).replace(" ", "   ", 1) + " "  # exact duplicate once normalised
        elif texts and roll < 0.04:
            text = rng.choice(texts).upper() + "!!"  # near duplicate: same word bigrams
        else:
            words = [rng.choice(vocabulary) for _ in range(rng.randint(8, 24))]
            if roll > 0.95:
                pii = rng.choice(
                    [
                        f"mail {rng.choice(vocabulary)}@example.com",
                        f"call +1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}",
                        "card 4111 1111 1111 1111",
                    ]
                )
                words.insert(rng.randint(0, len(words)), pii)
            text = " ".join(words)
            texts.append(text)
        row = {"id": f"b{i}", "text": text}
        if rng.random() < labeled:
            row["label"] = "pos" if i % 2 else "neg"
        lines.append(json.dumps(row))
    return ("\n".join(lines) + "\n").encode()


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--policy", choices=["drop", "flag", "off"], default="drop")
    parser.add_argument("--labeled", type=float, default=0.0, help="share of items that carry a label (0-1)")
    args = parser.parse_args()

    data = synthetic_jsonl(args.items, labeled=args.labeled)
    baseline = peak_rss_mib()
    with tempfile.TemporaryDirectory(prefix="labeling-bench-") as tmp:
        database = Database(f"sqlite:///{Path(tmp) / 'bench.db'}")
        database.create_all(tables.metadata)
        service = LabelingService(SqlLabelingStore(database), LocalObjectStore(Path(tmp) / "objects"))
        policy = {
            "drop": m.NearDuplicatePolicy.DROP,
            "flag": m.NearDuplicatePolicy.FLAG,
            "off": m.NearDuplicatePolicy.OFF,
        }
        service.create_project(
            "",
            project_id="bench",
            display_name="bench",
            description="",
            task_type=m.TaskType.TEXT_CLASSIFICATION,
            labels=[m.LabelDefinition("neg"), m.LabelDefinition("pos")],
            settings=m.ProjectSettings(cleaning=m.CleaningSettings(near_duplicate_policy=policy[args.policy])),
        )
        session = service.begin_import("", m.ImportOptions("bench", m.ImportFormat.JSONL, source_name="synthetic"))
        assert not isinstance(session, m.ImportReport)
        started = time.perf_counter()
        cpu_started = time.process_time()
        for start in range(0, len(data), CHUNK):
            session.feed_chunk(data[start : start + CHUNK])
        read_done = time.perf_counter()
        cpu_read_done = time.process_time()
        report = service.finish_import(session)
        finished = time.perf_counter()
        cpu_finished = time.process_time()
        database.dispose()

    total = finished - started
    print(f"items:                 {report.received_count:,} ({len(data) / 1e6:.1f} MB of JSONL)")
    print(
        f"accepted:              {report.accepted_count:,}  exact dup {report.dropped_exact_duplicate_count:,}  "
        f"near dup {report.dropped_near_duplicate_count + report.flagged_near_duplicate_count:,}  "
        f"PII-masked {report.pii_masked_item_count:,} {dict(report.pii_masked_by_kind)}  "
        f"labels {report.imported_label_count:,}"
    )
    cpu = cpu_finished - cpu_started
    phase1 = f"{read_done - started:6.2f} s wall, {cpu_read_done - cpu_started:6.2f} s CPU"
    phase2 = f"{finished - read_done:6.2f} s wall, {cpu_finished - cpu_read_done:6.2f} s CPU"
    print(f"phase 1 (parse, normalise, mask, spool): {phase1}")
    print(f"phase 2 (dedupe, MinHash/LSH, insert):   {phase2}")
    print(
        f"end to end:            {total:.2f} s = {report.received_count / total:,.0f} items/s "
        f"({report.received_count / cpu:,.0f} items per CPU second; the machine is shared)"
    )
    print(
        f"peak RSS:              {peak_rss_mib():.0f} MiB (input held in memory: {len(data) / 2**20:.0f} MiB; "
        f"before the import: {baseline:.0f} MiB)"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
