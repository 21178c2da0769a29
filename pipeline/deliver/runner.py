"""Walk a job's batches in order, a chunk of batches at a time, through a delivery backend.

The build stage file says which batch each recipient is in; the normalize
stage file holds the recipients' values. Both are in recipient order, so a
:class:`Chunk` is read from the two streams side by side: whole batches,
about :data:`CHUNK_RECIPIENTS` recipients. The backend answers every
recipient of the chunk and writes the batches' response files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.build import batch_id, primary_rows
from pipeline.config import JobPlan, MailpipeConfig
from pipeline.deliver import OUTCOME_SCHEMA, conform
from pipeline.errors import DeliveryStopped, MailpipeError
from pipeline.ledger import Entry, Ledger
from pipeline.payloads.jsonfrag import field, member, obj
from pipeline.rundir import BatchFileWriter, RunDir, now_iso

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
    # what the backend's ``prepare`` worked out from the rows ahead of sending; a subset
    # of the chunk starts without it
    prepared: Any = None
    # set once the platform has judged every request of the chunk (what is left, such as
    # following Yesmail tickets, changes nothing the next chunk is judged on); at the
    # latest when the backend has answered the chunk
    judged: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    finished: bool = False  # the backend has answered the chunk, or raised

    def ids(self) -> list[str]:
        return [batch_id(self.target, int(n)) for n in self.numbers]

    def sizes(self) -> np.ndarray:
        sizes: np.ndarray = np.diff(self.starts)
        return sizes

    def recipient_batch_column(self) -> pa.Array:
        """The batch id of every recipient, as an array."""
        at = np.repeat(np.arange(len(self.numbers)), self.sizes())
        return pa.array(self.ids(), pa.string()).take(pa.array(at))

    def subset(self, keep: np.ndarray) -> Chunk:
        """The chunk without the recipients not kept (a batch left empty disappears)."""
        per = np.repeat(self.numbers, self.sizes())[keep]
        cuts = np.flatnonzero(np.diff(per)) + 1
        starts = np.concatenate(([0], cuts, [per.size])) if per.size else np.zeros(1, np.int64)
        return Chunk(
            self.target,
            self.rows.filter(pa.array(keep)),
            per[starts[:-1]] if per.size else per,
            starts,
        )

    def batches(self) -> Iterator[BatchRows]:
        for number, bid, s, e in zip(
            self.numbers.tolist(), self.ids(), self.starts[:-1].tolist(), self.starts[1:].tolist()
        ):
            yield BatchRows(bid, number, self.rows.slice(s, e - s))


class Backend(Protocol):
    """A delivery mode. It may also have ``prepare(chunk)``: the work that needs only the
    chunk's rows (kept in ``chunk.prepared``), which an overlapped run does in its own
    thread while the chunk before is on its way."""

    def deliver(self, chunk: Chunk, files: BatchFileWriter) -> pa.Table:
        """Answer every recipient of the chunk (OUTCOME_SCHEMA rows, in order); write the
        batches' response files to ``files``."""
        ...

    def close(self) -> None: ...


def iter_chunks(run: RunDir, plan: JobPlan, size: int = CHUNK_RECIPIENTS) -> Iterator[Chunk]:
    """The job's batches, a chunk at a time (build stage joined to normalize by position)."""
    rows_iter = primary_rows(iter(run.stage_reader("normalize", plan.name)))
    pending: list[pa.Table] = []
    have = 0
    group: list[pa.RecordBatch] = []
    total = 0
    for whole in run.stage_reader("build", plan.name):
        for built in _pieces(whole, size):
            group.append(built)
            total += built.num_rows
            if total < size:
                continue
            yield from _chunk(plan, group, total, rows_iter, pending, have)
            have = sum(t.num_rows for t in pending)
            group, total = [], 0
    if group:
        yield from _chunk(plan, group, total, rows_iter, pending, have)


def _pieces(built: pa.RecordBatch, size: int) -> list[pa.RecordBatch]:
    """Split a build-stage record batch at batch boundaries into pieces of about ``size``
    rows, so a chunk (the unit a crash can leave in doubt) stays near the configured size."""
    if built.num_rows <= size:
        return [built]
    numbers = built.column("_batch").to_numpy()
    starts = np.flatnonzero(np.diff(numbers)) + 1
    # the first batch start in each stretch of ``size`` rows
    bucket = starts // size
    cuts = starts[np.flatnonzero(np.diff(bucket, prepend=0))].tolist()
    edges = [0, *cuts, built.num_rows]
    return [built.slice(a, b - a) for a, b in itertools.pairwise(edges) if b > a]


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


# modes whose sending leaves the interpreter free (the network; SQLite, which lets go of
# the GIL): the next chunk is sent while the last one's answers go to the ledger and the
# stage file (up to IN_FLIGHT chunks are then out). simulate: the engine's lookups of a
# chunk overlap the ledger's writes of the one before (1M on-demand rows: 8.0 → 6.3 s)
OVERLAPPED = {"http", "simulate"}
# chunks sent and not yet recorded, at most: a chunk goes as soon as the one before is
# judged, while earlier ones may still be followed (Yesmail tickets)
IN_FLIGHT = 4


def deliver_job(
    run: RunDir,
    cfg: MailpipeConfig,
    plan: JobPlan,
    progress: Callable[[str, int], None],
    ledger: Ledger | None = None,
    resend: bool = False,
    dry_run: bool = False,
    rate: float | None = None,
) -> None:
    """Deliver every batch of a job in order; write responses and one outcome per recipient.

    With a ledger, each chunk's records are claimed (pending) in one transaction
    before any is sent, and finished (completed/failed) in one after; records
    another run settled or holds are not sent and come back ``ignored``.
    """
    backend = make_backend(cfg, plan, dry_run=dry_run)
    # with a rate limit, chunks shrink to about one second of sending
    size = cfg.run.chunk_rows
    if rate:
        size = max(1, min(size, int(rate)))
    started, sent = time.monotonic(), 0
    try:
        with (
            run.stage_writer("deliver", plan.name, OUTCOME_SCHEMA) as out,
            run.batch_writer() as files,
        ):
            chunks = iter_chunks(run, plan, size)
            if ledger is not None and not rate and not dry_run and cfg.delivery.mode in OVERLAPPED:
                for chunk, outcomes in _overlapped(backend, chunks, files, plan, ledger, resend):
                    out.write_table(outcomes)
                    progress("deliver", chunk.rows.num_rows)
                return
            for chunk in chunks:
                outcomes = _deliver_chunk(backend, chunk, files, plan, ledger, resend)
                files.flush()
                out.write_table(outcomes)
                progress("deliver", chunk.rows.num_rows)
                sent += chunk.rows.num_rows
                if rate:
                    time.sleep(max(0.0, sent / rate - (time.monotonic() - started)))
    finally:
        backend.close()


@dataclass
class _Claimed:
    """A chunk whose keys the ledger has claimed: what to send, and what not."""

    chunk: Chunk
    sent: Chunk  # the claimed recipients
    keys: list[str]
    key_col: pa.Array
    claimed: np.ndarray
    held: dict[str, Entry]
    previous: dict[str, Entry]
    seq: int  # the ledger's number of this claim


def _claim(chunk: Chunk, plan: JobPlan, ledger: Ledger, resend: bool) -> _Claimed:
    key_col = chunk.rows.column("_lkey").combine_chunks()
    keys = key_col.to_pylist()
    batches = chunk.recipient_batch_column().to_pylist()
    claimed, held, previous = ledger.claim(plan.name, keys, batches, resend)
    sent = chunk if claimed.all() else chunk.subset(claimed)
    return _Claimed(chunk, sent, keys, key_col, claimed, held, previous, ledger.claim_seq)


def _deliver_chunk(
    backend: Backend,
    chunk: Chunk,
    files: BatchFileWriter,
    plan: JobPlan,
    ledger: Ledger | None,
    resend: bool,
) -> pa.Table:
    if ledger is None:
        return conform(backend.deliver(chunk, files))
    c = _claim(chunk, plan, ledger, resend)
    fault("after-claim")
    try:
        got = _send(backend, c, files)
    except DeliveryStopped as stop:
        _stopped(ledger, plan, c, stop)
        raise
    fault("after-send")
    return _settle(ledger, plan, c, got)


def _send(backend: Backend, c: _Claimed, files: BatchFileWriter | _ChunkFiles) -> pa.Table | None:
    """The answers of a claimed chunk's recipients (None: it claimed none)."""
    try:
        if not c.sent.rows.num_rows:
            return None
        answered = backend.deliver(c.sent, files)  # type: ignore[arg-type]
    finally:
        c.sent.finished = True
        c.sent.judged.set()
    return conform(answered)


def _settle(ledger: Ledger, plan: JobPlan, c: _Claimed, got: pa.Table | None) -> pa.Table:
    """Record the answers of a sent chunk; its outcomes, the records not sent included."""
    if got is not None:
        _record(ledger, plan, got, c.key_col, np.flatnonzero(c.claimed), c.seq)
    if got is not None and c.previous:
        got = _note_resent(got, c.sent, c.previous, c.keys, c.claimed)
    if c.claimed.all():
        assert got is not None
        return got
    others = _held(c.chunk.rows.filter(pa.array(~c.claimed)), c.keys, c.claimed, c.held)
    merged = pa.concat_tables([t for t in (got, others) if t is not None])
    order = np.argsort(merged.column("_rec").to_numpy(), kind="stable")
    return merged.take(pa.array(order))


class _ChunkFiles:
    """The response files of a chunk sent in a worker thread, handed over when it is done."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, bytes]] = []

    def add(self, batch_id: str, kind: str, data: bytes) -> None:
        self.items.append((batch_id, kind, data))


def _overlapped(
    backend: Backend,
    chunks: Iterator[Chunk],
    files: BatchFileWriter,
    plan: JobPlan,
    ledger: Ledger,
    resend: bool,
) -> Iterator[tuple[Chunk, pa.Table]]:
    """Send each chunk in a worker thread while the chunk before it is recorded.

    A chunk is claimed before it is sent, as always. The next one is claimed
    while the last one is on its way, and sent as soon as the platform has
    judged every request of the last one (``Chunk.judged``: for Yesmail, its
    tickets may still be followed; the platforms judge an address against what
    the calls before left, so batches still keep their order); the ledger and
    the stage file take the answers of the chunks before meanwhile, in chunk order
    (:data:`IN_FLIGHT` chunks at most are out). If the
    platform stops the run, every chunk already on its way is still waited for
    and recorded: nothing sent is left unrecorded, nothing unsent is marked.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    Flight = tuple[_Claimed, Future[pa.Table | None], _ChunkFiles]

    def land(flight: Flight) -> pa.Table | None:
        """Wait for a chunk's answers; record them (or, stopped, what was answered)."""
        c, fut, buf = flight
        try:
            got = fut.result()
        except DeliveryStopped as stop:
            _stopped(ledger, plan, c, stop)
            raise
        finally:
            for item in buf.items:
                files.add(*item)
            files.flush()
        fault("after-send")
        return got

    def record_first() -> tuple[Chunk, pa.Table]:
        """Land the oldest chunk out and record it."""
        first = flights.pop(0)
        return first[0].chunk, _settle(ledger, plan, first[0], land(first))

    pool = ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="deliver")
    prepare = getattr(backend, "prepare", None)
    flights: list[Flight] = []  # sent, not landed yet, in chunk order
    landed: list[tuple[_Claimed, pa.Table | None]] = []  # landed, not recorded yet
    unsent: _Claimed | None = None  # claimed, not handed to the backend yet
    try:
        for chunk in chunks:
            # while the last chunk is on its way: what needs only the rows, then the claim
            if prepare is not None:
                prepare(chunk)
            unsent = _claim(chunk, plan, ledger, resend)
            fault("after-claim")
            if flights:
                flights[-1][0].sent.judged.wait()
                if flights[-1][0].sent.finished:
                    # answered in full (simulate) or stopped: its answers are in before the
                    # next chunk goes; a stop raises here, and nothing more is sent
                    while flights:
                        first = flights.pop(0)
                        landed.append((first[0], land(first)))
            buf = _ChunkFiles()
            flights.append((unsent, pool.submit(_send, backend, unsent, buf), buf))
            unsent = None
            # record the chunks answered so far, in order; wait only when too many are out.
            # The one just sent is landed only after the next chunk is claimed (as always:
            # a crash after its answers finds the next chunk in doubt beside it)
            while landed:
                c, got = landed.pop(0)
                yield c.chunk, _settle(ledger, plan, c, got)
            while len(flights) > 1 and (len(flights) >= IN_FLIGHT or flights[0][1].done()):
                yield record_first()
        while flights:
            yield record_first()
    except BaseException:
        if unsent is not None:  # never sent: give its claim back
            mine = np.flatnonzero(unsent.claimed).tolist()
            ledger.release(plan.name, [unsent.keys[i] for i in mine], unsent.seq)
        # stopped while chunks are on their way: wait for them and keep them, in order
        for c, got in landed:
            with contextlib.suppress(Exception):  # the first error is the one to report
                _settle(ledger, plan, c, got)
        for flight in flights:
            with contextlib.suppress(Exception):
                _settle(ledger, plan, flight[0], land(flight))
        raise
    finally:
        pool.shutdown(wait=True)


def _note_resent(
    got: pa.Table, sent: Chunk, previous: dict[str, Entry], keys: list[str], claimed: np.ndarray
) -> pa.Table:
    """--resend: say so on the records sent again, with the run that had settled them."""
    picked = np.flatnonzero(claimed).tolist()
    message = got.column("message").to_pylist()
    earlier = got.column("earlier_run").to_pylist()
    for j, i in enumerate(picked):
        e = previous.get(keys[i])
        if e is None:
            continue
        note = f"resent (--resend); earlier {e.state} in run {e.run_id}"
        message[j] = f"{note}: {message[j]}" if message[j] else note
        earlier[j] = e.run_id
    got = got.set_column(
        got.schema.get_field_index("message"), "message", pa.array(message, pa.string())
    )
    return got.set_column(
        got.schema.get_field_index("earlier_run"), "earlier_run", pa.array(earlier, pa.string())
    )


def _stopped(ledger: Ledger, plan: JobPlan, c: _Claimed, stop: DeliveryStopped) -> None:
    """The backend stopped the run: keep what was answered, give back the rest untouched."""
    picked = np.flatnonzero(c.claimed)
    answered: pa.Table | None = conform(stop.partial) if stop.partial is not None else None
    done: set[int] = set()
    if answered is not None and answered.num_rows:
        rec_pos = {r: i for i, r in enumerate(c.sent.rows.column("_rec").to_pylist())}
        at = [int(picked[rec_pos[r]]) for r in answered.column("_rec").to_pylist()]
        done = set(at)
        _record(ledger, plan, answered, c.key_col, np.array(at, dtype=np.int64), c.seq)
    ledger.release(plan.name, [c.keys[i] for i in picked.tolist() if i not in done], c.seq)


def _record(
    ledger: Ledger,
    plan: JobPlan,
    got: pa.Table,
    key_col: pa.Array,
    at: np.ndarray,
    claim: int,
) -> None:
    """Write the answers in ``got`` (for the chunk positions ``at``) to the ledger; this
    ends the ledger's claim number ``claim``."""
    sel = pa.array(at, pa.int64())
    failed = pc.equal(got.column("status").combine_chunks(), "failed")
    ledger.finish(
        plan.name,
        key_col.take(sel),
        pc.if_else(failed, "failed", "completed"),
        got.column("_transient").combine_chunks().fill_null(False),
        outcome_json(got),
        claim,
    )


def fault(point: str) -> None:
    """Fault injection for the crash tests: ``MAILPIPE_FAULT=after-claim:3`` kills this
    process (SIGKILL, no clean-up) the third time it passes ``after-claim``.

    Points: ``after-claim`` (chunk recorded pending, nothing sent), ``mid-chunk``
    (simulate: some of the chunk's batches processed by the platform),
    ``after-send`` (all sent, the answers not yet in the ledger)."""
    spec = os.environ.get("MAILPIPE_FAULT")
    if not spec or not spec.startswith(point + ":"):
        return
    _FAULTS[point] = _FAULTS.get(point, 0) + 1
    if _FAULTS[point] >= int(spec.rsplit(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)


_FAULTS: dict[str, int] = {}


def _held(rows: pa.Table, keys: list[str], claimed: np.ndarray, held: dict[str, Entry]) -> pa.Table:
    """Outcomes of records not sent: another run settled (or holds) them; carry its answer."""
    fields: dict[str, list[Any]] = {f.name: [] for f in OUTCOME_SCHEMA if f.name != "_rec"}
    for i in np.flatnonzero(~claimed).tolist():
        e = held[keys[i]]
        answer = e.outcome or {}
        for name in ("result", "error", "reason", "ticket", "state", "http_status", "events"):
            value = answer.get(name)
            plain = name == "http_status" or value is None or isinstance(value, str)
            fields[name].append(value if plain else orjson.dumps(value).decode())
        fields["status"].append("ignored")
        detail = f": {answer['message']}" if answer.get("message") else ""
        if e.state != "pending":
            fields["message"].append(f"already {e.state} in run {e.run_id}{detail}")
        else:  # a runner claiming it this very moment has no run id to show yet
            fields["message"].append(
                f"being sent by run {e.run_id}" if e.run_id else "being sent by another run"
            )
        fields["earlier_run"].append(e.run_id or None)
        fields["time"].append(now_iso())
        fields["_transient"].append(False)
    table = {"_rec": rows.column("_rec")}
    table.update({k: pa.array(v, OUTCOME_SCHEMA.field(k).type) for k, v in fields.items()})
    return conform(pa.table(table))


def outcome_json(outcomes: pa.Table) -> pa.Array:
    """Each recipient's documented answer as one JSON object, for the ledger."""
    n = outcomes.num_rows
    members = [
        field(name, outcomes.column(name).combine_chunks(), None)
        for name in ("status", "result", "error", "message", "ticket", "state")
    ]
    members += [
        member(name, outcomes.column(name).combine_chunks()) for name in ("reason", "events")
    ]
    members.append(member("http_status", pc.cast(outcomes.column("http_status"), pa.string())))
    return obj(members, n)


# delivery mode -> "module:Class" of its backend, imported when a run uses it
BACKENDS = {
    "simulate": "pipeline.deliver.simulate:SimulateBackend",
    "http": "pipeline.deliver.http:HttpBackend",
    "smtp": "pipeline.deliver.smtp:SmtpBackend",
}


def make_backend(cfg: MailpipeConfig, plan: JobPlan, dry_run: bool = False) -> Backend:
    """The backend of the run's delivery mode: ``Class(cfg, plan)``; a dry run simulates
    without keeping what the engine would change."""
    import importlib

    mode = "simulate" if dry_run else cfg.delivery.mode
    if dry_run:
        from pipeline.deliver.simulate import SimulateBackend

        return SimulateBackend(cfg, plan, dry_run=True)
    module, _, name = BACKENDS[mode].partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError:
        raise MailpipeError(
            f"delivery mode {mode!r} is not available in this version; use --mode simulate"
        ) from None
    backend: Backend = cls(cfg, plan)
    return backend
