"""The array percent-encoder is url_quote, byte for byte (the seeds' encoding)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.payloads.base import url_quote
from pipeline.payloads.urlencode import percent_encode, percent_encode_parts, quote_text


def test_the_seeds_subscriber_example() -> None:
    raw = b'{"email":"first.last@example.com"}'
    assert percent_encode(raw) == b"%7B%22email%22%3A%22first.last%40example.com%22%7D"


@given(st.text())
def test_percent_encode_is_url_quote(text: str) -> None:
    assert percent_encode(text.encode()).decode() == url_quote(text)


@given(st.lists(st.text(), min_size=1, max_size=8))
def test_parts_encode_each_slice_as_alone(parts: list[str]) -> None:
    raw = ",".join(parts).encode()
    cuts = [0]
    for p in parts:
        cuts.append(cuts[-1] + len(p.encode()))
        cuts.append(cuts[-1] + 1)  # the comma
    cuts = cuts[:-1]
    encoded, at = percent_encode_parts(raw, cuts)
    assert encoded.decode() == url_quote(",".join(parts))
    for i, p in enumerate(parts):
        assert encoded[at[2 * i] : at[2 * i + 1]].decode() == url_quote(p)


@given(st.text())
def test_quote_text_is_url_quote(text: str) -> None:
    assert quote_text(text) == url_quote(text)
