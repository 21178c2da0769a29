"""HTTP/1.1 requests over kept-alive connections, for the ``http`` backend's transport.

The transport sends tens of thousands of small requests to one or two origins
(a Maestro trigger URL carries ~15 recipients), so what a request costs the
client's own CPU bounds how fast a run goes while the platform has cores to
spare. aiohttp's ``ClientSession.request`` spends ~165 µs of Python on each
(URL object, header multidicts, request and response objects, tracing hooks);
this writes the request line and headers as one ``bytes`` and lets httptools
(llhttp, the parser uvicorn uses) read the answer: ~55 µs a request, measured
on loopback against an aiohttp server.

What it does and does not do, since the platforms need no more:

- one request at a time on a connection, connections kept alive per origin
  (``http`` and ``https``, certificates checked with the default context, which
  honours ``SSL_CERT_FILE``) and dropped when the server closes them or answers
  ``Connection: close``;
- a GET that finds a kept-alive connection closed before any answer byte
  arrives is sent once more on a new connection, as aiohttp and browsers do
  (the server never saw it); anything else that goes wrong is raised, for the
  transport's retries to judge;
- bodies by ``Content-Length``, chunked, or read until the server closes;
  no redirects followed, no cookies, no compression asked for;
- one deadline per request (``timeout`` seconds for connecting, sending and the
  whole answer), after which the connection is closed and ``TimeoutError`` raised.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

import httptools
from multidict import CIMultiDict

__all__ = ["ConnectFailed", "Connection", "H1Client", "Reply", "split_url"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


class ConnectFailed(ConnectionError):
    """No connection could be made to the origin (refused, unreachable, name unknown)."""

    def __init__(self, origin: str, error: OSError) -> None:
        super().__init__(f"{origin}: {type(error).__name__}: {error}")
        self.os_error = error


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: bytes


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str  # as connected to: an IPv6 literal without its brackets
    port: int
    authority: bytes  # the Host header, port only when not the scheme's own

    @property
    def name(self) -> str:
        return f"{self.scheme}://{self.authority.decode('ascii')}"


def split_url(url: str) -> tuple[str, str, str]:
    """``(scheme, authority, target)`` of an absolute http(s) URL; the target is the
    path and query as given (already percent-encoded), ``/`` when there is no path."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise ValueError(f"not an http or https URL: {url[:80]!r}")
    cut = len(rest)
    for mark in "/?#":
        at = rest.find(mark)
        if 0 <= at < cut:
            cut = at
    authority, target = rest[:cut], rest[cut:].partition("#")[0]
    if not authority:
        raise ValueError(f"no host in the URL: {url[:80]!r}")
    if not target.startswith("/"):
        target = "/" + target
    return scheme, authority, target


class Connection(asyncio.Protocol):
    """One kept-alive connection: a request is written, its answer awaited."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = False  # has carried a request before: may have been closed under us
        self._waiter: asyncio.Future[Reply] | None = None
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._started = False  # a byte of the current answer has arrived
        self._complete_headers = False
        self.gone: Callable[[Connection], None] | None = None  # told when the connection ends

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ConnectionError(f"unreadable HTTP answer ({e})"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost settles what is waiting

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.gone is not None:
            self.gone(self)
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._complete_headers and not _length_given(self._headers):
            # an answer without a length ends where the connection does (one cut short
            # despite its length is an error, not a shorter body)
            self.on_message_complete()
        elif not self._started:
            self._fail(_Unanswered("the server closed the connection before answering"))
        else:
            self._fail(ConnectionError("the server closed the connection mid-answer"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._complete_headers = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        waiter.set_result(
            Reply(self.parser.get_status_code(), CIMultiDict(self._headers), b"".join(self._body))
        )
        if not self.parser.should_keep_alive():
            self.close()

    # use
    async def send(self, request: bytes, body: bytes | None) -> Reply:
        assert self.transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self._headers, self._body = [], []
        self._started = self._complete_headers = False
        self.transport.write(request)
        if body:
            self.transport.write(body)
        try:
            return await self._waiter
        finally:
            self._waiter = None
            self.used = True

    def _fail(self, error: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _Unanswered(ConnectionError):
    """The connection closed before a byte of the answer: the server never read it."""


class H1Client:
    """Kept-alive connections per origin; ``request`` may run concurrently from one loop
    (the caller bounds how many at once: each concurrent request holds a connection)."""

    def __init__(self, timeout: float, headers: Mapping[str, str] | None = None) -> None:
        self.timeout = timeout
        self._headers = _header_block(headers or {})
        self._idle: dict[_Origin, list[Connection]] = {}
        self._origins: dict[str, _Origin] = {}
        self._ssl: ssl.SSLContext | None = None
        self._open: set[Connection] = set()

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> Reply:
        scheme, authority, target = split_url(url)
        key = f"{scheme}://{authority}"
        origin = self._origins.get(key) or self._origin(key, scheme, authority)
        extra = dict(headers or {})
        if "@" in authority:
            user = unquote(authority.rpartition("@")[0])
            extra["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode("ascii")
        head = _request_head(method, target, origin.authority, self._headers, extra, data)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        async with asyncio.timeout_at(deadline):
            while True:
                conn = await self._connection(origin)
                reused = conn.used
                try:
                    reply = await conn.send(head, data)
                except _Unanswered:
                    conn.abort()
                    if reused and method in ("GET", "HEAD"):
                        continue  # a kept-alive connection the server had closed: once more
                    raise
                except BaseException:
                    conn.abort()  # timed out, cancelled or broken mid-answer: never reused
                    raise
                if not conn.closed:
                    self._idle.setdefault(origin, []).append(conn)
                return reply

    def _origin(self, key: str, scheme: str, authority: str) -> _Origin:
        hostport = authority.rpartition("@")[2]
        if hostport.startswith("["):  # an IPv6 literal
            host, _, rest = hostport[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = hostport.partition(":")
        if not host:
            raise ValueError(f"no host in {key!r}")
        try:
            port = int(port_text) if port_text else _DEFAULT_PORTS[scheme]
        except ValueError:
            raise ValueError(f"not a port number in {key!r}") from None
        origin = _Origin(scheme, host, port, hostport.lower().encode("ascii"))
        self._origins[key] = origin
        return origin

    async def _connection(self, origin: _Origin) -> Connection:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        tls = None
        if origin.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            _, conn = await loop.create_connection(
                Connection,
                origin.host,
                origin.port,
                ssl=tls,
                server_hostname=origin.host if tls else None,
            )
        except OSError as e:  # ssl.SSLError and CertificateError among them
            raise ConnectFailed(origin.name, e) from None
        self._open.add(conn)
        conn.gone = self._open.discard  # closed by either side: no longer held
        return conn

    @property
    def connections(self) -> int:
        """Connections open now (in use or idle)."""
        return len(self._open)

    async def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports' close callbacks run


def _length_given(headers: list[tuple[str, str]]) -> bool:
    """Whether an answer says where its body ends (a length, or chunks)."""
    return any(
        name.lower() == "content-length"
        or (name.lower() == "transfer-encoding" and "chunked" in value.lower())
        for name, value in headers
    )


def _header_block(headers: Mapping[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        if any(c in name or c in value for c in "\r\n") or not name or ":" in name:
            raise ValueError(f"a header that cannot be sent: {name!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


def _request_head(
    method: str,
    target: str,
    authority: bytes,
    common: bytes,
    headers: Mapping[str, str],
    data: bytes | None,
) -> bytes:
    if not target.isascii() or any(c in target for c in " \r\n"):
        raise ValueError("a URL with spaces, line breaks or non-ASCII text cannot be sent")
    length = b"" if data is None else b"Content-Length: %d\r\n" % len(data)
    return b"".join(
        (
            method.encode("ascii"),
            b" ",
            target.encode("ascii"),
            b" HTTP/1.1\r\nHost: ",
            authority,
            b"\r\n",
            common,
            _header_block(headers) if headers else b"",
            length,
            b"\r\n",
        )
    )
