"""Split a text file into blocks of whole records, with each record's physical line.

A record ends at a newline that is not inside a quoted value. Whether a newline
is inside quotes is the parity of the quote characters before it, which numpy
finds for a whole block at once; that is exact as long as every quote opens a
field, closes one or doubles another (RFC 4180). :class:`BlockScanner` yields
blocks cut on that rule, and :meth:`BlockScanner.rest` hands over the bytes it
has not yet yielded, for a reader that must take over when quoting turns out
to be irregular.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

__all__ = ["Block", "BlockScanner", "text_chunks"]

_NL, _CR = 10, 13
SNIFF_BYTES = 64 << 10


@dataclass
class Block:
    """Whole records: record ``i`` is ``data[starts[i]:ends[i]]`` (terminator excluded)."""

    data: bytes
    arr: np.ndarray
    newlines: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    first_line: int
    final: bool
    quotes: np.ndarray | None = None  # positions of the quote character, when one is set
    base: int = 0  # where ``data`` starts in the (decoded) stream

    @property
    def lines(self) -> np.ndarray:
        """Physical line (1-based) on which each record starts."""
        return self.first_line + np.searchsorted(self.newlines, self.starts)


class BlockScanner:
    """Iterate a stream of UTF-8 chunks as :class:`Block` objects."""

    def __init__(self, chunks: Iterator[bytes], quote: int | None) -> None:
        self._chunks = chunks
        self._quote = quote
        self._carry = b""
        self._pending = b""
        self._line = 1
        self._pos = 0

    def rest(self) -> Iterator[bytes]:
        """The bytes after the last yielded block, then every chunk not yet read."""
        carry, pending = self._carry, self._pending
        self._carry = self._pending = b""
        yield carry
        yield pending
        yield from self._chunks

    def __iter__(self) -> Iterator[Block]:
        self._pending = next(self._chunks, b"")
        while True:
            nxt = next(self._chunks, None)
            data = self._carry + self._pending if self._carry else self._pending
            self._carry = self._pending = b""
            final = nxt is None
            if not data:
                if final:
                    return
                self._pending = nxt or b""  # an empty chunk (a decoder still mid-character)
                continue
            arr = np.frombuffer(data, dtype=np.uint8)
            nl = np.flatnonzero(arr == _NL)
            qpos = None
            if self._quote is not None:
                qpos = np.flatnonzero(arr == self._quote)
                term = nl[(np.searchsorted(qpos, nl) & 1) == 0]
            else:
                term = nl
            if not final and term.size == 0:  # one record longer than the block: read on
                self._carry, self._pending = data, nxt or b""
                continue
            end = len(data) if final else int(term[-1]) + 1
            starts = np.concatenate(([0], term + 1)).astype(np.int64)
            ends = np.concatenate((term, [len(data)])).astype(np.int64)
            if not final or ends[-1] <= starts[-1]:
                starts, ends = starts[:-1], ends[:-1]
            ends = ends - ((ends > starts) & (arr[np.maximum(ends - 1, 0)] == _CR))
            if not final:
                self._carry = data[end:]
                self._pending = nxt or b""
            block = Block(
                data[:end] if end < len(data) else data,
                arr[:end],
                nl[nl < end],
                starts,
                ends,
                self._line,
                final,
                None if qpos is None else qpos[qpos < end],
                self._pos,
            )
            self._pos += end
            self._line += int(block.newlines.size)
            yield block
            if final:
                return


def text_chunks(
    path: str,
    encoding: str,
    block_bytes: int,
    hasher: Any | None = None,
    layout: dict[str, int] | None = None,
) -> Iterator[bytes]:
    """UTF-8 chunks of a text file, BOM removed, transcoded from ``encoding``.

    Raises ``ValueError`` with a user-facing reason when the start of the file
    shows it is binary or UTF-16 while UTF-8 was expected. ``hasher`` (a
    hashlib object) sees every byte of the file as read, so the file is read once.
    ``layout`` learns ``skip``, the bytes before the first chunk (a BOM), when the
    chunks are the file's own bytes; it stays empty when they were transcoded.
    """
    enc = codecs.lookup(encoding).name
    with open(path, "rb") as raw_fh:
        fh = _Hashing(raw_fh, hasher)
        # sniff a fixed amount whatever the block size, so that what is detected (BOM,
        # UTF-16, NUL bytes) does not depend on it; it is still handed on in blocks
        head = fh.read(SNIFF_BYTES)
        if enc == "utf-8":
            if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                raise ValueError(
                    "file is UTF-16, not UTF-8; re-save it as UTF-8 "
                    'or set encoding = "utf-16" on the source'
                )
            if layout is not None:
                layout["skip"] = len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0
            head = head.removeprefix(codecs.BOM_UTF8)
            if b"\x00" in head:
                raise ValueError(
                    "binary data (NUL bytes), not a text file; "
                    "check that this is the CSV/JSONL export"
                )
            yield from _pieces(head, block_bytes)
            while chunk := fh.read(block_bytes):
                yield chunk
            return
        decoder = codecs.getincrementaldecoder(enc)("replace")
        first = decoder.decode(head).removeprefix("\ufeff")
        if "\x00" in first:
            raise ValueError(f"binary data (NUL bytes) after decoding as {enc}")
        yield from _pieces(first.encode("utf-8"), block_bytes)
        while chunk := fh.read(block_bytes):
            yield decoder.decode(chunk).encode("utf-8")
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail.encode("utf-8")


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


class _Hashing:
    """A file reader that feeds what it reads to a hash."""

    def __init__(self, fh: BinaryIO, hasher: Any | None) -> None:
        self._fh = fh
        self._hasher = hasher

    def read(self, n: int) -> bytes:
        data = self._fh.read(n)
        if self._hasher is not None:
            self._hasher.update(data)
        return data
