"""CSV / JSONL / Parquet files → Arrow record batches with provenance.

Every batch this module yields has the provenance columns

``_file`` (int32)    index of the file in the run's input list
``_line`` (int64)    1-based physical line where the record starts (the CSV
                     header is line 1); the 1-based row number for Parquet
``_raw`` (string)    the record's text when extract rejected it, or when the file
                     was transcoded; otherwise null (see ``_offset``)
``_offset``/``_length``  where the record's bytes are in the file, for reading its
                     text back when a later stage rejects it
``_esc`` (bool)      a value of this record may need JSON escaping
``_reject`` (string) why the record could not be read, or null

followed by one string column per mapped field (``email``, ``record_id``,
``f:FIRST_NAME``, …; see :meth:`SourceConfig.columns`).

Files are read in bounded blocks, so memory stays flat however large a file
is. A record that cannot be read (ragged, not UTF-8, broken JSON) becomes a
reject with its line and the file goes on; a file that cannot be read at all
raises :class:`InputFileError` before any of its rows is yielded.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrowutil import escape_rows
from pipeline.config import SourceConfig
from pipeline.csvread import read_csv
from pipeline.errors import InputFileError
from pipeline.textblocks import Block, BlockScanner, text_chunks

__all__ = [
    "BLOCK_BYTES",
    "PROVENANCE",
    "FileStats",
    "detect_format",
    "expand_inputs",
    "extract_file",
    "extracted_schema",
    "file_sha256",
    "make_batch",
    "map_columns",
    "needs_escape",
    "record_text",
    "record_texts",
]

BLOCK_BYTES = 4 << 20
PARQUET_BATCH = 65536
PROVENANCE = ("_file", "_line", "_raw", "_offset", "_length", "_esc", "_reject")


@dataclass
class FileStats:
    """What extract learned about one input file (goes into the manifest)."""

    path: str
    format: str = ""
    sha256: str = ""
    bytes: int = 0
    rows: int = 0
    rejects: int = 0
    blank_lines: int = 0
    error: str | None = None
    columns: list[str] = field(default_factory=list)


def extracted_schema(source: SourceConfig) -> pa.Schema:
    """The schema of every batch :func:`extract_file` yields for ``source``."""
    fields = [
        pa.field("_file", pa.int32()),
        pa.field("_line", pa.int64()),
        pa.field("_raw", pa.string()),
        pa.field("_offset", pa.int64()),
        pa.field("_length", pa.int32()),
        pa.field("_esc", pa.bool_()),
        pa.field("_reject", pa.string()),
    ]
    fields += [pa.field(name, pa.string()) for name in source.columns()]
    return pa.schema(fields)


def detect_format(path: str, declared: str) -> str:
    """``csv`` | ``jsonl`` | ``parquet`` from the config or the file suffix."""
    if declared != "auto":
        return declared
    name = path.lower()
    for suffixes, fmt in (
        ((".csv", ".tsv", ".txt"), "csv"),
        ((".jsonl", ".ndjson", ".json"), "jsonl"),
        ((".parquet", ".pq"), "parquet"),
    ):
        if name.endswith(suffixes):
            return fmt
    raise InputFileError(
        path,
        "cannot tell the format from the file name; name it .csv, .jsonl or .parquet, "
        'or set format = "csv" on the source',
    )


def extract_file(
    path: str,
    file_id: int,
    source: SourceConfig,
    stats: FileStats,
    block_bytes: int = BLOCK_BYTES,
    digest: bool = True,
) -> Iterator[pa.RecordBatch]:
    """Yield the records of one file as batches of :func:`extracted_schema`.

    ``stats`` is filled in as the file is read (rows, rejects, blank lines,
    and its sha256 once the file has been read to the end).
    """
    fmt = detect_format(path, source.format)
    stats.format = fmt
    p = Path(path)
    if not p.exists():
        raise InputFileError(path, "file not found; check the path or the source's glob")
    if not p.is_file():
        raise InputFileError(path, "not a regular file")
    stats.bytes = p.stat().st_size
    if stats.bytes == 0:
        raise InputFileError(path, "file is empty (0 bytes); export it again with a header line")
    schema = extracted_schema(source)
    hasher = hashlib.sha256() if digest else None
    reader: Iterator[pa.RecordBatch]
    if fmt == "parquet":
        stats.sha256 = file_sha256(path) if digest else ""
        reader = _read_parquet(path, file_id, source, stats, schema)
    elif fmt == "jsonl":
        reader = _read_jsonl(path, file_id, source, stats, schema, block_bytes, hasher)
    else:
        reader = read_csv(path, file_id, source, stats, schema, block_bytes, hasher)
    for batch in reader:
        stats.rows += batch.num_rows
        stats.rejects += batch.num_rows - batch.column("_reject").null_count
        yield batch
    if hasher is not None and fmt != "parquet":
        stats.sha256 = hasher.hexdigest()


def make_batch(
    schema: pa.Schema,
    file_id: int,
    lines: np.ndarray,
    raw: pa.Array,
    esc: pa.Array,
    reject: pa.Array,
    values: dict[str, pa.Array],
    spans: tuple[np.ndarray, np.ndarray] | None = None,
) -> pa.RecordBatch:
    """Assemble one extracted batch from its provenance and value columns.

    ``spans`` are the records' (file offsets, lengths), when they are known.
    """
    n = len(lines)
    cols: list[pa.Array] = [
        pa.array(np.full(n, file_id, dtype=np.int32)),
        pa.array(lines, pa.int64()),
        raw,
        pa.array(spans[0], pa.int64()) if spans else pa.nulls(n, pa.int64()),
        pa.array(spans[1], pa.int32()) if spans else pa.nulls(n, pa.int32()),
        esc,
        reject,
    ]
    cols += [values[name] for name in schema.names[len(PROVENANCE) :]]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def needs_escape(*cols: pa.Array) -> pa.Array:
    """Per row: does any of ``cols`` hold a character JSON must escape?"""
    out = np.zeros(len(cols[0]) if cols else 0, dtype=bool)
    for col in cols:
        out |= escape_rows(col)
    return pa.array(out)


def map_columns(path: str, header: list[str], source: SourceConfig) -> dict[str, int]:
    """Internal column → index in the header; a missing column fails the file.

    A column is found by its exact name first, then ignoring case and
    surrounding spaces (exports are not always tidy about either).
    """
    exact = {name: i for i, name in reversed(list(enumerate(header)))}
    loose = {name.strip().lower(): i for i, name in reversed(list(enumerate(header)))}
    out: dict[str, int] = {}
    missing: list[str] = []
    for internal, col in source.columns().items():
        idx = exact.get(col, loose.get(col.strip().lower()))
        if idx is None:
            missing.append(col)
        else:
            out[internal] = idx
    if missing:
        shown = ", ".join(header[:20]) + (", …" if len(header) > 20 else "")
        raise InputFileError(
            path,
            f"missing column(s) {', '.join(repr(m) for m in sorted(set(missing)))} "
            f"(header has: {shown}); fix the export or the source's column mapping",
        )
    return out


# -- JSON Lines ----------------------------------------------------------------


def _read_jsonl(
    path: str,
    file_id: int,
    source: SourceConfig,
    stats: FileStats,
    schema: pa.Schema,
    block_bytes: int,
    hasher: Any,
) -> Iterator[pa.RecordBatch]:
    cols = source.columns()
    names = schema.names[len(PROVENANCE) :]
    head: list[Block] = []
    layout: dict[str, int] = {}
    try:
        chunks = text_chunks(path, source.encoding, block_bytes, hasher, layout)
        blocks = iter(BlockScanner(chunks, None))
        # the first lines decide whether this is JSON Lines at all, however small the blocks
        tried = 0
        for block in blocks:
            head.append(block)
            tried = _check_jsonl_start(path, block.data, block.starts, block.ends, tried)
            if tried < 0:
                break
    except ValueError as e:
        raise InputFileError(path, str(e)) from None
    if tried > 0:
        _not_jsonl(path, tried)
    for block in itertools.chain(head, blocks):
        data = block.data
        out_lines: list[int] = []
        raws: list[str | None] = []
        offsets: list[int] = []
        lengths: list[int] = []
        reasons: list[str | None] = []
        values: dict[str, list[str | None]] = {n: [] for n in names}
        # one orjson.loads per line: a broken line must become its own reject
        for ln, s, end in zip(block.lines.tolist(), block.starts.tolist(), block.ends.tolist()):
            chunk = data[s:end]
            if not chunk.strip():
                stats.blank_lines += 1
                continue
            out_lines.append(ln)
            offsets.append(block.base + s)
            lengths.append(end - s)
            obj: object = None
            try:
                obj = orjson.loads(chunk)
            except orjson.JSONDecodeError as err:
                reasons.append(f"not valid JSON ({err})")
            else:
                reasons.append(
                    None if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
                )
            # the text is kept for a rejected line, or when offsets would not find it
            keep = reasons[-1] is not None or "skip" not in layout
            raws.append(chunk.decode("utf-8", "backslashreplace") if keep else None)
            row = obj if isinstance(obj, dict) else None
            for internal in names:
                values[internal].append(_json_text(row.get(cols[internal])) if row else None)
        if not out_lines:
            continue
        arrays = {k: pa.array(v, pa.string()) for k, v in values.items()}
        # from the values, not the line: an array or object value is JSON text with quotes
        yield make_batch(
            schema,
            file_id,
            np.array(out_lines, dtype=np.int64),
            pa.array(raws, pa.string()),
            needs_escape(*arrays.values()),
            pa.array(reasons, pa.string()),
            arrays,
            (np.array(offsets, dtype=np.int64) + layout["skip"], np.array(lengths, np.int32))
            if "skip" in layout
            else None,
        )


def _check_jsonl_start(
    path: str, data: bytes, starts: np.ndarray, ends: np.ndarray, tried: int
) -> int:
    """Go on checking the first lines of a file, ``tried`` non-blank ones so far.

    Returns -1 once a line is a JSON object, else the lines tried; fails the file
    when none of its first 10 non-blank lines is one (a CSV named .jsonl).
    """
    for s, e in zip(starts.tolist(), ends.tolist()):
        chunk = data[s:e]
        if not chunk.strip():
            continue
        try:
            if isinstance(orjson.loads(chunk), dict):
                return -1
        except orjson.JSONDecodeError:
            pass
        tried += 1
        if tried == 10:
            _not_jsonl(path, tried)
    return tried


def _not_jsonl(path: str, tried: int) -> NoReturn:
    raise InputFileError(
        path,
        f"none of the first {tried} lines is a JSON object; is this "
        'a JSON Lines file? Set format = "csv" on the source if it is CSV',
    )


def _json_text(v: object) -> str | None:
    """A JSON value as the text a CSV cell would hold (arrays and objects stay JSON)."""
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if isinstance(v, float) else str(v)
    return orjson.dumps(v).decode()


# -- Parquet --------------------------------------------------------------------


def _read_parquet(
    path: str, file_id: int, source: SourceConfig, stats: FileStats, schema: pa.Schema
) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq  # here: 25 ms of imports that CSV and JSONL runs never need

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputFileError(
            path, f"not a readable Parquet file ({e}); check the export or set format on the source"
        ) from None
    header = pf.schema_arrow.names
    stats.columns = list(header)
    colmap = map_columns(path, header, source)
    names = schema.names[len(PROVENANCE) :]
    wanted = sorted({header[i] for i in colmap.values()})
    row = 0
    for rb in pf.iter_batches(batch_size=PARQUET_BATCH, columns=wanted):
        n = rb.num_rows
        vals = {name: _to_text(rb.column(header[colmap[name]])) for name in names}
        lines = np.arange(row + 1, row + n + 1, dtype=np.int64)
        row += n
        # Parquet has no text of its own: a rejected row is shown as JSON of its values
        yield make_batch(
            schema,
            file_id,
            lines,
            pa.nulls(n, pa.string()),
            needs_escape(*vals.values()),
            pa.nulls(n, pa.string()),
            vals,
        )


def _to_text(col: pa.Array) -> pa.Array:
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col.cast(pa.string())
    if pa.types.is_dictionary(t):
        return _to_text(col.cast(t.value_type))
    if pa.types.is_boolean(t):
        return pc.if_else(col, "true", "false")
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_struct(t):
        return pa.array(
            [None if v is None else orjson.dumps(v).decode() for v in col.to_pylist()], pa.string()
        )
    try:
        return col.cast(pa.string())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())


# -- files ------------------------------------------------------------------------


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read into one reused buffer.

    The hashing runs beside the stages while they read the same file: a new
    8 MB chunk a read kept up to 16 MB more in the process for as long as it
    ran, which on a large file is the busiest part of the run.
    """
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def expand_inputs(pattern: str) -> list[str]:
    """Files matching a source's glob, sorted for a stable input order."""
    hits = glob.glob(os.path.expanduser(pattern), recursive=True)
    return sorted(p for p in hits if os.path.isfile(p))


def record_texts(spans: list[tuple[str, int | None, int | None]]) -> list[str | None]:
    """Many records' text read back from their files, each file opened once."""
    out: list[str | None] = [None] * len(spans)
    by_path: dict[str, list[int]] = {}
    for i, (path, offset, _) in enumerate(spans):
        if offset is not None:
            by_path.setdefault(path, []).append(i)
    for path, idx in by_path.items():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            # one pread a record: a buffered file's seek + read took two calls and 8 KB
            for i in sorted(idx, key=lambda k: spans[k][1] or 0):
                _, offset, length = spans[i]
                data = os.pread(fd, length or 0, offset or 0)
                if len(data) == length:
                    out[i] = data.decode("utf-8", "backslashreplace").rstrip("\r\n")
        except OSError:
            continue
        finally:
            os.close(fd)
    return out


def record_text(path: str, offset: int, length: int) -> str | None:
    """A record's text read back from its file (None when the file has changed or gone)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
    except OSError:
        return None
    return data.decode("utf-8", "backslashreplace").rstrip("\r\n") if len(data) == length else None
