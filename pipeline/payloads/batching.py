"""Cut a stream of payload items into batches: at most N items, and within a byte budget.

Items arrive in chunks; a batch may span chunks, so the items not yet in a
full batch wait for the next chunk (at most one batch's worth). With a budget
(GET targets, bounded by URL length) a batch also ends before the item that
would overflow it; an item that alone exceeds the budget travels alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

__all__ = ["Batch", "Batcher"]


@dataclass
class Batch:
    """One batch: the recipients (``recs``) and their JSON items, in order."""

    recs: np.ndarray
    items: pa.Array
    cost: int


class Batcher:
    def __init__(self, size: int, budget: int | None = None) -> None:
        if not size >= 1:
            raise ValueError("batch size must be at least 1")
        self.size = size
        self.budget = budget
        self._recs = np.empty(0, dtype=np.int64)
        self._items: pa.Array = pa.array([], pa.string())
        self._costs = np.empty(0, dtype=np.int64)

    def feed(self, recs: np.ndarray, items: pa.Array, costs: np.ndarray | None) -> Iterator[Batch]:
        """Add items; yield every batch that is now complete."""
        self._recs = np.concatenate((self._recs, recs))
        self._items = pa.concat_arrays([self._items, items.cast(pa.string())])
        self._costs = np.concatenate(
            (self._costs, costs if costs is not None else np.zeros(len(recs), dtype=np.int64))
        )
        yield from self._cut(final=False)

    def finish(self) -> Iterator[Batch]:
        yield from self._cut(final=True)

    def _cut(self, final: bool) -> Iterator[Batch]:
        n = self._recs.size
        cum = np.concatenate(([0], np.cumsum(self._costs)))
        i = 0
        while i < n:
            k = min(self.size, n - i)
            complete = k == self.size
            if self.budget is not None:
                fit = int(np.searchsorted(cum, cum[i] + self.budget, side="right")) - 1 - i
                if fit < k:
                    k, complete = max(fit, 1), True
            if not complete and not final:
                break
            yield Batch(self._recs[i : i + k], self._items.slice(i, k), int(cum[i + k] - cum[i]))
            i += k
        self._recs, self._costs = self._recs[i:], self._costs[i:]
        self._items = self._items.slice(i)
