"""MinHash signatures (identical to datasketch's) and the per-project LSH index."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash, MinHashLSH  # type: ignore[import-untyped]

from gristmill.labeling.domain import neardup


@pytest.mark.parametrize(
    "text",
    ["Good case, Excellent value.", "Great for the jawbone.", "x", "!!!", "the quick brown fox jumps over the dog"],
)
def test_batched_signatures_equal_datasketch_minhash(text: str) -> None:
    # The vectorised batch computation must give exactly what datasketch computes one text at a time,
    # so that the LSH behaves as datasketch documents (and stored signatures stay valid across versions).
    reference = MinHash(num_perm=neardup.NUM_PERM, seed=neardup.SEED, hashfunc=neardup.shingle_hash)
    reference.update_batch(neardup.shingles(text))
    batch = neardup.signatures(["something else entirely", text, "and another one"])
    assert np.array_equal(batch[1], reference.hashvalues)


def test_signatures_of_many_texts_match_one_by_one() -> None:
    texts = [f"item number {i} says hello to {i % 7} friends" for i in range(1_100)]  # spans several numpy passes
    together = neardup.signatures(texts)
    for i in (0, 511, 512, 1_099):
        assert np.array_equal(together[i], neardup.signatures([texts[i]])[0])


def test_similarity_estimates_jaccard_of_word_bigrams() -> None:
    a, b, c = neardup.signatures(
        [
            "the battery lasts all day and the screen is bright",
            "The battery lasts all day, and the screen is bright!",  # same bigrams after lower-casing
            "terrible customer service never again",
        ]
    )
    assert neardup.similarity(a, b) == 1.0
    assert neardup.similarity(a, c) < 0.2


def _index(entries: dict[str, str], threshold: float = 0.9) -> tuple[neardup.NearDuplicateIndex, dict[str, Any]]:
    index = neardup.NearDuplicateIndex(threshold)
    sigs = neardup.signatures(list(entries.values()))
    index.insert_many(list(entries), sigs)
    return index, dict(zip(entries, sigs, strict=True))


def _probe(index: neardup.NearDuplicateIndex, text: str) -> tuple[Any, Any]:
    sigs = neardup.signatures([text])
    return index.band_keys(sigs)[0], sigs[0]


def test_index_finds_near_duplicates_above_the_threshold_only() -> None:
    index, stored = _index(
        {
            "a": "the battery lasts all day and the screen is bright and sharp",
            "b": "i returned it after two days because the speaker crackled",
        }
    )
    lookup = lambda keys: {k: stored[k] for k in keys}  # noqa: E731
    bands, sig = _probe(index, "The battery lasts all day and the screen is bright and sharp.")
    match = index.best_match(bands, sig, lookup)
    assert match is not None and match.key == "a" and match.similarity == 1.0
    other_bands, other_sig = _probe(index, "the screen is dim and the battery dies by noon")
    assert index.best_match(other_bands, other_sig, lookup) is None
    index.remove("a")
    assert index.best_match(bands, sig, lookup) is None
    assert len(index) == 1 and "b" in index and "a" not in index


def test_candidates_missing_from_the_lookup_are_not_matches() -> None:
    # A key left in the index by a transaction that rolled back has no stored signature: never a match.
    index, _ = _index({"ghost": "one two three four five"})
    bands, sig = _probe(index, "one two three four five")
    assert index.candidates(bands) == ["ghost"]
    assert index.best_match(bands, sig, lambda keys: {}) is None


def test_precomputed_band_keys_find_what_plain_minhashlsh_finds() -> None:
    # The index feeds datasketch's MinHashLSH batch-computed band keys instead of hashing each band's bytes.
    # Over many random texts and their near duplicates, both must return the same candidate sets.
    rng = random.Random(3)
    words = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 20))) for _ in range(400)]
    probes = [t.upper() + "!" for t in texts[:50]] + [t + " extra words here" for t in texts[50:100]]
    probes += [" ".join(rng.choice(words) for _ in range(12)) for _ in range(50)]
    ours = neardup.NearDuplicateIndex(0.7)
    plain = MinHashLSH(threshold=0.7, num_perm=neardup.NUM_PERM, params=neardup.lsh_params(0.7))
    sigs = neardup.signatures(texts)
    ours.insert_many([f"k{i}" for i in range(len(texts))], sigs)
    for i, sig in enumerate(sigs):
        plain.insert(f"k{i}", LeanMinHash(seed=neardup.SEED, hashvalues=sig, scheme="affine32"))
    probe_sigs = neardup.signatures(probes)
    found_any = 0
    for bands, sig in zip(ours.band_keys(probe_sigs), probe_sigs, strict=True):
        expected = set(plain.query(LeanMinHash(seed=neardup.SEED, hashvalues=sig, scheme="affine32")))
        assert set(ours.candidates(bands)) == expected
        found_any += bool(expected)
    assert found_any >= 50  # the near duplicates were found, so the comparison is not vacuous


def test_signature_bytes_round_trip_and_foreign_sizes_are_refused() -> None:
    (sig,) = neardup.signatures(["hello world"])
    data = neardup.to_bytes(sig)
    assert len(data) == neardup.SIGNATURE_BYTES
    restored = neardup.from_bytes(data)
    assert restored is not None and np.array_equal(restored, sig)
    assert neardup.from_bytes(data[:-4]) is None


def test_lsh_params_always_have_two_bands() -> None:
    assert neardup.lsh_params(1.0)[0] >= 2
    bands, rows = neardup.lsh_params(0.9)
    assert bands >= 2 and bands * rows <= neardup.NUM_PERM
