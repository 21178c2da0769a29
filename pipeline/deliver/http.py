"""``http`` mode: the payloads go to the platforms' documented endpoints.

:class:`HttpBackend` answers a chunk of batches like
:class:`~pipeline.deliver.simulate.SimulateBackend` does — same outcomes, same
response-file shapes — but from the platform's HTTP answers:

* ``maestro-ondemand`` (:mod:`.http_maestro`): GET the trigger URL plus
  ``recip=<URL-encoded JSON array>``; the body is an array in recipient order;
* ``maestro-subscribe`` (:mod:`.http_maestro`): one ``addSubscriberExternally.do``
  GET per subscriber;
* ``yesmail-send`` (:mod:`.http_yesmail`): POST, poll the ticket, read the
  async results; 400/409 bisected so only the offending recipients fail.

Async lives here: the backend owns one event loop, entered once per chunk.
Requests of a chunk run concurrently (``delivery.http.concurrency``), but a
request that carries an address waits for every earlier request carrying the
same address — the platforms judge an address against the state the previous
call left, so this keeps a run's outcomes those of sending one request after
the other (and equal to ``simulate``'s) — unless the builder says the order
cannot matter (:meth:`~pipeline.payloads.base.Builder.commutes`).

A 401 (or a server that cannot be reached) raises
:class:`~pipeline.errors.DeliveryStopped`: no request is started after it, in
this chunk or another under way beside it; the requests already under way
are answered and their outcomes travel in the exception's ``partial`` table;
the other recipients were not sent.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobPlan, MailpipeConfig
from pipeline.deliver.runner import Chunk
from pipeline.deliver.simulate import outcome_table
from pipeline.deliver.transport import Transport
from pipeline.errors import ConfigError, DeliveryStopped
from pipeline.payloads import builder_for
from pipeline.payloads.base import Builder
from pipeline.payloads.batching import with_commas
from pipeline.retry import RetryPolicy
from pipeline.rundir import BatchFileWriter

__all__ = [
    "BatchAnswer",
    "ChunkItems",
    "HttpBackend",
    "Sender",
    "chunk_items",
    "run_in_order",
    "unit_dependencies",
]


@dataclass
class BatchAnswer:
    """One batch's response file and its recipients' outcome columns (lists, in order).

    ``answered`` lists the positions in the batch of the recipients answered when a
    stop came in the middle of it (None: all of them).
    """

    response: bytes
    cols: dict[str, list[Any]] = field(default_factory=dict)
    answered: list[int] | None = None


@dataclass
class ChunkItems:
    """A chunk's recipient objects as one comma-separated buffer (item ``i`` is
    ``data[offsets[i]:offsets[i + 1] - 1]``) and, per request, the earlier requests
    it must wait for: what a sender works out from the rows alone."""

    data: memoryview
    offsets: list[int]
    deps: list[list[int]]


def chunk_items(builder: Builder, chunk: Chunk) -> ChunkItems:
    """The chunk's :class:`ChunkItems`, one request a batch (``chunk.prepared`` when
    :meth:`HttpBackend.prepare` made them ahead)."""
    if isinstance(chunk.prepared, ChunkItems):
        return chunk.prepared
    rows = chunk.rows
    n = rows.num_rows
    commas = with_commas(builder.items(rows))
    offsets = np.frombuffer(commas.buffers()[1], dtype=np.int32)[
        commas.offset : commas.offset + n + 1
    ].tolist()
    data = memoryview(commas.buffers()[2]) if n else memoryview(b"")
    units = len(chunk.starts) - 1
    unit_of_row = np.repeat(np.arange(units), np.diff(chunk.starts))
    deps = unit_dependencies(
        rows.column("email").combine_chunks(), unit_of_row, units, builder.commutes(rows)
    )
    return ChunkItems(data, offsets, deps)


class Sender(Protocol):
    """A target's client: answers every batch of a chunk (``None``: not sent, stopped)."""

    async def deliver(self, chunk: Chunk) -> tuple[list[BatchAnswer | None], Exception | None]: ...


def unit_dependencies(
    emails: pa.Array, unit_of_row: np.ndarray, units: int, commutes: pa.Array | None = None
) -> list[list[int]]:
    """For each unit (a request), the earlier units that carry one of its addresses.

    Addresses match case-insensitively, as the platforms' stores do; a row is
    tied to the previous row with its address only, which chains the rest.
    ``commutes`` (see :meth:`Builder.commutes`): an address whose rows all carry
    one and the same non-null value ties nothing.
    """
    deps: list[list[int]] = [[] for _ in range(units)]
    if len(emails) < 2:
        return deps
    valid = pc.is_valid(emails).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(valid)
    keys = pc.utf8_lower(emails.filter(pa.array(valid)))
    codes = pc.dictionary_encode(keys).indices.to_numpy()
    order = np.argsort(codes, kind="stable")
    same = codes[order][1:] == codes[order][:-1]
    if commutes is not None and same.any():
        same &= _orders(codes[order], commutes.filter(pa.array(valid)), order)[1:]
    later = unit_of_row[rows[order[1:][same]]]
    earlier = unit_of_row[rows[order[:-1][same]]]
    cross = later != earlier
    if not cross.any():
        return deps
    pairs = np.unique(np.stack([later[cross], earlier[cross]], axis=1), axis=0)
    for unit, before in pairs.tolist():
        deps[unit].append(before)
    return deps


def _orders(sorted_codes: np.ndarray, values: pa.Array, order: np.ndarray) -> np.ndarray:
    """Per row in ``order`` (rows sorted by address code): whether its address's rows
    must keep their order, i.e. carry a null or more than one value."""
    vcodes = pc.dictionary_encode(values).indices.fill_null(-1).to_numpy()[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    lo = np.minimum.reduceat(vcodes, starts)
    hi = np.maximum.reduceat(vcodes, starts)
    keep = (lo < 0) | (lo != hi)
    return np.repeat(keep, np.diff(np.r_[starts, sorted_codes.size]))


async def run_in_order(
    deps: list[list[int]],
    send: Callable[[int, Callable[[], None]], Awaitable[Any]],
    judged: Callable[[], None] | None = None,
    stops: list[Exception] | None = None,
) -> tuple[list[Any], Exception | None]:
    """Run ``send(k, release)`` for every unit, each after the units it depends on.

    A unit's dependants start when it returns, or as soon as it calls
    ``release()``: once the platform has judged the unit's requests, what is
    left (following a Yesmail ticket) changes nothing they would be judged on.
    ``judged`` is called once every unit has released or returned. After a
    :class:`DeliveryStopped` no unit starts; the answers of those that ran are
    returned with the stop (``None`` for the others). ``stops``, shared by the chunks
    of a job that may be under way together: a stop in one is a stop in all.
    """
    done = [asyncio.Event() for _ in deps]
    out: list[Any] = [None] * len(deps)
    stop: list[Exception] = []  # this chunk's
    shared = stop if stops is None else stops  # the job's
    left = len(deps)

    def release(k: int) -> None:
        nonlocal left
        if done[k].is_set():
            return
        done[k].set()
        left -= 1
        if not left and not stop and judged is not None:
            judged()  # a stop is seen when the chunk returns, not before

    def stopped(e: Exception) -> None:
        stop.append(e)
        if shared is not stop:
            shared.append(e)

    async def one(k: int) -> None:
        try:
            for d in deps[k]:
                await done[d].wait()
            if not stop and shared:  # another chunk stopped: this one stops too, unsent
                first = shared[0]
                code = first.code if isinstance(first, DeliveryStopped) else None
                stop.append(DeliveryStopped(str(first), code=code))
            if not stop:
                out[k] = await send(k, functools.partial(release, k))
        except DeliveryStopped as e:
            stopped(e)
        except Exception as e:  # a bug: stop starting requests, raise it below
            stopped(e)
            raise
        finally:
            release(k)

    if not deps and judged is not None:
        judged()
    results = await asyncio.gather(*(one(k) for k in range(len(deps))), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, DeliveryStopped):
            raise r
    return out, (stop[0] if stop else None)


class HttpBackend:
    """Sends the batches of one job to its platform (see the module docstring)."""

    def __init__(self, cfg: MailpipeConfig, plan: JobPlan) -> None:
        from pipeline.deliver.http_maestro import OnDemandSender, SubscribeSender
        from pipeline.deliver.http_yesmail import YesmailSender

        self.cfg = cfg
        self.plan = plan
        self.http = cfg.delivery.http
        self.builder = builder_for(plan)
        self.policy = RetryPolicy.from_config(cfg.delivery.retry)
        kinds: dict[str, Any] = {
            "maestro-ondemand": OnDemandSender,
            "maestro-subscribe": SubscribeSender,
            "yesmail-send": YesmailSender,
        }
        self.kind = kinds[plan.target]
        self.secrets = self.kind.secrets(self)  # checked before anything is sent
        # one loop for the whole job, in a thread of its own: a chunk's coroutine is handed
        # to it, so the next chunk can go while the last one's tickets are followed
        self.loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self.transport: Transport | None = None
        self.sender: Sender | None = None
        self.stops: list[Exception] = []  # a stop in one chunk under way stops the others

    def prepare(self, chunk: Chunk) -> None:
        """The requests' bodies and order, built while the chunk before is on its way
        (Yesmail, 1M rows: 0.1–0.3 s a chunk of 65,536 rows in which nothing was sent)."""
        if self.plan.target in ("maestro-ondemand", "yesmail-send"):
            chunk.prepared = chunk_items(self.builder, chunk)

    def deliver(self, chunk: Chunk, files: BatchFileWriter) -> pa.Table:
        """Answer the chunk (blocking the calling thread); it may be called again from
        another thread, for the next chunk, once ``chunk.judged`` is set."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.loop.run_forever, name="http-loop", daemon=True
            )
            self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._deliver(chunk, files), self.loop).result()

    async def _deliver(self, chunk: Chunk, files: BatchFileWriter) -> pa.Table:
        if self.transport is None:
            self.transport = Transport(self.http, self.policy, self.secrets)
            self.sender = self.kind(self, self.transport)
        assert self.sender is not None
        answers, stop = await self.sender.deliver(chunk)
        table = _outcomes(chunk, answers)
        for bid, answer in zip(chunk.ids(), answers):
            if answer is not None:
                files.add(bid, "response", answer.response)
        if stop is not None:
            if isinstance(stop, DeliveryStopped):
                stop.partial = table
            raise stop
        return table

    def close(self) -> None:
        if self._thread is not None:
            if self.transport is not None:
                asyncio.run_coroutine_threadsafe(self.transport.close(), self.loop).result()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self._thread = None
        self.loop.close()

    def env(self, name: str | None, key: str) -> str:
        """A secret from the environment, or a config error naming what to set."""
        value = os.environ.get(name) if name else None
        if not value:
            raise ConfigError(
                key,
                f"{self.plan.target} in http mode needs the environment variable "
                f"{name or '(unset)'}; export it (the sandbox prints it: "
                'eval "$(mailpipe sandbox --print-env)")',
            )
        return value


def _outcomes(chunk: Chunk, answers: list[BatchAnswer | None]) -> pa.Table:
    """OUTCOME_SCHEMA rows of the answered batches, in recipient order."""
    recs = chunk.rows.column("_rec").combine_chunks()
    starts = chunk.starts.tolist()
    names = {name for a in answers if a is not None for name in a.cols}
    cols: dict[str, list[Any]] = {name: [] for name in names}
    keep: list[np.ndarray] = []
    for k, answer in enumerate(answers):
        if answer is None:
            continue
        at = np.arange(starts[k], starts[k + 1])
        if answer.answered is not None:
            at = at[answer.answered]
        size = at.size
        keep.append(at)
        for name in names:
            cols[name].extend(answer.cols.get(name) or [None] * size)
    if sum(a.size for a in keep) != len(recs):
        recs = recs.take(pa.array(np.concatenate(keep) if keep else np.empty(0, np.int64)))
    n = len(recs)
    for name, values in cols.items():
        assert len(values) == n, f"{name}: {len(values)} values for {n} recipients"
    return outcome_table(recs, **cols)
