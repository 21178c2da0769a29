"""The extract layer: CSV / JSONL / Parquet files → record batches with provenance.

What is checked, whatever the block size the file is read in: every non-blank
record becomes exactly one row with the physical line it starts on, the values
a real CSV parser (Python's ``csv``) sees, a reject reason where the record
cannot be read, and a file that cannot be read at all fails with its path and
a fix before any row comes out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import extract
from pipeline.config import SourceConfig
from pipeline.errors import InputFileError
from pipeline.extract import (
    BLOCK_BYTES,
    FileStats,
    extract_file,
    extracted_schema,
    record_text,
)

CASES = Path(__file__).resolve().parent / "cases"
BLOCK_SIZES = (1 << 20, 64, 7, 1)
NOT_UTF8 = "bytes that are not UTF-8"
_JSON_UNSAFE = re.compile(r'["\\\x00-\x1f]')

ORDERS = SourceConfig(
    kind="orders",
    path="x",
    email="email",
    record_id="order_id",
    fields={"FIRST_NAME": "first_name", "NOTE": "note"},
)


# -- helpers ---------------------------------------------------------------------


def run(
    path: Path, source: SourceConfig, block_bytes: int = BLOCK_BYTES, file_id: int = 0
) -> tuple[list[dict[str, Any]], FileStats]:
    """All rows of one file (as dicts) and its stats; every batch has the documented schema."""
    stats = FileStats(str(path))
    schema = extracted_schema(source)
    rows: list[dict[str, Any]] = []
    for batch in extract_file(str(path), file_id, source, stats, block_bytes=block_bytes):
        assert batch.schema == schema
        rows.extend(batch.to_pylist())
    return rows, stats


def values(row: dict[str, Any], source: SourceConfig) -> dict[str, Any]:
    return {name: row[name] for name in source.columns()}


def assert_esc_sound(rows: list[dict[str, Any]], source: SourceConfig) -> None:
    """``_esc`` may be over-cautious, never wrong: payload builders skip escaping without it."""
    for r in rows:
        if any(isinstance(v, str) and _JSON_UNSAFE.search(v) for v in values(r, source).values()):
            assert r["_esc"] is True, r


def text_of(path: Path | str, row: dict[str, Any]) -> str | None:
    """A record's text: kept by extract (rejects), else read back from the file by offset."""
    if row["_raw"] is not None:
        return str(row["_raw"])
    assert row["_offset"] is not None, row
    return record_text(str(path), row["_offset"], row["_length"])


def snapshot(path: Path, source: SourceConfig, block_bytes: int) -> tuple[Any, ...]:
    """What must not depend on the block size: every row (but the ``_esc`` hint) and the stats.

    A record's text is compared, not where it was kept: with irregular quoting,
    where the stdlib reader takes over depends on the block size.
    """
    rows, stats = run(path, source, block_bytes)
    assert_esc_sound(rows, source)
    assert stats.rows == len(rows)
    skip = {"_esc", "_raw", "_offset", "_length"}
    kept = [
        {**{k: v for k, v in r.items() if k not in skip}, "text": text_of(path, r)} for r in rows
    ]
    return kept, (stats.rows, stats.rejects, stats.blank_lines, stats.sha256, stats.columns)


def assert_block_independent(path: Path, source: SourceConfig) -> tuple[Any, ...]:
    base = snapshot(path, source, BLOCK_SIZES[0])
    for bs in BLOCK_SIZES[1:]:
        assert snapshot(path, source, bs) == base, f"block_bytes={bs}"
    return base


def first_batch(path: Path, source: SourceConfig, block_bytes: int = BLOCK_BYTES) -> Any:
    stats = FileStats(str(path))
    return next(iter(extract_file(str(path), 0, source, stats, block_bytes=block_bytes)))


# -- 1. the hostile CSV ------------------------------------------------------------

LONG_VALUE = "x" * 99_999 + "é"  # 100,000 characters


def hostile_bytes() -> bytes:
    """The content of ``cases/hostile.csv``, one physical line (or record) per entry."""
    return b"".join(
        [
            b"\xef\xbb\xbforder_id,email,first_name,note\r\n",  # 1: BOM + header
            b"1,anna@example.com,Anna,plain\r\n",  # 2
            b'2,ben@example.com,"Ben\r\nBenson","two, lines"\r\n',  # 3-4: CRLF in quotes
            b"3,carl@example.com,Carl\r\n",  # 5: ragged (3 fields)
            b"\r\n",  # 6: blank
            b"4,dora@example.com,D\xff\xfera,bad\r\n",  # 7: not UTF-8 (byte 21)
            b"5,eve@example.com,Eve," + LONG_VALUE.encode() + b"\r\n",  # 8: long field
            b'6,finn@example.com,"Say ""hi""","a ""quoted"" word"\r\n',  # 9: doubled quotes
            b'7,gus@example.com,"","x,y,z"\r\n',  # 10: empty quoted field
            '8,hé@example.com,Hélène,"multi\nline\nLF"\r\n'.encode(),  # 11-13: LF in quotes
            b"9,ivy@example.com,Ivy,a,b,c\r\n",  # 14: ragged (6 fields)
            b"10,jo@example.com,Jo,no newline at end",  # 15: no final line break
        ]
    )


HOSTILE = CASES / "hostile.csv"


def test_hostile_case_file_is_what_its_generator_says() -> None:
    assert HOSTILE.read_bytes() == hostile_bytes()


def test_hostile_csv_lines_values_rejects_and_stats() -> None:
    rows, stats = run(HOSTILE, ORDERS)

    got = [(r["_line"], r["record_id"], r["_reject"]) for r in rows]
    assert [(line, rid) for line, rid, _ in got] == [
        (2, "1"),
        (3, "2"),
        (5, None),
        (7, None),
        (8, "5"),
        (9, "6"),
        (10, "7"),
        (11, "8"),
        (14, None),
        (15, "10"),
    ]
    by_line = {r["_line"]: r for r in rows}
    ok = {line: values(r, ORDERS) for line, r in by_line.items() if r["_reject"] is None}
    assert ok == {
        2: {
            "email": "anna@example.com",
            "record_id": "1",
            "f:FIRST_NAME": "Anna",
            "f:NOTE": "plain",
        },
        3: {
            "email": "ben@example.com",
            "record_id": "2",
            "f:FIRST_NAME": "Ben\r\nBenson",
            "f:NOTE": "two, lines",
        },
        8: {
            "email": "eve@example.com",
            "record_id": "5",
            "f:FIRST_NAME": "Eve",
            "f:NOTE": LONG_VALUE,
        },
        9: {
            "email": "finn@example.com",
            "record_id": "6",
            "f:FIRST_NAME": 'Say "hi"',
            "f:NOTE": 'a "quoted" word',
        },
        10: {"email": "gus@example.com", "record_id": "7", "f:FIRST_NAME": "", "f:NOTE": "x,y,z"},
        11: {
            "email": "hé@example.com",
            "record_id": "8",
            "f:FIRST_NAME": "Hélène",
            "f:NOTE": "multi\nline\nLF",
        },
        15: {
            "email": "jo@example.com",
            "record_id": "10",
            "f:FIRST_NAME": "Jo",
            "f:NOTE": "no newline at end",
        },
    }
    assert len(ok[8]["f:NOTE"]) == 100_000

    # rejects: the reason, the line, no values, and the record's own text
    assert by_line[5]["_reject"] == "row has 3 fields, the header has 4"
    assert by_line[14]["_reject"] == "row has 6 fields, the header has 4"
    assert by_line[7]["_reject"].startswith(f"{NOT_UTF8} at byte 21;")
    assert "encoding" in by_line[7]["_reject"]
    for line in (5, 7, 14):
        assert all(v is None for v in values(by_line[line], ORDERS).values())
    assert by_line[5]["_raw"] == "3,carl@example.com,Carl"
    assert by_line[7]["_raw"] == "4,dora@example.com,D\\xff\\xfera,bad"
    assert text_of(HOSTILE, by_line[3]) == '2,ben@example.com,"Ben\r\nBenson","two, lines"'
    assert text_of(HOSTILE, by_line[15]) == "10,jo@example.com,Jo,no newline at end"
    assert by_line[3]["_raw"] is None  # a good record's text stays in the file
    assert {r["_file"] for r in rows} == {0}

    # every non-blank record is one output row, rejects included; the blank line is none
    assert stats.rows == len(rows) == 10
    assert stats.rejects == 3 == sum(r["_reject"] is not None for r in rows)
    assert stats.blank_lines == 1
    assert stats.columns == ["order_id", "email", "first_name", "note"]  # BOM gone
    assert stats.format == "csv"
    assert stats.bytes == len(hostile_bytes())
    assert stats.sha256 == hashlib.sha256(hostile_bytes()).hexdigest()
    assert_esc_sound(rows, ORDERS)


def test_file_id_is_carried_on_every_row() -> None:
    rows, _ = run(HOSTILE, ORDERS, file_id=7)
    assert {r["_file"] for r in rows} == {7}


# -- 2. block-boundary independence ----------------------------------------------


def test_hostile_csv_is_the_same_for_every_block_size() -> None:
    rows, stats = assert_block_independent(HOSTILE, ORDERS)
    assert len(rows) == 10 and stats[:3] == (10, 3, 1)


_PIECES = ["plain", "a,b", 'say "x"', "line\nbreak", "crlf\r\nbreak", "", " ", "é", "日本", "🙂"]


def _generated_csv(path: Path, seed: int) -> list[tuple[int, list[str] | None]]:
    """A larger mixed CSV (LF and CRLF, blank, ragged and non-UTF-8 records).

    Returns each record's start line and its values (None: a reject is expected).
    """
    rng = random.Random(seed)
    out = bytearray(b"id,email,name,note,extra\n")
    expected: list[tuple[int, list[str] | None]] = []
    for i in range(700):
        term = rng.choice(["\n", "\r\n"])
        kind = rng.random()
        if kind < 0.05:
            out += term.encode()
            continue
        row = [str(i), f"u{i}@example.com"] + [
            "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 3))) for _ in range(3)
        ]
        if rng.random() < 0.02:
            row[3] = "z" * rng.randint(100, 3000)
        good: list[str] | None = row
        if kind < 0.10:
            row = row[: rng.choice([1, 4])] if rng.random() < 0.5 else [*row, "more"]
            good = None
        elif kind < 0.14:
            row[2] = "bad\udcff" + row[2]  # written as the byte 0xff
            good = None
        buf = io.StringIO()
        csv.writer(buf, lineterminator=term).writerow(row)
        expected.append((out.count(b"\n") + 1, good))
        out += buf.getvalue().encode("utf-8", "surrogateescape")
    path.write_bytes(bytes(out))
    return expected


GENERATED = SourceConfig(
    kind="orders",
    path="x",
    email="email",
    record_id="id",
    fields={"NAME": "name", "NOTE": "note"},
)


def test_generated_csv_is_right_and_the_same_for_every_block_size(tmp_path: Path) -> None:
    path = tmp_path / "gen.csv"
    expected = _generated_csv(path, seed=20261120)
    rows, stats = assert_block_independent(path, GENERATED)
    assert [r["_line"] for r in rows] == [line for line, _ in expected]
    for r, (line, want) in zip(rows, expected):
        if want is None:
            assert r["_reject"] is not None, line
        else:
            assert r["_reject"] is None, (line, r["_reject"])
            assert [r["record_id"], r["email"], r["f:NAME"], r["f:NOTE"]] == want[:4], line
    assert stats[0] == len(expected)
    assert stats[1] == sum(want is None for _, want in expected) > 0


def test_a_value_starting_with_u_feff_is_kept(tmp_path: Path) -> None:
    # not a byte-order mark: the file's BOM is gone, this one starts a record
    path = tmp_path / "feff.csv"
    path.write_bytes("c0,c1\n\ufeffa,b\nc,d\n\ufeffe,f\n".encode())
    source = SourceConfig(kind="signups", path="x", email="c0", fields={"F1": "c1"})
    rows, _ = assert_block_independent(path, source)
    assert [(r["_line"], r["email"]) for r in rows] == [(2, "\ufeffa"), (3, "c"), (4, "\ufeffe")]


# -- 3. irregular quoting: the stdlib fallback -------------------------------------

IRREGULAR = (
    b"id,email,note\n"  # 1
    b'1,a@example.com,"regular, quoted"\n'  # 2
    b"2,b@example.com,D\xffx\n"  # 3: not UTF-8, before the irregular part
    b"\n"  # 4: blank
    b'3,c@example.com,5" screen\n'  # 5: a quote inside an unquoted field
    b'4,d@example.com,"abc"x\n'  # 6: text after a closing quote
    b'5,e@example.com,"multi\n'  # 7
    b'line"\n'  # 8
    b"\n"  # 9: blank
    b"6,f@example.com,plain,extra\n"  # 10: ragged
    b'7,g@example.com,"ok"\r\n'  # 11
    b'8,h@example.com,"unterminated\n'  # 12
    b"to the end\n"  # 13
)
IRR_SOURCE = SourceConfig(
    kind="orders", path="x", email="email", record_id="id", fields={"N": "note"}
)


def test_irregular_quoting_falls_back_and_keeps_lines(tmp_path: Path) -> None:
    path = tmp_path / "irregular.csv"
    path.write_bytes(IRREGULAR)
    rows, stats = run(path, IRR_SOURCE)
    got = [(r["_line"], r["record_id"], r["f:N"]) for r in rows]
    assert got == [
        (2, "1", "regular, quoted"),
        (3, None, None),
        (5, "3", '5" screen'),
        (6, None, None),
        (7, "5", "multi\nline"),
        (10, None, None),
        (11, "7", "ok"),
        (12, None, None),
    ]
    reasons = {r["_line"]: r["_reject"] for r in rows if r["_reject"]}
    assert reasons[3].startswith(f"{NOT_UTF8} at byte 18;")
    assert reasons[6].startswith("malformed CSV quoting")
    assert reasons[10] == "row has 4 fields, the header has 3"
    assert reasons[12].startswith("malformed CSV quoting")
    assert {r["_line"]: r["_raw"] for r in rows}[6] == '4,d@example.com,"abc"x'
    assert (stats.rows, stats.rejects, stats.blank_lines) == (8, 4, 2)
    assert_esc_sound(rows, IRR_SOURCE)


def test_irregular_quoting_is_the_same_for_every_block_size(tmp_path: Path) -> None:
    path = tmp_path / "irregular.csv"
    path.write_bytes(IRREGULAR)
    _, stats = assert_block_independent(path, IRR_SOURCE)
    assert stats[:3] == (8, 4, 2)


def test_unterminated_quote_in_a_regular_file_is_one_reject(tmp_path: Path) -> None:
    path = tmp_path / "unterminated.csv"
    path.write_bytes(b'id,email,note\n1,a@x.org,ok\n2,b@x.org,ok\n3,c@x.org,"runs on\nand on\n')
    rows, stats = assert_block_independent(path, IRR_SOURCE)
    assert [(r["_line"], r["record_id"]) for r in rows] == [(2, "1"), (3, "2"), (4, None)]
    assert rows[2]["_reject"] == (
        "unterminated quote: this record runs to the end of the file (2 lines from here)"
    )
    assert stats[:2] == (3, 1)


def test_fallback_reads_fields_longer_than_the_csv_module_limit(tmp_path: Path) -> None:
    big = "y" * 200_000  # the csv module refuses fields over 131,072 characters by default
    path = tmp_path / "big.csv"
    path.write_bytes(f'id,email,note\n1,a@x.org,5" screen\n2,b@x.org,{big}\n'.encode())
    rows, _ = run(path, IRR_SOURCE)
    assert [(r["_line"], r["_reject"]) for r in rows] == [(2, None), (3, None)]
    assert rows[1]["f:N"] == big


# -- 4. property: the same records as Python's csv module -----------------------------

_CELL_PIECE = st.one_of(
    st.sampled_from([",", '"', '""', "\n", "\r\n", " ", "é", "🙂", "x y", "\ufeff", "\t", "'"]),
    # a lone CR is left out: csv.writer does not quote it, and csv.reader rejects it
    st.text(st.characters(codec="utf-8", exclude_characters="\r\x00"), max_size=4),
)
_CELL = st.lists(_CELL_PIECE, max_size=3).map("".join)


@st.composite
def _tables(draw: st.DrawFn) -> tuple[int, list[list[str]]]:
    ncols = draw(st.integers(1, 4))
    width = st.one_of(st.just(ncols), st.just(ncols), st.just(ncols), st.integers(0, ncols + 1))
    rows = draw(
        st.lists(width.flatmap(lambda w: st.lists(_CELL, min_size=w, max_size=w)), max_size=10)
    )
    return ncols, rows


def _reference(text: str) -> tuple[list[tuple[int, list[str]]], int]:
    """Records with the physical line they start on, and the blank lines, per ``csv.reader``."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    reader = csv.reader(lines)
    records: list[tuple[int, list[str]]] = []
    blank = 0
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        if row:
            records.append((start, row))
        else:
            blank += 1
    return records, blank


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=_tables(),
    term=st.sampled_from(["\n", "\r\n"]),
    block_bytes=st.sampled_from(BLOCK_SIZES),
    poison=st.none() | st.integers(0, 10),
)
def test_records_match_python_csv(
    tmp_path_factory: pytest.TempPathFactory,
    table: tuple[int, list[list[str]]],
    term: str,
    block_bytes: int,
    poison: int | None,
) -> None:
    ncols, body = table
    header = [f"c{i}" for i in range(ncols)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=term)
    writer.writerow(header)
    for i, row in enumerate([*body, None]):
        if i == min(poison if poison is not None else -1, len(body)):
            # a quote inside an unquoted field: the stdlib reads on from its block
            buf.write('zz"z' + "," * (ncols - 1) + term)
        if row is not None:
            writer.writerow(row)
    text = buf.getvalue()
    path = tmp_path_factory.mktemp("prop") / "t.csv"
    path.write_bytes(text.encode())

    source = SourceConfig(
        kind="signups", path="x", email="c0", fields={f"F{i}": f"c{i}" for i in range(1, ncols)}
    )
    rows, stats = run(path, source, block_bytes)
    records, blank = _reference(text)
    assert records[0] == (1, header)
    records = records[1:]

    assert [r["_line"] for r in rows] == [line for line, _ in records]
    for r, (line, rec) in zip(rows, records):
        if len(rec) == ncols:
            assert r["_reject"] is None, (line, r["_reject"])
            assert [r["email"]] + [r[f"f:F{i}"] for i in range(1, ncols)] == rec, line
        else:
            assert r["_reject"] == f"row has {len(rec)} fields, the header has {ncols}", line
    assert stats.rows == len(records)
    assert stats.rejects == sum(len(rec) != ncols for _, rec in records)
    assert stats.blank_lines == blank
    assert_esc_sound(rows, source)


# -- 5. JSON Lines ----------------------------------------------------------------------

JSONL = SourceConfig(
    kind="signups",
    path="x",
    email="email",
    record_id="order_id",
    fields={"FIRST_NAME": "first_name", "VIP": "vip", "TAGS": "tags", "SCORE": "score"},
)


def _jsonl_bytes() -> bytes:
    return b"".join(
        [
            b'{"email": "b@example.com", "order_id": 2, broken\n',  # 1: not JSON
            b'{"email":"a@example.com","order_id":1,"first_name":"Ann","vip":true,'
            b'"tags":["a","b"]}\n',  # 2
            b"\n",  # 3: blank
            b"[1, 2, 3]\n",  # 4: an array
            b'"just a string"\r\n',  # 5: a string
            b"   \n",  # 6: blank (spaces)
            b'{"email":"c@example.com","order_id":"C-3","first_name":null,"vip":false,'
            b'"tags":{"k":"v"},"score":1.5}\n',  # 7
            b"null\n",  # 8
            '{"email":"d@example.com","order_id":12345678901234,'
            '"first_name":"Dé \\"q\\" \\\\ b","vip":0}'.encode(),  # 9: no final newline
        ]
    )


def test_jsonl_rejects_blank_lines_and_values_as_text(tmp_path: Path) -> None:
    path = tmp_path / "signups.jsonl"
    path.write_bytes(_jsonl_bytes())
    rows, stats = run(path, JSONL)
    assert [r["_line"] for r in rows] == [1, 2, 4, 5, 7, 8, 9]
    by_line = {r["_line"]: r for r in rows}
    assert by_line[1]["_reject"].startswith("not valid JSON")
    assert by_line[1]["_raw"] == '{"email": "b@example.com", "order_id": 2, broken'
    assert "not an object" in by_line[4]["_reject"] and "list" in by_line[4]["_reject"]
    assert "not an object" in by_line[5]["_reject"] and "str" in by_line[5]["_reject"]
    assert "not an object" in by_line[8]["_reject"]
    for line in (1, 4, 5, 8):
        assert all(v is None for v in values(by_line[line], JSONL).values())
    assert values(by_line[2], JSONL) == {
        "email": "a@example.com",
        "record_id": "1",
        "f:FIRST_NAME": "Ann",
        "f:VIP": "true",
        "f:TAGS": '["a","b"]',
        "f:SCORE": None,
    }
    assert values(by_line[7], JSONL) == {
        "email": "c@example.com",
        "record_id": "C-3",
        "f:FIRST_NAME": None,
        "f:VIP": "false",
        "f:TAGS": '{"k":"v"}',
        "f:SCORE": "1.5",
    }
    assert values(by_line[9], JSONL) == {
        "email": "d@example.com",
        "record_id": "12345678901234",
        "f:FIRST_NAME": 'Dé "q" \\ b',
        "f:VIP": "0",
        "f:TAGS": None,
        "f:SCORE": None,
    }
    assert (stats.rows, stats.rejects, stats.blank_lines) == (7, 4, 2)
    assert stats.format == "jsonl"
    assert stats.sha256 == hashlib.sha256(_jsonl_bytes()).hexdigest()
    # an array value is JSON text full of quotes: it must be flagged for escaping
    assert by_line[2]["_esc"] is True and by_line[7]["_esc"] is True
    assert_esc_sound(rows, JSONL)


def test_jsonl_is_the_same_for_every_block_size(tmp_path: Path) -> None:
    # the first line is broken: the "is this JSON Lines at all" check must look further
    path = tmp_path / "signups.jsonl"
    path.write_bytes(_jsonl_bytes())
    _, stats = assert_block_independent(path, JSONL)
    assert stats[:3] == (7, 4, 2)


@pytest.mark.parametrize("block_bytes", [BLOCK_BYTES, 1])
def test_csv_named_jsonl_fails_the_file(tmp_path: Path, block_bytes: int) -> None:
    path = tmp_path / "orders.jsonl"
    path.write_bytes(b"order_id,email\n1,a@example.com\n2,b@example.com\n")
    with pytest.raises(InputFileError) as err:
        first_batch(path, JSONL, block_bytes)
    assert str(path) in str(err.value)
    assert "none of the first 3 lines is a JSON object" in str(err.value)
    assert 'format = "csv"' in str(err.value)


def test_jsonl_gives_up_after_ten_lines_that_are_not_objects(tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    path.write_bytes(b"[1]\n" * 12 + b'{"email": "a@example.com"}\n')
    with pytest.raises(InputFileError, match="none of the first 10 lines"):
        first_batch(path, JSONL)


# -- 6. Parquet ---------------------------------------------------------------------------


def _parquet_table() -> pa.Table:
    return pa.table(
        {
            "email": pa.array(["a@example.com", "b@example.com", None, "d@example.com", "e@x"]),
            "order_id": pa.array([1, 2, 3, None, 5], pa.int64()),
            "vip": pa.array([True, False, None, True, False]),
            "tags": pa.array([["a", "b"], [], None, ["c"], ['q"']], pa.list_(pa.string())),
            "amount": pa.array([1.5, 2.0, None, 0.25, 3.0]),
            "unused": pa.array(["u"] * 5),
        }
    )


PARQUET = SourceConfig(
    kind="orders",
    path="x",
    email="email",
    record_id="order_id",
    fields={"VIP": "vip", "TAGS": "tags", "AMOUNT": "amount"},
)


def test_parquet_lines_and_values_as_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extract, "PARQUET_BATCH", 2)  # lines must go on across batches
    path = tmp_path / "orders.parquet"
    pq.write_table(_parquet_table(), path, row_group_size=2)
    rows, stats = run(path, PARQUET)
    assert [r["_line"] for r in rows] == [1, 2, 3, 4, 5]
    assert [values(r, PARQUET) for r in rows] == [
        {
            "email": "a@example.com",
            "record_id": "1",
            "f:VIP": "true",
            "f:TAGS": '["a","b"]',
            "f:AMOUNT": "1.5",
        },
        {
            "email": "b@example.com",
            "record_id": "2",
            "f:VIP": "false",
            "f:TAGS": "[]",
            "f:AMOUNT": "2",
        },
        {"email": None, "record_id": "3", "f:VIP": None, "f:TAGS": None, "f:AMOUNT": None},
        {
            "email": "d@example.com",
            "record_id": None,
            "f:VIP": "true",
            "f:TAGS": '["c"]',
            "f:AMOUNT": "0.25",
        },
        {"email": "e@x", "record_id": "5", "f:VIP": "false", "f:TAGS": '["q\\""]', "f:AMOUNT": "3"},
    ]
    assert all(r["_raw"] is None and r["_reject"] is None for r in rows)
    assert (stats.rows, stats.rejects, stats.blank_lines) == (5, 0, 0)
    assert stats.format == "parquet"
    assert stats.columns == _parquet_table().column_names
    assert stats.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_esc_sound(rows, PARQUET)


def test_parquet_missing_column_fails_the_file(tmp_path: Path) -> None:
    path = tmp_path / "orders.parquet"
    pq.write_table(_parquet_table().drop_columns(["vip"]), path)
    with pytest.raises(InputFileError) as err:
        first_batch(path, PARQUET)
    msg = str(err.value)
    assert str(path) in msg and "missing column(s) 'vip'" in msg
    assert "header has: email, order_id, tags, amount, unused" in msg


def test_not_a_parquet_file_fails_the_file(tmp_path: Path) -> None:
    path = tmp_path / "orders.parquet"
    path.write_bytes(b"email,order_id\na@example.com,1\n")
    with pytest.raises(InputFileError, match="not a readable Parquet file") as err:
        first_batch(path, PARQUET)
    assert str(path) in str(err.value)


# -- 7. files that cannot be read at all -------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "fix"),
    [
        ("missing.csv", None, "file not found; check the path"),
        ("empty.csv", b"", "file is empty (0 bytes); export it again"),
        ("bom-only.csv", b"\xef\xbb\xbf", "no header line; the first line must name the columns"),
        ("blank-first.csv", b"\nemail\n", "the first line is empty; it must name the columns"),
        ("binary.csv", b"PK\x03\x04\x14\x00\x00\x00email", "binary data (NUL bytes)"),
        ("late-nul.csv", b"email,order_id\n" + b"a@x.org,1\n" * 50 + b"\x00", "binary data"),
        (
            "utf16.csv",
            "email,order_id\na@x.org,1\n".encode("utf-16"),
            're-save it as UTF-8 or set encoding = "utf-16"',
        ),
        ("orders.xlsx", b"email\n", "cannot tell the format from the file name; name it .csv"),
        ("orders", b"email\n", 'or set format = "csv" on the source'),
    ],
)
@pytest.mark.parametrize("block_bytes", [BLOCK_BYTES, 1])
def test_unreadable_file_fails_with_path_and_fix(
    tmp_path: Path, name: str, content: bytes | None, fix: str, block_bytes: int
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    stats = FileStats(str(path))
    batches = extract_file(str(path), 0, ORDERS, stats, block_bytes=block_bytes)
    with pytest.raises(InputFileError) as err:
        next(iter(batches))
    assert str(path) in str(err.value)
    assert fix in str(err.value)
    assert err.value.path == str(path)
    assert stats.rows == 0


def test_missing_mapped_column_lists_the_header(tmp_path: Path) -> None:
    path = tmp_path / "orders.csv"
    path.write_bytes(b"order_id,e_mail,first_name,note\n1,a@x.org,A,n\n")
    with pytest.raises(InputFileError) as err:
        first_batch(path, ORDERS)
    msg = str(err.value)
    assert msg.startswith(f"{path}: missing column(s) 'email'")
    assert "(header has: order_id, e_mail, first_name, note)" in msg
    assert "fix the export or the source's column mapping" in msg


@pytest.mark.parametrize(
    "content", [b"order_id,email,first_name,note\r\n", b"order_id,email,first_name,note"]
)
def test_header_only_file_gives_no_rows(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "orders.csv"
    path.write_bytes(content)
    rows, stats = run(path, ORDERS)
    assert rows == []
    assert (stats.rows, stats.rejects, stats.blank_lines) == (0, 0, 0)
    assert stats.columns == ["order_id", "email", "first_name", "note"]
    assert stats.sha256 == hashlib.sha256(content).hexdigest()


def test_header_names_match_ignoring_case_and_spaces(tmp_path: Path) -> None:
    path = tmp_path / "orders.csv"
    path.write_bytes(b" ORDER_ID ,Email,first_name,note\n1,a@x.org,A,n\n")
    rows, _ = run(path, ORDERS)
    assert values(rows[0], ORDERS) == {
        "email": "a@x.org",
        "record_id": "1",
        "f:FIRST_NAME": "A",
        "f:NOTE": "n",
    }


# -- 8. encodings --------------------------------------------------------------------------

CP1252_TEXT = (
    "order_id,email,first_name,note\r\n1,m@x.org,Müller,café – 5 €\r\n2,n@x.org,Œuvre,“quoted”\r\n"
)


@pytest.mark.parametrize("block_bytes", BLOCK_SIZES)
def test_cp1252_source_reads_a_cp1252_file(tmp_path: Path, block_bytes: int) -> None:
    path = tmp_path / "orders.csv"
    data = CP1252_TEXT.encode("cp1252")
    path.write_bytes(data)
    source = ORDERS.model_copy(update={"encoding": "cp1252"})
    rows, stats = run(path, source, block_bytes)
    assert [(r["_line"], r["f:FIRST_NAME"], r["f:NOTE"], r["_reject"]) for r in rows] == [
        (2, "Müller", "café – 5 €", None),
        (3, "Œuvre", "“quoted”", None),
    ]
    assert stats.sha256 == hashlib.sha256(data).hexdigest()  # of the bytes on disk


def test_cp1252_file_read_as_utf8_rejects_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "orders.csv"
    path.write_bytes(CP1252_TEXT.encode("cp1252"))
    rows, _ = run(path, ORDERS)
    assert [r["_line"] for r in rows] == [2, 3]
    assert all(r["_reject"].startswith(NOT_UTF8) for r in rows)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
@pytest.mark.parametrize("block_bytes", BLOCK_SIZES)
def test_multibyte_source_encodings(tmp_path: Path, encoding: str, block_bytes: int) -> None:
    # with tiny blocks the decoder hands on empty chunks mid-character
    path = tmp_path / "orders.csv"
    path.write_bytes(CP1252_TEXT.encode(encoding))
    source = ORDERS.model_copy(update={"encoding": encoding})
    rows, stats = run(path, source, block_bytes)
    assert [(r["_line"], r["f:FIRST_NAME"], r["f:NOTE"]) for r in rows] == [
        (2, "Müller", "café – 5 €"),
        (3, "Œuvre", "“quoted”"),
    ]
    assert stats.columns == ["order_id", "email", "first_name", "note"]


# -- 9. delimiters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delimiter", "content"),
    [
        (
            ";",
            b"order_id;email;first_name;note\n"
            b"1;a@x.org;Smith, Anna;3,50 EUR\n"
            b'2;b@x.org;"semi;colon";"two\nlines"\n'
            b"3;c@x.org;ragged,with,commas\n",
        ),
        (
            "\t",
            b"order_id\temail\tfirst_name\tnote\n"
            b"1\ta@x.org\tSmith, Anna\t3,50 EUR\n"
            b'2\tb@x.org\t"semi\ttab"\t"two\nlines"\n'
            b"3\tc@x.org\tragged,with,commas\n",
        ),
    ],
)
def test_other_delimiters(tmp_path: Path, delimiter: str, content: bytes) -> None:
    path = tmp_path / "orders.csv"
    path.write_bytes(content)
    source = ORDERS.model_copy(update={"delimiter": delimiter})
    rows, stats = assert_block_independent(path, source)
    sep = "semi;colon" if delimiter == ";" else "semi\ttab"
    assert [(r["_line"], r["f:FIRST_NAME"], r["f:NOTE"], r["_reject"]) for r in rows] == [
        (2, "Smith, Anna", "3,50 EUR", None),
        (3, sep, "two\nlines", None),
        (5, None, None, "row has 3 fields, the header has 4"),
    ]
    assert stats[:3] == (3, 1, 0)


# bytes built to hit the UTF-8 edge cases: lead bytes of every length, continuations,
# surrogates (ED A0..), overlong forms (C0, E0 80, F0 80), past U+10FFFF (F4 90, F5)
_UTF8_EDGES = st.lists(
    st.one_of(
        st.integers(0, 255),
        st.integers(0x80, 0xBF),
        st.sampled_from([0x41, 0xC0, 0xC2, 0xDF, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5]),
    ),
    max_size=16,
).map(bytes)


@settings(max_examples=2000)
@given(st.one_of(st.binary(max_size=32), _UTF8_EDGES, st.text().map(str.encode)))
def test_block_utf8_check_agrees_with_the_strict_decoder(data: bytes) -> None:
    from pipeline.csvread import _is_utf8

    try:
        data.decode("utf-8")
        decodes = True
    except UnicodeDecodeError:
        decodes = False
    assert _is_utf8(data) is decodes
