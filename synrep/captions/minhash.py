"""Near-duplicate detection with MinHash and locality-sensitive hashing (Broder 1997; the LSH
banding of Leskovec, Rajaraman and Ullman, *Mining of Massive Datasets*, ch. 3).

Texts are shingled into word-anchored character n-grams (the ``n`` characters from the start of
each word, plus the text's last ``n``: about one shingle per word, each spanning a word and the
start of the next), each signature is the minimum of ``num_perm``
multiply-shift hashes ``((a*x + b) mod 2^64) >> 32`` (Dietzfelbinger et al. 1997) over the
shingles, and the probability that two
signatures agree at a position is the Jaccard similarity of the shingle sets. Signatures are
split into ``bands`` of ``rows``; texts sharing a band are candidates, and a candidate is a
near-duplicate when its estimated Jaccard similarity is at least ``threshold``.

Shingling and hashing are batched numpy operations over many texts at once; only the band lookups
run per text.
"""

from __future__ import annotations

import numpy as np

_SHIFT = np.uint64(32)
_MAX_WINDOWS = 1 << 17  # shingles hashed per numpy block: bounds memory to ~num_perm MB


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.1,
               fn_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted false-positive and
    false-negative probability mass around ``threshold``. Misses weigh more: a false candidate
    only costs a signature comparison, a missed one lets a near-duplicate through."""
    s = np.linspace(0.0, 1.0, 1001)
    best, best_err = (1, num_perm), np.inf
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        p = 1.0 - (1.0 - s**rows) ** bands  # probability of becoming a candidate
        fp = np.trapezoid(np.where(s < threshold, p, 0.0), s)
        fn = np.trapezoid(np.where(s >= threshold, 1.0 - p, 0.0), s)
        err = fp_weight * fp + fn_weight * fn
        if err < best_err:
            best, best_err = (bands, rows), err
    return best


def shingle_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of the word-anchored character ``n``-grams of every text, concatenated:
    returns ``(hashes (W,), owner (W,))`` where ``owner[w]`` is the index of the text shingle
    ``w`` came from. Texts shorter than ``n`` count as one shingle (padded)."""
    raw = [t.encode("utf-8") for t in texts]
    raw = [r + b"\x01" * (n - len(r)) if len(r) < n else r for r in raw]
    lengths = np.fromiter((len(r) for r in raw), dtype=np.int64, count=len(raw))
    data = np.frombuffer(b"".join(raw), dtype=np.uint8).astype(np.uint32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    counts = lengths - n + 1  # windows per text
    owner = np.repeat(np.arange(len(raw)), counts)
    pos = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    idx = np.repeat(starts, counts) + pos
    # keep windows that start a word, and each text's last window
    prev = data[np.maximum(idx - 1, 0)]
    keep = (pos == 0) | (prev == 32) | (pos == np.repeat(counts - 1, counts))
    idx, owner = idx[keep], owner[keep]
    h = np.zeros(len(idx), dtype=np.uint32)
    for j in range(n):  # polynomial hash of the window, then an integer mix (wraps mod 2^32)
        h = h * np.uint32(0x01000193) + data[idx + j]
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x45D9F3B)
    h ^= h >> np.uint32(16)
    return h, owner


class NearDuplicateIndex:
    """An LSH index of MinHash signatures.

    Args:
        threshold: Jaccard similarity at or above which a text is a near-duplicate.
        num_perm: hash functions per signature; more is more exact and slower.
        shingle: character n-gram length.
        seed: seeds the hash functions (fixed, so runs are reproducible).

    Example:
        >>> index = NearDuplicateIndex(0.8)
        >>> index.add_texts(["a red coat on a hanger", "a red coat on a hanger.", "a blue bag"])
        [True, False, True]
    """

    def __init__(self, threshold: float, num_perm: int = 64, shingle: int = 10,
                 seed: int = 1) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if num_perm < 1 or shingle < 1:
            raise ValueError("num_perm and shingle must be >= 1")
        self.threshold, self.num_perm, self.shingle = threshold, num_perm, shingle
        self.bands, self.rows = lsh_params(threshold, num_perm)
        rng = np.random.default_rng(seed)
        self._a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + 1
        self._b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)
        # folds a band's rows into one 64-bit key
        self._fold = rng.integers(0, 1 << 63, size=self.rows, dtype=np.uint64) * np.uint64(2) + 1
        self._tables: list[dict[int, list[int]]] = [{} for _ in range(self.bands)]
        self._sigs = np.empty((1024, num_perm), dtype=np.uint32)  # grows by doubling
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def signatures(self, texts: list[str]) -> np.ndarray:
        """MinHash signatures, uint32 (len(texts), num_perm)."""
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        i = 0
        while i < len(texts):
            # grow the block until it holds ~_MAX_WINDOWS shingles
            j, windows = i, 0
            while j < len(texts) and (j == i or windows < _MAX_WINDOWS):
                windows += max(len(texts[j]), self.shingle)
                j += 1
            h, owner = shingle_hashes(texts[i:j], self.shingle)
            hv = ((h.astype(np.uint64)[:, None] * self._a + self._b) >> _SHIFT).astype(np.uint32)
            bounds = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
            out[i:j] = np.minimum.reduceat(hv, bounds, axis=0)
            i = j
        return out

    def band_keys(self, sigs: np.ndarray) -> list[list[int]]:
        """One integer key per band for each signature (batched): (n, bands) as lists."""
        r = self.rows
        bands = sigs[:, : self.bands * r].astype(np.uint64).reshape(len(sigs), self.bands, r)
        return (bands * self._fold).sum(axis=2).tolist()  # wraps mod 2^64

    def find(self, sig: np.ndarray, keys: list[int]) -> int | None:
        """Index of an indexed text whose estimated Jaccard similarity is >= threshold."""
        for table, key in zip(self._tables, keys):
            cands = table.get(key)
            if cands:
                agree = np.count_nonzero(self._sigs[cands] == sig, axis=1)
                hit = np.flatnonzero(agree >= self.threshold * self.num_perm)
                if len(hit):
                    return cands[hit[0]]
        return None

    def add(self, sig: np.ndarray, keys: list[int]) -> int:
        j = self._n
        if j == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
        self._sigs[j] = sig
        self._n += 1
        for table, key in zip(self._tables, keys):
            table.setdefault(key, []).append(j)
        return j

    def add_if_new(self, sig: np.ndarray, keys: list[int]) -> bool:
        """Index ``sig`` (with its :meth:`band_keys`) unless it is a near-duplicate; return
        whether it was new."""
        if self.find(sig, keys) is not None:
            return False
        self.add(sig, keys)
        return True

    def add_texts(self, texts: list[str]) -> list[bool]:
        """Index texts in order, each unless it near-duplicates an earlier one."""
        sigs = self.signatures(texts)
        return [self.add_if_new(s, k) for s, k in zip(sigs, self.band_keys(sigs))]
