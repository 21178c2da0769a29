"""Vectorized email cleaning whose verdict is email-validator's, for every address.

A regular expression run over the whole column settles the common case: a
plain ASCII dot-atom local part and a plain ASCII host name that
email-validator is certain to accept. Everything else (IDN, quoted local
parts, odd lengths, ``--`` labels, special-use names, outright garbage) is
handed to :func:`email_validator.validate_email` one by one, so the final
verdict always equals the library's. Tests check that equivalence with
hypothesis.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from email_validator import EmailNotValidError, validate_email

from pipeline.arrowutil import scatter, to_bool_np, trim

__all__ = ["INVALID", "MISSING", "EmailVerdict", "check_emails"]

# the hyphen is escaped: last in this string it is followed by _LATIN in the class, and an
# unescaped "~-\x{00C0}" is a range that lets DEL, C1 controls, NBSP and SOFT HYPHEN through
_ATEXT = r"A-Za-z0-9_!#$%&'*+/=?^`{|}~\-"
# precomposed Latin letters (Latin-1 Supplement, Extended-A and -B, without × and ÷): the
# library accepts them in a local part (SMTPUTF8) and NFC leaves them as they are
_LATIN = r"\x{00C0}-\x{00D6}\x{00D8}-\x{00F6}\x{00F8}-\x{024F}"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TLD = r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z])?"
# what email-validator (check_deliverability=False) accepts for certain
FAST_ACCEPT = rf"^[{_ATEXT}{_LATIN}]+(?:\.[{_ATEXT}{_LATIN}]+)*@(?:{_LABEL}\.)+{_TLD}$"
# ... unless one of these holds, which the library judges itself: a special-use name, or
# "--" anywhere (one expression: one pass over the column)
_DOUBT = r"(?i)--|\.(?:arpa|invalid|local|localhost|onion|test)$"
_PROBLEMS = pa.array(["MISSING_EMAIL", "INVALID_EMAIL"])
MISSING, INVALID = 1, 2  # EmailVerdict.codes
_MAX_ADDRESS = 254  # bytes; a domain within it is within 253 too


@dataclass(frozen=True)
class EmailVerdict:
    """Per row: the cleaned address, and why it is not usable (or nulls)."""

    email: pa.Array  # trimmed; domain lower-cased when valid (all of it when asked)
    problem: pa.Array  # "MISSING_EMAIL" | "INVALID_EMAIL" | null
    message: pa.Array  # email-validator's explanation, or null
    codes: np.ndarray  # the problem as int8: 0 none, MISSING or INVALID


def _lower_domain(col: pa.Array) -> pa.Array:
    """``Local@Domain`` → ``Local@domain``, touching only rows with upper case after the @."""
    upper = pc.fill_null(pc.match_substring_regex(col, r"@[^@]*[A-Z]"), False)
    idx = np.flatnonzero(to_bool_np(upper))
    if idx.size == 0:
        return col
    rows = col.take(pa.array(idx))
    parts = pc.split_pattern(rows, "@", max_splits=1, reverse=True)
    fixed = pc.binary_join_element_wise(
        pc.list_element(parts, 0), pc.utf8_lower(pc.list_element(parts, 1)), "@"
    )
    return pc.replace_with_mask(col, upper, fixed)


def _lower_all(col: pa.Array, fast: np.ndarray) -> pa.Array:
    """The whole address lower-cased by ``str.lower``, the rule of the slow path and of the
    store's keys (``engine.ondemand._store_keys``). Arrow's ``utf8_lower`` differs on a few
    letters (İ → "i" where Python gives "i̇"; no final sigma), so Arrow only lowers ASCII
    (``ascii_lower``) and Python the non-ASCII rows the fast path keeps (the slow path
    replaces the others anyway)."""
    low = pc.ascii_lower(col)
    other = np.flatnonzero(fast & ~to_bool_np(pc.string_is_ascii(col), True))
    if other.size == 0:
        return low
    mask = np.zeros(len(col), dtype=bool)
    mask[other] = True
    fixed = [s.lower() for s in col.take(pa.array(other)).to_pylist()]
    return pc.replace_with_mask(low, pa.array(mask), pa.array(fixed, pa.string()))


def check_emails(col: pa.Array, lowercase_all: bool = False) -> EmailVerdict:
    """Clean and validate a column of addresses.

    >>> v = check_emails(pa.array([" Ann@Example.COM ", "bad", None]))
    >>> v.email.to_pylist(), v.problem.to_pylist()
    (['Ann@example.com', 'bad', None], [None, 'INVALID_EMAIL', 'MISSING_EMAIL'])
    """
    n = len(col)
    trimmed = trim(col.cast(pa.string()))
    missing = pc.fill_null(pc.equal(trimmed, ""), True)
    fast = pc.and_(
        pc.fill_null(pc.match_substring_regex(trimmed, FAST_ACCEPT), False),
        pc.invert(pc.fill_null(pc.match_substring_regex(trimmed, _DOUBT), True)),
    )
    fast = pc.fill_null(
        pc.and_(fast, pc.less_equal(pc.binary_length(trimmed), _MAX_ADDRESS)), False
    )
    fast_np = to_bool_np(fast)
    missing_np = to_bool_np(missing, True)
    cleaned = _lower_all(trimmed, fast_np) if lowercase_all else _lower_domain(trimmed)
    email_out = pc.if_else(fast, cleaned, trimmed)
    slow = np.flatnonzero(~fast_np & ~missing_np)
    codes = missing_np.astype(np.int8)  # MISSING where missing
    said = np.full(n, -1, dtype=np.int64)  # per row: its message among ``messages``, or -1
    messages: list[str] = []
    if slow.size:
        # the library decides every address the expression is not sure of
        values = trimmed.take(pa.array(slow)).to_pylist()
        fixed: list[str | None] = []
        for i, addr in zip(slow.tolist(), values):
            try:
                v = validate_email(addr, check_deliverability=False)
            except EmailNotValidError as e:
                codes[i] = INVALID
                said[i] = len(messages)
                messages.append(str(e))
                fixed.append(addr)
            else:
                good = unicodedata.normalize("NFC", addr.rsplit("@", 1)[0]) + "@" + v.domain
                fixed.append(good.lower() if lowercase_all else good)
        mask = np.zeros(n, dtype=bool)
        mask[slow] = True
        email_out = pc.replace_with_mask(email_out, pa.array(mask), pa.array(fixed, pa.string()))
    return EmailVerdict(
        email=email_out,
        problem=scatter(_PROBLEMS, codes.astype(np.int64) - 1),
        message=scatter(pa.array(messages, pa.string()), said),
        codes=codes,
    )
