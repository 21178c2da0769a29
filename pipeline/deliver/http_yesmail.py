"""Yesmail over HTTP: ``POST /v2/emails/send``, the ticket, the async results (``003_…``).

A batch is POSTed with the ``Api-User``/``Api-Key`` headers and
``responseRef=<batch id>``. On 202 the ticket named by ``Content-Location`` is
polled with backoff until it is ``completed`` (or failed); its
``response.location`` names the async results, whose ``index`` entries map
back to the batch's recipients. The first poll comes after
``delivery.http.poll_interval`` or, once tickets have completed, after the time
they typically took (from their own ``accepted`` to ``completed`` events), so a
ticket is usually read once, completed; then the interval doubles up to
``poll_max_interval``. A 400 or 409 on a batch of several is
bisected, exactly as the simulate backend does, so only the offending
recipients fail, with the server's message; a 401 stops the run.

The response file holds every attempt: the recipients it carried, the status,
``Content-Location``, the body, and for an accepted one the final ticket and
the async results.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import orjson

from pipeline.deliver.http import BatchAnswer, chunk_items, run_in_order
from pipeline.deliver.runner import Chunk
from pipeline.deliver.transport import Response, Transport, json_headers, truncate
from pipeline.errors import DeliveryError, DeliveryStopped, YesmailStatus
from pipeline.payloads.yesmail import send_url
from pipeline.rundir import now_iso

if TYPE_CHECKING:
    from pipeline.deliver.http import HttpBackend

__all__ = ["YesmailSender"]

_COLUMNS = ("status", "ticket", "state", "message", "http_status", "events", "time", "_transient")
_BISECT = (YesmailStatus.BAD_REQUEST, YesmailStatus.CONFLICT)
_ACCEPTED = int(YesmailStatus.ACCEPTED)


@dataclass
class _Accepted:
    """A request the platform accepted (202): its ticket, recipients and record."""

    location: str
    idx: list[int]
    attempt: dict[str, Any]
    events: list[dict[str, str]]


class _Unfollowed(Exception):
    """An accepted request whose ticket or results could not be read to the end."""


def _stopped(e: DeliveryStopped) -> str:
    return f"accepted, but the run stopped before its ticket completed: {e.message}"


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", errors="replace")


class YesmailSender:
    """``yesmail-send``: one POST per batch (more when a 400/409 is bisected)."""

    @staticmethod
    def secrets(backend: HttpBackend) -> list[str]:
        http = backend.http
        backend.env(http.api_user_env, "delivery.http.api_user_env")
        return [backend.env(http.api_key_env, "delivery.http.api_key_env")]

    def __init__(self, backend: HttpBackend, transport: Transport) -> None:
        http = backend.http
        self.backend = backend
        self.transport = transport
        self.http = http
        self.names = f"${http.api_user_env} / ${http.api_key_env}"
        self.headers = json_headers(
            {
                "Api-User": backend.env(http.api_user_env, "delivery.http.api_user_env"),
                "Api-Key": backend.env(http.api_key_env, "delivery.http.api_key_env"),
            }
        )
        self.base = http.yesmail_url.rstrip("/")
        self.head: bytes = backend.builder.body_head()  # type: ignore[attr-defined]
        self.typical: float | None = None  # seconds a ticket takes to complete, smoothed
        # until one has: the first ticket followed, which the others wait for (so that only
        # it polls at short intervals; the next chunk goes before this one's tickets are done)
        self._first: asyncio.Event | None = None

    async def deliver(self, chunk: Chunk) -> tuple[list[BatchAnswer | None], Exception | None]:
        ready = chunk_items(self.backend.builder, chunk)
        data, offsets = ready.data, ready.offsets
        starts = chunk.starts.tolist()
        ids = chunk.ids()

        def body(lo: int, hi: int) -> bytes:
            return self.head + data[offsets[lo] : offsets[hi] - 1].tobytes() + b"]}"

        stopped: dict[int, BatchAnswer] = {}

        async def send(k: int, release: Callable[[], None]) -> BatchAnswer:
            lo, hi = starts[k], starts[k + 1]
            cols: dict[str, list[Any]] = {c: [None] * (hi - lo) for c in _COLUMNS}
            attempts: list[dict[str, Any]] = []
            accepted: list[_Accepted] = []
            try:
                try:
                    await self._send(ids[k], body, lo, lo, hi, attempts, cols, [], accepted)
                except DeliveryStopped as e:
                    for a in accepted:  # accepted, so sent: recorded, not given back
                        self._fail(cols, a.idx, _ACCEPTED, _stopped(e), a.events)
                    raise
                release()  # judged: the batches after it may go while its tickets run
                await self._follow_all(accepted, cols)
            except DeliveryStopped:
                # what the platform accepted before the stop is an outcome: keep it
                done = [i for i, s in enumerate(cols["status"]) if s is not None]
                if done:
                    response = orjson.dumps({"attempts": attempts})
                    stopped[k] = BatchAnswer(response, cols, answered=done)
                raise
            return BatchAnswer(orjson.dumps({"attempts": attempts}), cols)

        answers, stop = await run_in_order(ready.deps, send, chunk.judged.set, self.backend.stops)
        for k, answer in stopped.items():
            answers[k] = answer
        return answers, stop

    async def _send(
        self,
        ref: str,
        body: Any,
        base: int,
        lo: int,
        hi: int,
        attempts: list[dict[str, Any]],
        cols: dict[str, list[Any]],
        inherited: list[dict[str, str]],
        accepted: list[_Accepted],
    ) -> None:
        """POST recipients ``lo..hi``; on 400/409 split them, so only the offenders fail.

        An accepted request joins ``accepted``, its ticket to be followed.
        """
        url = send_url(self.base, ref)
        events = list(inherited)
        idx = list(range(lo - base, hi - base))
        try:
            resp = await self.transport.request(
                "POST", url, headers=self.headers, data=body(lo, hi), events=events
            )
        except DeliveryStopped:
            raise
        except DeliveryError as e:
            attempts.append({"recipients": idx, "status": None, "error": e.message})
            code = e.code if isinstance(e.code, int) else None
            # retries ran out before the platform took it: a later run may try again
            self._fail(cols, idx, code, e.message, events, transient=True)
            return
        self._check_auth(resp)
        answer = _json(resp.body)
        attempt: dict[str, Any] = {"recipients": idx, "status": resp.status}
        attempts.append(attempt)
        if resp.status == YesmailStatus.ACCEPTED:
            location = resp.headers.get("Content-Location") or (
                f"{self.base}/v2/tickets/{answer.get('id')}" if isinstance(answer, dict) else ""
            )
            attempt["headers"] = {"Content-Location": location}
            attempt["body"] = answer
            accepted.append(_Accepted(location, idx, attempt, events))
            return
        attempt["body"] = answer
        if resp.status in _BISECT and len(idx) > 1:
            half = len(idx) // 2
            await self._send(ref, body, base, lo, lo + half, attempts, cols, events, accepted)
            await self._send(ref, body, base, lo + half, hi, attempts, cols, events, accepted)
            return
        message = answer.get("message") if isinstance(answer, dict) else truncate(resp.body)
        self._fail(cols, idx, resp.status, message, events)

    async def _follow_all(self, accepted: list[_Accepted], cols: dict[str, list[Any]]) -> None:
        """Follow every accepted request's ticket to its outcome, together; a stop is raised
        once all of them have been recorded (as accepted but unfinished)."""
        stops = [
            e
            for e in await asyncio.gather(
                *(self._settle(a, cols) for a in accepted), return_exceptions=True
            )
            if isinstance(e, BaseException)
        ]
        for e in stops:
            if not isinstance(e, DeliveryStopped):
                raise e
        if stops:
            raise stops[0]

    async def _settle(self, a: _Accepted, cols: dict[str, list[Any]]) -> None:
        try:
            ticket, results = await self._follow(a.location, a.events)
        except _Unfollowed as e:
            self._fail(cols, a.idx, _ACCEPTED, str(e), a.events)
            return
        except DeliveryStopped as e:  # accepted, so sent: record it before stopping
            self._fail(cols, a.idx, _ACCEPTED, _stopped(e), a.events)
            raise
        a.attempt["ticket"] = ticket
        a.attempt["asyncResults"] = results
        self._accepted(cols, a.idx, ticket, results, a.events)

    def _check_auth(self, resp: Response) -> None:
        if resp.status == YesmailStatus.UNAUTHORIZED:
            raise DeliveryStopped(
                f"yesmail-send: HTTP 401 Unauthorized from {self.base}: check Api-User/Api-Key "
                f"({self.names})",
                code=401,
            )

    async def _get(self, url: str, events: list[dict[str, str]], what: str) -> Any:
        try:
            resp = await self.transport.request(
                "GET", url, headers=self.headers, events=events, follow_up=True
            )
        except DeliveryStopped:
            raise
        except DeliveryError as e:
            raise _Unfollowed(f"accepted, but reading the {what} failed: {e.message}") from None
        self._check_auth(resp)
        data = _json(resp.body)
        if resp.status != 200 or not isinstance(data, dict):
            raise _Unfollowed(
                f"accepted, but GET {url} answered HTTP {resp.status}: {truncate(resp.body)}"
            )
        return data

    async def _follow(
        self, location: str, events: list[dict[str, str]]
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Poll the ticket until it is completed or failed; then read its async results."""
        url = urljoin(self.base + "/", location)
        http = self.http
        deadline = time.monotonic() + http.ticket_timeout
        if self.typical is None and self._first is None:
            self._first = asyncio.Event()  # this one finds out how long tickets take
            try:
                return await self._poll(url, events, deadline, http.poll_interval)
            finally:
                self._first.set()
        started = time.monotonic()
        if self.typical is None and self._first is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first.wait(), http.ticket_timeout)
        # a tenth more than tickets typically take: the answer to the POST left after the
        # ticket's accepted time, so this mostly reads it completed, once
        first = min(max(http.poll_interval, 1.1 * (self.typical or 0.0)), http.poll_max_interval)
        return await self._poll(url, events, deadline, first - (time.monotonic() - started))

    async def _poll(
        self, url: str, events: list[dict[str, str]], deadline: float, first: float
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        http = self.http
        delay = http.poll_interval
        if first > 0:
            await asyncio.sleep(first)
        while True:
            ticket = await self._get(url, events, "ticket")
            state = ticket.get("state")
            if state in ("completed", "failed"):
                break
            if time.monotonic() >= deadline:
                raise _Unfollowed(
                    f"accepted, but ticket {ticket.get('id')} was still {state!r} after "
                    f"{http.ticket_timeout:g} s (delivery.http.ticket_timeout)"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, http.poll_max_interval)
        self._learn(ticket)
        where = (ticket.get("response") or {}).get("location")
        if state != "completed" or not where:
            return ticket, None
        return ticket, await self._get(urljoin(self.base + "/", where), events, "async results")

    def _learn(self, ticket: dict[str, Any]) -> None:
        """Fold a completed ticket's duration (its first to its last event) into
        :attr:`typical`, the wait before the next tickets' first poll."""
        times = [str(e.get("time")) for e in ticket.get("events") or [] if isinstance(e, dict)]
        try:
            took = (
                dt.datetime.fromisoformat(times[-1]) - dt.datetime.fromisoformat(times[0])
            ).total_seconds()
        except (IndexError, TypeError, ValueError):
            return
        if took >= 0:
            self.typical = took if self.typical is None else 0.8 * self.typical + 0.2 * took

    @staticmethod
    def _accepted(
        cols: dict[str, list[Any]],
        idx: list[int],
        ticket: dict[str, Any],
        results: dict[str, Any] | None,
        events: list[dict[str, str]],
    ) -> None:
        state = ticket.get("state")
        default = "completed" if state == "completed" and results is None else "failed"
        status = {i: default for i in range(len(idx))}
        for category in ("completed", "failed", "ignored"):
            for entry in (results or {}).get(category) or []:
                if isinstance(entry, dict) and entry.get("index") in status:
                    status[entry["index"]] = category
        ev = orjson.dumps(events + list(ticket.get("events") or [])).decode()
        for pos, i in enumerate(idx):
            cols["status"][i] = status[pos]
            cols["ticket"][i] = ticket.get("id")
            cols["state"][i] = state
            cols["message"][i] = ticket.get("message")
            cols["http_status"][i] = int(YesmailStatus.ACCEPTED)
            cols["events"][i] = ev
            cols["time"][i] = ticket.get("lastUpdate")
            cols["_transient"][i] = False

    @staticmethod
    def _fail(
        cols: dict[str, list[Any]],
        idx: list[int],
        status: int | None,
        message: Any,
        events: list[dict[str, str]],
        transient: bool = False,
    ) -> None:
        ev = orjson.dumps(events).decode() if events else None
        now = now_iso()
        for i in idx:
            cols["status"][i] = "failed"
            cols["http_status"][i] = status
            cols["message"][i] = (
                message if isinstance(message, str) or message is None else str(message)
            )
            cols["events"][i] = ev
            cols["time"][i] = now
            cols["_transient"][i] = transient
