"""Near-duplicate detection: MinHash signatures over word shingles, indexed with datasketch's MinHashLSH.

Signatures follow datasketch's ``affine32`` scheme exactly (the permutations of ``MinHash(NUM_PERM,
SEED)``, the MurmurHash3 finaliser, ``a * h + b mod 2**32``, minimum per permutation), with CRC-32 of
each shingle as the hash function, so ``MinHash(hashfunc=shingle_hash).update_batch(shingles)`` gives the
same values (a unit test checks it). They are computed for a whole batch of texts in a few numpy
operations instead of one ``MinHash`` per text, which is what makes a 100,000-item import fast.

A signature is stored with its item (``NUM_PERM`` little-endian uint32 values), so a project's LSH index
can always be rebuilt from the database without reading any text.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

# datasketch ships no type information (see the service README: a root mypy override is requested).
from datasketch import MinHash, MinHashLSH  # type: ignore[import-untyped]

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
    """Word bigrams of the lower-cased text (its words alone when it has one; the text when it has none)."""
    words = _WORD.findall(text.lower())
    if len(words) >= SHINGLE_WORDS:
        return [f"{a} {b}".encode() for a, b in itertools.pairwise(words)]
    if words:
        return [words[0].encode()]
    return [text.encode()]


def shingle_hash(shingle: bytes) -> int:
    """The 32-bit hash of one shingle (CRC-32: fast, stable across processes, unlike ``hash``)."""
    return zlib.crc32(shingle)


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
        hashes: list[int] = []
        offsets: list[int] = []
        for text in chunk:
            offsets.append(len(hashes))
            hashes.extend(map(zlib.crc32, shingles(text)))
        mixed = _fmix32(np.asarray(hashes, dtype=np.uint32))
        with np.errstate(over="ignore"):
            permuted = mixed[:, None] * _A + _B
        out[start : start + len(chunk)] = np.minimum.reduceat(permuted, np.asarray(offsets), axis=0)
    return out


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


def _band_key(band: bytes) -> bytes:
    # Eight bytes per band instead of the band's raw values: the index stays a fraction of the size.
    return hashlib.blake2b(band, digest_size=8).digest()


class _Sketch:
    """What MinHashLSH reads from a MinHash (its length, values and scheme), without copying the values."""

    __slots__ = ("hashvalues",)
    scheme = "affine32"

    def __init__(self, hashvalues: Signature) -> None:
        self.hashvalues = hashvalues

    def __len__(self) -> int:
        return NUM_PERM


@dataclass(frozen=True)
class Match:
    key: str
    similarity: float


class NearDuplicateIndex:
    """One project's LSH index over item ids. Holds band hashes only: no text, no signatures.

    ``high_water`` is the largest item sequence number it covers, so that it can catch up with items
    another process (or a past run) stored: the caller feeds it ``signatures after high_water``.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, params=lsh_params(threshold), hashfunc=_band_key)
        self.high_water = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: str) -> bool:
        return key in self._lsh

    def candidates(self, signature: Signature) -> list[str]:
        return [str(key) for key in self._lsh.query(_Sketch(signature))]

    def best_match(
        self, signature: Signature, signature_of: Callable[[Sequence[str]], dict[str, Signature]]
    ) -> Match | None:
        """The most similar indexed item at or above the threshold (candidates verified by their signatures)."""
        keys = self.candidates(signature)
        if not keys:
            return None
        best: Match | None = None
        for key, other in sorted(signature_of(keys).items()):
            score = similarity(signature, other)
            if score >= self.threshold and (best is None or score > best.similarity):
                best = Match(key, score)
        return best

    def insert(self, key: str, signature: Signature) -> None:
        self._lsh.insert(key, _Sketch(signature), check_duplication=False)
        self._size += 1

    def insert_many(self, entries: Iterable[tuple[str, Signature]]) -> None:
        for key, signature in entries:
            if key not in self._lsh:
                self.insert(key, signature)

    def remove(self, key: str) -> None:
        if key in self._lsh:
            self._lsh.remove(key)
            self._size -= 1
