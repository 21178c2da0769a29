"""LISTSERV Maestro over HTTP: on-demand trigger URLs and external subscribe calls.

On-demand (``000_…``): one GET per batch, the trigger URL plus
``recip=<URL-encoded JSON array>``; the status is 200 even when recipients
fail, so the body decides: an array of ``{"result":…}`` objects in recipient
order (a job the platform refuses answers each recipient with its error), or
one object for the whole call (``PARSE_ERROR``, ``NO_RECIPIENTS``; taken for
every recipient, whatever its code). A body
that is not that documented JSON fails the batch's rows with
``INTERNAL_ERROR`` and the raw body (truncated) in ``message``.

Subscribe (``002_…``): one GET of ``addSubscriberExternally.do`` per
subscriber, ``{"result":"SUCCESS"}`` or ``{"result":"FAILED","reason":{…}}``.
The response file of a batch is the array of the bodies that came back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from pipeline.deliver.http import BatchAnswer, chunk_items, run_in_order, unit_dependencies
from pipeline.deliver.runner import Chunk
from pipeline.deliver.transport import Response, Transport, truncate
from pipeline.errors import ConfigError, DeliveryError, DeliveryStopped, MaestroResult
from pipeline.errors import SubscribeFailure as F
from pipeline.payloads.base import REDACTED
from pipeline.payloads.maestro_ondemand import trigger_url
from pipeline.payloads.maestro_subscribe import subscribe_endpoint, subscribe_query
from pipeline.payloads.urlencode import quote_text
from pipeline.rundir import now_iso

if TYPE_CHECKING:
    from pipeline.deliver.http import HttpBackend

__all__ = ["OnDemandSender", "SubscribeSender", "parse_recip_answer", "response_file"]

_CODES = {c.value: c for c in MaestroResult}
_FAILURES = {f.value for f in F}


def response_file(resp: Response | None, problem: str | None = None) -> bytes:
    """What came back, as the batch's response file: the body when it is JSON, else the
    status and the body's text (or the failure, when nothing came back) in a JSON object."""
    if resp is None:
        return orjson.dumps({"error": problem})
    try:
        orjson.loads(resp.body)
        return resp.body
    except orjson.JSONDecodeError:
        text = resp.body.decode("utf-8", errors="replace")
        return orjson.dumps({"status": resp.status, "body": text})


def _events(events: list[dict[str, str]]) -> str | None:
    return orjson.dumps(events).decode() if events else None


def _recip_object(obj: Any) -> tuple[str, str | None, str | None] | None:
    """(result, error, message) of a documented result object, else None."""
    if not isinstance(obj, dict) or obj.get("result") not in _CODES:
        return None
    error, message = obj.get("error"), obj.get("message")
    if obj["result"] != "SUCCESS" and not isinstance(error, str):
        return None
    if (error is not None and not isinstance(error, str)) or (
        message is not None and not isinstance(message, str)
    ):
        return None
    return obj["result"], error, message


def parse_recip_answer(body: bytes, count: int) -> list[tuple[str, str | None, str | None]] | None:
    """Per recipient (result, error, message) from an on-demand body; None if undocumented.

    An array answers each recipient in order; one object answers the whole call.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict):
        one = _recip_object(data)
        return None if one is None else [one] * count
    if not isinstance(data, list) or len(data) != count:
        return None
    out = [_recip_object(obj) for obj in data]
    if any(o is None for o in out):
        return None
    return out  # type: ignore[return-value]


class OnDemandSender:
    """``maestro-ondemand``: one trigger-URL GET per batch."""

    @staticmethod
    def secrets(backend: HttpBackend) -> list[str]:
        plan = backend.plan
        if not plan.job.trigger_url:
            raise ConfigError(
                f"jobs.{plan.name}.trigger_url",
                "http mode needs the mail job's trigger URL: "
                'trigger_url = "https://SERVER/trigger/JOB?token={token}" with token_env',
            )
        if "{token}" not in plan.job.trigger_url:
            return []
        return [backend.env(plan.job.token_env, f"jobs.{plan.name}.token_env")]

    def __init__(self, backend: HttpBackend, transport: Transport) -> None:
        self.backend = backend
        self.transport = transport
        plan = backend.plan
        url = trigger_url(plan, redact=False) or ""
        sep = "&" if "?" in url else "?"
        self.url = f"{url}{sep}recip="
        self.shown = f"{trigger_url(plan, redact=True)}{sep}recip=…"

    async def deliver(self, chunk: Chunk) -> tuple[list[BatchAnswer | None], Exception | None]:
        ready = chunk_items(self.backend.builder, chunk)
        data, offsets = ready.data, ready.offsets
        starts = chunk.starts.tolist()

        async def send(k: int, _release: Callable[[], None]) -> BatchAnswer:
            # the batch's items without the trailing comma, encoded when it is sent
            items = data[offsets[starts[k]] : offsets[starts[k + 1]] - 1]
            url = f"{self.url}%5B{quote_text(str(items, 'utf-8'))}%5D"
            return await self._call(url, starts[k + 1] - starts[k])

        return await run_in_order(ready.deps, send, stops=self.backend.stops)

    async def _call(self, url: str, size: int) -> BatchAnswer:
        events: list[dict[str, str]] = []
        try:
            resp = await self.transport.request("GET", url, shown=self.shown, events=events)
        except DeliveryStopped:
            raise
        except DeliveryError as e:
            # retries ran out: a later run may try again (the ledger's transient failure)
            return _internal_error(
                size, e.message, events, response_file(None, e.message), transient=True
            )
        if resp.status == 401:
            job = self.backend.plan.job
            raise DeliveryStopped(
                f"maestro-ondemand: HTTP 401 from the trigger URL {self.shown}; check the "
                f"security token in ${job.token_env or '(token_env)'}",
                code=401,
            )
        answers = parse_recip_answer(resp.body, size) if resp.status == 200 else None
        if answers is None:
            what = "an undocumented" if resp.status == 200 else f"HTTP {resp.status} with a"
            message = f"{what} body: {truncate(resp.body)}"
            return _internal_error(size, message, events, response_file(resp))
        now = now_iso()
        ev = _events(events)
        return BatchAnswer(
            resp.body,  # read above as the documented JSON: the response file as it came
            {
                "status": ["completed" if r == "SUCCESS" else "failed" for r, _, _ in answers],
                "result": [r for r, _, _ in answers],
                "error": [e or None for _, e, _ in answers],
                "message": [m for _, _, m in answers],
                "events": [ev] * size,
                "time": [now] * size,
            },
        )


def _internal_error(
    size: int,
    message: str,
    events: list[dict[str, str]],
    response: bytes,
    transient: bool = False,
) -> BatchAnswer:
    err = MaestroResult.INTERNAL_ERROR
    return BatchAnswer(
        response,
        {
            "status": ["failed"] * size,
            "result": [err.value] * size,
            "error": [err.error] * size,
            "message": [message] * size,
            "events": [_events(events)] * size,
            "time": [now_iso()] * size,
            "_transient": [transient] * size,
        },
    )


class SubscribeSender:
    """``maestro-subscribe``: one ``addSubscriberExternally.do`` GET per subscriber."""

    @staticmethod
    def secrets(backend: HttpBackend) -> list[str]:
        return []

    def __init__(self, backend: HttpBackend, transport: Transport) -> None:
        self.backend = backend
        self.transport = transport
        self.base = subscribe_endpoint(backend.plan, backend.http)
        lst = backend.plan.lst
        self.ids = (lst.mContainer or "", lst.mOwner or "", lst.mListId or "")
        # the builder's call object: {"mContainer":…,"mOwner":…,"mListId":…,"mSubscriber":{…}}
        head = {"mContainer": lst.mContainer, "mOwner": lst.mOwner, "mListId": lst.mListId}
        self.prefix = orjson.dumps(head).decode()[:-1] + ',"mSubscriber":'

    def _subscriber(self, item: str) -> str:
        """The ``mSubscriber`` JSON exactly as built (sliced out of the call object)."""
        if item.startswith(self.prefix) and item.endswith("}"):
            return item[len(self.prefix) : -1]
        return orjson.dumps(orjson.loads(item)["mSubscriber"]).decode()

    async def deliver(self, chunk: Chunk) -> tuple[list[BatchAnswer | None], Exception | None]:
        rows = chunk.rows
        n = rows.num_rows
        items = self.backend.builder.items(rows).to_pylist()
        deps = unit_dependencies(rows.column("email").combine_chunks(), np.arange(n), n)

        async def send(i: int, _release: Callable[[], None]) -> tuple[bytes, dict[str, Any]]:
            query = subscribe_query(*self.ids, self._subscriber(items[i]))
            return await self._call(f"{self.base}?{query}")

        calls, stop = await run_in_order(deps, send, stops=self.backend.stops)
        starts = chunk.starts.tolist()
        answers: list[BatchAnswer | None] = []
        for k in range(len(starts) - 1):
            part = calls[starts[k] : starts[k + 1]]
            done = [c for c in part if c is not None]
            if not done:
                answers.append(None)
                continue
            cols: dict[str, list[Any]] = {}
            for _, values in done:
                for name, value in values.items():
                    cols.setdefault(name, []).append(value)
            answer = BatchAnswer(b"[" + b",".join(body for body, _ in done) + b"]", cols)
            if len(done) < len(part):
                answer.answered = [j for j, c in enumerate(part) if c is not None]
            answers.append(answer)
        return answers, stop

    async def _call(self, url: str) -> tuple[bytes, dict[str, Any]]:
        events: list[dict[str, str]] = []
        shown = f"{self.base}?mContainer=…&mSubscriber={REDACTED}"
        try:
            resp = await self.transport.request("GET", url, shown=shown, events=events)
        except DeliveryStopped:
            raise
        except DeliveryError as e:
            return response_file(None, e.message), _subscribe_failed(e.message, events, True)
        body: Any = None
        if resp.status == 200:
            try:
                body = orjson.loads(resp.body)
            except orjson.JSONDecodeError:
                body = None
        ok = isinstance(body, dict) and body.get("result") == "SUCCESS"
        reason = body.get("reason") if isinstance(body, dict) else None
        failed = (
            isinstance(body, dict)
            and body.get("result") == "FAILED"
            and isinstance(reason, dict)
            and reason.get("type") in _FAILURES
        )
        if not ok and not failed:
            what = "an undocumented" if resp.status == 200 else f"HTTP {resp.status} with a"
            message = f"{what} body: {truncate(resp.body)}"
            return response_file(resp), _subscribe_failed(message, events)
        return response_file(resp), {
            "status": "completed" if ok else "failed",
            "result": "SUCCESS" if ok else "FAILED",
            "reason": None if ok else orjson.dumps(reason).decode(),
            "message": None,
            "events": _events(events),
            "time": now_iso(),
            "_transient": False,
        }


def _subscribe_failed(
    message: str, events: list[dict[str, str]], transient: bool = False
) -> dict[str, Any]:
    """A call that got no documented answer: ``FAILED`` without a platform reason
    (``transient`` when retries ran out: a later run may try again)."""
    return {
        "status": "failed",
        "result": "FAILED",
        "reason": None,
        "message": message,
        "events": _events(events),
        "time": now_iso(),
        "_transient": transient,
    }
