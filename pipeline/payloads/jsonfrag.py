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

from pipeline.arrowutil import json_escape
from pipeline.config import ProfileField

__all__ = ["join_members", "literal", "member", "obj", "string_literal"]

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


def member(name: str, value_json: pa.Array) -> pa.Array:
    """``"name":value`` per row, null where the value is null."""
    return pc.binary_join_element_wise(key_text(name), value_json, "")


def join_members(members: list[pa.Array], n: int) -> pa.Array:
    """Comma-join the non-null members of each row ("" when all are null).

    Not with ``null_handling="skip"``: Arrow leaves the rows whose members are all null
    out of that result (a shorter array), so each member brings its own comma instead
    and the last one is cut off.
    """
    if not members:
        return pa.array([""] * n, pa.string())
    pieces = [pc.fill_null(pc.binary_join_element_wise(m, ",", ""), "") for m in members]
    return pc.utf8_slice_codeunits(pc.binary_join_element_wise(*pieces, ""), 0, -1)


def obj(members: list[pa.Array], n: int) -> pa.Array:
    """``{members}`` per row."""
    return pc.binary_join_element_wise("{", join_members(members, n), "}", "")


def constant(value: object, n: int) -> pa.Array:
    """The same JSON value on every row."""
    return pa.array(np.full(n, orjson.dumps(value).decode(), dtype=object), pa.string())
