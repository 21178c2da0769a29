"""The bytes of each message, built directly from a per-job head and merged parts.

Every message is ``multipart/alternative`` (text, then HTML), with the
list's From / Sender / Reply-To and custom headers, the recipient in To, the
merged Subject (RFC 2047 encoded words when it is not plain ASCII), a Date,
a Message-ID derived from the record's ledger key (the same on a resend, so
a receiver can tell one), and for jobs that are not transactional
``List-Unsubscribe`` with a one-click ``List-Unsubscribe-Post`` (RFC 8058).
A part that is ASCII with short lines goes as ``7bit``, any other as base64.

The envelope sender is the list's bounce address (else its From). An address
whose domain is internationalized is sent with the domain's ASCII form (IDNA);
one whose local part is not ASCII needs SMTPUTF8 (``Outgoing.utf8``).

Building the bytes from pieces costs a few microseconds a message;
``email.message.EmailMessage`` costs hundreds (see ``bench/smtp.py``), which
is why a message is not made that way.
"""

from __future__ import annotations

import binascii
import datetime as dt
import email.utils
import hashlib
import re
import secrets
from dataclasses import dataclass, field

import pyarrow as pa
from email_validator import EmailNotValidError, validate_email

from pipeline.config import JobPlan
from pipeline.mail.settings import custom_headers, transactional
from pipeline.mail.templates import Merged

__all__ = ["Composer", "Outgoing", "envelope_address", "subject_header"]

_LONG_LINE = re.compile(rb"[^\n]{990}")
_PLAIN_SUBJECT = re.compile(r"[ -~\t]{0,900}")
_WORD_BYTES = 45  # 45 bytes -> 60 base64 characters: an encoded word of 72


@dataclass
class Outgoing:
    """One message on its way, and what became of it."""

    pos: int  # the recipient's position in the chunk
    sender: str
    rcpt: str
    data: bytes  # what follows DATA: dot-stuffed, ending with CRLF "." CRLF
    utf8: bool
    message_id: str
    attempts: int = 0
    events: list[dict[str, str]] = field(default_factory=list)
    code: int | None = None  # the server's final answer, when there was one
    reply: str = ""
    ok: bool = False
    transient: bool = False
    done: bool = False
    time: str | None = None


def envelope_address(address: str) -> tuple[str, bool]:
    """(address for the envelope and To, needs SMTPUTF8): IDN domains in ASCII form."""
    if address.isascii():
        return address, False
    local = address.rpartition("@")[0]
    if not local.isascii():
        return address, True
    try:
        ascii_domain = validate_email(address, check_deliverability=False).ascii_domain
    except EmailNotValidError:
        return address, True
    return f"{local}@{ascii_domain}", False


def subject_header(subject: str) -> bytes:
    """The Subject value: as it is when plain ASCII, else folded RFC 2047 encoded words."""
    if _PLAIN_SUBJECT.fullmatch(subject) and "=?" not in subject:
        return subject.encode("ascii")
    raw = subject.encode("utf-8")
    words = []
    start = 0
    while start < len(raw):
        end = min(start + _WORD_BYTES, len(raw))
        while end < len(raw) and (raw[end] & 0xC0) == 0x80:  # not inside a character
            end -= 1
        words.append(b"=?utf-8?b?" + binascii.b2a_base64(raw[start:end], newline=False) + b"?=")
        start = end
    return b"\r\n ".join(words)


def _body(text: str, boundary: bytes) -> tuple[bytes, bytes]:
    """(Content-Transfer-Encoding, encoded part) for a part whose lines end in CRLF."""
    raw = text.encode("utf-8")
    if raw.isascii() and not _LONG_LINE.search(raw) and boundary not in raw:
        return b"7bit", raw
    enc = binascii.b2a_base64(raw, newline=False)
    return b"base64", b"\r\n".join([enc[i : i + 76] for i in range(0, len(enc), 76)]) + b"\r\n"


def _addr(name: str, address: str) -> bytes:
    return email.utils.formataddr((name, envelope_address(address)[0]), charset="utf-8").encode()


class Composer:
    """Messages of one job: the head that every message shares is built once."""

    def __init__(self, plan: JobPlan) -> None:
        lst = plan.lst
        self.job = plan.name
        self.sender = envelope_address(lst.d_bounce_email or lst.d_from_email)[0]
        self.domain = envelope_address(lst.d_from_email)[0].rpartition("@")[2] or "localhost"
        self.boundary = f"=_mailpipe_{secrets.token_hex(12)}".encode()
        lines = [b"From: " + _addr(lst.d_from_name, lst.d_from_email)]
        if lst.d_sender_email:
            lines.append(b"Sender: " + _addr("", lst.d_sender_email))
        if lst.d_reply_to:
            lines.append(b"Reply-To: " + _addr("", lst.d_reply_to))
        self.head = b"\r\n".join(lines) + b"\r\n"
        tail = [b"MIME-Version: 1.0"]
        tail += [f"{n}: {v}".encode("ascii") for n, v in custom_headers(lst)]
        self.unsubscribe = not transactional(plan.job)
        if self.unsubscribe:
            tail.append(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click")
        tail.append(b'Content-Type: multipart/alternative; boundary="' + self.boundary + b'"')
        self.tail = b"\r\n".join(tail) + b"\r\n\r\n"
        part = b"Content-Type: text/%s; charset=utf-8\r\nContent-Transfer-Encoding: "
        self.text_head = b"--" + self.boundary + b"\r\n" + part % b"plain"
        self.html_head = b"\r\n--" + self.boundary + b"\r\n" + part % b"html"
        self.end = b"\r\n--" + self.boundary + b"--\r\n"

    def message_id(self, key: str) -> str:
        digest = hashlib.blake2b(f"{self.job}\0{key}".encode(), digest_size=16).hexdigest()
        return f"<{digest}@{self.domain}>"

    def compose(
        self,
        positions: list[int],
        emails: list[str],
        keys: list[str],
        merged: Merged,
        unsubscribe_urls: pa.Array | None,
    ) -> list[Outgoing]:
        """One message per recipient (all arrays in the same order)."""
        date = email.utils.format_datetime(dt.datetime.now(dt.UTC)).encode()
        subjects = merged.subject.to_pylist()
        texts = merged.text.to_pylist()
        htmls = merged.html.to_pylist()
        urls = unsubscribe_urls.to_pylist() if unsubscribe_urls is not None else None
        out = []
        # a loop per message: each is a distinct byte string that goes onto a socket
        for i, pos in enumerate(positions):
            rcpt, utf8 = envelope_address(emails[i])
            mid = self.message_id(keys[i])
            t_cte, t_body = _body(texts[i], self.boundary)
            h_cte, h_body = _body(htmls[i], self.boundary)
            extra = b"List-Unsubscribe: <" + urls[i].encode() + b">\r\n" if urls else b""
            data = b"".join(
                (
                    b"Date: ",
                    date,
                    b"\r\n",
                    self.head,
                    b"To: ",
                    rcpt.encode(),
                    b"\r\nSubject: ",
                    subject_header(subjects[i]),
                    b"\r\nMessage-ID: ",
                    mid.encode(),
                    b"\r\n",
                    extra,
                    self.tail,
                    self.text_head,
                    t_cte,
                    b"\r\n\r\n",
                    t_body,
                    self.html_head,
                    h_cte,
                    b"\r\n\r\n",
                    h_body,
                    self.end,
                )
            )
            out.append(
                Outgoing(
                    pos,
                    self.sender,
                    rcpt,
                    data.replace(b"\r\n.", b"\r\n..") + b".\r\n",
                    utf8 or not self.sender.isascii(),
                    mid,
                )
            )
        return out
