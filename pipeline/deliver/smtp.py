"""``smtp`` mode: the engine decides who may receive; mailpipe sends the messages itself.

For each chunk of batches:

1. merge the job's template for every recipient; a value that would put a
   line break into the Subject refuses its record at once (``INVALID_PROFILE``
   with the field, or the target's closest answer) — it never reaches the
   engine, nor the server;
2. the engine judges the others exactly as in simulate mode (suppression,
   list protection, flags, constraints, the store updated);
3. each recipient the engine accepted gets its message over the connection
   pool (:mod:`.smtppool`); the server's answer decides: 2xx completed, 4xx
   and lost connections retried then failed, 5xx failed at once
   (``SEND_ERROR`` with the server's code and text in ``message``);
4. the response file of each batch records the engine's answer and, per
   recipient, what the server answered.

Recipients the engine refused keep its answer. The event loop is the
backend's own and lives as long as it, so connections outlast chunks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobPlan, MailpipeConfig
from pipeline.deliver import OUTCOME_SCHEMA, conform
from pipeline.deliver.runner import Chunk
from pipeline.deliver.simulate import SimulateBackend
from pipeline.deliver.smtpconn import SmtpSettings
from pipeline.deliver.smtppool import SmtpPool
from pipeline.errors import ConfigError, DeliveryStopped, MaestroResult, SubscribeFailure
from pipeline.mail.compose import Composer, Outgoing
from pipeline.mail.settings import effective_rate, smtp_job_problems, transactional
from pipeline.mail.templates import Merger, job_template
from pipeline.mail.tokens import sign, token_key
from pipeline.retry import RetryPolicy
from pipeline.rundir import BatchFileWriter, now_iso

__all__ = ["SmtpBackend"]

_OUT = [f.name for f in OUTCOME_SCHEMA if f.name != "_rec"]
SLICE = 1024  # messages merged and composed at a time, while the pool sends the previous ones


class _Bodies:
    """Collects the response bodies the engine writes, by batch id."""

    def __init__(self) -> None:
        self.by_batch: dict[str, bytes] = {}

    def add(self, batch_id: str, kind: str, data: bytes) -> None:
        self.by_batch[batch_id] = data


class SmtpBackend:
    """Sends one job's messages over SMTP; see the module docstring."""

    def __init__(self, cfg: MailpipeConfig, plan: JobPlan) -> None:
        problems = smtp_job_problems(cfg, plan.name)
        if problems:
            raise ConfigError(*problems[0])
        self.cfg = cfg
        self.plan = plan
        self.merger = Merger(job_template(cfg, plan), plan)
        self.composer = Composer(plan)
        smtp = cfg.delivery.smtp
        self.settings = SmtpSettings.from_config(cfg)
        links = plan.target == "maestro-subscribe" or not transactional(plan.job)
        self.key = token_key(cfg) if links else None
        self.engine = SimulateBackend(cfg, plan)
        self.loop = asyncio.new_event_loop()
        self.pool = SmtpPool(
            self.settings,
            RetryPolicy.from_config(cfg.delivery.retry),
            effective_rate(cfg, plan),
            smtp.pool_size,
            smtp.messages_per_connection,
        )

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.pool.close())
        finally:
            self.loop.close()
            self.engine.close()

    # -- one chunk ------------------------------------------------------------------

    def deliver(self, chunk: Chunk, files: BatchFileWriter) -> pa.Table:
        rows = chunk.rows
        n = rows.num_rows
        links = self._links(rows)
        values = self.merger.values(rows, links)
        refused, fields = self.merger.header_problems(values)
        kept = np.flatnonzero(~refused)
        engine, bodies = self._judge(chunk, refused)
        accepted = kept[self._accepted(engine)]
        messages: list[Outgoing] = []
        stop: DeliveryStopped | None = None
        try:
            slices = self._compose(rows, values, links, accepted, messages)
            self.loop.run_until_complete(self.pool.send(slices))
        except DeliveryStopped as e:
            stop = e
        cols = self._outcomes(n, kept, engine, refused, fields, messages)
        self._responses(chunk, files, bodies, cols, refused, fields, messages, stop)
        table = _table(rows.column("_rec").combine_chunks(), cols)
        if stop is not None:
            answered = np.ones(n, dtype=bool)
            answered[[m.pos for m in messages if not m.done]] = False
            stop.partial = table.filter(pa.array(answered))
            raise stop
        return table

    def _compose(
        self,
        rows: pa.Table,
        values: dict[str, pa.Array],
        links: dict[str, pa.Array],
        accepted: np.ndarray,
        into: list[Outgoing],
    ) -> Iterator[list[Outgoing]]:
        """The accepted recipients' messages, a slice at a time (also kept in ``into``)."""
        emails = rows.column("email").combine_chunks()
        keys = self._keys(rows)
        unsubscribe = links.get("UNSUBSCRIBE_URL")
        for start in range(0, accepted.size, SLICE):
            idx = accepted[start : start + SLICE]
            sel = pa.array(idx)
            merged = self.merger.merge({k: v.take(sel) for k, v in values.items()}, idx.size)
            batch = self.composer.compose(
                idx.tolist(),
                emails.take(sel).to_pylist(),
                keys.take(sel).to_pylist(),
                merged,
                unsubscribe.take(sel) if unsubscribe is not None else None,
            )
            into += batch
            yield batch

    def _keys(self, rows: pa.Table) -> pa.Array:
        """What a Message-ID derives from: the ledger key (else record id, else position)."""
        for name in ("_lkey", "record_id"):
            if name in rows.column_names:
                col = rows.column(name).combine_chunks()
                if col.null_count == 0:
                    return col
        return pc.cast(rows.column("_rec").combine_chunks(), pa.string())

    def _links(self, rows: pa.Table) -> dict[str, pa.Array]:
        """Per recipient: the signed confirmation and unsubscribe links the job needs."""
        if self.key is None:
            return {}
        smtp = self.cfg.delivery.smtp
        emails = rows.column("email").to_pylist()
        out: dict[str, pa.Array] = {}
        lst = self.plan.list_name
        if self.plan.target == "maestro-subscribe" and smtp.confirm_url:
            expires = int(time.time() + smtp.confirm_ttl_hours * 3600)
            out["CONFIRM_URL"] = pa.array(
                [
                    smtp.confirm_url.replace("{token}", sign(self.key, "confirm", lst, e, expires))
                    for e in emails
                ],
                pa.string(),
            )
        if not transactional(self.plan.job) and smtp.unsubscribe_url:
            out["UNSUBSCRIBE_URL"] = pa.array(
                [
                    smtp.unsubscribe_url.replace(
                        "{token}", sign(self.key, "unsubscribe", lst, e, 0)
                    )
                    for e in emails
                ],
                pa.string(),
            )
        return out

    def _judge(self, chunk: Chunk, refused: np.ndarray) -> tuple[pa.Table, _Bodies]:
        """The engine's answers for the records not refused, as in simulate mode.

        The rows go without their ledger keys: the simulated platform's own log
        (used to settle records in doubt in simulate mode) is not kept here.
        """
        sub = chunk.subset(~refused) if refused.any() else chunk
        rows = sub.rows
        if "_lkey" in rows.column_names:
            rows = rows.drop_columns(["_lkey"])
        bodies = _Bodies()
        if rows.num_rows == 0:
            return conform(OUTCOME_SCHEMA.empty_table()), bodies
        judged = Chunk(sub.target, rows, sub.numbers, sub.starts)
        # the engine writes its bodies through the batch-file interface: keep them instead
        table = self.engine.deliver(judged, cast(BatchFileWriter, bodies))
        return conform(table), bodies

    def _accepted(self, engine: pa.Table) -> np.ndarray:
        if self.plan.target == "yesmail-send":
            ok = pc.equal(engine.column("status"), "completed")
        else:
            ok = pc.equal(engine.column("result"), "SUCCESS")
        return np.asarray(pc.fill_null(ok, False).to_numpy(zero_copy_only=False), dtype=bool)

    # -- outcomes -------------------------------------------------------------------

    def _outcomes(
        self,
        n: int,
        kept: np.ndarray,
        engine: pa.Table,
        refused: np.ndarray,
        fields: list[str],
        messages: list[Outgoing],
    ) -> dict[str, np.ndarray]:
        cols = {name: np.full(n, None, dtype=object) for name in _OUT}
        for name in _OUT:
            cols[name][kept] = _objects(engine.column(name).to_pylist())
        self._refused(cols, np.flatnonzero(refused), fields)
        # a loop per message: each has its own answer and its own events
        for m in messages:
            self._sent(cols, m)
        return cols

    def _refused(self, cols: dict[str, np.ndarray], idx: np.ndarray, fields: list[str]) -> None:
        now = now_iso()
        target = self.plan.target
        for i, name in zip(idx.tolist(), fields):
            text = f"{name}: a line break in a value that goes into the Subject header"
            cols["status"][i] = "failed"
            cols["message"][i] = text
            cols["time"][i] = now
            cols["_transient"][i] = False
            if target == "maestro-ondemand":
                cols["result"][i] = MaestroResult.INVALID_PROFILE.value
                cols["error"][i] = MaestroResult.INVALID_PROFILE.error
            elif target == "maestro-subscribe":
                body = SubscribeFailure.PROFILE_VALIDATION_ERROR.response(
                    "Profile validation error", [text]
                )
                cols["result"][i] = body["result"]
                cols["reason"][i] = orjson.dumps(body["reason"]).decode()
            else:
                cols["http_status"][i] = 400
                cols["message"][i] = f"Bad Request: {text}"

    def _sent(self, cols: dict[str, np.ndarray], m: Outgoing) -> None:
        """Patch the engine's answer with what the server made of the message."""
        if not m.done:
            return
        i = m.pos
        cols["time"][i] = m.time
        target = self.plan.target
        if target == "yesmail-send":
            events = orjson.loads(cols["events"][i] or "[]")
            cols["events"][i] = orjson.dumps(events[:-1] + m.events + events[-1:]).decode()
        elif m.events:
            cols["events"][i] = orjson.dumps(m.events).decode()
        if m.ok:
            return
        cols["status"][i] = "failed"
        cols["message"][i] = m.reply
        cols["_transient"][i] = m.transient
        if target == "maestro-ondemand":
            cols["result"][i] = MaestroResult.SEND_ERROR.value
            cols["error"][i] = MaestroResult.SEND_ERROR.error
        elif target == "maestro-subscribe":
            body = SubscribeFailure.SUBSCRIBE_NOT_POSSIBLE.response(
                f"The confirmation message could not be sent: {m.reply}"
            )
            cols["result"][i] = body["result"]
            cols["reason"][i] = orjson.dumps(body["reason"]).decode()

    def _responses(
        self,
        chunk: Chunk,
        files: BatchFileWriter,
        bodies: _Bodies,
        cols: dict[str, np.ndarray],
        refused: np.ndarray,
        fields: list[str],
        messages: list[Outgoing],
        stop: DeliveryStopped | None,
    ) -> None:
        """Per batch: the engine's body, and per recipient what the server answered."""
        by_pos = {m.pos: m for m in messages}
        why_refused = dict(zip(np.flatnonzero(refused).tolist(), fields))
        emails = chunk.rows.column("email").to_pylist()
        server = {"host": self.settings.host, "port": self.settings.port}
        for bid, s, e in zip(chunk.ids(), chunk.starts[:-1].tolist(), chunk.starts[1:].tolist()):
            recipients: list[dict[str, Any]] = []
            for i in range(s, e):
                entry: dict[str, Any] = {"email": emails[i]}
                m = by_pos.get(i)
                if m is not None and m.done:
                    entry.update(
                        sent=m.ok,
                        message_id=m.message_id,
                        code=m.code,
                        reply=m.reply,
                        attempts=m.attempts,
                        events=m.events,
                    )
                elif m is not None:
                    entry.update(sent=False, not_sent=f"the run stopped: {stop}")
                elif i in why_refused:
                    entry.update(sent=False, refused=cols["message"][i])
                else:
                    entry.update(sent=False, refused="the engine did not accept the recipient")
                recipients.append(entry)
            engine = bodies.by_batch.get(bid)
            files.add(
                bid,
                "response",
                b'{"smtp":'
                + orjson.dumps(server)
                + b',"engine":'
                + (engine if engine is not None else b"null")
                + b',"recipients":'
                + orjson.dumps(recipients)
                + b"}",
            )


def _objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _table(recs: pa.Array, cols: dict[str, np.ndarray]) -> pa.Table:
    arrays = {"_rec": recs}
    for f in OUTCOME_SCHEMA:
        if f.name != "_rec":
            arrays[f.name] = pa.array(cols[f.name].tolist(), f.type)
    return pa.table(arrays, schema=OUTCOME_SCHEMA)
