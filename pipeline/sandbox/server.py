"""The sandbox's aiohttp application: the platforms' endpoints over the engine and the store.

=====================================================  ==========================================
``GET /trigger/{job}?token=…&recip=…``                  Maestro on-demand recipients (``000_…``)
``GET /list/action/addSubscriberExternally.do``         Maestro external subscribe (``002_…``)
``POST /v2/emails/send``                                Yesmail send (``003_…``): 202 + ticket
``GET /v2/tickets/{id}``, ``/v2/async-results/{id}``    the ticket and its async results
``/ga/api/v2/mailing_lists…``                           InboxFirst lists (``004_…``)
=====================================================  ==========================================

Credentials are checked as the services do: the trigger URL's security token,
the ``Api-User``/``Api-Key`` headers, Basic auth — 401 without them.

Store work runs on the event loop, one engine call at a time. Maestro calls
that arrive while the engine is busy are answered together by one engine
call, in arrival order — the platform processes consecutive calls "one by
one" anyway — which is what lets one core answer thousands of calls a second.
Before each engine call the loop turns until no more calls join (a few
turns): the requests read in one turn reach the queue only in the next, and
an engine call costs a transaction and a commit whatever its size. An
accepted Yesmail request is judged at once (a 409 is immediate, as
documented), those that arrived together in one transaction; its ticket then
really passes ``accepted`` → ``processing`` → ``completed``, and only then
are its async results there.

Test knobs (:class:`SandboxOptions`): ``latency`` before each answer,
``fail_rate`` of requests answered ``fail_status`` (with ``Retry-After`` when
``retry_after`` is set).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import gc
import hmac
import html
import random
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import unquote_plus

import aiohttp
import orjson
from aiohttp import web

from pipeline.checkpoint import Checkpointer
from pipeline.config import JobPlan, MailpipeConfig
from pipeline.engine.ondemand import columns_from_objects, evaluate_ondemand
from pipeline.engine.subscribe import evaluate_subscribe
from pipeline.engine.yesmail import SendAnswer, evaluate_sends, ticket_document
from pipeline.errors import MaestroResult, SubscribeFailure, YesmailStatus
from pipeline.payloads.maestro_subscribe import SUBSCRIBE_PATH
from pipeline.payloads.yesmail import SEND_PATH
from pipeline.rundir import now_iso
from pipeline.sandbox.credentials import Credentials, env_lines, load_credentials
from pipeline.sandbox.inboxfirst import MailingLists, Refused, envelope
from pipeline.store import Store

if TYPE_CHECKING:
    pass

__all__ = ["Sandbox", "SandboxOptions", "running_sandbox"]

T = TypeVar("T")
R = TypeVar("R")
MAX_TICKETS = 100_000  # tickets (and their async results) kept, oldest dropped first
SEND_GROUP = 32  # Yesmail requests judged in one transaction at most
LISTS = "/ga/api/v2/mailing_lists"


@dataclass(frozen=True)
class SandboxOptions:
    latency: float = 0.0
    fail_rate: float = 0.0
    fail_status: int = 503
    retry_after: float | None = None
    ticket_delay: float = 0.005  # seconds a ticket spends accepted, then processing
    seed: int | None = None


class _Aggregator(Generic[T, R]):
    """Items of calls that arrive while the engine is busy are answered by one engine call."""

    def __init__(
        self,
        run: Callable[[list[T]], list[R]],
        engine: Callable[..., Awaitable[Any]],
        limit: int = 3072,
    ) -> None:
        self.run = run
        self.engine = engine
        self.limit = limit
        self.waiting: collections.deque[tuple[list[T], asyncio.Future[list[R]]]] = (
            collections.deque()
        )
        self.task: asyncio.Task[None] | None = None

    async def submit(self, items: list[T]) -> list[R]:
        fut: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self.waiting.append((items, fut))
        if self.task is None:
            self.task = asyncio.create_task(self._drain())
        return await fut

    async def _gather(self) -> None:
        """Let the requests the loop has read join, while more keep arriving."""
        before = -1
        for _ in range(8):
            if len(self.waiting) == before:
                return
            before = len(self.waiting)
            await asyncio.sleep(0)

    async def _drain(self) -> None:
        try:
            await self._gather()
            while self.waiting:
                take = [self.waiting.popleft()]
                count = len(take[0][0])
                while self.waiting and count + len(self.waiting[0][0]) <= self.limit:
                    take.append(self.waiting.popleft())
                    count += len(take[-1][0])
                flat = [x for items, _ in take for x in items]
                try:
                    out: list[R] = await self.engine(self.run, flat)
                except Exception as e:
                    if len(take) == 1:
                        if not take[0][1].done():
                            take[0][1].set_exception(e)
                        continue
                    # the engine's transaction was rolled back: each call again, alone, so
                    # that only the one it fails on gets the error
                    for items, fut in take:
                        try:
                            alone: list[R] = await self.engine(self.run, items)
                        except Exception as err:
                            if not fut.done():
                                fut.set_exception(err)
                        else:
                            if not fut.done():
                                fut.set_result(alone)
                    continue
                pos = 0
                for items, fut in take:
                    if not fut.done():
                        fut.set_result(out[pos : pos + len(items)])
                    pos += len(items)
                await self._gather()  # answer these before judging the next calls
        finally:
            self.task = None


class _Ticket:
    """An accepted request's ticket, moving through its states in real time."""

    def __init__(self, answer: SendAnswer) -> None:
        final = answer.ticket or {}
        response = final.get("response") or {}
        self.id: str = final["id"]
        self.request: dict[str, Any] = final["request"]
        self.ref: str | None = response.get("ref")
        self.response_uri: str | None = response.get("uri")
        self.data: dict[str, str] | None = response.get("data")
        self.steps: list[dict[str, str]] = final["events"]
        self.location: str = response.get("location") or ""
        self.results = answer.async_results or {}
        self.events = [self.steps[0]]
        self.done = False
        self.posted: int | None = None  # the responseUri's HTTP status, once posted

    @property
    def async_id(self) -> str:
        return self.location.rsplit("/", 1)[-1]

    def document(self) -> dict[str, Any]:
        data = self.data
        if data is not None and self.done:  # sent when the ticket completed
            data = {**data, "sentTime": self.events[-1]["time"]}
        return ticket_document(
            self.id,
            self.request["id"],
            self.request["user"],
            self.request["uri"],
            self.ref,
            self.events,
            self.location,
            self.response_uri,
            data,
        )


# a query parameter whose percent-escapes are not UTF-8 (aiohttp's ``request.query`` would
# put U+FFFD in their place and the call would go on with changed data)
_NOT_UTF8 = "\x00not-utf8"
_NOT_UTF8_TEXT = "The {} parameter is not URL-encoded UTF-8"


def _query(request: web.Request) -> dict[str, str]:
    """The query's parameters, the first value of each (as a servlet's getParameter);
    one whose escapes are not UTF-8 is :data:`_NOT_UTF8`. Read through aiohttp's
    (compiled) parser; only a value holding U+FFFD is decoded again, strictly."""
    out = {name: request.query[name] for name in request.query}
    if any("\ufffd" in v for v in out.values()):
        seen: set[str] = set()
        for part in request.rel_url.raw_query_string.split("&"):
            name, _, value = part.partition("=")
            name = unquote_plus(name, errors="replace")
            if name in seen or "\ufffd" not in out.get(name, ""):
                continue
            seen.add(name)
            try:
                out[name] = unquote_plus(value, errors="strict")
            except UnicodeDecodeError:
                out[name] = _NOT_UTF8
    return out


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(data), content_type="application/json", headers=headers
    )


def _ym_error(status: int, message: str) -> web.Response:
    return _json({"status": status, "message": message}, status)


class Sandbox:
    """The platforms of one config, answering from its store."""

    def __init__(self, cfg: MailpipeConfig, options: SandboxOptions | None = None) -> None:
        self.cfg = cfg
        self.options = options or SandboxOptions()
        self.store = Store(cfg.store.url)
        self.checkpointer = Checkpointer(self.store)
        if cfg.simulate.mail_jobs:
            self.store.sync_mail_jobs(dict(cfg.simulate.mail_jobs))
        self.creds: Credentials = load_credentials(self.store, cfg)
        self.plans: dict[str, JobPlan] = {
            name: cfg.plan(name)
            for name, job in cfg.jobs.items()
            if job.target == "maestro-ondemand"
        }
        self.lists = MailingLists(self.store, self.creds.secret)
        self.rng = random.Random(self.options.seed)
        self.base = ""
        self.requests: collections.Counter[str] = collections.Counter()
        self.tickets: collections.OrderedDict[str, _Ticket] = collections.OrderedDict()
        self.results: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._ondemand: dict[str, _Aggregator[Any, dict[str, Any]]] = {}
        self._subscribe: _Aggregator[dict[str, Any], dict[str, Any]] | None = None
        self._sends: _Aggregator[tuple[Any, str, str | None, str | None], SendAnswer] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: aiohttp.ClientSession | None = None  # posts to responseUri
        self._runner: web.AppRunner | None = None

    # -- running ---------------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(
            middlewares=[self._knobs],
            client_max_size=64 * 1024 * 1024,
            # a trigger URL carries its recipients: longer request lines than the default 8 KiB
            handler_args={"max_line_size": 1 << 16, "max_field_size": 1 << 16},
        )
        app.router.add_get("/trigger/{job}", self.trigger, name="trigger")
        app.router.add_get(SUBSCRIBE_PATH, self.subscribe, name="subscribe")
        app.router.add_get("/list/subscribe.html", self.subscribe_page, name="subscribe_page")
        app.router.add_post(SEND_PATH, self.send, name="send")
        app.router.add_get("/v2/tickets/{id}", self.ticket, name="ticket")
        app.router.add_get("/v2/async-results/{id}", self.async_results, name="async_results")
        app.router.add_get(LISTS, self.lists_all, name="lists")
        app.router.add_post(LISTS, self.lists_create, name="lists_create")
        app.router.add_put(LISTS + "/{id:\\d+}", self.lists_update, name="lists_update")
        app.router.add_get(
            LISTS + "/{id:\\d+}/delete_confirmation_code", self.lists_code, name="lists_code"
        )
        app.router.add_delete(
            LISTS + "/{id:\\d+}/confirmed/{code}", self.lists_delete, name="lists_delete"
        )
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 8025) -> str:
        """Listen; returns the base URL (with the port really bound when ``port`` is 0)."""
        # every request parses JSON into short-lived objects: collect the young generation
        # less often, and never look at what start-up made again
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        self._runner = web.AppRunner(self.application(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024)
        await site.start()
        self.checkpointer.start()
        bound = self._runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.base = f"http://{shown}:{bound}"
        return self.base

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.checkpointer.stop()
        self.store.close()

    def env(self, base: str | None = None) -> list[tuple[str, str]]:
        return env_lines(self.cfg, base or self.base, self.creds)

    async def _engine(self, fn: Callable[..., R], *args: Any) -> R:
        """Run engine work (store access) on the loop itself, one call at a time.

        Not in a thread: the engine is Python and holds the GIL, so a thread
        would only trade places with the loop, at the cost of a convoy of GIL
        hand-offs. Requests that arrive meanwhile wait in the socket buffers and
        are answered together by the next aggregated call.
        """
        return fn(*args)

    def _later(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @web.middleware
    async def _knobs(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route.name or "unknown"
        self.requests[route] += 1
        opts = self.options
        if opts.latency:
            await asyncio.sleep(opts.latency)
        if opts.fail_rate and self.rng.random() < opts.fail_rate:
            self.requests["injected-failure"] += 1
            headers = {}
            if opts.retry_after is not None:
                headers["Retry-After"] = f"{opts.retry_after:g}"
            phrase = (
                HTTPStatus(opts.fail_status).phrase
                if opts.fail_status in HTTPStatus._value2member_map_
                else "Error"
            )
            return _json(
                {"status": opts.fail_status, "message": f"{phrase} (sandbox --fail-rate)"},
                opts.fail_status,
                headers,
            )
        return await handler(request)

    # -- Maestro ---------------------------------------------------------------------

    async def trigger(self, request: web.Request) -> web.Response:
        job = request.match_info["job"]
        plan = self.plans.get(job)
        if plan is None:
            return web.Response(status=404, text=f"No on-demand mail job trigger {job!r}\n")
        query = _query(request)
        token = query.get("token") or ""
        if not hmac.compare_digest(token.encode(), self.creds.token(job).encode()):
            return web.Response(status=401, text="Invalid security token for this trigger\n")
        recip = query.get("recip")
        if recip is _NOT_UTF8:
            return _json(MaestroResult.PARSE_ERROR.response(_NOT_UTF8_TEXT.format("recip")))
        if recip is None or not recip.strip():
            return _json(MaestroResult.NO_RECIPIENTS.response())
        try:
            data = orjson.loads(recip)
        except orjson.JSONDecodeError as e:
            return _json(MaestroResult.PARSE_ERROR.response(str(e)))
        single = not isinstance(data, list)
        objs = [data] if single else data
        if not objs:
            return _json(MaestroResult.NO_RECIPIENTS.response())
        agg = self._ondemand.get(job)
        if agg is None:
            agg = self._ondemand[job] = _Aggregator(
                functools.partial(self._answer_recip, plan), self._engine
            )
        answers = await agg.submit(objs)  # a refused call: its error for each recipient
        return _json(answers[0] if single else answers)

    def _answer_recip(self, plan: JobPlan, objs: list[Any]) -> list[dict[str, Any]]:
        """Recipients of consecutive calls, judged one after the other (engine thread)."""
        answer = evaluate_ondemand(self.cfg, plan, self.store, columns_from_objects(objs, plan))
        return answer.bodies()

    async def subscribe(self, request: web.Request) -> web.Response:
        q = _query(request)
        names = ("mContainer", "mOwner", "mListId", "mSubscriber")
        bad = [p for p in names if q.get(p) is _NOT_UTF8]
        if bad:  # 002_…: an error related to the URL parameters
            failure = SubscribeFailure.PARAMETER_VALIDATION_ERROR
            return _json(failure.response(_NOT_UTF8_TEXT.format(bad[0])))
        call = {p: q.get(p) for p in names}
        if self._subscribe is None:
            self._subscribe = _Aggregator(self._answer_subscribe, self._engine)
        [answer] = await self._subscribe.submit([call])
        return _json(answer)

    async def subscribe_page(self, request: web.Request) -> web.Response:
        """Where AUTHENTICATION_REQUIRED's ``externalSubscribeURL`` leads: 002_… says it
        "yields the same page in Maestro that is designed for this specific situation";
        the sandbox's stand-in says what that page would ask for."""
        q = request.query
        lst = next(
            (
                c
                for c in self.cfg.lists.values()
                if (c.mContainer, c.mOwner, c.mListId)
                == (q.get("mContainer"), q.get("mOwner"), q.get("mListId"))
            ),
            None,
        )
        if lst is None:
            return web.Response(status=404, text="No such list\n")
        email = html.escape(q.get("email", ""))
        page = (
            f"<!doctype html><title>Subscribe to {html.escape(lst.name)}</title>"
            f"<h1>Subscribe to {html.escape(lst.name)}</h1>"
            f"<p>{email} is already a member of the list group "
            f"{html.escape(lst.group or '')}: log in with its password to subscribe "
            "(mailpipe sandbox: the page the platform shows here).</p>"
        )
        return web.Response(text=page, content_type="text/html")

    def _answer_subscribe(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return evaluate_subscribe(self.cfg, self.store, calls, self.base)

    # -- Yesmail ---------------------------------------------------------------------

    def _ym_denied(self, request: web.Request) -> web.Response | None:
        user = request.headers.get("Api-User", "")
        key = request.headers.get("Api-Key", "")
        if user == self.creds.api_user and hmac.compare_digest(
            key.encode(), self.creds.api_key.encode()
        ):
            return None
        return _ym_error(401, "Invalid Api-User and/or Api-Key header value.")

    async def send(self, request: web.Request) -> web.Response:
        denied = self._ym_denied(request)
        if denied is not None:
            return denied
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _ym_error(
                400, "The request could not be understood by the server due to malformed syntax."
            )
        ref = request.query.get("responseRef")
        response_uri = request.query.get("responseUri")
        user = request.headers["Api-User"]
        if self._sends is None:
            self._sends = _Aggregator(self._answer_sends, self._engine, SEND_GROUP)
        [answer] = await self._sends.submit([(body, user, ref, response_uri)])
        if answer.status is not YesmailStatus.ACCEPTED:
            return _json(answer.body, int(answer.status))
        ticket = _Ticket(answer)
        self.tickets[ticket.id] = ticket
        while len(self.tickets) > MAX_TICKETS:
            old = self.tickets.popitem(last=False)[1]
            if old.location:
                self.results.pop(old.async_id, None)
        self._later(self._process(ticket))
        return _json(
            ticket.document(),
            202,
            {"Content-Location": f"{self.base}/v2/tickets/{ticket.id}"},
        )

    def _answer_sends(
        self, calls: list[tuple[Any, str, str | None, str | None]]
    ) -> list[SendAnswer]:
        """Requests ``(body, user, responseRef, responseUri)`` that arrived together, judged
        one after the other in one transaction (a refused one stores nothing, as alone)."""
        return evaluate_sends(
            self.store,
            [(body, user, ref) for body, user, ref, _ in calls],
            self.base,
            response_uris=[uri for *_, uri in calls],
        )

    async def _process(self, ticket: _Ticket) -> None:
        """accepted → processing → completed; the async results appear at the end."""
        for step in ticket.steps[1:]:
            await asyncio.sleep(self.options.ticket_delay)
            ticket.events.append({**step, "time": now_iso()})
        ticket.done = True
        if ticket.response_uri:
            self._later(self._post_status(ticket))
        if ticket.location:  # several recipients (one sent alone has its data on the ticket)
            self.results[ticket.async_id] = {
                **ticket.results,
                "lastUpdated": ticket.events[-1]["time"],
            }

    async def _post_status(self, ticket: _Ticket) -> None:
        """003_…'s ``responseUri``: "a customer-specified URI where Yesmail's service can
        post the final status of the request" — the completed ticket, POSTed once (a
        failure is told on stderr; nothing retries it)."""
        uri = ticket.response_uri or ""
        try:
            if not uri.startswith(("http://", "https://")):
                raise ValueError("not an http(s) URI")
            if self._client is None:
                self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            async with self._client.post(uri, json=ticket.document()) as resp:
                await resp.read()
                ticket.posted = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            print(
                f"mailpipe sandbox: posting ticket {ticket.id}'s final status to {uri} failed: "
                f"{e or type(e).__name__}",
                file=sys.stderr,
                flush=True,
            )

    async def ticket(self, request: web.Request) -> web.Response:
        denied = self._ym_denied(request)
        if denied is not None:
            return denied
        ticket = self.tickets.get(request.match_info["id"])
        if ticket is None:
            return _ym_error(404, "Ticket not found.")
        return _json(ticket.document())

    async def async_results(self, request: web.Request) -> web.Response:
        denied = self._ym_denied(request)
        if denied is not None:
            return denied
        results = self.results.get(request.match_info["id"])
        if results is None:
            return _ym_error(404, "Async results not found.")
        return _json(results)

    # -- InboxFirst ------------------------------------------------------------------

    def _if_denied(self, request: web.Request) -> web.Response | None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        try:
            login, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            login = password = ""
        if (
            scheme.lower() == "basic"
            and login == self.creds.inboxfirst_user
            and hmac.compare_digest(password.encode(), self.creds.inboxfirst_key.encode())
        ):
            return None
        return _json(envelope(error="Authentication required: invalid user or API key"), 401)

    async def _lists_call(
        self, request: web.Request, fn: Callable[..., Any], *args: Any
    ) -> web.Response:
        denied = self._if_denied(request)
        if denied is not None:
            return denied
        try:
            return _json(envelope(await self._engine(fn, *args)))
        except Refused as e:
            return _json(envelope(error=e.message), e.status)

    async def _payload(self, request: web.Request) -> Any:
        try:
            return orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return None

    async def lists_all(self, request: web.Request) -> web.Response:
        return await self._lists_call(request, self.lists.all)

    async def lists_create(self, request: web.Request) -> web.Response:
        return await self._lists_call(request, self.lists.create, await self._payload(request))

    async def lists_update(self, request: web.Request) -> web.Response:
        list_id = int(request.match_info["id"])
        return await self._lists_call(
            request, self.lists.update, list_id, await self._payload(request)
        )

    async def lists_code(self, request: web.Request) -> web.Response:
        list_id = int(request.match_info["id"])
        return await self._lists_call(request, self.lists.confirmation_code, list_id)

    async def lists_delete(self, request: web.Request) -> web.Response:
        list_id = int(request.match_info["id"])
        return await self._lists_call(
            request, self.lists.delete, list_id, request.match_info["code"]
        )


@contextmanager
def running_sandbox(
    cfg: MailpipeConfig,
    options: SandboxOptions | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> Iterator[Sandbox]:
    """A sandbox serving from a thread of its own (tests, benchmarks); stopped on exit."""
    sandbox = Sandbox(cfg, options)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    failure: list[BaseException] = []
    stop: asyncio.Event | None = None

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        try:
            await sandbox.start(host, port)
        except BaseException as e:
            failure.append(e)
            ready.set()
            raise
        ready.set()
        await stop.wait()
        await sandbox.stop()

    thread = threading.Thread(
        target=lambda: loop.run_until_complete(main()), name="sandbox", daemon=True
    )
    thread.start()
    ready.wait()
    if failure:
        raise failure[0]
    try:
        yield sandbox
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join()
        loop.close()
