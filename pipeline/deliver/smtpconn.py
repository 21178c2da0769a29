"""One SMTP connection: set up by aiosmtplib, then carrying pipelined transactions.

aiosmtplib opens the connection — TCP, implicit TLS or STARTTLS with the
certificate checked (against ``ca_file`` when set), EHLO, AUTH with the
credentials from the environment. Its protocol, though, expects one reply
per read and drops replies that arrive together, so it cannot pipeline; once
the session is set up, its transport is handed to :class:`ReplyReader`,
which parses every reply a read brings. With PIPELINING (RFC 2920) a message
then costs one round trip — the previous message's content and the next
one's ``RSET MAIL RCPT DATA`` go out in one write; a server without it gets
one command at a time. ``bench/smtp.py`` measures the difference.

Errors::

    DeliveryStopped (pipeline.errors)  the server cannot be used as configured
                                       (TLS, no STARTTLS, AUTH refused): stop the run
    SessionLost (ConnectionError)      the connection dropped, or no reply in time:
                                       what was in flight is tried again
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import aiosmtplib

from pipeline.config import MailpipeConfig
from pipeline.errors import DeliveryStopped
from pipeline.mail.compose import Outgoing
from pipeline.mail.settings import require_env

__all__ = [
    "Capabilities",
    "Session",
    "SessionLost",
    "SmtpReply",
    "SmtpSettings",
    "describe_error",
    "login",
    "open_smtp",
    "tls_error",
]


class SmtpReply(NamedTuple):
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


class SessionLost(ConnectionError):
    """The connection is gone or silent; ``replies`` are those that came before."""

    def __init__(self, why: str, replies: list[SmtpReply] | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.replies = replies or []


@dataclass(frozen=True)
class SmtpSettings:
    """``[delivery.smtp]`` with the credentials read from the environment."""

    host: str
    port: int
    security: str
    timeout: float
    ca_file: str | None
    local_hostname: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    username_env: str | None = None
    password_env: str | None = None

    @classmethod
    def from_config(cls, cfg: MailpipeConfig, env: Mapping[str, str] | None = None) -> SmtpSettings:
        s = cfg.delivery.smtp
        user = pw = None
        if s.username_env and s.password_env:
            user = require_env("delivery.smtp.username_env", s.username_env, env)
            pw = require_env("delivery.smtp.password_env", s.password_env, env)
        return cls(
            s.host,
            s.port,
            s.security,
            s.timeout,
            s.ca_file,
            s.local_hostname or _fqdn(),
            user,
            pw,
            s.username_env,
            s.password_env,
        )

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self) -> aiosmtplib.SMTP:
        """An unconnected client for the relay (implicit TLS when configured; certificates
        always checked)."""
        return aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=self.timeout,
            use_tls=self.security == "tls",
            start_tls=False,
            validate_certs=True,
            cert_bundle=self.ca_file,
            local_hostname=self.local_hostname,
        )


@functools.cache
def _fqdn() -> str:
    return socket.getfqdn() or "localhost"


@dataclass(frozen=True)
class Capabilities:
    """What the server's EHLO offered (after TLS, when TLS is used)."""

    pipelining: bool = False
    smtputf8: bool = False
    eightbitmime: bool = False
    starttls: bool = False
    size: int | None = None
    auth: tuple[str, ...] = ()

    @classmethod
    def of(cls, smtp: aiosmtplib.SMTP) -> Capabilities:
        ext = smtp.esmtp_extensions
        size = ext.get("size", "").strip()
        return cls(
            "pipelining" in ext,
            "smtputf8" in ext,
            "8bitmime" in ext,
            "starttls" in ext,
            int(size) if size.isdigit() and int(size) > 0 else None,
            tuple(m.upper() for m in smtp.server_auth_methods),
        )


def tls_error(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _stopped(settings: SmtpSettings, what: str) -> DeliveryStopped:
    return DeliveryStopped(f"smtp {settings.where}: {what}; nothing more was sent")


async def open_smtp(settings: SmtpSettings) -> tuple[aiosmtplib.SMTP, Capabilities]:
    """Connect, secure, EHLO and log in as configured.

    Raises :class:`DeliveryStopped` when the config cannot work with the
    server, :class:`SessionLost` when the attempt failed in a way that another
    may not (refused, dropped, timed out, a 4xx greeting).
    """
    smtp = settings.client()
    try:
        await smtp.connect()
        await smtp.ehlo()
        if settings.security == "starttls":
            if not smtp.supports_extension("starttls"):
                raise _stopped(
                    settings,
                    'the server does not offer STARTTLS, which security = "starttls" requires; '
                    'use security = "tls" if it speaks TLS at once',
                )
            await smtp.starttls()
            await smtp.ehlo()
        if settings.username is not None:
            await login(smtp, settings)
    except DeliveryStopped:
        smtp.close()
        raise
    except aiosmtplib.SMTPAuthenticationError as e:
        smtp.close()
        raise _stopped(
            settings,
            f"the server refused the login ({e.code} {e.message}); check the credentials in "
            f"${settings.username_env} and ${settings.password_env}",
        ) from None
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as e:
        smtp.close()
        tls = tls_error(e)
        if tls is not None:
            raise _stopped(
                settings,
                f"TLS failed ({tls.reason or tls}); if the server's certificate is signed by "
                "your own CA, set delivery.smtp.ca_file",
            ) from None
        if isinstance(e, aiosmtplib.SMTPResponseException) and e.code >= 500:
            raise _stopped(
                settings, f"the server refused the session ({e.code} {e.message})"
            ) from None
        raise SessionLost(
            f"the connection to {settings.where} failed: {describe_error(e)}"
        ) from None
    return smtp, Capabilities.of(smtp)


async def login(smtp: aiosmtplib.SMTP, settings: SmtpSettings) -> None:
    """AUTH with the best mechanism both sides know, once.

    Not ``SMTP.login``, which tries every mechanism after a refusal: a 535 is
    the server's answer about the credentials, and repeated failures can lock
    the account.
    """
    methods = smtp.supported_auth_methods
    if not methods:
        offered = " ".join(smtp.server_auth_methods) or "none"
        raise _stopped(
            settings, f"credentials are set, but the server offers no usable AUTH ({offered})"
        )
    auth = getattr(smtp, f"auth_{methods[0].replace('-', '')}")
    await auth(settings.username or "", settings.password or "")


def describe_error(e: BaseException) -> str:
    if isinstance(e, aiosmtplib.SMTPResponseException):
        return f"{e.code} {e.message}"
    text = str(e) or type(e).__name__
    cause = e.__cause__
    return f"{text} ({cause})" if cause is not None and str(cause) not in text else text


class ReplyReader(asyncio.Protocol):
    """Reads SMTP replies, as many as each read brings, into a queue."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._ready: deque[SmtpReply] = deque()
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None
        self.lost: str | None = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            self._parse()
        except ValueError:
            self.lost = "the server sent something that is not an SMTP reply"
            self.transport.abort()
        self._wake()

    def _parse(self) -> None:
        buf = self._buf
        start = pos = 0
        while (nl := buf.find(b"\n", pos)) >= 0:
            if buf[pos + 3 : pos + 4] == b"-":  # a line of a multi-line reply
                pos = nl + 1
                continue
            if pos == start:  # the usual one-line reply
                text = bytes(buf[start + 4 : nl]).decode("utf-8", "replace").strip()
            else:
                lines = bytes(buf[start:nl]).decode("utf-8", "replace").splitlines()
                text = " ".join(ln[4:].strip() for ln in lines)
            self._ready.append(SmtpReply(int(buf[start : start + 3]), text))
            start = pos = nl + 1
        if start:
            del buf[:start]

    def eof_received(self) -> bool:
        self.lost = self.lost or "the server closed the connection"
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.lost or (
            f"the connection was lost ({exc})" if exc else "the connection was closed"
        )
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done() and (len(self._ready) >= self._want or self.lost):
            w.set_result(None)

    async def read(self, n: int, timeout: float) -> list[SmtpReply]:
        """``n`` replies, or :class:`SessionLost` with those that came before it went."""
        if len(self._ready) < n and self.lost is None:
            self._want = n
            waiter = self._waiter = self._loop.create_future()
            timer = self._loop.call_later(timeout, _settle, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        got = [self._ready.popleft() for _ in range(min(n, len(self._ready)))]
        if len(got) < n:
            raise SessionLost(self.lost or f"the server did not answer within {timeout:g} s", got)
        return got


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Session:
    """A connection ready for transactions; ``used`` counts the messages it carried."""

    def __init__(self, smtp: aiosmtplib.SMTP, caps: Capabilities, timeout: float) -> None:
        transport = smtp.transport
        assert isinstance(transport, asyncio.Transport)
        self._smtp = smtp  # aiosmtplib's state, kept with the transport it set up
        self.transport = transport
        self.reader = ReplyReader(transport)
        transport.set_protocol(self.reader)
        self.caps = caps
        self.timeout = timeout
        self.used = 0
        self.checked = True

    @classmethod
    async def open(cls, settings: SmtpSettings) -> Session:
        smtp, caps = await open_smtp(settings)
        return cls(smtp, caps, settings.timeout)

    @property
    def alive(self) -> bool:
        return self.reader.lost is None and not self.transport.is_closing()

    def send(self, data: bytes) -> None:
        if not self.alive:
            raise SessionLost(self.reader.lost or "the connection was closed")
        self.transport.write(data)

    async def replies(self, n: int) -> list[SmtpReply]:
        try:
            return await self.reader.read(n, self.timeout)
        except SessionLost:
            self.close()
            raise

    def envelope(self, msg: Outgoing, rset: bool) -> list[bytes]:
        """``[RSET] MAIL RCPT DATA`` for one message (SIZE and SMTPUTF8 when they apply)."""
        params = b""
        if self.caps.size is not None:
            params += b" SIZE=%d" % len(msg.data)
        if msg.utf8:
            params += b" SMTPUTF8"
        cmds = [b"RSET\r\n"] if rset else []
        cmds.append(b"MAIL FROM:<" + msg.sender.encode() + b">" + params + b"\r\n")
        cmds.append(b"RCPT TO:<" + msg.rcpt.encode() + b">\r\n")
        cmds.append(b"DATA\r\n")
        return cmds

    async def probe(self) -> bool:
        """Whether a connection left idle is still there (NOOP)."""
        try:
            self.send(b"NOOP\r\n")
            (reply,) = await self.replies(1)
        except SessionLost:
            return False
        return reply.ok

    async def quit(self) -> None:
        try:
            self.send(b"QUIT\r\n")
            await self.replies(1)
        except SessionLost:
            pass
        finally:
            self.close()

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()
