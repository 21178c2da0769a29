"""Extracted rows → clean, typed records, one job at a time, vectorized.

For each job this stage

1. trims every value (an empty cell is a missing value);
2. groups rows that share the record key and stand next to each other (the
   line items of one order) into ONE record, taking the first non-empty
   value of each field; a key that comes back later, in this file or another
   one of the run, is a duplicate: ``ignored``, pointing at its first row;
3. validates the record's email (email-validator's verdict; the domain is
   lower-cased, the whole address for ``yesmail-send``) and coerces profile
   values to their field type; for ``yesmail-send`` the recipient's ``id``
   (``recipient_id``) must be there too, as a new subscriber needs both.

Every input row leaves this stage as exactly one output row, in input order,
with ``_status`` = ``pending`` (it becomes part of recipient ``_rec``),
``failed`` (``_problem`` says why) or ``ignored``. Only the first row of a
record (``_primary``) carries its values; the others follow its outcome.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrowutil import blank_to_null, scatter, to_bool_np
from pipeline.config import JobPlan, ProfileField
from pipeline.emails import INVALID, MISSING, check_emails
from pipeline.extract import record_texts
from pipeline.keyset import KeyHasher, SeenKeys
from pipeline.payloads.yesmail import NEW_SUBSCRIBER_NEEDS_ID, id_column

if TYPE_CHECKING:
    from pipeline.ledger import Ledger

__all__ = ["PROBLEMS", "Normalizer", "normalized_schema"]

# why a row could not become (part of) a payload
PROBLEMS = ("unreadable", "missing_email", "invalid_email", "profile", "missing_id", "duplicate")
PASSTHROUGH = ("password", "remoteAddress", "userAgent", "profile_json")
_TRUE = ["true", "yes", "1", "y", "on"]
_FALSE = ["false", "no", "0", "n", "off"]
_MAX_CARRY = 1 << 20
_FILE_SHIFT = 40  # where = file << 40 | line


def arrow_type(spec: ProfileField) -> pa.DataType:
    return {
        "number": pa.int64(),
        "boolean": pa.bool_(),
        "multi-select": pa.list_(pa.string()),
    }.get(spec.type, pa.string())


def normalized_schema(plan: JobPlan) -> pa.Schema:
    """Columns of the normalize stage's output for one job."""
    cols = plan.source.columns()
    fields = [
        pa.field("_seq", pa.int64()),
        pa.field("_file", pa.int32()),
        pa.field("_line", pa.int64()),
        pa.field("_raw", pa.string()),
        pa.field("_esc", pa.bool_()),
        pa.field("record_id", pa.string()),
        pa.field("email", pa.string()),
        pa.field("created_at", pa.string()),
        pa.field("_status", pa.string()),
        pa.field("_problem", pa.string()),
        pa.field("_message", pa.string()),
        pa.field("_field", pa.string()),
        pa.field("_details", pa.list_(pa.string())),
        pa.field("_rec", pa.int64()),
        pa.field("_primary", pa.bool_()),
        pa.field("_dup_file", pa.int32()),
        pa.field("_dup_line", pa.int64()),
        pa.field("_lkey", pa.string()),
        pa.field("_earlier", pa.string()),
        pa.field("_earlier_run", pa.string()),
    ]
    fields += [pa.field(f"f:{name}", arrow_type(plan.field_spec(name))) for name in plan.fields]
    fields += [pa.field(c, pa.string()) for c in cols if c.startswith("flag:")]
    fields += [pa.field(c, pa.string()) for c in PASSTHROUGH if c in cols]
    return pa.schema(fields)


class InputRef:
    """An input file as normalize sees it: its path, an earlier file with the same bytes,
    and its digest (the ledger keys a record without a key by file digest and line).

    The digest may come late (a hashing thread): ``digest_of`` is asked for it only
    when a record without a key needs it.
    """

    def __init__(
        self,
        path: str,
        same_as: int | None = None,
        digest: str | None = None,
        digest_of: Callable[[], str | None] | None = None,
    ) -> None:
        self.path = path
        self.same_as = same_as
        self._digest = digest
        self._digest_of = digest_of

    @property
    def digest(self) -> str | None:
        if self._digest is None and self._digest_of is not None:
            self._digest = self._digest_of()
        return self._digest


@dataclass(frozen=True)
class Window:
    """Backfill: only records created in ``[since, until)`` are taken (UTC, seconds)."""

    since: int
    until: int


class Normalizer:
    """Feed extracted batches in order; get normalized batches back, row for row.

    With a ``ledger``, records it already settled are ``ignored`` (carrying the
    earlier answer), unless ``resend``; with a ``window``, records created
    outside it are ``ignored`` too. The run's record keys spill to unnamed
    files in ``scratch`` (default: the system's temporary directory) past a
    few hundred thousand; they are gone once :meth:`finish` has run.
    """

    def __init__(
        self,
        plan: JobPlan,
        inputs: Sequence[InputRef],
        ledger: Ledger | None = None,
        resend: bool = False,
        window: Window | None = None,
        scratch: str | os.PathLike[str] | None = None,
    ) -> None:
        self.plan = plan
        self.inputs = inputs
        self.ledger = ledger
        self.resend = resend
        self.window = window
        self.schema = normalized_schema(plan)
        self.key = plan.source.key_column
        self._carry: pa.Table | None = None
        self._seq = 0
        self._rec = 0
        self._seen = SeenKeys(scratch)
        self._hasher = KeyHasher()
        self._used = {"email", "record_id", "record_key", "created_at", *PASSTHROUGH}
        self._used |= {f"f:{name}" for name in plan.fields}
        self._used |= {c for c in plan.source.columns() if c.startswith("flag:")}

    @property
    def recipients(self) -> int:
        return self._rec

    def feed(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        table = pa.Table.from_batches([batch])
        if self._carry is not None:
            table = pa.concat_tables([self._carry, table])
            self._carry = None
        cut = self._hold_back_from(table)
        if cut < table.num_rows:
            self._carry = table.slice(cut)
            table = table.slice(0, cut)
        if table.num_rows:
            yield self._process(table)

    def finish(self) -> Iterator[pa.RecordBatch]:
        if self._carry is not None and self._carry.num_rows:
            table, self._carry = self._carry, None
            yield self._process(table)
        self._seen.close()

    # -- grouping ----------------------------------------------------------------

    def _hold_back_from(self, table: pa.Table) -> int:
        """Rows from here on may continue in the next batch (same key): keep them back."""
        n: int = table.num_rows
        if self.key is None or n > _MAX_CARRY:
            return n
        readable = to_bool_np(pc.is_null(table.column("_reject")))
        keys = blank_to_null(table.column(self.key).combine_chunks())
        has_key = readable & to_bool_np(pc.is_valid(keys))
        rows = np.flatnonzero(readable)
        if rows.size == 0 or not has_key[rows[-1]]:
            return n
        last = keys[int(rows[-1])].as_py()
        last_file = table.column("_file")[int(rows[-1])].as_py()
        same = (
            has_key
            & to_bool_np(pc.equal(keys, last))
            & (table.column("_file").to_numpy() == last_file)
        )
        # walk back over readable rows while they carry the same key
        breaks = rows[~same[rows]]
        start = int(breaks[-1]) + 1 if breaks.size else 0
        # the whole table is one record: keep it all back, unless it grew too big to carry
        return n if start == 0 and n > _MAX_CARRY // 2 else start

    def _process(self, table: pa.Table) -> pa.RecordBatch:
        n = table.num_rows
        readable = to_bool_np(pc.is_null(table.column("_reject")))
        ri = np.flatnonzero(readable)
        t = table.take(pa.array(ri)) if ri.size < n else table
        # only the columns this job uses: a source may map many more
        values = {
            name: blank_to_null(t.column(name).combine_chunks())
            for name in t.column_names
            if name in self._used
        }
        files = t.column("_file").to_numpy()
        lines = t.column("_line").to_numpy()
        m = ri.size
        key = values.get(self.key) if self.key else None
        start = np.ones(m, dtype=bool)
        if key is not None and m > 1:
            same = to_bool_np(pc.equal(key[1:], key[:-1])) & (files[1:] == files[:-1])
            start[1:] = ~same
        gs = np.flatnonzero(start)
        gid = np.cumsum(start) - 1
        merged = (
            {name: _first_valid(col, gs) for name, col in values.items()}
            if gs.size < m
            else dict(values)
        )
        g_files, g_lines = files[gs], lines[gs]
        g = _Groups(gs.size)
        self._dedupe(g, merged, key is not None, g_files, g_lines)
        if self.window is not None:
            self._select_window(g, merged)
        self._validate(g, merged)
        if self.plan.target == "yesmail-send":
            self._require_id(g, merged, values, gs)
        lkeys = self._ledger_keys(merged, g_files, g_lines)
        if self.ledger is not None and not self.resend:
            self._settled_before(g, lkeys)
        # recipients: pending groups, numbered densely in input order
        pending = g.status == 0
        g_rec = np.full(gs.size, -1, dtype=np.int64)
        g_rec[pending] = self._rec + np.arange(int(pending.sum()))
        self._rec += int(pending.sum())
        merged["_lkey"] = lkeys
        return self._rows(table, readable, ri, gid, gs, g, g_rec, merged, values)

    def _ledger_keys(
        self, merged: dict[str, pa.Array], g_files: np.ndarray, g_lines: np.ndarray
    ) -> pa.Array:
        """Each record's ledger key: ``k:<record key>``, else ``f:<file digest>:<line>``."""
        n = len(g_files)
        by_line = (
            pa.array(
                [
                    f"f:{(self.inputs[f].digest or self.inputs[f].path)[:32]}:{ln}"
                    for f, ln in zip(g_files.tolist(), g_lines.tolist())
                ],
                pa.string(),
            )
            if (self.key is None or merged[self.key].null_count)
            else None
        )
        if self.key is None:
            assert by_line is not None
            return by_line
        keyed = pc.binary_join_element_wise("k:", merged[self.key], "")
        return keyed if by_line is None else pc.coalesce(keyed, by_line)[:n]

    def _settled_before(self, g: _Groups, lkeys: pa.Array) -> None:
        """Records the ledger has settled in an earlier run: ignored, with that answer."""
        assert self.ledger is not None
        open_ = np.flatnonzero(g.status == 0)
        if open_.size == 0:
            return
        keys = lkeys.take(pa.array(open_)).to_pylist()
        found = self.ledger.lookup(self.plan.name, keys)
        if not found:
            return
        for i, k in zip(open_.tolist(), keys):
            e = found.get(k)
            if e is None or not (e.final or e.state == "pending"):
                continue
            g.status[i] = 2
            if e.state == "pending":
                g.problem[i] = "in_progress"
                g.message[i] = f"being sent by run {e.run_id}"
            elif e.state == "doubt":
                g.problem[i] = "in_doubt"
                g.message[i] = (
                    f"in doubt since run {e.run_id} stopped while sending it; not sent "
                    "again (run with --in-doubt=resend to send it)"
                )
            else:
                g.problem[i] = "sent_before"
                g.message[i] = f"already {e.state} in run {e.run_id}"
            g.earlier[i] = orjson.dumps(e.outcome).decode() if e.outcome else None
            g.earlier_run[i] = e.run_id

    def _select_window(self, g: _Groups, merged: dict[str, pa.Array]) -> None:
        """Backfill: records created outside the window are not taken (ignored)."""
        assert self.window is not None
        created = merged.get("created_at")
        seconds = _epoch_seconds(created) if created is not None else None
        for i in np.flatnonzero(g.status == 0).tolist():
            t = None if seconds is None else seconds[i]
            if t is None:
                g.status[i], g.problem[i] = 2, "outside_window"
                g.message[i] = "no readable created_at: not taken by the backfill"
            elif not self.window.since <= t < self.window.until:
                g.status[i], g.problem[i] = 2, "outside_window"
                g.message[i] = "created outside the backfill window"

    def _dedupe(
        self,
        g: _Groups,
        merged: dict[str, pa.Array],
        keyed: bool,
        g_files: np.ndarray,
        g_lines: np.ndarray,
    ) -> None:
        where = (g_files.astype(np.int64) << _FILE_SHIFT) | g_lines
        if keyed:
            keys = merged[self.key] if self.key else None
            assert keys is not None
            has = to_bool_np(pc.is_valid(keys))
            idx = np.flatnonzero(has)
            if idx.size:
                h1, h2 = self._hasher(keys.take(pa.array(idx)))
                first = self._seen.add(h1, h2, where[idx])
                dup = idx[first >= 0]
                g.mark_duplicate(dup, first[first >= 0])
        # rows without a key are told apart by file and line: only a file read twice repeats them
        for fid in np.unique(g_files).tolist():
            same_as = self.inputs[fid].same_as
            if same_as is None:
                continue
            rows = np.flatnonzero((g_files == fid) & (g.status == 0))
            if keyed:
                rows = rows[~to_bool_np(pc.is_valid(merged[self.key or ""].take(pa.array(rows))))]
            g.mark_duplicate(rows, (np.int64(same_as) << _FILE_SHIFT) | g_lines[rows])

    def _validate(self, g: _Groups, merged: dict[str, pa.Array]) -> None:
        verdict = check_emails(merged["email"], lowercase_all=self.plan.target == "yesmail-send")
        merged["email"] = verdict.email
        open_ = g.status == 0
        for kind, code in (("missing_email", MISSING), ("invalid_email", INVALID)):
            rows = np.flatnonzero(open_ & (verdict.codes == code))
            g.fail(rows, kind, verdict.message.take(pa.array(rows)).to_pylist(), field="email")
        messages: list[pa.Array] = []
        for name in self.plan.fields:
            typed, msg = coerce(name, self.plan.field_spec(name), merged[f"f:{name}"])
            merged[f"f:{name}"] = typed
            messages.append(msg)
        if messages:
            g.fail_profile(messages, self.plan.fields)

    def _require_id(
        self, g: _Groups, merged: dict[str, pa.Array], values: dict[str, pa.Array], gs: np.ndarray
    ) -> None:
        """``yesmail-send``: a record whose ``id`` is empty fails here, with the platform's
        answer to it (see :data:`~pipeline.payloads.yesmail.NEW_SUBSCRIBER_NEEDS_ID`, which
        quotes ``003_…``), instead of failing its whole request as a 400."""
        col = id_column(self.plan)
        if col == "email":  # an open record's email is there and valid
            return
        # what the builder will read: a field's record value; record_id is the first row's own
        ids = merged[col] if col != "record_id" else values[col].take(pa.array(gs))
        rows = np.flatnonzero((g.status == 0) & ~to_bool_np(pc.is_valid(ids)))
        missing: list[str | None] = [NEW_SUBSCRIBER_NEEDS_ID] * rows.size
        g.fail(rows, "missing_id", missing, self.plan.job.recipient_id)

    # -- output ---------------------------------------------------------------------

    def _rows(
        self,
        table: pa.Table,
        readable: np.ndarray,
        ri: np.ndarray,
        gid: np.ndarray,
        gs: np.ndarray,
        g: _Groups,
        g_rec: np.ndarray,
        merged: dict[str, pa.Array],
        values: dict[str, pa.Array],
    ) -> pa.RecordBatch:
        n = table.num_rows
        row_g = np.full(n, -1, dtype=np.int64)
        row_g[ri] = gid
        is_primary = np.zeros(n, dtype=bool)
        is_primary[ri[gs]] = True
        prim_g = np.where(is_primary, row_g, -1)
        status = _spread(g.status, row_g, 1)
        status_names = pa.array(["pending", "failed", "ignored"])
        reject = table.column("_reject").combine_chunks()
        g_problem = g.column(g.problem, pa.string())
        problem = pc.if_else(pa.array(readable), scatter(g_problem, row_g), "unreadable")
        message = pc.coalesce(reject, scatter(g.column(g.message, pa.string()), row_g))
        failed = status == 1
        # only failed rows keep their text (for rejects.jsonl), in a compact array
        raw = scatter(
            _raw_or_json(table, np.flatnonzero(failed), self.inputs),
            np.where(failed, np.cumsum(failed) - 1, -1),
        )
        dup = _spread(g.dup_where, row_g, -1)
        row_index = np.where(readable, np.cumsum(readable) - 1, -1)
        row_vals = {
            name: scatter(values[name], row_index)
            for name in ("record_id", "created_at")
            if name in values
        }
        cols: dict[str, pa.Array] = {
            "_seq": pa.array(np.arange(self._seq, self._seq + n, dtype=np.int64)),
            "_file": table.column("_file").combine_chunks(),
            "_line": table.column("_line").combine_chunks(),
            "_raw": raw,
            "_esc": table.column("_esc").combine_chunks(),
            "record_id": row_vals.get("record_id", pa.nulls(n, pa.string())),
            "email": scatter(merged["email"], row_g),
            "created_at": row_vals.get("created_at", pa.nulls(n, pa.string())),
            "_status": status_names.take(pa.array(status.astype(np.int64))),
            "_problem": pc.if_else(pa.array(status == 0), pa.scalar(None, pa.string()), problem),
            "_message": message,
            "_field": scatter(g.column(g.field, pa.string()), row_g),
            "_details": scatter(g.column(g.details, pa.list_(pa.string())), row_g),
            "_rec": pa.array(_spread(g_rec, row_g, -1)),
            "_primary": pa.array(is_primary),
            "_dup_file": pa.array(
                np.where(dup >= 0, dup >> _FILE_SHIFT, 0).astype(np.int32), mask=dup < 0
            ),
            "_dup_line": pa.array(
                np.where(dup >= 0, dup & ((1 << _FILE_SHIFT) - 1), 0), mask=dup < 0
            ),
            "_lkey": scatter(merged["_lkey"], prim_g),
            "_earlier": scatter(g.column(g.earlier, pa.string()), row_g),
            "_earlier_run": scatter(g.column(g.earlier_run, pa.string()), row_g),
        }
        for f in self.schema.names[len(cols) :]:
            src = (
                merged[f]
                if f.startswith("f:") or f.startswith("flag:") or f in PASSTHROUGH
                else None
            )
            cols[f] = (
                scatter(src, prim_g) if src is not None else pa.nulls(n, self.schema.field(f).type)
            )
        self._seq += n
        return pa.RecordBatch.from_arrays(
            [cols[f].cast(self.schema.field(f).type) for f in self.schema.names], schema=self.schema
        )


class _Groups:
    """Per-record outcome while a batch is normalized (0 pending, 1 failed, 2 ignored)."""

    def __init__(self, n: int) -> None:
        self.status = np.zeros(n, dtype=np.int8)
        self.problem: list[str | None] = [None] * n
        self.message: list[str | None] = [None] * n
        self.field: list[str | None] = [None] * n
        self.details: list[list[str] | None] = [None] * n
        self.dup_where = np.full(n, -1, dtype=np.int64)
        self.earlier: list[str | None] = [None] * n
        self.earlier_run: list[str | None] = [None] * n

    def column(self, values: Sequence[object], type_: pa.DataType) -> pa.Array:
        """One of the per-record lists as an array. Only a record that failed or was
        ignored has a value in them, so only those are converted: a list of 40,000
        mostly None took ~3 ms to convert, six lists a batch."""
        told = np.flatnonzero(self.status != 0)
        if told.size == 0:
            return pa.nulls(len(values), type_)
        at = np.full(len(values), -1, dtype=np.int64)
        at[told] = np.arange(told.size)
        return scatter(pa.array([values[i] for i in told.tolist()], type_), at)

    def mark_duplicate(self, rows: np.ndarray, where: np.ndarray) -> None:
        for i, w in zip(rows.tolist(), where.tolist()):
            self.status[i] = 2
            self.problem[i] = "duplicate"
            self.dup_where[i] = w

    def fail(self, rows: np.ndarray, kind: str, messages: list[str | None], field: str) -> None:
        for i, msg in zip(rows.tolist(), messages):
            if self.status[i] == 0:
                self.status[i] = 1
                self.problem[i], self.message[i], self.field[i] = kind, msg, field

    def fail_profile(self, messages: list[pa.Array], names: tuple[str, ...]) -> None:
        bad = np.zeros(len(self.status), dtype=bool)
        for m in messages:
            bad |= to_bool_np(pc.is_valid(m))
        rows = np.flatnonzero(bad & (self.status == 0))
        if rows.size == 0:
            return
        sel = pa.array(rows)
        per_field = [m.take(sel).to_pylist() for m in messages]
        for k, i in enumerate(rows.tolist()):
            details = [col[k] for col in per_field if col[k] is not None]
            first = next(name for name, col in zip(names, per_field) if col[k] is not None)
            self.status[i] = 1
            self.problem[i], self.field[i] = "profile", first
            self.message[i], self.details[i] = "; ".join(details), details


def _spread(per_group: np.ndarray, row_g: np.ndarray, fill: int) -> np.ndarray:
    """Per row: its group's value, or ``fill`` for a row in no group (a batch may have none)."""
    out = np.full(row_g.size, fill, dtype=per_group.dtype)
    has = row_g >= 0
    out[has] = per_group[row_g[has]]
    return out


def _first_valid(col: pa.Array, starts: np.ndarray) -> pa.Array:
    """Per group (rows ``starts[i]`` up to the next start): its first non-null value."""
    firsts = col.take(pa.array(starts))
    if firsts.null_count == 0:  # the usual export: every line item repeats the order's values
        return firsts
    n = len(col)
    valid = to_bool_np(pc.is_valid(col))
    pos = np.where(valid, np.arange(n), n)
    first = np.minimum.reduceat(pos, starts)
    return scatter(col, np.where(first < n, first, -1))


def _raw_or_json(table: pa.Table, rows: np.ndarray, inputs: Sequence[InputRef]) -> pa.Array:
    """The raw text of the given rows: as extract kept it, read back from the file by
    offset, or (Parquet has no text) the row's values as JSON."""
    sel = pa.array(rows, pa.int64())
    raw = table.column("_raw").take(sel).combine_chunks()
    missing = np.flatnonzero(~to_bool_np(pc.is_valid(raw)))
    if missing.size == 0:
        return raw
    picked = table.select(["_file", "_offset", "_length"]).take(sel).to_pylist()
    names = [c for c in table.column_names if not c.startswith("_")]
    spans = [
        (p["_file"], p["_offset"], p["_length"]) for p in (picked[i] for i in missing.tolist())
    ]
    found = record_texts([(inputs[f].path, o, n) for f, o, n in spans])
    text: list[str | None] = []
    for i, got in zip(missing.tolist(), found):
        if got is None:
            got = orjson.dumps(table.select(names).slice(int(rows[i]), 1).to_pylist()[0]).decode()
        text.append(got)
    mask = np.zeros(len(raw), dtype=bool)
    mask[missing] = True
    return pc.replace_with_mask(raw, pa.array(mask), pa.array(text, pa.string()))


# -- profile values ----------------------------------------------------------------


def coerce(name: str, spec: ProfileField, col: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Strings → the field's type. Returns (typed values, per-row problem or null)."""
    if spec.type == "text":
        return col, pa.nulls(len(col), pa.string())
    if spec.type == "number":
        ok = pc.match_substring_regex(col, r"^[+-]?[0-9]{1,18}$")
        # Arrow's cast does not take a leading "+"
        digits = pc.replace_substring_regex(col, r"^\+", "")
        typed = pc.cast(pc.if_else(ok, digits, pa.scalar(None, pa.string())), pa.int64())
        return typed, _problem(name, col, ok, "is not a whole number")
    if spec.type == "boolean":
        low = pc.utf8_lower(col)
        is_true, is_false = pc.is_in(low, pa.array(_TRUE)), pc.is_in(low, pa.array(_FALSE))
        typed = pc.if_else(is_true, True, pc.if_else(is_false, False, pa.scalar(None, pa.bool_())))
        return typed, _problem(
            name, col, pc.or_(is_true, is_false), "is not a boolean (true/false, yes/no, 1/0)"
        )
    if spec.type == "single-select":
        ok = pc.is_in(col, pa.array(list(spec.lookup)))
        return col, _problem(name, col, ok, f"is not one of {', '.join(spec.lookup)}")
    return _multi_select(name, spec, col)


def _problem(name: str, col: pa.Array, ok: pa.Array, what: str) -> pa.Array:
    bad = pc.and_(pc.is_valid(col), pc.invert(pc.fill_null(ok, False)))
    shown = pc.utf8_slice_codeunits(col, 0, 60)
    text = pc.binary_join_element_wise(f"{name}: '", shown, f"' {what}", "")
    return pc.if_else(bad, text, pa.scalar(None, pa.string()))


def _multi_select(name: str, spec: ProfileField, col: pa.Array) -> tuple[pa.Array, pa.Array]:
    """A JSON array or ``A|B|C`` → list of lookup values (per row: a rare field type)."""
    allowed = set(spec.lookup)
    values: list[list[str] | None] = []
    problems: list[str | None] = []
    for v in col.to_pylist():
        if v is None:
            values.append(None)
            problems.append(None)
            continue
        items: object
        if v.startswith("["):
            try:
                items = orjson.loads(v)
            except orjson.JSONDecodeError:
                items = None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                values.append(None)
                problems.append(f"{name}: '{v[:60]}' is not a JSON array of strings")
                continue
        else:
            items = [i.strip() for i in v.split("|") if i.strip()]
        unknown = [i for i in items if i not in allowed]
        values.append(None if unknown else items)
        problems.append(
            f"{name}: {', '.join(repr(u) for u in unknown)} not among {', '.join(spec.lookup)}"
            if unknown
            else None
        )
    return pa.array(values, pa.list_(pa.string())), pa.array(problems, pa.string())


def _epoch_seconds(col: pa.Array) -> list[int | None]:
    """ISO 8601 dates or times (with or without zone; naive ones are UTC) as epoch seconds."""
    import datetime as dt

    out: list[int | None] = []
    for v in col.to_pylist():
        if v is None:
            out.append(None)
            continue
        try:
            t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            out.append(None)
            continue
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.UTC)
        out.append(int(t.timestamp()))
    return out
