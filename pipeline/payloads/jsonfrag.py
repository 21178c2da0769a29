"""Build JSON text for whole columns at once, with Arrow string kernels.

A payload object is assembled from fragments: ``"KEY":VALUE`` pieces (null
when the value is missing, so the key is left out), joined with commas and
wrapped in braces. String values are escaped only in the rows flagged as
needing it, which extract already knows; everything else is concatenation.
"""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrowutil import json_escape, repeat_text
from pipeline.config import ProfileField

__all__ = [
    "array",
    "constant_member",
    "field",
    "literal",
    "member",
    "obj",
    "string_literal",
]

NULL_STR = pa.scalar(None, pa.string())


def key_text(name: str) -> str:
    """``"name":`` with the name JSON-escaped."""
    return orjson.dumps(name).decode() + ":"


def string_literal(col: pa.Array, esc: np.ndarray | None) -> pa.Array:
    """Strings → JSON string literals (null stays null)."""
    return pc.binary_join_element_wise('"', json_escape(col.cast(pa.string()), esc), '"', "")


def literal(col: pa.Array, spec: ProfileField | None, esc: np.ndarray | None) -> pa.Array:
    """A typed column → JSON literals: numbers and booleans bare, lists as arrays."""
    t = col.type
    if pa.types.is_integer(t):
        return pc.cast(col, pa.string())
    if pa.types.is_boolean(t):
        return pc.if_else(col, "true", "false")
    if pa.types.is_list(t):
        return pa.array(
            [None if v is None else orjson.dumps(v).decode() for v in col.to_pylist()], pa.string()
        )
    return string_literal(col, esc)


def member(name: str, value_json: pa.Array, lead: str = ",") -> pa.Array:
    """``,"name":value`` per row (its own leading comma), null where the value is null."""
    return pc.binary_join_element_wise(lead + key_text(name), value_json, "")


def field(name: str, col: pa.Array, esc: np.ndarray | None, lead: str = ",") -> pa.Array:
    """:func:`member` of a typed column; a string value costs one kernel call, quotes included."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pc.binary_join_element_wise(
            lead + key_text(name) + '"', json_escape(col.cast(pa.string()), esc), '"', ""
        )
    return member(name, literal(col, None, esc), lead)


def _joined(pieces: list[pa.Array], n: int) -> pa.Array:
    """The pieces of each row concatenated, null pieces left out, the first comma dropped.

    Not ``null_handling="skip"``: Arrow drops the rows whose pieces are all null
    from that result (a shorter array); ``replace`` keeps every row.
    """
    if not pieces:
        return repeat_text("", n)
    joined = pc.binary_join_element_wise(*pieces, "", null_handling="replace", null_replacement="")
    return pc.utf8_ltrim(joined, characters=",")


def obj(members: list[pa.Array], n: int) -> pa.Array:
    """``{members}`` per row; ``{}`` when every member is null."""
    return pc.binary_join_element_wise("{", _joined(members, n), "}", "")


def array(items: list[pa.Array], n: int) -> pa.Array:
    """``[items]`` per row, from items that carry their own leading comma (or are null)."""
    return pc.binary_join_element_wise("[", _joined(items, n), "]", "")


def constant_member(name: str, value: object, n: int) -> pa.Array:
    """``,"name":value`` with the same JSON value on every row."""
    text = "," + key_text(name) + orjson.dumps(value).decode()
    return repeat_text(text, n)
