"""The HTTP/1.1 client the ``http`` backend sends with, against real servers on loopback:
a raw asyncio server where the test must say exactly which bytes go back (chunked,
read-until-close, a connection closed under a kept-alive client), an aiohttp server
for ordinary use, and TLS with a certificate from a test CA (trustme)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from pipeline.deliver.h1 import ConnectFailed, H1Client, split_url

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    line, *fields = head.split("\r\n")[:-2]
    headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return line, headers, body


class RawServer:
    """An asyncio server that answers with the bytes each test gives it, counting the
    connections made and recording the requests read."""

    def __init__(self, answer: Callable[[int, str], bytes | None]) -> None:
        self.answer = answer  # (request number, request line) -> bytes, or None to close
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append(request)
                out = self.answer(len(self.requests), request[0])
                if out is None:
                    return
                writer.write(out)
                await writer.drain()
                if b"connection: close" in out.lower():
                    return
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        for w in self.writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()


def ok(body: bytes = b"hi", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def test_requests_reuse_one_kept_alive_connection() -> None:
    async def go() -> tuple[list[bytes], RawServer]:
        srv = RawServer(lambda n, _: ok(b"answer %d" % n))
        async with srv as base:
            client = H1Client(5.0, {"User-Agent": "mailpipe"})
            bodies = [(await client.request("GET", f"{base}/x?n={i}")).body for i in range(5)]
            await client.close()
        return bodies, srv

    bodies, srv = asyncio.run(go())
    assert bodies == [b"answer %d" % n for n in range(1, 6)]
    assert srv.connections == 1
    line, headers, _ = srv.requests[2]
    assert line == "GET /x?n=2 HTTP/1.1"
    assert headers["host"].startswith("127.0.0.1:") and headers["user-agent"] == "mailpipe"


def test_a_post_carries_its_body_and_headers_and_the_reply_its_headers() -> None:
    async def go() -> tuple[Any, RawServer]:
        srv = RawServer(lambda n, _: ok(b"{}", b"Content-Location: /v2/tickets/7\r\n"))
        async with srv as base:
            client = H1Client(5.0)
            reply = await client.request(
                "POST", f"{base}/v2/emails/send", {"Api-Key": "k"}, b'{"a":1}'
            )
            await client.close()
        return reply, srv

    reply, srv = asyncio.run(go())
    assert reply.status == 200 and reply.headers["content-location"] == "/v2/tickets/7"
    line, headers, body = srv.requests[0]
    assert line == "POST /v2/emails/send HTTP/1.1"
    assert headers["api-key"] == "k" and headers["content-length"] == "7" and body == b'{"a":1}'


def test_a_chunked_answer_is_joined() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )

    async def go() -> tuple[list[bytes], int]:
        srv = RawServer(lambda n, _: chunked)
        async with srv as base:
            client = H1Client(5.0)
            bodies = [(await client.request("GET", f"{base}/")).body for _ in range(2)]
            await client.close()
        return bodies, srv.connections

    assert asyncio.run(go()) == ([b"abcdefg", b"abcdefg"], 1)


def test_connection_close_and_a_body_read_until_close_open_a_new_connection() -> None:
    def answer(n: int, _: str) -> bytes:
        if n == 1:
            return ok(b"first", b"Connection: close\r\n")
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"

    async def go() -> tuple[list[bytes], int, int]:
        srv = RawServer(answer)
        async with srv as base:
            client = H1Client(5.0)
            bodies = [(await client.request("GET", f"{base}/")).body for _ in range(3)]
            await asyncio.sleep(0.05)
            held = client.connections  # the closed ones are let go
            await client.close()
        return bodies, srv.connections, held

    assert asyncio.run(go()) == ([b"first", b"until the end", b"until the end"], 3, 0)


def test_a_get_on_a_kept_alive_connection_closed_unanswered_is_sent_once_more() -> None:
    async def go() -> tuple[list[int], int, int]:
        srv = RawServer(lambda n, _: None if n == 2 else ok())  # the 2nd: closed, unanswered
        async with srv as base:
            client = H1Client(5.0)
            replies = [await client.request("GET", f"{base}/") for _ in range(2)]
            await client.close()
        return [r.status for r in replies], srv.connections, len(srv.requests)

    assert asyncio.run(go()) == ([200, 200], 2, 3)


def test_an_idle_connection_the_server_closed_is_not_used_again() -> None:
    async def go() -> tuple[list[int], int, int]:
        srv = RawServer(lambda n, _: ok())
        async with srv as base:
            client = H1Client(5.0)
            first = await client.request("GET", f"{base}/")
            for w in srv.writers:  # the server drops its idle connection, as servers do
                w.close()
            await asyncio.sleep(0.05)
            second = await client.request("GET", f"{base}/")
            await client.close()
        return [first.status, second.status], srv.connections, len(srv.requests)

    assert asyncio.run(go()) == ([200, 200], 2, 2)


def test_a_post_on_a_connection_closed_before_answering_is_not_sent_twice() -> None:
    async def go() -> tuple[type[BaseException], int]:
        srv = RawServer(lambda n, _: ok() if n == 1 else None)  # the 2nd request: closed unanswered
        async with srv as base:
            client = H1Client(5.0)
            await client.request("POST", f"{base}/", data=b"x")
            with pytest.raises(ConnectionError) as caught:
                await client.request("POST", f"{base}/", data=b"y")
            await client.close()
        return caught.type, len(srv.requests)

    error, requests = asyncio.run(go())
    assert issubclass(error, ConnectionError) and requests == 2


def test_an_answer_cut_off_midway_is_a_connection_error() -> None:
    async def go() -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
            await writer.drain()
            writer.close()

        srv = RawServer(lambda n, _: None)
        srv.handle = handle  # type: ignore[method-assign]
        async with srv as base:
            client = H1Client(5.0)
            with pytest.raises(ConnectionError) as caught:
                await client.request("GET", f"{base}/")
            await client.close()
        return str(caught.value)

    assert "mid-answer" in asyncio.run(go())


def test_an_answer_cut_short_of_its_length_is_an_error_even_with_connection_close() -> None:
    async def go() -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 100\r\n\r\npart")
            await writer.drain()
            writer.close()

        srv = RawServer(lambda n, _: None)
        srv.handle = handle  # type: ignore[method-assign]
        async with srv as base:
            client = H1Client(5.0)
            with pytest.raises(ConnectionError) as caught:
                await client.request("GET", f"{base}/")
            await client.close()
        return str(caught.value)

    assert "mid-answer" in asyncio.run(go())


def test_a_slow_answer_times_out_and_its_connection_is_not_reused() -> None:
    async def go() -> tuple[int, int, bytes]:
        slow = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            srv.connections += 1
            while True:
                try:
                    await _read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                if not slow.is_set():
                    slow.set()
                    await asyncio.sleep(0.5)  # past the client's deadline
                writer.write(ok(b"late" if srv.connections == 1 else b"fresh"))
                try:
                    await writer.drain()
                except ConnectionError:
                    break
            writer.close()

        srv = RawServer(lambda n, _: None)
        srv.handle = handle  # type: ignore[method-assign]
        async with srv as base:
            client = H1Client(0.2)
            with pytest.raises(TimeoutError):
                await client.request("GET", f"{base}/")
            reply = await client.request("GET", f"{base}/")
            await client.close()
        return reply.status, srv.connections, reply.body

    assert asyncio.run(go()) == (200, 2, b"fresh")


def test_a_refused_connection_is_connect_failed() -> None:
    async def go() -> ConnectFailed:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        client = H1Client(2.0)
        with pytest.raises(ConnectFailed) as caught:
            await client.request("GET", f"http://127.0.0.1:{port}/")
        return caught.value

    error = asyncio.run(go())
    assert isinstance(error.os_error, ConnectionRefusedError)


def test_userinfo_in_the_url_becomes_basic_auth_and_leaves_the_host_header() -> None:
    async def go() -> dict[str, str]:
        srv = RawServer(lambda n, _: ok())
        async with srv as base:
            client = H1Client(5.0)
            await client.request(
                "GET", base.replace("http://", "http://api%40shop:s3cret@") + "/lists"
            )
            await client.close()
        return srv.requests[0][1]

    headers = asyncio.run(go())
    assert headers["authorization"] == "Basic YXBpQHNob3A6czNjcmV0"  # api@shop:s3cret
    assert "@" not in headers["host"]


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("http://127.0.0.1:9/x\r\nX-Injected: 1", None),
        ("http://127.0.0.1:9/a b", None),
        ("http://127.0.0.1:9/caf\u00e9", None),
        ("http://127.0.0.1:9/", {"X-Ok": "a\r\nX-Injected: 1"}),
        ("ftp://127.0.0.1/", None),
        ("http:///path", None),
    ],
)
def test_what_cannot_be_sent_safely_is_refused_before_connecting(
    url: str, headers: dict[str, str] | None
) -> None:
    async def go() -> None:
        await H1Client(1.0).request("GET", url, headers)

    with pytest.raises(ValueError):
        asyncio.run(go())


def test_split_url() -> None:
    assert split_url("HTTPS://u:p@h:8443?a=1#frag") == ("https", "u:p@h:8443", "/?a=1")
    assert split_url("http://[::1]:8025/v2/x?q=%7B") == ("http", "[::1]:8025", "/v2/x?q=%7B")


def test_many_concurrent_requests_against_aiohttp_each_get_their_own_answer() -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"n": request.query["n"]})

    async def go() -> list[bytes]:
        app = web.Application()
        app.router.add_get("/echo", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        client = H1Client(5.0)
        try:
            replies = await asyncio.gather(
                *(client.request("GET", f"http://127.0.0.1:{port}/echo?n={i}") for i in range(200))
            )
        finally:
            await client.close()
            await runner.cleanup()
        return [r.body for r in replies]

    assert asyncio.run(go()) == [b'{"n": "%d"}' % i for i in range(200)]


def test_https_checks_the_certificate_against_the_trusted_cas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def go() -> Any:
        srv = RawServer(lambda n, _: ok(b"secure"))
        srv.server = await asyncio.start_server(srv.handle, "127.0.0.1", 0, ssl=server_ctx)
        port = srv.server.sockets[0].getsockname()[1]
        client = H1Client(5.0)
        try:
            return await client.request("GET", f"https://127.0.0.1:{port}/")
        except ConnectFailed as e:
            return e
        finally:
            await client.close()
            srv.server.close()

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    refused = asyncio.run(go())
    assert isinstance(refused, ConnectFailed) and isinstance(refused.os_error, ssl.SSLError)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    assert asyncio.run(go()).body == b"secure"
