"""The report stage: one result line per input row, in the platform's own vocabulary.

It reads, per job, the normalize stage's rows and, by recipient, the build
stage's batch and the deliver stage's outcome, and writes

* ``results.jsonl`` / ``results.parquet`` — every row, input order;
* ``rejects.jsonl`` — the rows that could not become a payload;
* ``async-results.json`` — totals and per-index lists, Yesmail's shape;
* ``summary.json`` — counts by job, target, status and result code.

A row that never reached the platform still gets the answer the platform
would give for it: Maestro's ``INVALID_EMAIL`` for a bad address, a subscribe
``FAILED``/``PARAMETER_VALIDATION_ERROR``, Yesmail's ``400`` — the closest
documented code, with the detail in ``message``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrowutil import join_items, repeat_text, scatter, to_bool_np
from pipeline.config import JobPlan
from pipeline.deliver import OUTCOME_SCHEMA
from pipeline.errors import MaestroResult, RunDirError, SubscribeFailure, YesmailStatus
from pipeline.payloads.base import REDACTED
from pipeline.payloads.jsonfrag import string_literal
from pipeline.rundir import RunDir, now_iso

__all__ = ["RESULT_SCHEMA", "ReportWriter", "problem_outcome"]

RESULT_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("line", pa.int64()),
        pa.field("record_id", pa.string()),
        pa.field("job", pa.string()),
        pa.field("target", pa.string()),
        pa.field("email", pa.string()),
        pa.field("batch", pa.string()),
        pa.field("status", pa.string()),
        pa.field("result", pa.string()),
        pa.field("error", pa.string()),
        pa.field("message", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("ticket", pa.string()),
        pa.field("state", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("events", pa.string()),
        pa.field("earlier_run", pa.string()),
        pa.field("time", pa.string()),
    ]
)
# results.jsonl writes these as JSON values already rendered (reason is an object)
_RAW_JSON = {"reason", "events"}
_STRINGS = [f.name for f in RESULT_SCHEMA if f.type == pa.string() and f.name not in _RAW_JSON]

# a record the ledger settled earlier (or that another run is sending, or that is in doubt)
_NOT_SENT_AGAIN = {"sent_before", "in_doubt", "in_progress"}
_PROBLEM_TEXT = {
    "unreadable": "the row could not be read",
    "missing_email": MaestroResult.MISSING_EMAIL.error,
    "invalid_email": MaestroResult.INVALID_EMAIL.error,
}
_ONDEMAND = {
    "unreadable": MaestroResult.PARSE_ERROR,
    "missing_email": MaestroResult.MISSING_EMAIL,
    "invalid_email": MaestroResult.INVALID_EMAIL,
    "profile": MaestroResult.PROFILE_VALIDATION_ERROR,
}


def hide_password(raw: str, password: Any, column: str, unreadable: bool) -> str:
    r"""A reject's raw text without the subscriber's password, which no result file shows.

    A row that was read has its password value (replaced wherever it appears, as
    written, JSON-escaped or CSV-quoted); a row that could not be read has none: in
    a JSON line the value of the password's key is hidden, and a line whose fields
    could not be told apart is not shown at all (its file, line and reason still are).

    >>> hide_password('3,ann@example.com,"se""cret"', 'se"cret', "pw", False)
    '3,ann@example.com,"***"'
    >>> hide_password('{"pw": "s3cr\\"et", "email": 1', None, "pw", True)
    '{"pw": "***", "email": 1'
    >>> hide_password('3,ann@example.com,s3cret,extra', None, "pw", True)
    '***'
    """
    if password is not None and str(password) != "":
        text = str(password)
        forms = {text, orjson.dumps(text).decode()[1:-1], text.replace('"', '""')}
        for form in sorted(forms, key=len, reverse=True):
            raw = raw.replace(form, REDACTED)
        return raw
    if not unreadable:
        return raw  # read, and no password in it
    if raw.lstrip().startswith("{"):
        key = re.escape(orjson.dumps(column).decode())
        return re.sub(
            key + r'(\s*:\s*)(?:"(?:[^"\\]|\\.)*"?|[^,}\s]*)',
            lambda m: f'{orjson.dumps(column).decode()}{m.group(1)}"{REDACTED}"',
            raw,
        )
    return REDACTED


def problem_outcome(
    target: str, problem: str, message: str | None, details: list[str] | None
) -> dict[str, Any]:
    """The platform's answer for a row that failed before it could be sent.

    >>> problem_outcome("maestro-ondemand", "invalid_email", "no @", None)["result"]
    'INVALID_EMAIL'
    """
    if target == "maestro-ondemand":
        code = _ONDEMAND[problem]
        return {"result": code.value, "error": code.error, "message": message}
    if target == "maestro-subscribe":
        if problem == "profile":
            body = SubscribeFailure.PROFILE_VALIDATION_ERROR.response(
                "Profile validation error", details or ([message] if message else None)
            )
        else:
            text = _PROBLEM_TEXT[problem] + (f": {message}" if message else "")
            body = SubscribeFailure.PARAMETER_VALIDATION_ERROR.response(text)
        return {"result": body["result"], "reason": orjson.dumps(body["reason"]).decode()}
    if problem == "missing_id":  # the platform's own 400 message (payloads.yesmail)
        return {"http_status": int(YesmailStatus.BAD_REQUEST), "message": message}
    what = {
        "unreadable": "the row could not be read",
        "missing_email": "missing email address",
        "invalid_email": "invalid email address",
        "profile": "invalid profile attribute",
    }[problem]
    return {
        "http_status": int(YesmailStatus.BAD_REQUEST),
        "message": f"Bad Request: {what}" + (f" ({message})" if message else ""),
    }


class _ByRec:
    """Stream of rows keyed by a dense, increasing ``_rec``; look up any rec not yet passed."""

    def __init__(self, batches: Iterator[pa.RecordBatch], schema: pa.Schema) -> None:
        self._batches = batches
        self._table = schema.empty_table()
        self._base = 0

    def take(self, recs: np.ndarray) -> pa.Table:
        """Rows for ``recs`` (all >= every rec asked for before; -1 gives nulls)."""
        wanted = recs[recs >= 0]
        if wanted.size:
            need = int(wanted.max())
            have = self._base + self._table.num_rows
            more: list[pa.RecordBatch] = []
            while have <= need:  # gather first, concatenate once: stage files hold many batches
                nxt = next(self._batches, None)
                if nxt is None:
                    raise ValueError(f"recipient {need} has no entry in the stage file")
                more.append(nxt)
                have += nxt.num_rows
            low = int(wanted.min()) - self._base
            if more or low > 0:
                table = self._table.slice(max(low, 0))
                self._table = pa.Table.from_batches(
                    [*table.combine_chunks().to_batches(), *more], schema=self._table.schema
                ).combine_chunks()
                self._base += max(low, 0)
        idx = np.where(recs >= 0, recs - self._base, -1)
        return pa.table(
            {
                name: scatter(self._table.column(name).combine_chunks(), idx)
                for name in self._table.column_names
            }
        )


class ReportWriter:
    """Writes the report files for the jobs of a run, job after job."""

    def __init__(self, run: RunDir, paths: list[str]) -> None:
        self.run = run
        self.paths_json = pa.array([orjson.dumps(p).decode() for p in paths], pa.string())
        self.paths = pa.array(paths, pa.string())
        self.index = 0
        self.summary: dict[str, Any] = {}
        self.status_counts: Counter[str] = Counter()
        self.finished = now_iso()
        self._tmp = tempfile.TemporaryDirectory(dir=run.path, prefix=".report-")
        self._lists = {
            s: open(os.path.join(self._tmp.name, s), "wb")  # noqa: SIM115
            for s in ("completed", "failed", "ignored")
        }
        self._results = open(os.path.join(self._tmp.name, "results.jsonl"), "wb")  # noqa: SIM115
        self._rejects = open(os.path.join(self._tmp.name, "rejects.jsonl"), "wb")  # noqa: SIM115
        import pyarrow.parquet as pq  # only a report needs it (25 ms of imports)

        self._parquet = pq.ParquetWriter(
            os.path.join(self._tmp.name, "results.parquet"), RESULT_SCHEMA, compression="snappy"
        )
        # Parquet encoding releases the GIL: it runs beside the JSON lines of the next chunk
        self._pq_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet")
        self._pq_pending: Future[None] | None = None

    def add_job(self, plan: JobPlan) -> dict[str, Any]:
        """Append one job's rows; return its counts."""
        builds = _ByRec(
            iter(self.run.stage_reader("build", plan.name)),
            self.run.stage_reader("build", plan.name).schema,
        )
        outcomes = _ByRec(iter(self.run.stage_reader("deliver", plan.name)), OUTCOME_SCHEMA)
        counts: dict[str, Any] = {
            "target": plan.target,
            "rows": 0,
            "status": Counter(),
            "codes": Counter(),
        }
        for rows in self.run.stage_reader("normalize", plan.name):
            table = self._chunk(plan, rows, builds, outcomes)
            self._write(table, rows)
            self._count(plan, table, counts)
            self._write_rejects(plan, rows, table)
        counts["status"] = dict(counts["status"])
        counts["codes"] = dict(counts["codes"])
        self.summary[plan.name] = counts
        return counts

    def _chunk(
        self, plan: JobPlan, rows: pa.RecordBatch, builds: _ByRec, outcomes: _ByRec
    ) -> pa.Table:
        n = rows.num_rows
        recs = rows.column("_rec").to_numpy()
        b = builds.take(recs)
        o = outcomes.take(recs)
        pending = to_bool_np(pc.equal(rows.column("_status"), "pending"))
        batch_no = b.column("_batch").combine_chunks()
        batch = pc.if_else(
            pc.is_valid(batch_no),
            pc.binary_join_element_wise(
                f"{plan.target}-", pc.utf8_lpad(pc.cast(batch_no, pa.string()), 4, "0"), ""
            ),
            pa.scalar(None, pa.string()),
        )
        cols: dict[str, pa.Array] = {
            "index": pa.array(np.arange(self.index, self.index + n, dtype=np.int64)),
            "source": self.paths.take(rows.column("_file")),
            "line": rows.column("_line"),
            "record_id": rows.column("record_id"),
            "job": repeat_text(plan.name, n),
            "target": repeat_text(plan.target, n),
            "email": rows.column("email"),
            "batch": batch,
        }
        p = pa.array(pending)
        for name in (
            "status",
            "result",
            "error",
            "message",
            "reason",
            "ticket",
            "state",
            "http_status",
            "events",
            "earlier_run",
            "time",
        ):
            own = (
                rows.column("_status")
                if name == "status"
                else pa.nulls(n, OUTCOME_SCHEMA.field(name).type)
            )
            cols[name] = pc.if_else(p, o.column(name).combine_chunks(), own)
        cols["time"] = pc.coalesce(cols["time"], self.finished)
        self.index += n
        table = pa.table(cols, schema=RESULT_SCHEMA)
        return self._explain(plan, rows, table, ~pending)

    def _explain(
        self, plan: JobPlan, rows: pa.RecordBatch, table: pa.Table, mask: np.ndarray
    ) -> pa.Table:
        """Fill in the platform's answer for rows that failed or were skipped before sending."""
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return table
        sel = pa.array(idx)
        problems = rows.column("_problem").take(sel).to_pylist()
        messages = rows.column("_message").take(sel).to_pylist()
        details = rows.column("_details").take(sel).to_pylist()
        dup_file = rows.column("_dup_file").take(sel).to_pylist()
        dup_line = rows.column("_dup_line").take(sel).to_pylist()
        rid = rows.column("record_id").take(sel).to_pylist()
        earlier = rows.column("_earlier").take(sel).to_pylist()
        earlier_run = rows.column("_earlier_run").take(sel).to_pylist()
        filled: dict[str, list[Any]] = {
            k: [None] * idx.size
            for k in (
                "result",
                "error",
                "message",
                "reason",
                "ticket",
                "state",
                "http_status",
                "events",
                "earlier_run",
            )
        }
        for k, problem in enumerate(problems):
            if problem in _NOT_SENT_AGAIN:
                answer = orjson.loads(earlier[k]) if earlier[k] else {}
                for key in ("result", "error", "ticket", "state", "http_status"):
                    filled[key][k] = answer.get(key)
                for key in ("reason", "events"):
                    v = answer.get(key)
                    filled[key][k] = None if v is None else orjson.dumps(v).decode()
                before = f" ({answer['message']})" if answer.get("message") else ""
                filled["message"][k] = f"not sent again: {messages[k]}{before}"
                filled["earlier_run"][k] = earlier_run[k]
                continue
            if problem == "outside_window":
                filled["message"][k] = messages[k]
                continue
            if problem == "duplicate":
                where = f"{self.paths[dup_file[k]].as_py()} line {dup_line[k]}"
                what = f"record key {rid[k]!r}" if rid[k] else "the same file"
                filled["message"][k] = f"duplicate: {what} already appeared in this run at {where}"
                continue
            for key, value in problem_outcome(
                plan.target, problem or "unreadable", messages[k], details[k]
            ).items():
                filled[key][k] = value
        m = np.zeros(table.num_rows, dtype=bool)
        m[idx] = True
        mask_arr = pa.array(m)
        for key, values in filled.items():
            col = table.column(key).combine_chunks()
            typ = RESULT_SCHEMA.field(key).type
            table = table.set_column(
                table.schema.get_field_index(key),
                key,
                pc.replace_with_mask(col, mask_arr, pa.array(values, typ)),
            )
        return table

    # -- writing ----------------------------------------------------------------------

    def _write(self, table: pa.Table, rows: pa.RecordBatch) -> None:
        if self._pq_pending is not None:
            self._pq_pending.result()
        self._pq_pending = self._pq_thread.submit(self._parquet.write_table, table)
        esc = rows.column("_esc").to_numpy(zero_copy_only=False)
        self._results.write(jsonl_lines(table, esc, self.paths_json.take(rows.column("_file"))))
        status = table.column("status").combine_chunks()
        times = table.column("time").combine_chunks()
        for name, fh in self._lists.items():
            sel = pc.equal(status, name)
            if not pc.any(sel).as_py():
                continue
            entries = pc.binary_join_element_wise(
                '{"index":',
                pc.cast(table.column("index").filter(sel), pa.string()),
                ',"time":"',
                times.filter(sel),
                '"}',
                "",
            )
            fh.write(join_items(entries) + b",")

    def _write_rejects(self, plan: JobPlan, rows: pa.RecordBatch, table: pa.Table) -> None:
        problem = rows.column("_problem")
        sel = pc.and_(pc.equal(rows.column("_status"), "failed"), pc.is_valid(problem))
        if not pc.any(sel).as_py():
            return
        picked = rows.filter(sel)
        res = table.filter(sel)
        secret = plan.source.password  # the source column of a subscriber's password, if any
        passwords = (
            picked.column("password").to_pylist()
            if secret and "password" in picked.column_names
            else [None] * picked.num_rows
        )
        for i, r in enumerate(
            picked.select(["_file", "_line", "_raw", "_field", "_problem", "_message"]).to_pylist()
        ):
            raw = (r["_raw"] or "").rstrip("\r\n")
            if secret:
                raw = hide_password(raw, passwords[i], secret, r["_problem"] == "unreadable")
            code = res.column("result")[i].as_py() or res.column("http_status")[i].as_py()
            reason_obj = res.column("reason")[i].as_py()
            if reason_obj:
                code = orjson.loads(reason_obj)["type"]
            line = {
                "index": res.column("index")[i].as_py(),
                "job": plan.name,
                "source": self.paths[r["_file"]].as_py(),
                "line": r["_line"],
                "raw": raw,
                "field": r["_field"],
                "reason": r["_message"] or _PROBLEM_TEXT.get(r["_problem"], r["_problem"]),
                "code": str(code) if code is not None else None,
            }
            self._rejects.write(orjson.dumps(line) + b"\n")

    def _count(self, plan: JobPlan, table: pa.Table, counts: dict[str, Any]) -> None:
        counts["rows"] += table.num_rows
        vc = (
            table.group_by(["status", "result", "http_status", "reason"])
            .aggregate([("index", "count")])
            .to_pylist()
        )
        for row in vc:
            counts["status"][row["status"]] += row["index_count"]
            self.status_counts[row["status"]] += row["index_count"]
            code = row["result"]
            if row["reason"]:
                code = orjson.loads(row["reason"])["type"]
            elif row["http_status"] is not None:
                code = str(row["http_status"])
            if code and row["status"] != "ignored":
                counts["codes"][code] += row["index_count"]

    def close(self) -> dict[str, Any]:
        """Move the finished files into the run directory; return the totals."""
        if self._pq_pending is not None:
            self._pq_pending.result()
        self._pq_thread.shutdown()
        self._parquet.close()
        self._results.close()
        self._rejects.close()
        for fh in self._lists.values():
            fh.close()
        total = self.index
        done = self.status_counts
        run = self.run
        for name in ("results.jsonl", "rejects.jsonl", "results.parquet"):
            src = os.path.join(self._tmp.name, name)
            os.chmod(src, 0o600)
            os.replace(src, run.file(name))
        counts = {
            "requested": total,
            "total": total,
            "completed": done["completed"],
            "ignored": done["ignored"],
            "failed": done["failed"],
        }
        with run.open_private("async-results.json") as fh:
            fh.write(
                b'{"id":'
                + orjson.dumps(run.run_id)
                + b',"lastUpdated":'
                + orjson.dumps(self.finished)
                + b',"counts":'
                + orjson.dumps(counts)
            )
            for name in ("completed", "failed", "ignored"):
                fh.write(b',"' + name.encode() + b'":[')
                with open(os.path.join(self._tmp.name, name), "rb") as part:
                    data = part.read()
                fh.write(data[:-1] if data.endswith(b",") else data)
                fh.write(b"]")
            fh.write(b"}\n")
        self._tmp.cleanup()
        summary = {"run_id": run.run_id, "rows": total, "status": dict(done), "jobs": self.summary}
        run.write_json("summary.json", summary, private=False)
        return summary


# values mailpipe writes itself, never needing JSON escaping
_OWN = {"job", "target", "batch", "status", "result", "error", "ticket", "state", "time"}
_NEVER_NULL = {"index", "source", "line", "job", "target", "status", "time"}


def jsonl_lines(
    table: pa.Table, esc: np.ndarray | None = None, sources_json: pa.Array | None = None
) -> bytes:
    """Every row of a results table as one JSON line, rendered column-wise.

    ``esc`` marks the rows whose input values may need escaping (extract knows);
    ``sources_json`` is the ``source`` column already as JSON strings.
    """
    n = table.num_rows
    parts: list[pa.Array | str] = []
    for i, f in enumerate(RESULT_SCHEMA):
        key = ("{" if i == 0 else ",") + orjson.dumps(f.name).decode() + ":"
        col = table.column(f.name).combine_chunks()
        if f.name == "source" and sources_json is not None:
            parts += [key, sources_json]
            continue
        if f.name in _NEVER_NULL and f.type == pa.string() and f.name in _OWN:
            parts += [key + '"', col, '"']  # no kernel call of its own
            continue
        if f.name in _RAW_JSON:
            value = col
        elif f.type != pa.string():
            value = pc.cast(col, pa.string())
        elif f.name in _OWN:
            value = pc.binary_join_element_wise('"', col, '"', "")
        else:
            value = string_literal(col, esc if f.name in ("email", "record_id") else None)
        parts += [key, value if f.name in _NEVER_NULL else pc.coalesce(value, "null")]
    parts.append("}\n")
    line = pc.binary_join_element_wise(*parts, "")
    offsets = np.frombuffer(line.buffers()[1], dtype=np.int32)
    lo, hi = int(offsets[line.offset]), int(offsets[line.offset + n])
    return memoryview(line.buffers()[2])[lo:hi].tobytes() if n else b""


# -- counting a run's results (`mailpipe results`) ---------------------------------

STATUS_ORDER = ("completed", "failed", "ignored")
_COUNT_COLUMNS = ["job", "target", "status", "result", "reason", "http_status", "state"]


def result_counts(run: RunDir) -> list[dict[str, Any]]:
    """One entry per (job, target, status, code) of the run's results, in table order.

    Job, then status (completed, failed, ignored), then most rows first. The
    results are read a batch at a time and counted by Arrow's group-by: a run
    can hold millions of rows, and only seven columns matter.
    """
    block = _JSON_BLOCK
    while True:
        try:
            counts = _count(_result_batches(run, block))
            break
        except pa.ArrowInvalid as e:
            # a results.jsonl line longer than a block: read again with blocks that hold it
            if "straddl" in str(e) and block < _JSON_BLOCK_MAX:
                block *= 16
                continue
            raise RunDirError(
                f"{run.path}: the results cannot be read ({e}); "
                f"run `mailpipe report {run.path}` to write them again"
            ) from None
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    ordered = sorted(
        counts.items(),
        key=lambda kv: (kv[0][0], rank.get(kv[0][2], len(rank)), kv[0][2], -kv[1], kv[0][3]),
    )
    return [
        {"job": job, "target": target, "status": status, "code": code or None, "rows": n}
        for (job, target, status, code), n in ordered
    ]


def _count(batches: Iterator[Any]) -> dict[tuple[str, str, str, str], int]:
    """Rows by (job, target, status, code), summed over the batches' group-bys."""
    counts: dict[tuple[str, str, str, str], int] = {}
    for batch in batches:
        table = pa.table(
            {
                "job": batch.column("job"),
                "target": batch.column("target"),
                "status": batch.column("status"),
                "code": _codes(batch),
            }
        )
        groups = table.group_by(["job", "target", "status", "code"]).aggregate([([], "count_all")])
        for g in groups.to_pylist():
            key = (g["job"], g["target"], g["status"], g["code"])
            counts[key] = counts.get(key, 0) + g["count_all"]
    return counts


# Arrow's JSON reader needs a whole line in one block, and takes about 15 times a
# block in memory: small blocks, made larger only when a line does not fit
_JSON_BLOCK, _JSON_BLOCK_MAX = 1 << 20, 1 << 30
_BATCH_ROWS = 262_144


def _result_batches(run: RunDir, block_size: int = _JSON_BLOCK) -> Iterator[Any]:
    """The counted columns of the run's results, batch by batch.

    results.parquet when the run has it (columnar: only these columns are
    read); else results.jsonl through Arrow's streaming JSON reader, in blocks
    of ``block_size`` bytes.
    """
    parquet = run.file("results.parquet")
    if parquet.exists():
        import pyarrow.parquet as pq  # a report's or this command's import (25 ms)

        yield from pq.ParquetFile(parquet).iter_batches(
            batch_size=_BATCH_ROWS, columns=_COUNT_COLUMNS
        )
        return
    jsonl = run.file("results.jsonl")
    if not jsonl.exists():
        raise RunDirError(f"{run.path}: no results yet; run `mailpipe report {run.path}`")
    if jsonl.stat().st_size == 0:  # Arrow refuses an empty stream; no rows is no counts
        return
    import pyarrow.json as pj

    schema = pa.schema(
        [
            ("job", pa.string()),
            ("target", pa.string()),
            ("status", pa.string()),
            ("result", pa.string()),
            ("reason", pa.struct([("type", pa.string())])),
            ("http_status", pa.int32()),
            ("state", pa.string()),
        ]
    )
    reader = pj.open_json(
        jsonl,
        read_options=pj.ReadOptions(block_size=block_size),
        parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
    )
    # a block is a few thousand rows: counted one by one, the group-bys would cost more
    # than the parsing, so they are counted a quarter of a million at a time
    held: list[Any] = []
    for batch in reader:
        held.append(batch)
        if sum(b.num_rows for b in held) >= _BATCH_ROWS:
            yield pa.Table.from_batches(held, schema=schema).combine_chunks().to_batches()[0]
            held = []
    if held:
        yield pa.Table.from_batches(held, schema=schema).combine_chunks().to_batches()[0]


def _codes(batch: Any) -> Any:
    """Each row's platform code: ``reason.type``, else ``result``, else Yesmail's
    ``http_status/state``; "" when the row has none.

    ``reason.type`` comes first because a failed subscribe's ``result`` is just
    ``FAILED``; the three never mix within a target.
    """
    http = pc.cast(batch.column("http_status"), pa.string())
    state = batch.column("state")
    # "202/completed" when both; not null_handling="skip", which drops all-null rows
    # (pyarrow 26) instead of keeping them null
    yesmail = pc.coalesce(pc.binary_join_element_wise(http, state, "/"), http, state)
    return pc.coalesce(_reason_types(batch.column("reason")), batch.column("result"), yesmail, "")


def _reason_types(reason: Any) -> Any:
    """``reason.type`` of each row (null without a reason).

    results.jsonl gives the object, parsed by Arrow; results.parquet gives its
    JSON text, whose ``type`` mailpipe writes first: a pattern reads that
    without parsing, and only text that does not start so (an HTTP answer
    with its keys in another order) is parsed, once per distinct value.
    """
    if pa.types.is_struct(reason.type):
        return pc.struct_field(reason, "type")
    reason = pc.cast(reason, pa.string())
    types = pc.struct_field(
        pc.extract_regex(reason, r'^\{"type":"(?P<type>[A-Z_a-z0-9]*)"'), "type"
    )
    odd = pc.and_(pc.is_valid(reason), pc.is_null(types))
    if not pc.any(odd).as_py():
        return types
    parsed: dict[str, str | None] = {}
    for text in pc.unique(reason.filter(odd)).to_pylist():
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            obj = None
        kind = obj.get("type") if isinstance(obj, dict) else None
        parsed[text] = str(kind) if kind is not None else None
    keys = pa.array(list(parsed), pa.string())
    values = pa.array(list(parsed.values()), pa.string())
    looked_up = values.take(pc.index_in(reason, value_set=keys))
    return pc.if_else(odd, looked_up, types)
