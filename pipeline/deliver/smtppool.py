"""A pool of persistent SMTP connections that sends messages and retries the transient.

Messages come in slices from an iterator, which is read only as the queue
runs low: a slice is composed while the connections carry the previous one,
and memory holds a few slices, not a chunk. ``pool_size`` workers share the
queue and one rate limiter; each
keeps its connection across calls of :meth:`SmtpPool.send` (checked with a
NOOP before its first use in a call) and replaces it when the server closes
it or after ``messages_per_connection`` messages. Between messages a
connection is reset (``RSET``).

What becomes of a message (its fields ``ok``, ``code``, ``reply``,
``transient``, ``events``):

* 2xx after the content → sent;
* 4xx (421 included), a dropped connection, no reply in time → tried again
  after a backoff from :class:`~pipeline.retry.RetryPolicy`, each retry a
  ``retrying`` event with the server's code and text; failed (transient)
  after the last try;
* 5xx → failed at once; an address that needs SMTPUTF8 from a server that
  does not offer it, or a message larger than the server's SIZE, fails
  without being tried.

When the server cannot be used at all — TLS or AUTH refused, or as many
connection attempts in a row failed as a message may be tried — ``send``
raises :class:`~pipeline.errors.DeliveryStopped`; messages not yet answered
then keep ``done`` false.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator, Sequence

from pipeline.deliver.smtpconn import Session, SessionLost, SmtpReply, SmtpSettings
from pipeline.errors import DeliveryStopped
from pipeline.mail.compose import Outgoing
from pipeline.retry import RetryPolicy, retrying_event
from pipeline.rundir import now_iso

__all__ = ["RateLimiter", "SmtpPool"]

LOW_WATER = 256  # read the next slice when fewer messages than this wait in the queue


class RateLimiter:
    """At most ``rate`` messages a second across the pool (0: no limit)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    async def take(self) -> None:
        if not self.interval:
            return
        while True:
            now = time.monotonic()
            if now >= self._next:
                self._next = max(now, self._next) + self.interval
                return
            await asyncio.sleep(self._next - now)


class SmtpPool:
    def __init__(
        self,
        settings: SmtpSettings,
        policy: RetryPolicy,
        rate: float,
        pool_size: int,
        per_connection: int,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.limiter = RateLimiter(rate)
        self.per_connection = per_connection
        self.sessions: list[Session | None] = [None] * pool_size
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue()
        self._open = 0
        self._fed = False
        self._room = asyncio.Event()
        self._finished = asyncio.Event()
        self._stop: DeliveryStopped | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self._connect_failures = 0

    async def send(self, slices: Iterable[Sequence[Outgoing]]) -> None:
        """Send every message of every slice; each ends ``done`` with its answer (unless
        the run stops: then :class:`DeliveryStopped` is raised)."""
        self._queue = asyncio.Queue()
        self._open = 0
        self._fed = False
        self._finished = asyncio.Event()
        for s in self.sessions:
            if s is not None:
                s.checked = False
        tasks = [asyncio.create_task(self._feed(iter(slices)))]
        tasks += [asyncio.create_task(self._worker(i)) for i in range(len(self.sessions))]
        finished = asyncio.create_task(self._finished.wait())
        waiting = {finished, *tasks}
        try:
            while True:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if finished in done or any(
                    t is not tasks[0] or t.exception() is not None for t in done
                ):
                    break  # all answered, or stopped, or a task failed
                # the feeder is through: wait for the answers
        finally:
            for task in (finished, *tasks):
                task.cancel()
            await asyncio.gather(finished, *tasks, return_exceptions=True)
            for t in self._timers:
                t.cancel()
            self._timers.clear()
        for task in tasks:  # the feeder's errors, and a worker that ended by itself (a bug)
            exc = None if task.cancelled() else task.exception()
            if exc is not None:
                raise exc
        if self._stop is not None:
            stop, self._stop = self._stop, None
            raise stop

    async def _feed(self, slices: Iterator[Sequence[Outgoing]]) -> None:
        """Queue the slices, each when the queue runs low (composing happens here)."""
        for batch in slices:
            self._open += len(batch)
            for m in batch:
                self._queue.put_nowait(m)
            while self._queue.qsize() >= LOW_WATER and self._stop is None:
                self._room.clear()
                await self._room.wait()
            if self._stop is not None:
                return
        self._fed = True
        if self._open == 0:
            self._finished.set()

    def _next(self, msg: Outgoing) -> Outgoing:
        if self._queue.qsize() < LOW_WATER:
            self._room.set()
        return msg

    async def close(self) -> None:
        await asyncio.gather(*(s.quit() for s in self.sessions if s is not None and s.alive))
        self.sessions = [None] * len(self.sessions)

    # -- outcomes -------------------------------------------------------------------

    def _done(
        self, msg: Outgoing, ok: bool, reply: SmtpReply | None, why: str, transient: bool = False
    ) -> None:
        msg.ok, msg.transient, msg.done, msg.time = ok, transient, True, now_iso()
        msg.code = reply.code if reply is not None else None
        msg.reply = why
        msg.data = b""  # answered: its bytes are not needed any more
        self._open -= 1
        if self._open == 0 and self._fed:
            self._finished.set()

    def _again(self, msg: Outgoing, why: str, reply: SmtpReply | None = None) -> None:
        """A transient failure: retry after a backoff, or fail after the last try."""
        if msg.attempts >= self.policy.attempts:
            self._done(msg, False, reply, f"{why} (gave up after {msg.attempts} tries)", True)
            return
        msg.events.append(retrying_event(why, now_iso()))
        loop = asyncio.get_running_loop()
        handle = loop.call_later(self.policy.delay(msg.attempts), self._requeue, msg)
        self._timers.add(handle)

    def _requeue(self, msg: Outgoing) -> None:
        self._queue.put_nowait(msg)

    def _answer(self, msg: Outgoing, reply: SmtpReply) -> None:
        """The server's verdict on a message: 2xx sent, 4xx again, 5xx failed."""
        if reply.ok:
            self._done(msg, True, reply, str(reply))
        elif 400 <= reply.code < 500:
            self._again(msg, f"the server answered {reply}", reply)
        else:
            self._done(msg, False, reply, str(reply))

    def _cut_off(self, pending: Outgoing | None, nxt: Outgoing | None, e: SessionLost) -> None:
        """The connection went mid-exchange: answer what its replies answered, retry the rest."""
        got = list(e.replies)
        if pending is not None:
            if got:
                self._answer(pending, got.pop(0))
            else:
                self._again(pending, e.why)
        if nxt is not None:
            refused = next((r for r in got if not r.ok and r.code != 354), None)
            if refused is not None:
                self._answer(nxt, refused)
            else:
                self._again(nxt, e.why)

    def _sendable(self, s: Session, msg: Outgoing) -> bool:
        """Fail, without trying, what this server cannot take."""
        if msg.utf8 and not s.caps.smtputf8:
            self._done(
                msg,
                False,
                None,
                f"the address {msg.rcpt} needs SMTPUTF8 (its local part is not ASCII), which "
                f"{self.settings.where} does not offer",
            )
            return False
        if s.caps.size is not None and len(msg.data) > s.caps.size:
            self._done(
                msg,
                False,
                None,
                f"the message is {len(msg.data)} bytes; {self.settings.where} takes at most "
                f"{s.caps.size}",
            )
            return False
        return True

    # -- workers --------------------------------------------------------------------

    async def _worker(self, slot: int) -> None:
        while True:
            msg = self._next(await self._queue.get())
            if self._stop is not None:
                return
            s = await self._session(slot, msg)
            if s is None:
                continue
            try:
                if s.caps.pipelining:
                    await self._pipelined(s, msg)
                else:
                    await self._lockstep(s, msg)
            except asyncio.CancelledError:
                s.close()  # stopped mid-exchange: the connection's state is unknown
                raise
            if not s.alive:
                self.sessions[slot] = None
            elif s.used >= self.per_connection:
                self.sessions[slot] = None
                await s.quit()

    async def _session(self, slot: int, msg: Outgoing) -> Session | None:
        """The slot's connection, checked or (re)opened; None when ``msg`` could not go."""
        s = self.sessions[slot]
        if s is not None and s.alive and (s.checked or await s.probe()):
            s.checked = True
            return s
        if s is not None:
            s.close()
        self.sessions[slot] = None
        try:
            s = await Session.open(self.settings)
        except DeliveryStopped as stop:
            self._halt(stop)
            return None
        except SessionLost as e:
            self._connect_failures += 1
            if self._connect_failures >= self.policy.attempts:
                self._halt(
                    DeliveryStopped(
                        f"smtp {self.settings.where}: {self._connect_failures} connection "
                        f"attempts in a row failed, the last: {e.why}; nothing more was sent"
                    )
                )
                return None
            msg.attempts += 1
            self._again(msg, e.why)
            await asyncio.sleep(self.policy.delay(self._connect_failures))
            return None
        self._connect_failures = 0
        self.sessions[slot] = s
        return s

    def _halt(self, stop: DeliveryStopped) -> None:
        """Stop sending: every message not yet answered stays so."""
        self._stop = self._stop or stop
        self._finished.set()

    def _take(self, s: Session) -> Outgoing | None:
        """The next message, if one is waiting and the connection may carry it."""
        if self._stop is not None or not s.alive or s.used >= self.per_connection:
            return None
        try:
            return self._next(self._queue.get_nowait())
        except asyncio.QueueEmpty:
            return None

    @staticmethod
    def _envelope_verdict(replies: list[SmtpReply]) -> SmtpReply | None:
        """None when ``RSET MAIL RCPT`` were accepted and DATA got 354; else the first
        reply that refused the transaction."""
        for reply in replies[:-1]:
            if not reply.ok:
                return reply
        return None if replies[-1].code == 354 else replies[-1]

    async def _pipelined(self, s: Session, first: Outgoing) -> None:
        """One write per message: the previous one's content and this one's envelope."""
        pending: Outgoing | None = None  # DATA accepted: its content goes out next
        nxt: Outgoing | None = first
        while nxt is not None or pending is not None:
            if nxt is not None and not self._sendable(s, nxt):
                nxt = self._take(s)
                continue
            parts, want = [], 0
            if pending is not None:
                parts.append(pending.data)
                want += 1
            if nxt is not None:
                await self.limiter.take()
                cmds = s.envelope(nxt, rset=s.used > 0)
                parts += cmds
                want += len(cmds)
                nxt.attempts += 1
                s.used += 1
            try:
                s.send(b"".join(parts))
                replies = await s.replies(want)
            except SessionLost as e:
                self._cut_off(pending, nxt, e)
                return
            closing = any(r.code == 421 for r in replies)
            if pending is not None:
                self._answer(pending, replies.pop(0))
                pending = None
            if nxt is not None:
                refused = self._envelope_verdict(replies)
                if refused is not None:
                    self._answer(nxt, refused)
                elif closing:  # its DATA was accepted, yet the server is going away
                    self._again(nxt, "the server announced it is closing the connection (421)")
                else:
                    pending = nxt
            if closing:
                s.close()
                return
            nxt = self._take(s)

    async def _lockstep(self, s: Session, msg: Outgoing) -> None:
        """One command at a time, for a server without PIPELINING."""
        if not self._sendable(s, msg):
            return
        await self.limiter.take()
        msg.attempts += 1
        rset = s.used > 0
        s.used += 1
        try:
            for cmd in s.envelope(msg, rset):
                s.send(cmd)
                (reply,) = await s.replies(1)
                refused = self._envelope_verdict([reply] if cmd == b"DATA\r\n" else [reply, _GO])
                if refused is not None:
                    self._answer(msg, refused)
                    if refused.code == 421:
                        s.close()
                    return
            s.send(msg.data)
            (reply,) = await s.replies(1)
        except SessionLost as e:
            self._cut_off(None, msg, e)
            return
        self._answer(msg, reply)
        if reply.code == 421:
            s.close()


_GO = SmtpReply(354, "")  # stands for DATA's go-ahead when a command before it is judged
