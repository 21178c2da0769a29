"""Buffer-level helpers over Arrow strings: their verdict is the per-value one."""

from __future__ import annotations

import json

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.arrowutil import escape_rows, json_escape

SPECIAL = '"\\\x00\x01\x1f\x7f é\u2028\u3000ab'
values = st.lists(
    st.one_of(st.none(), st.text(), st.text(alphabet=SPECIAL, max_size=8)), max_size=30
)


def must_escape(v: str | None) -> bool:
    return v is not None and any(c in '"\\' or ord(c) < 0x20 for c in v)


@settings(max_examples=300, deadline=None)
@given(values, st.data())
def test_escape_rows_flags_exactly_the_values_json_must_escape(
    vals: list[str | None], data: st.DataObject
) -> None:
    want = [must_escape(v) for v in vals]
    for typ in (pa.string(), pa.large_string()):
        col = pa.array(vals, typ)
        assert escape_rows(col).tolist() == want
        # a slice (offsets not starting at 0) and a chunked column
        lo = data.draw(st.integers(0, len(vals)))
        assert escape_rows(col.slice(lo)).tolist() == want[lo:]
        chunked = pa.chunked_array([col.slice(0, lo), col.slice(lo)], typ)
        assert escape_rows(chunked).tolist() == want


@settings(max_examples=200, deadline=None)
@given(values)
def test_json_escape_gives_json_string_contents(vals: list[str | None]) -> None:
    got = json_escape(pa.array(vals, pa.string())).to_pylist()
    for v, g in zip(vals, got):
        assert (g is None) == (v is None)
        if v is not None:
            assert json.loads(f'"{g}"') == v
