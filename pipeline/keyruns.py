"""Sorted runs of record keys on disk, and the filter that spares most lookups in them.

:class:`~pipeline.keyset.SeenKeys` keeps a bounded number of keys in memory
and moves the rest here, so a run's memory does not grow with its number of
distinct keys. A key is a pair of 64-bit numbers (``h1``, ``h2``) with the
int64 ``where`` it was first seen at; a run is a temporary file of such
records sorted by ``h1`` (equal ``h1`` values adjacent, in any ``h2`` order).

Finding keys in a run reads only the blocks that can hold them: a block
starts where ``h1`` changes, at least ``block`` records after the previous
start, so all records sharing an ``h1`` are in one block, and the first
``h1`` of each block (the fences, a few bytes per thousand keys) says which
one. Every found key is an exact match of both numbers.

:class:`KeyFilter` is a blocked Bloom filter of fixed size over every key on
disk: a key it has never been given is answered "absent" without a read; a
key it was given is always answered "maybe", and so are a few others (0.3%
at 3M keys in 8 MB), which the exact lookup then rules out.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO

import numpy as np

__all__ = ["RECORD", "DiskRun", "KeyFilter", "RunWriter", "lookup", "merge_runs", "records"]

RECORD = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("w", "<i8")])
BLOCK = 1024  # records from one fence to the next, at least (24 KB)
READ_RECORDS = 1 << 16  # records read at once, at most (1.5 MB), unless one block is bigger
MERGE_RECORDS = 1 << 14  # records held from all the runs a merge reads (384 KB)
_GAP = 4  # blocks between two wanted ones read rather than skipped with another call
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def lookup(
    r1: np.ndarray, r2: np.ndarray, q1: np.ndarray, q2: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each query, is (q1, q2) in the run sorted by ``r1``, and at which index."""
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
    # equal first numbers with different second ones: vanishingly rare, checked one by one
    for i in cand[hi[cand] - lo[cand] > 1].tolist():
        m = np.flatnonzero(r2[lo[i] : hi[i]] == q2[i])
        if m.size:
            hit[i] = True
            at[i] = lo[i] + int(m[0])
    return hit, at


class DiskRun:
    """A sorted run of key records in an anonymous temporary file (gone when closed)."""

    def __init__(self, fh: IO[bytes], size: int, fences: np.ndarray, starts: np.ndarray) -> None:
        self._fh = fh
        self.size = size
        self._fences = fences  # first h1 of each block
        self._starts = starts  # first record of each block, then ``size``

    def close(self) -> None:
        self._fh.close()

    def read(self, start: int, stop: int) -> np.ndarray:
        """Records ``start`` up to ``stop``."""
        want = (stop - start) * RECORD.itemsize
        data = os.pread(self._fh.fileno(), want, start * RECORD.itemsize)
        if len(data) != want:
            raise OSError(f"key run: read {len(data)} of {want} bytes")
        recs: np.ndarray = np.frombuffer(data, dtype=RECORD)
        return recs

    def pieces(self, records: int) -> Iterator[np.ndarray]:
        """The whole run, ``records`` at a time."""
        for start in range(0, self.size, records):
            yield self.read(start, min(start + records, self.size))

    def find(self, q1: np.ndarray, q2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per query: found, and the ``where`` stored with it (reads only the blocks needed)."""
        hit = np.zeros(q1.size, dtype=bool)
        where = np.zeros(q1.size, dtype=np.int64)
        block = np.searchsorted(self._fences, q1, side="right") - 1
        ask = np.flatnonzero(block >= 0)  # below the first fence: not in this run
        if ask.size == 0:
            return hit, where
        ask = ask[np.argsort(block[ask], kind="stable")]
        blocks = block[ask]
        for first, last in self._spans(np.unique(blocks)):
            lo, hi = np.searchsorted(blocks, [first, last + 1])
            sel = ask[lo:hi]
            recs = self.read(int(self._starts[first]), int(self._starts[last + 1]))
            found, at = lookup(recs["h1"], recs["h2"], q1[sel], q2[sel])
            hit[sel[found]] = True
            where[sel[found]] = recs["w"][at[found]]
        return hit, where

    def _spans(self, wanted: np.ndarray) -> Iterator[tuple[int, int]]:
        """Runs of wanted blocks (close ones joined), each read with one call."""
        first = last = int(wanted[0])
        # one Python step per wanted block: at most the keys of a batch, usually a few
        for b in wanted[1:].tolist():
            if b - last <= _GAP and self._starts[b + 1] - self._starts[first] <= READ_RECORDS:
                last = b
                continue
            yield first, last
            first = last = b
        yield first, last


class RunWriter:
    """Writes a sorted run piece by piece (each piece continues the previous one)."""

    def __init__(self, scratch: str | os.PathLike[str] | None, block: int = BLOCK) -> None:
        # no name on disk, gone when closed or when the process ends; the DiskRun closes it
        self._fh = tempfile.TemporaryFile(dir=scratch)  # noqa: SIM115
        self._block = block
        self._size = 0
        self._next = 0  # no block starts before this record
        self._last: np.uint64 | None = None
        self._fences: list[np.ndarray] = []
        self._starts: list[np.ndarray] = []

    def write(self, recs: np.ndarray) -> None:
        n = recs.size
        if n == 0:
            return
        h1 = recs["h1"]
        change = np.empty(n, dtype=bool)
        change[0] = self._last is None or h1[0] != self._last
        change[1:] = h1[1:] != h1[:-1]
        where = np.flatnonzero(change)
        starts: list[int] = []
        target = self._next - self._size
        # one Python step per block (a thousand keys): a block starts at the first
        # change of h1 at least ``block`` records after the previous start
        while (j := int(np.searchsorted(where, max(target, 0)))) < where.size:
            starts.append(int(where[j]))
            target = starts[-1] + self._block
        self._next = self._size + target
        at = np.array(starts, dtype=np.int64)
        self._fences.append(h1[at])
        self._starts.append(at + self._size)
        self._fh.write(recs.data)
        self._size += n
        self._last = h1[-1]

    def close(self) -> DiskRun:
        self._fh.flush()
        fences = np.concatenate(self._fences) if self._fences else np.empty(0, np.uint64)
        starts = np.concatenate([*self._starts, np.array([self._size], dtype=np.int64)])
        return DiskRun(self._fh, self._size, fences, starts)


def records(h1: np.ndarray, h2: np.ndarray, w: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """A sorted run held as three columns, as records, ``size`` at a time."""
    for start in range(0, h1.size, size):
        stop = min(start + size, h1.size)
        recs = np.empty(stop - start, dtype=RECORD)
        recs["h1"], recs["h2"], recs["w"] = h1[start:stop], h2[start:stop], w[start:stop]
        yield recs


def merge_runs(
    feeds: Sequence[Iterator[np.ndarray]],
    scratch: str | os.PathLike[str] | None,
    block: int = BLOCK,
) -> DiskRun:
    """One run on disk of the sorted runs that ``feeds`` give a piece at a time.

    Each round takes, from every run's current piece, the records up to the
    smallest last ``h1`` among the pieces: nothing read later can sort before
    it. Memory: a piece of each run, and one round's records twice.
    """
    out = RunWriter(scratch, block)
    empty = np.empty(0, dtype=RECORD)
    held = [next(f, empty) for f in feeds]
    while live := [i for i, p in enumerate(held) if p.size]:
        bound = min(held[i]["h1"][-1] for i in live)
        taken = []
        for i in live:
            piece = held[i]
            cut = int(np.searchsorted(piece["h1"], bound, side="right"))
            taken.append(piece[:cut])
            held[i] = piece[cut:] if cut < piece.size else next(feeds[i], empty)
        recs = np.concatenate(taken)
        out.write(recs[np.argsort(recs["h1"], kind="stable")])
    return out.close()


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every bit of the result depends on every bit of ``x``."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    out: np.ndarray = x ^ (x >> np.uint64(31))
    return out


class KeyFilter:
    """A blocked Bloom filter: one 64-bit word a key, three bits set in it."""

    def __init__(self, words: int = 1 << 20) -> None:
        if words & (words - 1):
            raise ValueError("KeyFilter: words must be a power of two")
        self._bits = np.zeros(words, dtype=np.uint64)
        self._shift = np.uint64(64 - (words.bit_length() - 1))

    def _slots(self, h1: np.ndarray, h2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = _mix(h1 ^ _mix(h2))
        word = (x >> self._shift).astype(np.intp) if self._shift < 64 else np.zeros(x.size, np.intp)
        one, six = np.uint64(1), np.uint64(63)
        mask = (
            (one << (x & six))
            | (one << ((x >> np.uint64(6)) & six))
            | (one << ((x >> np.uint64(12)) & six))
        )
        return word, mask

    def add(self, h1: np.ndarray, h2: np.ndarray) -> None:
        word, mask = self._slots(h1, h2)
        np.bitwise_or.at(self._bits, word, mask)

    def might_hold(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        """False: certainly never added; True: added, or (rarely) not."""
        word, mask = self._slots(h1, h2)
        maybe: np.ndarray = (self._bits[word] & mask) == mask
        return maybe
