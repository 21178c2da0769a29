"""Walk a job's batches in order, a chunk of batches at a time, through a delivery backend.

The build stage file says which batch each recipient is in; the normalize
stage file holds the recipients' values. Both are in recipient order, so a
:class:`Chunk` is read from the two streams side by side: whole batches,
about :data:`CHUNK_RECIPIENTS` recipients. The backend answers every
recipient of the chunk and writes the batches' response files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from pipeline.build import batch_id, primary_rows
from pipeline.config import JobPlan, MailpipeConfig
from pipeline.deliver import OUTCOME_SCHEMA
from pipeline.errors import MailpipeError
from pipeline.rundir import BatchFileWriter, RunDir

__all__ = ["Backend", "BatchRows", "Chunk", "deliver_job", "iter_chunks"]

CHUNK_RECIPIENTS = 65536


@dataclass
class BatchRows:
    """One batch: its id, number and its recipients' normalized rows, in order."""

    id: str
    number: int
    rows: pa.Table


@dataclass
class Chunk:
    """Consecutive whole batches: every recipient's row, and where each batch starts."""

    target: str
    rows: pa.Table
    numbers: np.ndarray  # batch number of each batch
    starts: np.ndarray  # index of each batch's first recipient, plus the total at the end

    def ids(self) -> list[str]:
        return [batch_id(self.target, int(n)) for n in self.numbers]

    def batches(self) -> Iterator[BatchRows]:
        for number, bid, s, e in zip(
            self.numbers.tolist(), self.ids(), self.starts[:-1].tolist(), self.starts[1:].tolist()
        ):
            yield BatchRows(bid, number, self.rows.slice(s, e - s))


class Backend(Protocol):
    def deliver(self, chunk: Chunk, files: BatchFileWriter) -> pa.Table:
        """Answer every recipient of the chunk (OUTCOME_SCHEMA rows, in order); write the
        batches' response files to ``files``."""
        ...

    def close(self) -> None: ...


def iter_chunks(run: RunDir, plan: JobPlan) -> Iterator[Chunk]:
    """The job's batches, a chunk at a time (build stage joined to normalize by position)."""
    rows_iter = primary_rows(iter(run.stage_reader("normalize", plan.name)))
    pending: list[pa.Table] = []
    have = 0
    group: list[pa.RecordBatch] = []
    size = 0
    for built in run.stage_reader("build", plan.name):
        group.append(built)
        size += built.num_rows
        if size < CHUNK_RECIPIENTS:
            continue
        yield from _chunk(plan, group, size, rows_iter, pending, have)
        have = sum(t.num_rows for t in pending)
        group, size = [], 0
    if group:
        yield from _chunk(plan, group, size, rows_iter, pending, have)


def _chunk(
    plan: JobPlan,
    group: list[pa.RecordBatch],
    size: int,
    rows_iter: Iterator[pa.Table],
    pending: list[pa.Table],
    have: int,
) -> Iterator[Chunk]:
    # a build-stage record batch holds whole batches: so does a group of them
    while have < size:
        nxt = next(rows_iter)
        pending.append(nxt)
        have += nxt.num_rows
    rows = pa.concat_tables(pending)
    pending[:] = [rows.slice(size)] if rows.num_rows > size else []
    rows = rows.slice(0, size).combine_chunks()
    numbers = np.concatenate([b.column("_batch").to_numpy() for b in group])
    cuts = np.flatnonzero(np.diff(numbers)) + 1
    starts = np.concatenate(([0], cuts, [numbers.size]))
    yield Chunk(plan.target, rows, numbers[starts[:-1]], starts)


def deliver_job(
    run: RunDir, cfg: MailpipeConfig, plan: JobPlan, progress: Callable[[str, int], None]
) -> None:
    """Deliver every batch of a job in order; write responses and one outcome per recipient."""
    backend = make_backend(cfg, plan)
    try:
        with (
            run.stage_writer("deliver", plan.name, OUTCOME_SCHEMA) as out,
            run.batch_writer() as files,
        ):
            for chunk in iter_chunks(run, plan):
                outcomes = backend.deliver(chunk, files)
                files.flush()
                out.write_table(outcomes.cast(OUTCOME_SCHEMA))
                progress("deliver", chunk.rows.num_rows)
    finally:
        backend.close()


# delivery mode -> "module:Class" of its backend, imported when a run uses it
BACKENDS = {
    "simulate": "pipeline.deliver.simulate:SimulateBackend",
    "http": "pipeline.deliver.http:HttpBackend",
    "smtp": "pipeline.deliver.smtp:SmtpBackend",
}


def make_backend(cfg: MailpipeConfig, plan: JobPlan) -> Backend:
    """The backend of the run's delivery mode: ``Class(cfg, plan)``."""
    import importlib

    mode = cfg.delivery.mode
    module, _, name = BACKENDS[mode].partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError:
        raise MailpipeError(
            f"delivery mode {mode!r} is not available in this version; use --mode simulate"
        ) from None
    backend: Backend = cls(cfg, plan)
    return backend
