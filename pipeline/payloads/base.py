"""What every payload builder offers, and the pieces they share."""

from __future__ import annotations

import os
from urllib.parse import quote

import numpy as np
import orjson
import pyarrow as pa

from pipeline.config import HttpConfig, JobPlan
from pipeline.payloads.jsonfrag import field

__all__ = ["REDACTED", "Builder", "encoded_bytes", "url_quote"]

REDACTED = "***"


def url_quote(text: str) -> str:
    """Percent-encode a query value as the seeds do: ``{"email":…}`` → ``%7B%22email%22…``."""
    return quote(text, safe="")


_KEEP = np.zeros(256, dtype=bool)
_KEEP[[ord(c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.~-"]] = True


def encoded_bytes(json_text: pa.Array) -> np.ndarray:
    """Bytes each value takes once percent-encoded (unreserved bytes stay, others ×3).

    Counted over the string buffer with a byte lookup table and one segmented
    sum, not with a regular expression (which costs ten times as much).
    """
    arr = json_text.cast(pa.large_string())
    if len(arr) == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[
        arr.offset : arr.offset + len(arr) + 1
    ]
    lengths = np.diff(offsets)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    where = np.flatnonzero(~_KEEP[data])
    bounds = np.searchsorted(where, offsets - offsets[0])
    return np.asarray(lengths + 2 * np.diff(bounds), dtype=np.int64)


class Builder:
    """Base of the three builders.

    ``items`` renders one JSON object per record (what is really sent),
    ``redacted`` the same with secrets replaced by ``***`` (what the request
    files keep), ``costs``/``budget`` bound a batch by URL length where the
    target sends by GET, ``envelope`` wraps a batch's items into the
    request file, and ``commutes`` says which requests to one address may
    overtake each other.

    ``http`` is ``delivery.http`` of the run's config: the endpoints the senders
    use, so that the URL in a request file is the one really (or, in another
    mode, the one that would be) requested. Without it the defaults stand.
    """

    target = ""
    list_open = "["

    def __init__(self, plan: JobPlan, http: HttpConfig | None = None) -> None:
        self.plan = plan
        self.http = http if http is not None else HttpConfig()
        self.batch_size = plan.job.batch_size

    def items(self, rows: pa.Table) -> pa.Array:
        raise NotImplementedError

    def redacted(self, items: pa.Array) -> pa.Array:
        return items

    def costs(self, items: pa.Array) -> np.ndarray | None:
        return None

    def budget(self) -> int | None:
        return None

    def commutes(self, rows: pa.Table) -> pa.Array | None:
        """Per recipient, a value such that the recipients of one address that all carry
        the same (non-null) value leave the platform's answers and state alike in any
        order, so their requests need not wait for each other; None: every request
        carrying an address waits for the earlier ones carrying it."""
        return None

    def envelope(self, batch_id: str) -> tuple[bytes, bytes]:
        """Bytes before and after the comma-joined items of one batch."""
        raise NotImplementedError

    # shared pieces

    def _head(self, batch_id: str, method: str, url: str | None) -> dict[str, object]:
        return {
            "batch": batch_id,
            "job": self.plan.name,
            "target": self.target,
            "method": method,
            "url": url,
        }

    @staticmethod
    def _open(head: dict[str, object], key: str) -> bytes:
        """``{"batch":…,…,"key":[`` — the head of an envelope whose last member is a list."""
        return orjson.dumps(head)[:-1] + b"," + orjson.dumps(key) + b":["

    def profile_members(self, rows: pa.Table, esc: np.ndarray | None) -> list[pa.Array]:
        """``,"FIELD":value`` for each profile field the job sends (see :func:`jsonfrag.obj`)."""
        return [
            field(name, rows.column(f"f:{name}").combine_chunks(), esc) for name in self.plan.fields
        ]


def secret_from_env(name: str | None) -> str | None:
    return os.environ.get(name) if name else None
