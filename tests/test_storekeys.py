"""The engine matches addresses to the store exactly as ``email_key`` (``str.lower``) does."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from pipeline.engine.ondemand import _store_keys


@given(st.lists(st.one_of(st.none(), st.text(), st.emails()), max_size=30))
def test_store_keys_are_python_lower_case_of_every_text(emails: list[str | None]) -> None:
    got = _store_keys(pa.array(emails, pa.string())).tolist()
    assert got == [(e or "").lower() for e in emails]


def test_store_keys_of_mixed_case_and_non_ascii_addresses() -> None:
    emails = ["Ann@Example.COM", None, "ÄRGER@Exämple.de", "ΣΑΣ@x.gr", "İ@x.tr"]
    assert _store_keys(pa.array(emails, pa.string())).tolist() == [
        "ann@example.com",
        "",
        "ärger@exämple.de",
        "σας@x.gr",
        "i̇@x.tr",
    ]
