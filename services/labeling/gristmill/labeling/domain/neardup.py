"""Near-duplicate detection: MinHash signatures over word shingles, indexed with datasketch's MinHashLSH.

Shingles are the word bigrams of the lower-cased text. A shingle's 32-bit hash combines the CRC-32 of its
two words (``shingle_hash``), so each distinct word is hashed once and the bigrams of a whole batch are
combined, mixed and permuted in a few numpy operations. Signatures follow datasketch's ``affine32`` scheme
exactly (the permutations of ``MinHash(NUM_PERM, SEED)``, the MurmurHash3 finaliser, ``a * h + b mod
2**32``, minimum per permutation), so ``MinHash(hashfunc=shingle_hash).update_batch(shingles(text))``
gives the same values (a unit test checks it).

A signature is stored with its item (``NUM_PERM`` little-endian uint32 values), so a project's LSH index
can always be rebuilt from the database without reading any text.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

# datasketch ships no type information (see the service README: a root mypy override is requested).
from datasketch import MinHash, MinHashLSH

NUM_PERM = 64
SEED = 1
SHINGLE_WORDS = 2
SIGNATURE_BYTES = NUM_PERM * 4

Signature = npt.NDArray[np.uint32]

_WORD = re.compile(r"\w+")
_PERMUTATIONS = MinHash(num_perm=NUM_PERM, seed=SEED, scheme="affine32").permutations
_A: Signature = np.asarray(_PERMUTATIONS[0], dtype=np.uint32)
_B: Signature = np.asarray(_PERMUTATIONS[1], dtype=np.uint32)
# Texts per numpy pass: bounds the temporary (shingles x NUM_PERM) matrix to a few MB.
_BATCH = 512


def shingles(text: str) -> list[bytes]:
    """Word bigrams of the lower-cased text; its one word when it has one; when it has none, its
    non-space characters (so that punctuation-only texts still compare)."""
    words = _WORD.findall(text.lower())
    if len(words) >= SHINGLE_WORDS:
        return [f"{a} {b}".encode() for a, b in itertools.pairwise(words)]
    if words:
        return [words[0].encode()]
    return ["".join(text.split()).encode()]


_PAIR = np.uint32(0x9E3779B1)  # odd: (first * _PAIR + second) mod 2**32 keeps the order of the two words


def shingle_hash(shingle: bytes) -> int:
    """The 32-bit hash of one shingle: CRC-32 of a single token, or of each word of a bigram, combined.

    (CRC-32: fast and stable across processes, unlike ``hash``.)
    """
    first, space, second = shingle.partition(b" ")
    if not space:
        return zlib.crc32(shingle)
    return (zlib.crc32(first) * int(_PAIR) + zlib.crc32(second)) & 0xFFFFFFFF


# Word → CRC-32, shared by all imports: real vocabularies repeat, so most words are hashed once. Bounded.
_WORD_HASHES: dict[str, int] = {}
_WORD_CACHE_LIMIT = 500_000


def _word_hashes(words: list[str]) -> list[int]:
    cache = _WORD_HASHES
    out = []
    for word in words:
        value = cache.get(word)
        if value is None:
            value = zlib.crc32(word.encode())
            if len(cache) < _WORD_CACHE_LIMIT:
                cache[word] = value
        out.append(value)
    return out


def _fmix32(values: Signature) -> Signature:
    # MurmurHash3's 32-bit finaliser, as datasketch applies it before the affine permutations.
    values = values ^ (values >> np.uint32(16))
    values = values * np.uint32(0x85EBCA6B)
    values = values ^ (values >> np.uint32(13))
    values = values * np.uint32(0xC2B2AE35)
    return values ^ (values >> np.uint32(16))


def signatures(texts: Sequence[str]) -> npt.NDArray[np.uint32]:
    """One MinHash signature per text, as a ``(len(texts), NUM_PERM)`` uint32 array."""
    out = np.empty((len(texts), NUM_PERM), dtype=np.uint32)
    for start in range(0, len(texts), _BATCH):
        chunk = texts[start : start + _BATCH]
        out[start : start + len(chunk)] = _signatures(chunk)
    return out


def _signatures(texts: Sequence[str]) -> npt.NDArray[np.uint32]:
    # Every text contributes its tokens to one array: its word hashes, or one fallback token.
    tokens: list[int] = []
    counts: list[int] = []
    for text in texts:
        words = _WORD.findall(text.lower())
        if words:
            tokens += _word_hashes(words)
            counts.append(len(words))
        else:
            tokens.append(zlib.crc32("".join(text.split()).encode()))
            counts.append(1)
    values = np.asarray(tokens, dtype=np.uint32)
    n = np.asarray(counts, dtype=np.int64)
    starts = np.cumsum(n) - n
    with np.errstate(over="ignore"):
        pairs = values[:-1] * _PAIR + values[1:]
    # Shingles of text t: its n-1 bigrams (pairs[start:start+n-1]), or its one token (values[start]).
    # Both arrays side by side, and one gather picks each text's shingles in order.
    combined = np.concatenate((pairs, values))
    lengths = np.maximum(n - 1, 1)
    base = np.where(n >= SHINGLE_WORDS, starts, len(pairs) + starts)
    offsets = np.cumsum(lengths) - lengths
    index = np.repeat(base - offsets, lengths) + np.arange(int(lengths.sum()))
    mixed = _fmix32(combined[index])
    with np.errstate(over="ignore"):
        permuted = mixed[:, None] * _A + _B
    result: npt.NDArray[np.uint32] = np.minimum.reduceat(permuted, offsets, axis=0)
    return result


def similarity(a: Signature, b: Signature) -> float:
    """Estimated Jaccard similarity: the fraction of permutations whose minimum agrees."""
    return float(np.count_nonzero(a == b)) / NUM_PERM


def to_bytes(signature: Signature) -> bytes:
    return signature.astype("<u4", copy=False).tobytes()


def from_bytes(data: bytes) -> Signature | None:
    """The stored signature, or None when it was made with another NUM_PERM (then it is not indexed)."""
    if len(data) != SIGNATURE_BYTES:
        return None
    return np.frombuffer(data, dtype="<u4").astype(np.uint32)


@lru_cache(maxsize=64)
def lsh_params(threshold: float) -> tuple[int, int]:
    """(bands, rows) for ``threshold``: datasketch's optimum, or two bands where that would be one
    (MinHashLSH needs at least two; only thresholds near 1 get there)."""
    try:
        lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    except ValueError:
        return 2, NUM_PERM // 2
    return lsh.b, lsh.r


# Odd 64-bit multipliers: a band's key is sum(value_i * multiplier_i) mod 2**64, a multiply-add hash that
# numpy computes for a whole batch at once. Two different bands get the same key with negligible
# probability, and even then the item is only a candidate: its signature is compared before it counts.
_BAND_MULTIPLIERS = np.random.RandomState(SEED + 1).randint(1, 2**62, size=NUM_PERM, dtype=np.uint64) * np.uint64(
    2
) + np.uint64(1)


class BandKeys:
    """One signature's LSH band keys, in the shape MinHashLSH reads a MinHash: ``len()`` and slices of
    ``hashvalues`` (each band's slice gives that band's precomputed key)."""

    __slots__ = ("hashvalues",)
    scheme = "affine32"

    def __init__(self, keys: list[int], rows: int) -> None:
        self.hashvalues = _BandSlices(keys, rows)

    def __len__(self) -> int:
        return NUM_PERM

    @property
    def keys(self) -> list[int]:
        return self.hashvalues.keys


class _BandSlices:
    __slots__ = ("keys", "rows")

    def __init__(self, keys: list[int], rows: int) -> None:
        self.keys = keys
        self.rows = rows

    def __getitem__(self, band: slice) -> int:
        start: int = band.start
        return self.keys[start // self.rows]


def band_keys(signatures: npt.NDArray[np.uint32], bands: int, rows: int) -> list[BandKeys]:
    """Every signature's band keys, computed in one numpy pass per band."""
    wide = signatures.astype(np.uint64)
    columns = []
    with np.errstate(over="ignore"):
        for band in range(bands):
            start, end = band * rows, (band + 1) * rows
            columns.append((wide[:, start:end] * _BAND_MULTIPLIERS[start:end]).sum(axis=1, dtype=np.uint64))
    per_row: list[list[int]] = np.stack(columns, axis=1).tolist()
    return [BandKeys(keys, rows) for keys in per_row]


class _BandKeyLSH(MinHashLSH):  # type: ignore[misc]
    """datasketch's MinHashLSH (bands and rows from its optimiser, its hash tables, query and removal), fed
    band keys computed for a batch at once (``band_keys``) instead of hashing each band's bytes one call at
    a time, which was most of an import's LSH cost. A unit test checks it finds what MinHashLSH finds."""

    def __init__(self, threshold: float, params: tuple[int, int]) -> None:
        super().__init__(threshold=threshold, num_perm=NUM_PERM, params=params)
        self._H = _band_key_of


def _band_key_of(band: int) -> int:
    return band


@dataclass(frozen=True)
class Match:
    key: str
    similarity: float


def best_of(signature: Signature, candidates: Sequence[tuple[str, Signature]], threshold: float) -> Match | None:
    """The candidate most similar to ``signature`` at or above ``threshold`` (the first one on a tie).

    LSH candidates are only likely matches: this is where they are verified.
    """
    best: Match | None = None
    for key, other in candidates:
        score = similarity(signature, other)
        if score >= threshold and (best is None or score > best.similarity):
            best = Match(key, score)
    return best


class NearDuplicateIndex:
    """One project's LSH index over item ids. Holds band keys only: no text, no signatures.

    ``high_water`` is the largest item sequence number it covers, so that it can catch up with items
    another process (or a past run) stored: the caller feeds it ``signatures after high_water``.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.bands, self.rows = lsh_params(threshold)
        self._lsh = _BandKeyLSH(threshold, (self.bands, self.rows))
        self.high_water = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: str) -> bool:
        return key in self._lsh

    def band_keys(self, signatures: npt.NDArray[np.uint32]) -> list[BandKeys]:
        return band_keys(signatures, self.bands, self.rows)

    def candidates(self, bands: BandKeys) -> list[str]:
        return [str(key) for key in self._lsh.query(bands)]

    def best_match(
        self, bands: BandKeys, signature: Signature, signature_of: Callable[[Sequence[str]], dict[str, Signature]]
    ) -> Match | None:
        """The most similar indexed item at or above the threshold (candidates verified by their signatures)."""
        keys = self.candidates(bands)
        if not keys:
            return None
        return best_of(signature, sorted(signature_of(keys).items()), self.threshold)

    def insert(self, key: str, bands: BandKeys) -> None:
        self._lsh.insert(key, bands, check_duplication=False)
        self._size += 1

    def insert_many(self, keys: Sequence[str], signatures: npt.NDArray[np.uint32]) -> None:
        """Index stored items (a rebuild or catch-up), skipping those already in."""
        for key, bands in zip(keys, self.band_keys(signatures), strict=True):
            if key not in self._lsh:
                self.insert(key, bands)

    def remove(self, key: str) -> None:
        if key in self._lsh:
            self._lsh.remove(key)
            self._size -= 1
