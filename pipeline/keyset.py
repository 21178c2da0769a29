"""A set of record keys for one run whose memory does not grow with the keys: numpy only.

A key is stored as two 64-bit numbers. Shop keys are mostly a fixed prefix and
a number (``1001``, ``#1001``, ``ORD-1001``): those are stored exactly, as the
number and the prefix's id. Any other key is stored as two independent keyed
SipHash values, so two different keys are taken for one only if both 64-bit
hashes collide at once. Keys live in sorted runs that are merged as they grow
(a log-structured set), so adding a batch costs O(batch · log n) and no Python
object is kept per key. Past ``SPILL_AT`` keys (3 MB), the runs go to disk
(:mod:`pipeline.keyruns`): memory holds at most that many keys, the disk
runs' fences and a fixed 8 MB filter, whether a run has a million keys or
fifty.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrowutil import to_bool_np
from pipeline.keyruns import (
    BLOCK,
    MERGE_RECORDS,
    DiskRun,
    KeyFilter,
    lookup,
    merge_runs,
    records,
)

__all__ = ["KeyHasher", "SeenKeys"]

_HASHED = np.uint64(1 << 63)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # marks h2 of a hashed key, apart from prefix ids
SPILL_AT = 1 << 17  # keys kept in memory (3 MB) before they go to a sorted run on disk
FANOUT = 8  # runs on disk of one level merged into one of the next
FILTER_WORDS = 1 << 20  # the filter over the keys on disk: 8 MB
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
    """Which keys were seen, and where each was first seen (an int64 you choose).

    At most ``spill_at`` keys stay in memory, in sorted runs merged as they
    grow; then they go to disk as one sorted run (see :mod:`pipeline.keyruns`),
    and runs on disk are merged ``fanout`` at a time. A key the in-memory runs
    do not hold is looked up on disk only when the fixed-size filter over the
    disk's keys says it may be there, so memory stays flat however many keys a
    run has. ``spill_at``, ``block``, ``fanout`` and ``filter_words`` exist for
    tests, which force spills with a few keys.
    """

    def __init__(
        self,
        scratch: str | os.PathLike[str] | None = None,
        spill_at: int | None = None,
        block: int = BLOCK,
        fanout: int = FANOUT,
        filter_words: int = FILTER_WORDS,
    ) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._in_memory = 0
        self._disk: list[tuple[int, DiskRun]] = []  # (level, run)
        self._filter: KeyFilter | None = None
        self._filter_words = filter_words
        self._scratch = scratch
        self._spill_at = SPILL_AT if spill_at is None else spill_at
        self._block = block
        self._fanout = max(fanout, 2)

    def __len__(self) -> int:
        return self._in_memory + sum(r.size for _, r in self._disk)

    @property
    def in_memory(self) -> int:
        """Keys held in memory (the rest are on disk)."""
        return self._in_memory

    @property
    def disk_runs(self) -> int:
        return len(self._disk)

    def close(self) -> None:
        """Remove the runs on disk (the set is empty afterwards)."""
        for _, run in self._disk:
            run.close()
        self._disk, self._runs, self._in_memory, self._filter = [], [], 0, None

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
            hit, at = lookup(r1, r2, h1[new], h2[new])
            first[new[hit]] = rw[at[hit]]
            new = new[~hit]
        if self._disk and new.size:
            assert self._filter is not None
            ask = new[self._filter.might_hold(h1[new], h2[new])]
            for _, run in reversed(self._disk):
                if ask.size == 0:
                    break
                hit, at_where = run.find(h1[ask], h2[ask])
                first[ask[hit]] = at_where[hit]
                ask = ask[~hit]
            new = new[first[new] < 0]
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
        self._in_memory += h1.size
        while len(self._runs) > 1 and self._runs[-2][0].size <= 2 * self._runs[-1][0].size:
            a, b = self._runs.pop(), self._runs.pop()
            self._runs.append(_merged([b, a]))
        if self._in_memory >= self._spill_at:
            self._spill()

    def _spill(self) -> None:
        """Every key in memory → one sorted run on disk; full levels merged into the next.

        Both write a merge of sorted runs a piece at a time: a spill holds no
        second copy of the keys, a merge of runs on disk a few hundred KB.
        """
        runs, self._runs, self._in_memory = self._runs, [], 0
        if self._filter is None:
            self._filter = KeyFilter(self._filter_words)
        size = max(MERGE_RECORDS // len(runs), self._block)
        for h1, h2, _ in runs:
            for at in range(0, h1.size, size):
                self._filter.add(h1[at : at + size], h2[at : at + size])
        feeds = [records(*r, size) for r in runs]
        del runs
        self._disk.append((0, merge_runs(feeds, self._scratch, self._block)))
        while True:
            level = self._disk[-1][0]
            same = [r for lv, r in self._disk if lv == level]
            if len(same) < self._fanout:
                break
            size = max(MERGE_RECORDS // len(same), self._block)
            merged = merge_runs([r.pieces(size) for r in same], self._scratch, self._block)
            for r in same:
                r.close()
            self._disk = [(lv, r) for lv, r in self._disk if lv != level] + [(level + 1, merged)]


def _merged(
    runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted runs (oldest first) → one, sorted by the first number (stable)."""
    h1 = np.concatenate([r[0] for r in runs])
    order = np.argsort(h1, kind="stable")
    return (
        h1[order],
        np.concatenate([r[1] for r in runs])[order],
        np.concatenate([r[2] for r in runs])[order],
    )
