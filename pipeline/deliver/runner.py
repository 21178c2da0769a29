"""Walk a job's batches in order and hand each to the delivery backend of the run's mode."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.build import batch_id, primary_rows
from pipeline.config import JobPlan, MailpipeConfig
from pipeline.deliver import OUTCOME_SCHEMA
from pipeline.rundir import RunDir, now_iso

__all__ = ["Backend", "BatchRows", "deliver_job"]


class BatchRows:
    """One batch as deliver sees it: its id and the recipients' normalized rows, in order."""

    def __init__(self, bid: str, number: int, rows: pa.Table) -> None:
        self.id = bid
        self.number = number
        self.rows = rows


class Backend(Protocol):
    def send(self, batch: BatchRows) -> tuple[bytes | None, pa.Table]:
        """Deliver one batch: (response file bytes or None, outcomes in OUTCOME_SCHEMA)."""
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


def deliver_job(
    run: RunDir, cfg: MailpipeConfig, plan: JobPlan, progress: Callable[[str, int], None]
) -> None:
    backend = make_backend(cfg, plan, run)
    try:
        with run.stage_writer("deliver", plan.name, OUTCOME_SCHEMA) as out:
            for batch in iter_batches(run, plan):
                response, outcomes = backend.send(batch)
                if response is not None:
                    run.write_bytes(
                        run.batch_file(batch.id, "response").relative_to(run.path), response
                    )
                out.write_table(outcomes.cast(OUTCOME_SCHEMA))
                progress("deliver", batch.rows.num_rows)
    finally:
        backend.close()


def make_backend(cfg: MailpipeConfig, plan: JobPlan, run: RunDir) -> Backend:
    mode = cfg.delivery.mode
    if mode == "simulate":
        return _NotYet()
    raise NotImplementedError(f"delivery mode {mode!r} is not available yet")


class _NotYet:
    """Until the simulate engine lands: every recipient is left undelivered, and says so."""

    def send(self, batch: BatchRows) -> tuple[bytes | None, pa.Table]:
        n = batch.rows.num_rows
        recs = batch.rows.column("_rec").combine_chunks()
        return None, pa.table(
            {
                "_rec": recs,
                "status": pa.array(["ignored"] * n),
                "result": pa.nulls(n, pa.string()),
                "error": pa.nulls(n, pa.string()),
                "message": pa.array(["not delivered: the simulate engine is not built yet"] * n),
                "reason": pa.nulls(n, pa.string()),
                "ticket": pa.nulls(n, pa.string()),
                "state": pa.nulls(n, pa.string()),
                "http_status": pa.nulls(n, pa.int32()),
                "time": pa.array([now_iso()] * n),
            }
        )

    def close(self) -> None:
        return None


_ = pc
