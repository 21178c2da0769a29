"""The run-directory contract as checks: every test run directory goes through these."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

from pipeline.results import RESULT_SCHEMA

STATUSES = {"completed", "failed", "ignored"}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def check_run_dir(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Assert the files of a finished run follow the contract; return results.jsonl rows.

    Rows read = lines in results.jsonl = counts.requested; completed + failed +
    ignored = total; indexes 0..n-1 in order; one schema for every line.
    """
    d = Path(run_dir)
    for name in (
        "manifest.json",
        "rejects.jsonl",
        "results.jsonl",
        "results.parquet",
        "async-results.json",
        "summary.json",
        "batches",
    ):
        assert (d / name).exists(), f"{name} missing from {d}"
    manifest = orjson.loads((d / "manifest.json").read_bytes())
    for key in ("run_id", "config", "inputs", "stages", "counts", "jobs"):
        assert key in manifest, key
    assert manifest["run_id"] == d.name
    assert all(s["state"] == "completed" for s in manifest["stages"].values())
    rows = _jsonl(d / "results.jsonl")
    names = [f.name for f in RESULT_SCHEMA]
    for i, row in enumerate(rows):
        assert list(row) == names, f"line {i} keys {list(row)}"
        assert row["index"] == i
        assert row["status"] in STATUSES
    # rows read: each job reads every row of its source's files
    sources = orjson.loads((d / "stages" / "config.json").read_bytes())["jobs"]
    read = sum(
        e.get("rows") or 0
        for job in manifest["jobs"]
        for e in manifest["inputs"]
        if e["source"] == sources[job]["source"]
    )
    assert len(rows) == read, f"{len(rows)} result lines for {read} rows read"
    table = pq.read_table(d / "results.parquet")
    assert table.schema.names == names
    assert table.num_rows == len(rows)
    ar = orjson.loads((d / "async-results.json").read_bytes())
    counts = ar["counts"]
    assert set(counts) == {"requested", "total", "completed", "ignored", "failed"}
    assert counts["requested"] == counts["total"] == len(rows)
    assert counts["completed"] + counts["failed"] + counts["ignored"] == counts["total"]
    for status in STATUSES:
        entries = ar[status]
        assert len(entries) == counts[status]
        assert all(set(e) == {"index", "time"} for e in entries)
        assert {e["index"] for e in entries} == {r["index"] for r in rows if r["status"] == status}
    summary = orjson.loads((d / "summary.json").read_bytes())
    assert summary["rows"] == len(rows)
    assert sum(summary["status"].values()) == len(rows)
    for request in (d / "batches").glob("*.request.json"):
        body = orjson.loads(request.read_bytes())
        assert body["batch"] == request.name.removesuffix(".request.json")
    for response in (d / "batches").glob("*.response.json"):
        orjson.loads(response.read_bytes())
    batches = {r["batch"] for r in rows if r["batch"]}
    for b in batches:
        assert (d / "batches" / f"{b}.request.json").exists(), b
    for name in ("results.jsonl", "results.parquet", "rejects.jsonl", "async-results.json"):
        mode = stat.S_IMODE((d / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    rejects = _jsonl(d / "rejects.jsonl")
    for rej in rejects:
        assert set(rej) == {"index", "job", "source", "line", "raw", "field", "reason", "code"}
        assert rows[rej["index"]]["status"] == "failed"
    return rows
