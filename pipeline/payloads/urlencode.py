"""Percent-encoding at array speed, byte for byte what :func:`.base.url_quote` does.

A ``recip`` parameter of 8,000 bytes goes through ``urllib.parse.quote`` one
byte at a time in Python (about half a millisecond); thousands of trigger URLs
a second need the same result from one table lookup and a few array
operations. Unreserved bytes (``A-Z a-z 0-9 _ . ~ -``) stay, every other byte
becomes ``%XX`` with upper-case hex digits — UTF-8 bytes one by one, as
``quote(text, safe="")`` does.

    >>> percent_encode('{"email":"first.last@example.com"}'.encode())
    b'%7B%22email%22%3A%22first.last%40example.com%22%7D'
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.payloads.base import _KEEP

__all__ = ["percent_encode", "quote_text"]

_HEX = np.frombuffer(b"0123456789ABCDEF", dtype=np.uint8)
_PERCENT = ord("%")


def percent_encode(raw: bytes) -> bytes:
    """``raw`` (UTF-8 text) percent-encoded as a query value."""
    data = np.frombuffer(raw, dtype=np.uint8)
    escape = ~_KEEP[data]
    if not escape.any():
        return raw
    width = np.where(escape, 3, 1)
    ends = np.cumsum(width)
    starts = ends - width
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    keep = ~escape
    out[starts[keep]] = data[keep]
    at = starts[escape]
    byte = data[escape]
    out[at] = _PERCENT
    out[at + 1] = _HEX[byte >> 4]
    out[at + 2] = _HEX[byte & 15]
    return out.tobytes()


# yarl's C quoter (yarl comes with aiohttp) leaves RFC 3986's sub-delims as they are, which
# ``quote(text, safe="")`` escapes: it does the bulk of the work, the replaces the rest
try:
    from yarl._quoting import _Quoter

    _quoter: Callable[[str], str] | None = _Quoter(safe="", requote=False)
except ImportError:  # pragma: no cover - yarl without its quoter: the array encoder
    _quoter = None
_SUB_DELIMS = [(c, f"%{ord(c):02X}") for c in "!$&'()*+,;="]


def quote_text(text: str) -> str:
    """``text`` percent-encoded as a query value, exactly :func:`.base.url_quote`, at C speed.

    Five times faster than :func:`percent_encode` on a trigger URL's ``recip``
    (no arrays to set up per call), so each URL is encoded on its own.

        >>> quote_text('{"a":"b, c"}')
        '%7B%22a%22%3A%22b%2C%20c%22%7D'
    """
    if _quoter is None:
        return percent_encode(text.encode()).decode("ascii")
    out = _quoter(text)
    for char, escaped in _SUB_DELIMS:
        if char in out:
            out = out.replace(char, escaped)
    return out
