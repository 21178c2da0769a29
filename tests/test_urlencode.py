"""The array percent-encoder is url_quote, byte for byte (the seeds' encoding)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.payloads.base import url_quote
from pipeline.payloads.urlencode import percent_encode, quote_text


def test_the_seeds_subscriber_example() -> None:
    raw = b'{"email":"first.last@example.com"}'
    assert percent_encode(raw) == b"%7B%22email%22%3A%22first.last%40example.com%22%7D"


@given(st.text())
def test_percent_encode_is_url_quote(text: str) -> None:
    assert percent_encode(text.encode()).decode() == url_quote(text)


@given(st.text())
def test_quote_text_is_url_quote(text: str) -> None:
    assert quote_text(text) == url_quote(text)
