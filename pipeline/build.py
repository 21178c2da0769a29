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

from pipeline.config import JobPlan
from pipeline.payloads import builder_for
from pipeline.payloads.base import Builder
from pipeline.payloads.batching import Batch, Batcher
from pipeline.rundir import RunDir

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


def build_job(run: RunDir, plan: JobPlan, counter: BatchCounter) -> dict[str, int]:
    """Write the request files of one job and its build stage file. Returns counts."""
    builder = builder_for(plan)
    batcher = Batcher(builder.batch_size, builder.budget())
    reader = run.stage_reader("normalize", plan.name)
    counts = {"recipients": 0, "batches": 0, "first_batch": 0, "last_batch": 0}
    with run.stage_writer("build", plan.name, BUILD_SCHEMA) as out:
        for rows in primary_rows(iter(reader)):
            items = builder.items(rows)
            recs = rows.column("_rec").to_numpy()
            for batch in batcher.feed(recs, builder.redacted(items), builder.costs(items)):
                _write_batch(run, builder, batch, counter, out, counts)
        for batch in batcher.finish():
            _write_batch(run, builder, batch, counter, out, counts)
    return counts


def _write_batch(
    run: RunDir,
    builder: Builder,
    batch: Batch,
    counter: BatchCounter,
    out: pa.ipc.RecordBatchStreamWriter,
    counts: dict[str, int],
) -> None:
    number = counter.take(builder.target)
    bid = batch_id(builder.target, number)
    head, tail = builder.envelope(bid)
    run.write_batch_file(bid, "request", head + join_items(batch.items) + tail)
    n = len(batch.recs)
    out.write_batch(
        pa.record_batch(
            [
                pa.array(batch.recs, pa.int64()),
                pa.array(np.full(n, number, dtype=np.int32)),
                pa.array(np.arange(n, dtype=np.int32)),
            ],
            schema=BUILD_SCHEMA,
        )
    )
    counts["recipients"] += n
    counts["batches"] += 1
    counts["first_batch"] = counts["first_batch"] or number
    counts["last_batch"] = number


def join_items(items: pa.Array) -> bytes:
    """The items' bytes joined by commas, straight from the Arrow buffers."""
    if len(items) == 0:
        return b""
    if isinstance(items, pa.ChunkedArray):
        items = items.combine_chunks()
    with_comma = pc.binary_join_element_wise(items, ",", "")
    offsets = np.frombuffer(with_comma.buffers()[1], dtype=np.int32)
    lo = int(offsets[with_comma.offset])
    hi = int(offsets[with_comma.offset + len(with_comma)])
    return memoryview(with_comma.buffers()[2])[lo : hi - 1].tobytes()
