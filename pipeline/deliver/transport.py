"""HTTP requests for the ``http`` backend: kept-alive connections (:mod:`.h1`), a
concurrency cap, a rate limit, and retries of what is transient.

Every request goes through :meth:`Transport.request`: it waits for a free slot
(``delivery.http.concurrency``) and for the rate limiter
(``delivery.http.rate`` requests a second), and retries 429, 5xx, timeouts and
dropped connections with :class:`~pipeline.retry.RetryPolicy` (honouring
``Retry-After``), recording each retry as a ``retrying`` ticket event. Any
other status comes back to the caller, who knows what it means for its
platform. A server that cannot be connected to at all after every retry
raises :class:`~pipeline.errors.DeliveryStopped`: nothing was delivered, so
the run stops rather than failing every row.

Messages name the URL as shown (``shown``: the security token as ``***``) and
are passed through :meth:`Transport.redact`, so no secret reaches a log, an
event or a result file.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from pipeline.config import HttpConfig
from pipeline.deliver.h1 import ConnectFailed, H1Client, Reply
from pipeline.errors import DeliveryError, DeliveryStopped
from pipeline.payloads.base import REDACTED
from pipeline.retry import RetryPolicy, retrying_event
from pipeline.rundir import now_iso

__all__ = ["Response", "Transport", "truncate"]

BODY_IN_MESSAGE = 500  # bytes of an unexpected body quoted in a message


Response = Reply  # what came back: status, headers (case-insensitive), body


class _Retry(DeliveryError):
    """A transient answer or failure, carrying the server's Retry-After hint."""

    def __init__(self, message: str, *, code: int | str | None, retry_after: float | None) -> None:
        super().__init__(message, code=code, transient=True)
        self.retry_after = retry_after
        self.response: Response | None = None


def truncate(body: bytes, limit: int = BODY_IN_MESSAGE) -> str:
    text = body[:limit].decode("utf-8", errors="replace")
    return text + ("…" if len(body) > limit else "")


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class _RateLimiter:
    """At most ``rate`` request starts a second, evenly spaced (0: unlimited)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


class _Slots:
    """At most ``n`` requests at a time, like a semaphore, except that a freed slot goes
    first to a waiting follow-up request (polling a ticket the platform accepted, reading
    its results), then to the others in arrival order: finishing what was accepted is
    never queued behind new work."""

    def __init__(self, n: int) -> None:
        self.free = n
        self.waiting: tuple[collections.deque[asyncio.Future[None]], ...] = (
            collections.deque(),
            collections.deque(),
        )

    async def acquire(self, follow_up: bool) -> None:
        if self.free > 0 and not (self.waiting[0] or self.waiting[1]):
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting[0 if follow_up else 1].append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed a slot, then cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        for queue in self.waiting:
            while queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.set_result(None)
                    return
        self.free += 1


class Transport:
    """The connections and limits of ``[delivery.http]``; create it in a running loop."""

    def __init__(
        self, cfg: HttpConfig, policy: RetryPolicy, secrets: Iterable[str | None] = ()
    ) -> None:
        self.cfg = cfg
        self.policy = policy
        self.secrets = [s for s in secrets if s]
        self.slots = _Slots(cfg.concurrency)
        self.limiter = _RateLimiter(cfg.rate)
        # self.slots bounds the requests, hence the connections (one request at a time
        # on each); the platforms authenticate every call by token, key or Basic auth,
        # so no cookies are kept
        self.client = H1Client(cfg.timeout, {"User-Agent": "mailpipe"})

    async def close(self) -> None:
        await self.client.close()

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    async def request(
        self,
        method: str,
        url: str,
        *,
        shown: str | None = None,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        events: list[dict[str, str]] | None = None,
        follow_up: bool = False,
    ) -> Response:
        """Send with retries; every final answer but a transient one is returned as it is.

        ``url`` is already percent-encoded (sent as it is); ``shown`` is how
        messages name it. Each retry appends a ``retrying`` event to ``events``.
        A ``follow_up`` (of a request the platform accepted) gets the next free
        slot before new requests.
        After the last attempt a transient failure raises
        :class:`~pipeline.errors.DeliveryError` (``transient``), or
        :class:`~pipeline.errors.DeliveryStopped` when no connection could be made.
        """
        attempt = 1
        # the policy's loop (RetryPolicy.acall) written out: no closures per request, and
        # the message's name of the URL only made when something went wrong
        while True:
            try:
                return await self._attempt(method, url, shown, headers, data, follow_up)
            except _Retry as e:
                if attempt >= self.policy.attempts:
                    raise self._gave_up(e) from None
                if events is not None:
                    events.append(retrying_event(self.redact(str(e)), now_iso()))
                await asyncio.sleep(self.policy.delay(attempt, e.retry_after))
                attempt += 1

    async def _attempt(
        self,
        method: str,
        url: str,
        shown: str | None,
        headers: Mapping[str, str] | None,
        data: bytes | None,
        follow_up: bool,
    ) -> Response:
        """One try: the answer, or :class:`_Retry` for what is transient."""
        await self.slots.acquire(follow_up)
        try:
            await self.limiter.wait()
            try:
                answer = await self.client.request(method, url, headers, data)
            except ConnectFailed as e:
                raise _Retry(
                    f"cannot connect for {self._name(method, url, shown)} "
                    f"({type(e.os_error).__name__}: {e.os_error})",
                    code="connect",
                    retry_after=None,
                ) from None
            except TimeoutError:
                raise _Retry(
                    f"no answer to {self._name(method, url, shown)} within {self.cfg.timeout:g} s",
                    code="timeout",
                    retry_after=None,
                ) from None
            except ConnectionError as e:
                raise _Retry(
                    f"{self._name(method, url, shown)}: {e or type(e).__name__}",
                    code="connection",
                    retry_after=None,
                ) from None
        finally:
            self.slots.release()
        if answer.status == 429 or answer.status >= 500:
            err = _Retry(
                f"HTTP {answer.status} from {self._name(method, url, shown)}",
                code=answer.status,
                retry_after=retry_after(answer.headers.get("Retry-After")),
            )
            err.response = answer
            raise err
        return answer

    def _name(self, method: str, url: str, shown: str | None) -> str:
        return f"{method} {self.redact(shown or url)}"

    def _gave_up(self, e: _Retry) -> DeliveryError:
        """What the last transient failure becomes once every attempt is spent."""
        tries = self.policy.attempts
        if e.code == "connect":
            return DeliveryStopped(
                self.redact(f"{e.message} after {tries} attempts; is the server running?"),
                code="connect",
                transient=True,
            )
        message = f"{e.message} after {tries} attempts"
        if e.response is not None and e.response.body:
            message += f": {truncate(e.response.body)}"
        return DeliveryError(self.redact(message), code=e.code, transient=True)


def json_headers(extra: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"Content-Type": "application/json", "Accept": "application/json", **(extra or {})}
