"""``simulate`` mode: no network; the engine answers each batch as the platform documents.

The files written are those of a real run: the response file holds the body
the platform would send, and every recipient's outcome is in its vocabulary.
On-demand batches are judged many at a time (consecutive calls of one job are
processed one recipient after the other by the platform anyway), which keeps
the store to one query per chunk of recipients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrowutil import repeat_text, to_bool_np
from pipeline.checkpoint import CHECKPOINT_BYTES, Checkpointer
from pipeline.config import FLAG_NAMES, JobPlan, MailpipeConfig
from pipeline.deliver import OUTCOME_SCHEMA, conform
from pipeline.deliver.runner import BatchRows, Chunk, fault
from pipeline.engine.ondemand import (
    Precheck,
    RecipColumns,
    columns_from_objects,
    evaluate_ondemand,
    precheck,
)
from pipeline.engine.subscribe import evaluate_subscribe
from pipeline.engine.yesmail import SendAnswer, evaluate_sends, send_session
from pipeline.errors import MaestroResult, YesmailStatus
from pipeline.ledger import log_platform
from pipeline.payloads import builder_for
from pipeline.payloads.batching import with_commas
from pipeline.payloads.jsonfrag import string_literal
from pipeline.rundir import BatchFileWriter, now_iso
from pipeline.store import Store

__all__ = ["SimulateBackend", "outcome_table"]


def outcome_table(recs: pa.Array, **cols: list[Any]) -> pa.Table:
    """An OUTCOME_SCHEMA table from per-recipient lists (missing columns are null)."""
    n = len(recs)
    arrays = {"_rec": recs}
    for f in OUTCOME_SCHEMA:
        if f.name == "_rec":
            continue
        values = cols.get(f.name)
        arrays[f.name] = pa.array(values, f.type) if values is not None else pa.nulls(n, f.type)
    return conform(pa.table(arrays))


class SimulateBackend:
    """Answers batches of one job with the engine, from the store."""

    def __init__(self, cfg: MailpipeConfig, plan: JobPlan, dry_run: bool = False) -> None:
        self.cfg = cfg
        self.plan = plan
        self.store = Store(cfg.store.url, dry_run=dry_run)
        if cfg.simulate.mail_jobs:
            self.store.sync_mail_jobs(dict(cfg.simulate.mail_jobs))
        self.builder = builder_for(plan)
        self._keys_now: list[str] = []
        # the engine's commits never checkpoint: a thread does, once the log passes
        # CHECKPOINT_BYTES (see :meth:`_checkpoint_soon`)
        self._checkpoints = Checkpointer(self.store, every=None) if not dry_run else None
        if self._checkpoints is not None:
            self._checkpoints.start()

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.stop()
        self.store.close()

    def _checkpoint_soon(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.nudge(CHECKPOINT_BYTES)

    @staticmethod
    def _keys(rows: pa.Table) -> list[str]:
        """The recipients' ledger keys (absent when rows come from elsewhere, e.g. tests)."""
        if "_lkey" not in rows.column_names:
            return []
        return [k or "" for k in rows.column("_lkey").to_pylist()]

    @staticmethod
    def _key_column(rows: pa.Table) -> pa.Array | None:
        """:meth:`_keys` as an array (None when absent): a chunk's 69,000 keys go to the
        platform's log without becoming Python strings."""
        if "_lkey" not in rows.column_names:
            return None
        return pc.fill_null(rows.column("_lkey").combine_chunks(), "")

    def prepare(self, chunk: Chunk) -> None:
        """On-demand: the recipients' columns and what their own objects decide (no store
        needed), worked out while the chunk before is judged (1M rows: ~1.5 s of the
        engine thread's ~10 s)."""
        if self.plan.target == "maestro-ondemand":
            chunk.prepared = precheck(self._recip_columns(chunk.rows))

    def deliver(self, chunk: Chunk, files: BatchFileWriter) -> pa.Table:
        try:
            return self._deliver(chunk, files)
        finally:
            self._checkpoint_soon()

    def _deliver(self, chunk: Chunk, files: BatchFileWriter) -> pa.Table:
        target = self.plan.target
        if target == "maestro-ondemand":
            return self._ondemand(chunk, files)
        if target == "yesmail-send":
            return self._yesmail(chunk, files)
        tables = []
        for batch in chunk.batches():
            response, table = self._subscribe(batch)
            fault("mid-chunk")  # the platform processed this batch; the chunk is not done
            files.add(batch.id, "response", response)
            tables.append(table)
        return pa.concat_tables(tables) if tables else outcome_table(pa.array([], pa.int64()))

    # -- maestro-ondemand -----------------------------------------------------------

    def _ondemand(self, chunk: Chunk, files: BatchFileWriter) -> pa.Table:
        """The whole chunk in one engine call; responses and outcomes built column-wise."""
        rows = chunk.rows
        n = rows.num_rows
        keys = self._key_column(rows)

        answered: list[_Answers] = []  # built once: for the platform's log and the files

        def log(conn: Any, codes: list[MaestroResult], msgs: list[str | None]) -> None:
            a = _Answers.of(codes, msgs)
            answered.append(a)
            said = pc.binary_join_element_wise(
                '{"status":"',
                pc.if_else(a.ok, "completed", "failed"),
                '",',
                pc.utf8_slice_codeunits(a.body, 1),
                "",
            )
            assert keys is not None
            log_platform(conn, self.plan.name, keys, said)

        pre = chunk.prepared
        if not isinstance(pre, Precheck):
            pre = precheck(self._recip_columns(rows))
        logs = keys is not None and len(keys) > 0
        answer = evaluate_ondemand(self.cfg, self.plan, self.store, pre, log=log if logs else None)
        now = now_iso()
        recs = rows.column("_rec").combine_chunks()
        if answer.request_error is not None:
            # the platform answers each recipient of the call with the job's error
            one = orjson.dumps(answer.request_error.response())
            for bid, size in zip(chunk.ids(), chunk.sizes().tolist()):
                files.add(bid, "response", b"[" + b",".join([one] * size) + b"]")
            err = answer.request_error
            return outcome_table(
                recs,
                status=["failed"] * n,
                result=[err.value] * n,
                error=[err.error] * n,
                time=[now] * n,
            )
        a = answered[0] if answered else _Answers.of(answer.result, answer.message)
        commas = with_commas(a.body)
        offsets = np.frombuffer(commas.buffers()[1], dtype=np.int32)[
            commas.offset : commas.offset + n + 1
        ]
        data = memoryview(commas.buffers()[2])
        for bid, s, e in zip(chunk.ids(), chunk.starts[:-1].tolist(), chunk.starts[1:].tolist()):
            files.add(bid, "response", b"[" + data[int(offsets[s]) : int(offsets[e]) - 1] + b"]")
        return pa.table(
            {
                "_rec": recs,
                "status": pc.if_else(a.ok, "completed", "failed"),
                "result": a.codes,
                "error": a.errors,
                "message": a.messages,
                "reason": pa.nulls(n, pa.string()),
                "ticket": pa.nulls(n, pa.string()),
                "state": pa.nulls(n, pa.string()),
                "http_status": pa.nulls(n, pa.int32()),
                "events": pa.nulls(n, pa.string()),
                "time": repeat_text(now, n),
            }
        )

    def _recip_columns(self, rows: pa.Table) -> RecipColumns:
        n = rows.num_rows
        flags: dict[str, pa.Array] = {}
        for name in FLAG_NAMES:
            default = "true" if getattr(self.plan.job, name) else "false"
            col = f"flag:{name}"
            if col in rows.column_names:
                raw = rows.column(col).combine_chunks()
                low = pc.utf8_lower(raw)
                is_bool = pc.is_in(low, pa.array(["true", "false"]))
                value = pc.if_else(is_bool, low, raw)
                flags[name] = pc.coalesce(value, default)
            else:
                flags[name] = repeat_text(default, n)
        profile = {name: rows.column(f"f:{name}").combine_chunks() for name in self.plan.fields}
        rc = RecipColumns(
            email=rows.column("email").combine_chunks(),
            flags=flags,
            profile=profile,
            profile_error=pa.nulls(n, pa.string()),
            profile_invalid=np.zeros(n, dtype=bool),
        )
        if "profile_json" in rows.column_names:
            self._judge_profile_objects(rows, rc)
        return rc

    def _judge_profile_objects(self, rows: pa.Table, rc: RecipColumns) -> None:
        """Rows with a per-row profile object are judged from the JSON that would be sent."""
        idx = np.flatnonzero(to_bool_np(pc.is_valid(rows.column("profile_json"))))
        if idx.size == 0:
            return
        items = self.builder.items(rows.take(pa.array(idx))).to_pylist()
        parsed = columns_from_objects([orjson.loads(t) for t in items], self.plan)
        mask = np.zeros(len(rc), dtype=bool)
        mask[idx] = True
        m = pa.array(mask)
        for name, col in parsed.profile.items():
            base = rc.profile.get(name, pa.nulls(len(rc), col.type))
            rc.profile[name] = pc.replace_with_mask(base, m, col)
        for name, col in parsed.flags.items():
            rc.flags[name] = pc.replace_with_mask(rc.flags[name], m, col)
        rc.profile_error = pc.replace_with_mask(rc.profile_error, m, parsed.profile_error)
        rc.profile_invalid[idx] = parsed.profile_invalid

    # -- maestro-subscribe ----------------------------------------------------------

    def _subscribe(self, b: BatchRows) -> tuple[bytes, pa.Table]:
        calls = [orjson.loads(item) for item in self.builder.items(b.rows).to_pylist()]
        keys = self._keys(b.rows)

        def log(conn: Any, answers: list[dict[str, Any]]) -> None:
            log_platform(
                conn,
                self.plan.name,
                keys,
                [
                    orjson.dumps(
                        {"status": "completed" if a["result"] == "SUCCESS" else "failed", **a}
                    ).decode()
                    for a in answers
                ],
            )

        answers = evaluate_subscribe(
            self.cfg, self.store, calls, self.plan.job.subscribe_url, log=log if keys else None
        )
        n = len(answers)
        ok = [a["result"] == "SUCCESS" for a in answers]
        return orjson.dumps(answers), outcome_table(
            b.rows.column("_rec").combine_chunks(),
            status=["completed" if k else "failed" for k in ok],
            result=[a["result"] for a in answers],
            reason=[None if k else orjson.dumps(a["reason"]).decode() for k, a in zip(ok, answers)],
            time=[now_iso()] * n,
        )

    # -- yesmail-send ----------------------------------------------------------------

    def _yesmail(self, chunk: Chunk, files: BatchFileWriter) -> pa.Table:
        """The chunk's requests judged ``_GROUP`` at a time, one engine call (and one
        transaction) each, in order: a group stops at its first refused request, which
        is split (see :meth:`_take`) before the requests after it go."""
        head = orjson.loads(self.builder.body_head() + b"]}")  # type: ignore[attr-defined]
        items = [orjson.loads(i) for i in self.builder.items(chunk.rows).to_pylist()]
        keys = self._keys(chunk.rows)
        starts = chunk.starts.tolist()
        batches = list(chunk.batches())
        user = self.cfg.simulate.api_user
        tables: list[pa.Table] = []
        k = 0
        while k < len(batches):
            group = range(k, min(k + _GROUP, len(batches)))
            calls = [
                ({**head, "recipients": items[starts[j] : starts[j + 1]]}, user, batches[j].id)
                for j in group
            ]

            def log(conn: Any, answers: list[SendAnswer], first: int = k) -> None:
                for j, ans in enumerate(answers, first):
                    if ans.status is YesmailStatus.ACCEPTED:
                        log_platform(
                            conn, self.plan.name, keys[starts[j] : starts[j + 1]], _said(ans)
                        )

            answers = evaluate_sends(
                self.store, calls, log=log if keys else None, until_refused=True
            )
            for j, answer in enumerate(answers, k):
                b = batches[j]
                mine = items[starts[j] : starts[j + 1]]
                n = len(mine)
                fields: dict[str, list[Any]] = {c: [None] * n for c in _YESMAIL_FIELDS}
                attempts: list[dict[str, Any]] = []
                self._keys_now = keys[starts[j] : starts[j + 1]]
                self._take(head, mine, list(range(n)), b.id, attempts, fields, answer)
                fault("mid-chunk")  # the platform processed this batch; the chunk is not done
                files.add(b.id, "response", orjson.dumps({"attempts": attempts}))
                tables.append(outcome_table(b.rows.column("_rec").combine_chunks(), **fields))
            k += len(answers)
        return pa.concat_tables(tables) if tables else outcome_table(pa.array([], pa.int64()))

    def _take(
        self,
        head: dict[str, Any],
        items: list[dict[str, Any]],
        idx: list[int],
        ref: str,
        attempts: list[dict[str, Any]],
        fields: dict[str, list[Any]],
        answer: SendAnswer,
        split: _Split | None = None,
    ) -> None:
        """Record the answer to the recipients ``idx``; a refused group of several is
        split in halves, each sent again alone — all the halves of one refused request
        judged in one transaction of the engine (``split``)."""
        attempts.append(_attempt(idx, answer))
        if answer.status is YesmailStatus.ACCEPTED:
            assert answer.ticket is not None
            events = orjson.dumps(answer.ticket["events"]).decode()
            for pos, i in enumerate(idx):
                fields["status"][i] = answer.per_recipient[pos]
                fields["ticket"][i] = answer.ticket["id"]
                fields["state"][i] = answer.ticket["state"]
                fields["message"][i] = answer.ticket["message"]
                fields["http_status"][i] = int(answer.status)
                fields["events"][i] = events
                fields["time"][i] = answer.ticket["lastUpdate"]
            return
        if len(idx) == 1:
            i = idx[0]
            fields["status"][i] = "failed"
            fields["http_status"][i] = int(answer.status)
            fields["message"][i] = answer.body.get("message")
            fields["time"][i] = now_iso()
            return
        if split is not None:
            self._halves(head, items, idx, ref, attempts, fields, split)
            return
        logged: list[tuple[list[str], SendAnswer]] = []

        def log(conn: Any) -> None:
            for keys, accepted in logged:
                log_platform(conn, self.plan.name, keys, _said(accepted))

        with send_session(self.store, log=log if self._keys_now else None) as judge:
            self._halves(head, items, idx, ref, attempts, fields, _Split(judge, logged))

    def _halves(
        self,
        head: dict[str, Any],
        items: list[dict[str, Any]],
        idx: list[int],
        ref: str,
        attempts: list[dict[str, Any]],
        fields: dict[str, list[Any]],
        split: _Split,
    ) -> None:
        """Send each half of ``idx`` alone; on 400/409 split it again, so only the
        offending recipients fail."""
        half = len(idx) // 2
        for part in (idx[:half], idx[half:]):
            body = {**head, "recipients": [items[i] for i in part]}
            # the halves' emails passed the check with the request they came from
            answer = split.judge(body, self.cfg.simulate.api_user, ref, True)
            if self._keys_now and answer.status is YesmailStatus.ACCEPTED:
                split.logged.append(([self._keys_now[i] for i in part], answer))
            self._take(head, items, part, ref, attempts, fields, answer, split)


@dataclass
class _Split:
    """The halves of one refused request: the engine session judging them, and the
    accepted ones' keys and answers for the platform's log."""

    judge: Callable[[Any, str, str | None, bool], SendAnswer]
    logged: list[tuple[list[str], SendAnswer]]


# Yesmail requests a simulate engine call judges together (one transaction)
_GROUP = 32
# the outcome columns a Yesmail answer fills
_YESMAIL_FIELDS = ("status", "ticket", "state", "message", "http_status", "events", "time")


def _said(ans: SendAnswer) -> list[str]:
    """The platform log's line for each recipient of an accepted request."""
    ticket = ans.ticket or {}
    common = {
        "ticket": ticket.get("id"),
        "state": ticket.get("state"),
        "message": ticket.get("message"),
        "http_status": int(ans.status),
        "events": ticket.get("events"),
    }
    return [orjson.dumps({"status": s, **common}).decode() for s in ans.per_recipient]


def _attempt(idx: list[int], answer: SendAnswer) -> dict[str, Any]:
    out: dict[str, Any] = {"recipients": idx, "status": int(answer.status)}
    if answer.status is YesmailStatus.ACCEPTED:
        out["headers"] = {
            "Content-Location": f"https://api.yesmail.com/v2/tickets/"
            f"{(answer.ticket or {}).get('id')}"
        }
        out["body"] = answer.body
        out["ticket"] = answer.ticket
        out["asyncResults"] = answer.async_results
    else:
        out["body"] = answer.body
    return out


_CODES = pa.array([r.value for r in MaestroResult], pa.string())
_ERROR_TEXTS = pa.array([r.error or None for r in MaestroResult], pa.string())


@dataclass
class _Answers:
    """The engine's per-recipient answers as columns, with each documented response body:
    {"result":"SUCCESS"} or {"result":CODE,"error":TEXT[,"message":…]}."""

    codes: pa.Array
    errors: pa.Array
    messages: pa.Array
    ok: pa.Array
    body: pa.Array

    @classmethod
    def of(cls, result: list[MaestroResult], message: list[str | None]) -> _Answers:
        codes = pa.array(result, pa.string())  # a StrEnum member is its code
        errors = _ERROR_TEXTS.take(pc.index_in(codes, _CODES))
        messages = pa.array(message, pa.string())
        body = pc.binary_join_element_wise(
            '{"result":"',
            codes,
            '"',
            pc.binary_join_element_wise(',"error":"', errors, '"', ""),
            pc.binary_join_element_wise(',"message":', string_literal(messages, None), ""),
            "}",
            "",
            null_handling="replace",
            null_replacement="",
        )
        ok = pc.equal(codes, MaestroResult.SUCCESS.value)
        return cls(codes, errors, messages, ok, body)
