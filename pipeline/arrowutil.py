"""Small vectorized helpers over Arrow string arrays, shared by the stages."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["blank_to_null", "is_ascii", "json_escape", "scatter", "to_bool_np", "trim"]


def is_ascii(col: pa.Array) -> bool:
    """True when every byte of a string array's values is ASCII (looks at the buffer)."""
    if len(col) == 0:
        return True
    if isinstance(col, pa.ChunkedArray):
        return all(is_ascii(c) for c in col.chunks)
    bufs = col.buffers()
    if bufs[2] is None:
        return True
    width = 8 if pa.types.is_large_string(col.type) else 4
    offsets = np.frombuffer(bufs[1], dtype=np.int64 if width == 8 else np.int32)
    lo, hi = int(offsets[col.offset]), int(offsets[col.offset + len(col)])
    data = np.frombuffer(bufs[2], dtype=np.uint8)[lo:hi]
    return data.size == 0 or int(data.max()) < 0x80


# the ASCII characters utf8_trim_whitespace strips (as Python's str.strip does):
# ascii_trim_whitespace leaves out the separators U+001C..U+001F, and a value must
# not be trimmed differently because another row of its column is not ASCII
_ASCII_SPACE = " \t\n\v\f\r\x1c\x1d\x1e\x1f"


def trim(col: pa.Array) -> pa.Array:
    """Strip surrounding whitespace, the same set as Python's ``str.strip()``, for every row."""
    if is_ascii(col):
        return pc.ascii_trim(col, characters=_ASCII_SPACE)
    return pc.utf8_trim_whitespace(col)


def blank_to_null(col: pa.Array) -> pa.Array:
    """Trim, and make empty strings null: an empty cell is a missing value."""
    t = trim(col)
    empty = pc.equal(pc.binary_length(t), 0)
    if not pc.any(empty).as_py():
        return t
    return pc.if_else(empty, pa.scalar(None, t.type), t)


def to_bool_np(mask: pa.Array, null_as: bool = False) -> np.ndarray:
    """A boolean Arrow array as a numpy bool array, nulls as ``null_as``."""
    return np.asarray(pc.fill_null(mask, null_as).to_numpy(zero_copy_only=False), dtype=bool)


def scatter(values: pa.Array, index: np.ndarray) -> pa.Array:
    """``values.take(index)`` where a negative index gives null."""
    if values.null_count == len(values):  # mostly-empty columns (messages, details) cost nothing
        return pa.nulls(len(index), values.type)
    missing = index < 0
    if not missing.any():
        return values.take(pa.array(index))
    return values.take(pa.array(np.where(missing, 0, index), mask=missing))


def json_escape(col: pa.Array, esc: np.ndarray | None = None) -> pa.Array:
    """Escape string values for a JSON string literal (quotes not added).

    Only rows flagged in ``esc`` (or, when it is None, rows that contain a
    character needing it) are touched; the rest pass through unchanged,
    which keeps the common case nearly free.
    """
    flag = to_bool_np(pc.match_substring_regex(col, r'["\\\x00-\x1f]')) if esc is None else esc
    idx = np.flatnonzero(flag)
    if idx.size == 0:
        return col
    import orjson

    rows = col.take(pa.array(idx)).to_pylist()
    # a handful of rows: orjson gives exactly JSON's escaping
    fixed = [None if v is None else orjson.dumps(v).decode()[1:-1] for v in rows]
    mask = np.zeros(len(col), dtype=bool)
    mask[idx] = True
    return pc.replace_with_mask(col, pa.array(mask), pa.array(fixed, col.type))
