"""The build stage: normalized records → documented payloads, in batches, as request files.

For each job it reads the normalize stage's rows, renders the JSON object of
every recipient (the primary row of each pending record) with the job's
builder, cuts batches and writes ``batches/<target>-<nnnn>.request.json``:
exactly what is (or would be) sent, secrets shown as ``***``. Its stage file
maps each recipient to its batch and position, for deliver and report.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import HttpConfig, JobPlan
from pipeline.payloads import builder_for
from pipeline.payloads.base import Builder
from pipeline.payloads.batching import Batch, Batcher
from pipeline.rundir import BatchFileWriter, RunDir

__all__ = ["BUILD_SCHEMA", "BatchCounter", "build_job", "primary_rows"]

BUILD_SCHEMA = pa.schema(
    [
        pa.field("_rec", pa.int64()),
        pa.field("_batch", pa.int32()),
        pa.field("_pos", pa.int32()),
    ]
)


@dataclass
class BatchCounter:
    """Batch numbers per target, continuing across the jobs of a run."""

    next: dict[str, int] = field(default_factory=dict)

    def take(self, target: str) -> int:
        n = self.next.get(target, 1)
        self.next[target] = n + 1
        return n


def batch_id(target: str, number: int) -> str:
    return f"{target}-{number:04d}"


def primary_rows(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.Table]:
    """The rows that carry a recipient: primary rows of pending records."""
    for b in batches:
        keep = pc.and_(b.column("_primary"), pc.equal(b.column("_status"), "pending"))
        t = pa.Table.from_batches([b]).filter(keep)
        if t.num_rows:
            yield t


class JobBuild:
    """The build of one job, fed normalized batches in order (see :func:`build_job`).

    Writes request files (in a background thread) and the build stage file;
    ``counts`` tells recipients and batches once :meth:`finish` has run.
    """

    def __init__(
        self,
        run: RunDir,
        plan: JobPlan,
        counter: BatchCounter,
        out: pa.ipc.RecordBatchStreamWriter,
        http: HttpConfig | None = None,
    ) -> None:
        self.builder = builder_for(plan, http)
        self.batcher = Batcher(self.builder.batch_size, self.builder.budget())
        self.counter = counter
        self.out = out
        self.files = run.batch_writer()
        self.counts = {"recipients": 0, "batches": 0, "first_batch": 0, "last_batch": 0}

    def feed(self, batch: pa.RecordBatch) -> list[int]:
        for rows in primary_rows(iter([batch])):
            items = self.builder.items(rows)
            recs = rows.column("_rec").to_numpy()
            done = self.batcher.feed(recs, self.builder.redacted(items), self.builder.costs(items))
            _write_batches(
                self.builder, list(done), self.counter, self.out, self.files, self.counts
            )
        return []

    def finish(self) -> list[int]:
        _write_batches(
            self.builder,
            list(self.batcher.finish()),
            self.counter,
            self.out,
            self.files,
            self.counts,
        )
        self.files.close()
        return []


def build_job(
    run: RunDir, plan: JobPlan, counter: BatchCounter, http: HttpConfig | None = None
) -> dict[str, int]:
    """Write the request files of one job and its build stage file. Returns counts."""
    with run.stage_writer("build", plan.name, BUILD_SCHEMA) as out:
        job = JobBuild(run, plan, counter, out, http)
        for batch in run.stage_reader("normalize", plan.name):
            job.feed(batch)
        job.finish()
    return job.counts


def _write_batches(
    builder: Builder,
    batches: list[Batch],
    counter: BatchCounter,
    out: pa.ipc.RecordBatchStreamWriter,
    files: BatchFileWriter,
    counts: dict[str, int],
) -> None:
    """Request files for the batches, and one stage-file record batch for all of them."""
    if not batches:
        return
    numbers = []
    for batch in batches:
        number = counter.take(builder.target)
        bid = batch_id(builder.target, number)
        head, tail = builder.envelope(bid)
        files.add(bid, "request", head + batch.body + tail)
        numbers.append(number)
    files.flush()
    sizes = np.array([len(b.recs) for b in batches])
    out.write_batch(
        pa.record_batch(
            [
                pa.array(np.concatenate([b.recs for b in batches]), pa.int64()),
                pa.array(np.repeat(np.array(numbers, dtype=np.int32), sizes)),
                pa.array(
                    np.arange(sizes.sum(), dtype=np.int32)
                    - np.repeat(np.cumsum(sizes) - sizes, sizes).astype(np.int32)
                ),
            ],
            schema=BUILD_SCHEMA,
        )
    )
    counts["recipients"] += int(sizes.sum())
    counts["batches"] += len(batches)
    counts["first_batch"] = counts["first_batch"] or numbers[0]
    counts["last_batch"] = numbers[-1]
