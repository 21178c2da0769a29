"""Real SMTP servers for the tests: aiosmtpd on port 0, in a thread with its own loop.

:class:`Recorder` keeps every message it accepts; the fault handlers swap one
handler method each (RCPT or DATA), as aiosmtplib's own tests do. The
server can advertise PIPELINING (aiosmtpd processes pipelined commands in
order but does not announce it by itself), SMTPUTF8, STARTTLS, implicit
TLS, AUTH, and drop every n-th connection.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]

    def message(self) -> EmailMessage:
        msg = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


class Recorder:
    """Accepts everything and keeps it; ``pipelining`` adds PIPELINING to EHLO."""

    def __init__(self, pipelining: bool = False) -> None:
        self.pipelining = pipelining
        self.received: list[Received] = []
        self.commands: list[str] = []
        self._queued = 0

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.commands.append("RSET")
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._queued += 1
        self.received.append(
            Received(
                envelope.mail_from or "",
                list(envelope.rcpt_tos),
                bytes(envelope.original_content or envelope.content or b""),
                list(envelope.mail_options),
            )
        )
        return f"250 2.0.0 Ok: queued as Q{self._queued}"

    def to(self, address: str) -> list[Received]:
        return [r for r in self.received if address in r.rcpt_tos]


class RcptFault(Recorder):
    """Answers RCPT for chosen addresses with ``reply``: ``times`` times each (0: always)."""

    def __init__(self, reply: str, match: Callable[[str], bool], times: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        self.reply = reply
        self.match = match
        self.times = times
        self.seen: dict[str, int] = {}

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.match(address):
            self.seen[address] = self.seen.get(address, 0) + 1
            if not self.times or self.seen[address] <= self.times:
                return self.reply
        envelope.rcpt_tos.append(address)
        return "250 OK"


class DataFault(Recorder):
    """The first ``times`` DATA of each recipient: ``421`` and the connection closed, or
    (``delay``) an answer later than the client waits."""

    def __init__(self, times: int = 1, delay: float = 0.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.times = times
        self.delay = delay
        self.seen: dict[str, int] = {}

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        rcpt = envelope.rcpt_tos[0]
        self.seen[rcpt] = self.seen.get(rcpt, 0) + 1
        if self.times and self.seen[rcpt] > self.times:
            return await super().handle_DATA(server, session, envelope)
        if self.delay:
            await asyncio.sleep(self.delay)
            return await super().handle_DATA(server, session, envelope)
        transport = server.transport
        assert transport is not None
        asyncio.get_running_loop().call_soon(transport.close)
        return "421 4.3.2 Service shutting down, closing the connection"


class Dropper(SMTP):
    """Closes every ``every``-th connection, or every one after the first ``after``,
    before its greeting."""

    every = 0
    after = 0
    count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cls = type(self)
        cls.count += 1
        if (self.every and cls.count % self.every == 0) or (self.after and cls.count > self.after):
            transport.close()
            return
        super().connection_made(transport)


@dataclass
class Server:
    """An aiosmtpd server on 127.0.0.1, port 0, in its own thread. Use as a context manager."""

    handler: Any
    smtputf8: bool = False
    tls_context: ssl.SSLContext | None = None  # STARTTLS
    ssl_context: ssl.SSLContext | None = None  # TLS at once
    require_starttls: bool = False
    credentials: tuple[str, str] | None = None
    drop_every: int = 0
    drop_after: int = 0
    port: int = 0
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def _factory(self) -> SMTP:
        kw: dict[str, Any] = {}
        if self.credentials is not None:
            kw.update(authenticator=self._authenticate, auth_required=True, auth_require_tls=True)
        return self._cls(
            self.handler,
            hostname="mx.test",
            enable_SMTPUTF8=self.smtputf8,
            tls_context=self.tls_context,
            require_starttls=self.require_starttls,
            loop=self.loop,
            **kw,
        )

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and self.credentials is not None
            and (data.login.decode(), data.password.decode()) == self.credentials
        )
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535

    def __enter__(self) -> Server:
        # a class of its own: the connection count is per server
        self._cls = type(
            "CountingSMTP",
            (Dropper,),
            {"every": self.drop_every, "after": self.drop_after, "count": 0},
        )
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            srv = self.loop.run_until_complete(
                self.loop.create_server(self._factory, "127.0.0.1", 0, ssl=self.ssl_context)
            )
            self.port = srv.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
            srv.close()
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost, made with the openssl CLI
    (the ``cryptography`` package is not installed here)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


# -- a project in tmp_path: config, templates, input files ---------------------------------

TOKEN_KEY = "k" * 32  # the signing key the tests export as TEST_TOKEN_KEY

CONFIG = """
[run]
out = "{out}"

[store]
url = "sqlite:///{state}/mailpipe.db"

[delivery]
mode = "smtp"

[delivery.retry]
attempts = {attempts}
base_delay = 0.0
max_delay = 0.0

[delivery.smtp]
host = "127.0.0.1"
port = {port}
security = "{security}"
timeout = {timeout}
pool_size = {pool_size}
messages_per_connection = {per_connection}
rate = {rate}
templates = "{templates}"
confirm_url = "https://shop.test/confirm?t={{token}}"
unsubscribe_url = "https://shop.test/unsubscribe?t={{token}}"
token_key_env = "TEST_TOKEN_KEY"
{smtp_extra}

[delivery.smtp.template_ids]
"T1" = "followup"

[lists.shop]
name = "Shop"
d_from_email = "orders@shop.test"
d_from_name = "Zoë's Shop"
d_reply_to = "help@shop.test"
d_sender_email = "mailer@shop.test"
d_bounce_email = "bounces@shop.test"
custom_headers_enabled = true
custom_headers = "X-Company: Example Shop\\n"
mContainer = "1"
mOwner = "N10"
mListId = "SHOP"

[lists.shop.fields.FIRST_NAME]
type = "text"

[lists.shop.fields.LAST_NAME]
type = "text"

[lists.shop.fields.GIFT]
type = "text"
html = true

[lists.news]
name = "News"
d_from_email = "news@shop.test"
d_from_name = "Shop News"
mContainer = "2"
mOwner = "N10"
mListId = "NEWS"

[lists.news.fields.FIRST_NAME]
type = "text"

[sources.orders]
kind = "orders"
path = "{data}/orders.csv"
email = "email"
record_id = "order_id"

[sources.orders.fields]
FIRST_NAME = "first_name"
LAST_NAME = "last_name"
GIFT = "gift"
ORDER_ID = "order_id"
TOTAL = "amount"

[sources.signups]
kind = "signups"
path = "{data}/signups.csv"
email = "email"

[sources.signups.fields]
FIRST_NAME = "first_name"

[jobs.confirm]
source = "orders"
target = "maestro-ondemand"
list = "shop"
ifNotExistsAddAndSend = true
merge_fields = ["ORDER_ID", "TOTAL"]
template = "confirm"

[jobs.followup]
source = "orders"
target = "yesmail-send"
list = "shop"
enabled = false
fields = ["FIRST_NAME", "ORDER_ID"]
templateId = "T1"
transactional = true

[jobs.signup]
source = "signups"
target = "maestro-subscribe"
list = "news"
enabled = false
template = "welcome"
"""

TEMPLATES = {
    "confirm": (
        "Order &ORDER_ID; for &FIRST_NAME;",
        "Hello &FIRST_NAME; &LAST_NAME;,\n.a line that starts with a dot\n"
        "total &TOTAL;\ngift: &GIFT;\nunsubscribe: &UNSUBSCRIBE_URL;\n",
        "<p>Hello &FIRST_NAME; &LAST_NAME; &amp; co</p>\n<p>&GIFT;</p>\n"
        '<a href="&UNSUBSCRIBE_URL;">unsubscribe</a>\n',
    ),
    "followup": (
        "How is order &ORDER_ID;, &FIRST_NAME;?",
        "Hello &FIRST_NAME;, how is order &ORDER_ID;?\n",
        "<p>Hello &FIRST_NAME;, how is order &ORDER_ID;?</p>\n",
    ),
    "welcome": (
        "Please confirm, &FIRST_NAME;",
        "Hello &FIRST_NAME;, confirm &EMAIL; here:\n&CONFIRM_URL;\n",
        '<p>Hello &FIRST_NAME;, <a href="&CONFIRM_URL;">confirm &EMAIL;</a></p>\n',
    ),
}

# ann: plain; zoe: unicode names and an IDN domain (two line items); eve: a header
# injection; bob: characters HTML must escape; sup: suppressed; a bad address
ORDERS = (
    "order_id,email,first_name,last_name,amount,gift\n"
    '1,ann@example.com,Ann,Lee,10.00,"<b>Gift</b> wrap"\n'
    "2,zoe@bücher.example,Zoë,Müller,20.00,\n"
    "2,,,,,\n"
    '3,eve@example.com,"Eve\r\nBcc: spy@evil.example",Day,5.00,\n'
    "4,bob@example.com,Bob,O'Brien & <Sons>,7.50,\n"
    "5,sup@example.com,Sue,Press,1.00,\n"
    "6,not-an-address,Nat,Bad,1.00,\n"
)
PLAIN_ORDERS = "order_id,email,first_name,last_name,amount,gift\n" + "".join(
    f"{i},{n}@example.com,{n.title()},X,{i}.00,\n"
    for i, n in enumerate(["ann", "bob", "cy", "dee", "eli"], 1)
)


@dataclass
class Project:
    """A config, templates and inputs in a directory; ``config(port, ...)`` writes the TOML."""

    root: Path

    def __post_init__(self) -> None:
        self.data = self.root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.templates = self.root / "templates"
        for name, (subject, text, html_part) in TEMPLATES.items():
            d = self.templates / name
            d.mkdir(parents=True, exist_ok=True)
            (d / "subject.txt").write_text(subject + "\n", encoding="utf-8")
            (d / "body.txt").write_text(text, encoding="utf-8")
            (d / "body.html").write_text(html_part, encoding="utf-8")
        self.orders(ORDERS)
        (self.data / "signups.csv").write_text(
            "email,first_name\nnew@example.com,Nia\nzoé@example.com,Zoé\n", encoding="utf-8"
        )

    def orders(self, text: str) -> None:
        (self.data / "orders.csv").write_bytes(text.encode("utf-8"))

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def store_url(self) -> str:
        return f"sqlite:///{self.root / 'state'}/mailpipe.db"

    def config(self, port: int, **opts: Any) -> str:
        values = {
            "attempts": 3,
            "security": "none",
            "timeout": 5,
            "pool_size": 2,
            "per_connection": 1000,
            "rate": 0,
            "smtp_extra": "",
            **opts,
        }
        path = self.root / "mailpipe.toml"
        path.write_text(
            CONFIG.format(
                out=self.out,
                state=self.root / "state",
                data=self.data,
                templates=self.templates,
                port=port,
                **values,
            ),
            encoding="utf-8",
        )
        return str(path)
