"""A set of record keys for one run that stays small: 24 bytes a key, numpy only.

A key is stored as two 64-bit numbers. Shop keys are mostly a fixed prefix and
a number (``1001``, ``#1001``, ``ORD-1001``): those are stored exactly, as the
number and the prefix's id. Any other key is stored as two independent keyed
SipHash values, so two different keys are taken for one only if both 64-bit
hashes collide at once. Keys live in sorted runs that are merged as they grow
(a log-structured set), so adding a batch costs O(batch · log n) and no Python
object is kept per key.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrowutil import to_bool_np

__all__ = ["KeyHasher", "SeenKeys"]

_HASHED = np.uint64(1 << 63)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # marks h2 of a hashed key, apart from prefix ids
_NOT_DIGITS = "".join(chr(c) for c in range(32, 127) if not chr(c).isdigit())


class KeyHasher:
    """Turns string keys into pairs of 64-bit numbers; remembers the prefixes it met."""

    def __init__(self) -> None:
        self._prefixes: dict[str, int] = {}

    def __call__(self, keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Per key: exact (number, prefix id) when it is prefix + digits, else two hashes.

        The choice depends on the key alone, so a key is stored the same way
        whichever batch it comes in.
        """
        n = len(keys)
        h1 = np.empty(n, dtype=np.uint64)
        h2 = np.empty(n, dtype=np.uint64)
        if n == 0:
            return h1, h2
        digits = pc.utf8_ltrim(keys, characters=_NOT_DIGITS)
        prefix = pc.utf8_rtrim(keys, characters="0123456789")
        split_ok = pc.equal(
            pc.add(pc.binary_length(digits), pc.binary_length(prefix)), pc.binary_length(keys)
        )
        canonical = pc.match_substring_regex(digits, r"^(?:[1-9][0-9]{0,17}|0)$")
        padded = pc.match_substring_regex(digits, r"^0[0-9]{1,17}$")
        exact = to_bool_np(pc.and_(split_ok, pc.or_(canonical, padded)))
        idx = np.flatnonzero(exact)
        if idx.size:
            sel = pa.array(idx)
            numbers = pc.cast(digits.take(sel), pa.int64()).to_numpy(zero_copy_only=False)
            width = np.where(
                to_bool_np(canonical.take(sel)),
                0,
                pc.binary_length(digits.take(sel)).to_numpy(zero_copy_only=False),
            )
            enc = (
                pc.dictionary_encode(prefix.take(sel)).combine_chunks()
                if isinstance(prefix, pa.ChunkedArray)
                else pc.dictionary_encode(prefix.take(sel))
            )
            ids = np.array(
                [
                    self._prefixes.setdefault(p, len(self._prefixes))
                    for p in enc.dictionary.to_pylist()
                ],
                dtype=np.uint64,
            )
            pid = ids[enc.indices.to_numpy(zero_copy_only=False)]
            h2[idx] = (pid << np.uint64(8)) | width.astype(np.uint64)
            # mixing in the prefix keeps (h1, h2) exact (a bijection for each h2) while
            # 1001 and #1001 get different first numbers, so sorted runs rarely tie
            with np.errstate(over="ignore"):
                h1[idx] = numbers.astype(np.uint64) ^ (h2[idx] * _GOLDEN)
        rest = np.flatnonzero(~exact)
        if rest.size:
            import pandas as pd  # only keys that are not prefix + digits need it (slow import)

            series = pd.Series(keys.take(pa.array(rest)).to_pandas())
            h1[rest] = pd.util.hash_pandas_object(series, index=False, hash_key="mailpipe-keys-01")
            h2[rest] = (
                np.asarray(
                    pd.util.hash_pandas_object(series, index=False, hash_key="mailpipe-keys-02"),
                    dtype=np.uint64,
                )
                | _HASHED
            )
        return h1, h2


class SeenKeys:
    """Which keys were seen, and where each was first seen (an int64 you choose)."""

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(r[0].size for r in self._runs)

    def add(self, h1: np.ndarray, h2: np.ndarray, where: np.ndarray) -> np.ndarray:
        """Add keys in order; return, per key, where it was first seen, or -1 if it is new.

        A key repeated inside the batch is new the first time and a repeat after.
        """
        n = h1.size
        first = np.full(n, -1, dtype=np.int64)
        if n == 0:
            return first
        # sorted by both numbers (stable): exact keys share the first one whenever
        # their digits do ("1001", "#1001", "01001"), so equal keys must be made
        # adjacent by the second one too
        order = np.lexsort((h2, h1))
        s1, s2 = h1[order], h2[order]
        same_as_prev = np.zeros(n, dtype=bool)
        same_as_prev[1:] = (s1[1:] == s1[:-1]) & (s2[1:] == s2[:-1])
        head = np.maximum.accumulate(np.where(same_as_prev, 0, np.arange(n)))
        new = order[~same_as_prev]
        for r1, r2, rw in self._runs:
            hit, at = _lookup(r1, r2, h1[new], h2[new])
            first[new[hit]] = rw[at[hit]]
            new = new[~hit]
        if new.size:
            self._push(h1[new], h2[new], where[new])
        # a repeat inside the batch points where its first instance does
        first_of = order[head[same_as_prev]]
        first[order[same_as_prev]] = np.where(
            first[first_of] >= 0, first[first_of], where[first_of]
        )
        return first

    def _push(self, h1: np.ndarray, h2: np.ndarray, where: np.ndarray) -> None:
        order = np.argsort(h1, kind="stable")
        self._runs.append((h1[order], h2[order], where[order]))
        while len(self._runs) > 1 and self._runs[-2][0].size <= 2 * self._runs[-1][0].size:
            a, b = self._runs.pop(), self._runs.pop()
            h1m = np.concatenate((b[0], a[0]))
            h2m = np.concatenate((b[1], a[1]))
            wm = np.concatenate((b[2], a[2]))
            order = np.argsort(h1m, kind="stable")
            self._runs.append((h1m[order], h2m[order], wm[order]))


def _lookup(
    r1: np.ndarray, r2: np.ndarray, q1: np.ndarray, q2: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each query, is (q1, q2) in the sorted run, and at which index."""
    lo = np.searchsorted(r1, q1, side="left")
    hi = np.searchsorted(r1, q1, side="right")
    hit = np.zeros(q1.size, dtype=bool)
    at = np.zeros(q1.size, dtype=np.int64)
    cand = np.flatnonzero(hi > lo)
    if cand.size == 0:
        return hit, at
    single = cand[hi[cand] - lo[cand] == 1]
    ok = r2[lo[single]] == q2[single]
    hit[single[ok]] = True
    at[single[ok]] = lo[single[ok]]
    # equal first hashes with different second ones: vanishingly rare, checked one by one
    for i in cand[hi[cand] - lo[cand] > 1].tolist():
        m = np.flatnonzero(r2[lo[i] : hi[i]] == q2[i])
        if m.size:
            hit[i] = True
            at[i] = lo[i] + int(m[0])
    return hit, at
