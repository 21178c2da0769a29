"""Cut a stream of payload items into batches: at most N items, and within a byte budget.

Items arrive in chunks; a batch may span chunks, so the items not yet in a
full batch wait for the next chunk (at most one batch's worth). With a budget
(GET targets, bounded by URL length) a batch also ends before the item that
would overflow it; an item that alone exceeds the budget travels alone.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["Batch", "Batcher"]


@dataclass
class Batch:
    """One batch: the recipients (``recs``), their JSON items in order, and those joined."""

    recs: np.ndarray
    items: pa.Array
    cost: int
    body: bytes = b""  # the items' text, comma-separated


def with_commas(items: pa.Array) -> pa.Array:
    """Each item followed by a comma (one kernel call for a whole chunk)."""
    if len(items) == 0:
        return pa.array([], pa.string())
    return pc.binary_join_element_wise(items, ",", "")


def _joined(arr: pa.Array, start: int, count: int) -> bytes:
    """Items ``start..start+count`` of a with-commas array, joined, last comma dropped."""
    if count == 0:
        return b""
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)
    lo = int(offsets[arr.offset + start])
    hi = int(offsets[arr.offset + start + count])
    return memoryview(arr.buffers()[2])[lo : hi - 1].tobytes()


class Batcher:
    def __init__(self, size: int, budget: int | None = None) -> None:
        if not size >= 1:
            raise ValueError("batch size must be at least 1")
        self.size = size
        self.budget = budget
        self._recs = np.empty(0, dtype=np.int64)
        self._items: pa.Array = pa.array([], pa.string())
        self._commas: pa.Array = pa.array([], pa.string())
        self._costs = np.empty(0, dtype=np.int64)

    def feed(self, recs: np.ndarray, items: pa.Array, costs: np.ndarray | None) -> Iterator[Batch]:
        """Add items; yield every batch that is now complete."""
        self._recs = np.concatenate((self._recs, recs))
        items = items.cast(pa.string())
        self._items = pa.concat_arrays([self._items, items])
        self._commas = pa.concat_arrays([self._commas, with_commas(items)])
        self._costs = np.concatenate(
            (self._costs, costs if costs is not None else np.zeros(len(recs), dtype=np.int64))
        )
        yield from self._cut(final=False)

    def finish(self) -> Iterator[Batch]:
        yield from self._cut(final=True)

    def _cut(self, final: bool) -> Iterator[Batch]:
        n = self._recs.size
        # plain Python ints and bisect: one step per batch, thousands of batches a chunk
        cum = np.concatenate(([0], np.cumsum(self._costs))).tolist()
        body = _joined(self._commas, 0, n) + b","
        offsets = (
            np.frombuffer(self._commas.buffers()[1], dtype=np.int32)[
                self._commas.offset : self._commas.offset + n + 1
            ]
            if n
            else np.zeros(1, np.int32)
        )
        pos = (offsets - offsets[0]).tolist()
        i = 0
        while i < n:
            k = min(self.size, n - i)
            complete = k == self.size
            if self.budget is not None:
                fit = bisect.bisect_right(cum, cum[i] + self.budget) - 1 - i
                if fit < k:
                    k, complete = max(fit, 1), True
            if not complete and not final:
                break
            yield Batch(
                self._recs[i : i + k],
                self._items.slice(i, k),
                cum[i + k] - cum[i],
                body[pos[i] : pos[i + k] - 1],
            )
            i += k
        self._recs, self._costs = self._recs[i:], self._costs[i:]
        # the rest is copied out, so the next chunk does not drag this one along
        self._items = pa.concat_arrays([self._items.slice(i)])
        self._commas = pa.concat_arrays([self._commas.slice(i)])
