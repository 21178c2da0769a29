"""Walk a job's batches in order and hand each to the delivery backend of the run's mode."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import pyarrow as pa

from pipeline.build import batch_id, primary_rows
from pipeline.config import JobPlan, MailpipeConfig
from pipeline.deliver import OUTCOME_SCHEMA
from pipeline.errors import MailpipeError
from pipeline.rundir import RunDir

__all__ = ["Backend", "BatchRows", "deliver_job"]


class BatchRows:
    """One batch as deliver sees it: its id and the recipients' normalized rows, in order."""

    def __init__(self, bid: str, number: int, rows: pa.Table) -> None:
        self.id = bid
        self.number = number
        self.rows = rows


class Backend(Protocol):
    def send_many(self, batches: list[BatchRows]) -> list[tuple[bytes | None, pa.Table]]:
        """Deliver consecutive batches: per batch (response bytes or None, OUTCOME_SCHEMA rows)."""
        ...

    def close(self) -> None: ...


def iter_batches(run: RunDir, plan: JobPlan) -> Iterator[BatchRows]:
    """The job's batches with their recipients' rows (build stage joined to normalize)."""
    build = pa.Table.from_batches(
        list(run.stage_reader("build", plan.name)),
        schema=run.stage_reader("build", plan.name).schema,
    )
    numbers = build.column("_batch").to_numpy()
    if numbers.size == 0:
        return
    cuts = np.flatnonzero(np.diff(numbers)) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [numbers.size]))
    rows_iter = primary_rows(iter(run.stage_reader("normalize", plan.name)))
    pending: pa.Table | None = None
    for s, e in zip(starts.tolist(), ends.tolist()):
        need = e - s
        while pending is None or pending.num_rows < need:
            nxt = next(rows_iter)
            pending = nxt if pending is None else pa.concat_tables([pending, nxt])
        rows, pending = pending.slice(0, need), pending.slice(need)
        number = int(numbers[s])
        yield BatchRows(batch_id(plan.target, number), number, rows)


CHUNK_RECIPIENTS = 65536


def deliver_job(
    run: RunDir, cfg: MailpipeConfig, plan: JobPlan, progress: Callable[[str, int], None]
) -> None:
    """Deliver every batch of a job in order; write responses and one outcome per recipient."""
    backend = make_backend(cfg, plan)
    try:
        with run.stage_writer("deliver", plan.name, OUTCOME_SCHEMA) as out:
            group: list[BatchRows] = []
            size = 0
            for batch in iter_batches(run, plan):
                group.append(batch)
                size += batch.rows.num_rows
                if size >= CHUNK_RECIPIENTS:
                    _send(run, backend, group, out, progress)
                    group, size = [], 0
            if group:
                _send(run, backend, group, out, progress)
    finally:
        backend.close()


def _send(
    run: RunDir,
    backend: Backend,
    group: list[BatchRows],
    out: pa.ipc.RecordBatchStreamWriter,
    progress: Callable[[str, int], None],
) -> None:
    for batch, (response, outcomes) in zip(group, backend.send_many(group)):
        if response is not None:
            run.write_batch_file(batch.id, "response", response)
        out.write_table(outcomes.cast(OUTCOME_SCHEMA))
        progress("deliver", batch.rows.num_rows)


def make_backend(cfg: MailpipeConfig, plan: JobPlan) -> Backend:
    mode = cfg.delivery.mode
    if mode == "simulate":
        from pipeline.deliver.simulate import SimulateBackend

        return SimulateBackend(cfg, plan)
    raise MailpipeError(
        f"delivery mode {mode!r} is not available in this version; use --mode simulate"
    )
