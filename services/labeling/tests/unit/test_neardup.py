"""MinHash signatures (identical to datasketch's) and the per-project LSH index."""

from __future__ import annotations

import numpy as np
import pytest
from datasketch import MinHash  # type: ignore[import-untyped]

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


def test_index_finds_near_duplicates_above_the_threshold_only() -> None:
    index = neardup.NearDuplicateIndex(0.9)
    texts = [
        "the battery lasts all day and the screen is bright and sharp",
        "i returned it after two days because the speaker crackled",
    ]
    sigs = neardup.signatures(texts)
    for key, sig in zip(("a", "b"), sigs, strict=True):
        index.insert(key, sig)
    stored = dict(zip(("a", "b"), sigs, strict=True))
    lookup = lambda keys: {k: stored[k] for k in keys}  # noqa: E731
    (same,) = neardup.signatures(["The battery lasts all day and the screen is bright and sharp."])
    match = index.best_match(same, lookup)
    assert match is not None and match.key == "a" and match.similarity == 1.0
    (other,) = neardup.signatures(["the screen is dim and the battery dies by noon"])
    assert index.best_match(other, lookup) is None
    index.remove("a")
    assert index.best_match(same, lookup) is None
    assert len(index) == 1


def test_candidates_missing_from_the_lookup_are_not_matches() -> None:
    # A key left in the index by a transaction that rolled back has no stored signature: never a match.
    index = neardup.NearDuplicateIndex(0.9)
    (sig,) = neardup.signatures(["one two three four five"])
    index.insert("ghost", sig)
    assert index.candidates(sig) == ["ghost"]
    assert index.best_match(sig, lambda keys: {}) is None


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
