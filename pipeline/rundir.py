"""The run directory: its layout, the manifest, and the stage files between stages.

::

    <out>/<run_id>/
      manifest.json        run id, config digest, inputs, stage states, timings, counts
      rejects.jsonl        rows that could not become a payload
      batches/<target>-<nnnn>.request.json / .response.json
      results.jsonl        one line per input row, input order
      results.parquet      the same rows
      async-results.json   run totals in the Yesmail async-results shape
      summary.json         counts by job, target, status and code
      stages/              what each stage hands the next (Arrow IPC), and the config used

Files that hold addresses are created with mode 0600. Every JSON file is
written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import secrets
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from pipeline.errors import RunDirError

__all__ = ["STAGES", "RunDir", "new_run_id", "now_iso"]

STAGES = ("extract", "normalize", "build", "deliver", "report")
PRIVATE = 0o600


def now_iso() -> str:
    """UTC time as the Yesmail documents write it: ``2015-03-05T00:10:31.283Z``."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_run_id() -> str:
    """Sortable in start order and unique: ``20261123T165117.042Z-3f9c1a``."""
    now = dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


class RunDir:
    """One run's directory. Create with :meth:`create`, reopen with the constructor."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, out: str | os.PathLike[str], run_id: str | None = None) -> RunDir:
        rid = run_id or new_run_id()
        path = Path(out) / rid
        (path / "batches").mkdir(parents=True, exist_ok=False)
        (path / "stages").mkdir()
        os.chmod(path, 0o700)
        return cls(path)

    @property
    def run_id(self) -> str:
        return self.path.name

    # -- paths ------------------------------------------------------------------

    def file(self, name: str) -> Path:
        return self.path / name

    def stage_file(self, stage: str, name: str) -> Path:
        d = self.path / "stages" / stage
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{name}.arrow"

    def write_batch_file(self, batch_id: str, kind: str, data: bytes) -> None:
        """A request or response file, written in place.

        Batch files are many and each is rewritten whole from the stage files
        if a stage runs again, so they skip the rename that the other files
        use (it costs more than the write on some filesystems).
        """
        path = self.batch_file(batch_id, kind)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)

    def batch_writer(self) -> BatchFileWriter:
        """Writes batch files in a background thread (file I/O releases the GIL)."""
        return BatchFileWriter(str(self.path / "batches"))

    def batch_file(self, batch_id: str, kind: str) -> Path:
        return self.path / "batches" / f"{batch_id}.{kind}.json"

    # -- manifest ---------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = orjson.loads(self.file("manifest.json").read_bytes())
        except FileNotFoundError:
            raise RunDirError(
                f"{self.path}: no manifest.json; is this a run directory? "
                "(mailpipe run prints the path of the one it made)"
            ) from None
        return data

    def write_manifest(self, data: dict[str, Any]) -> None:
        self.write_json("manifest.json", data, private=False)

    def update_manifest(self, **changes: Any) -> dict[str, Any]:
        data = self.manifest()
        data.update(changes)
        self.write_manifest(data)
        return data

    def stage_state(self, stage: str) -> str | None:
        state = self.manifest().get("stages", {}).get(stage, {}).get("state")
        return str(state) if state is not None else None

    def require(self, stage: str) -> None:
        """Stop unless ``stage`` completed (a later stage reads its files)."""
        if self.stage_state(stage) != "completed":
            raise RunDirError(
                f"{self.path}: stage {stage!r} has not completed; "
                f"run `mailpipe {stage} {self.path}` first"
            )

    # -- writing ----------------------------------------------------------------

    def write_json(self, name: str, data: Any, private: bool = True, indent: bool = True) -> Path:
        return self.write_bytes(
            name, orjson.dumps(data, option=orjson.OPT_INDENT_2 if indent else 0), private=private
        )

    def write_bytes(self, name: str | Path, data: bytes, private: bool = True) -> Path:
        target = self.path / name
        tmp = target.with_name(f".{target.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE if private else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
        return target

    @contextmanager
    def open_private(self, name: str | Path) -> Iterator[Any]:
        """A binary file handle, mode 0600, renamed into place when the block ends cleanly."""
        target = self.path / name
        tmp = target.with_name(f".{target.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE)
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, target)

    @contextmanager
    def stage_writer(
        self, stage: str, name: str, schema: pa.Schema
    ) -> Iterator[pa.ipc.RecordBatchStreamWriter]:
        """Write one stage file (Arrow IPC stream), atomically."""
        path = self.stage_file(stage, name)
        with (
            self.open_private(path.relative_to(self.path)) as fh,
            pa.ipc.new_stream(fh, schema) as writer,
        ):
            yield writer

    def stage_reader(self, stage: str, name: str) -> pa.ipc.RecordBatchStreamReader:
        path = self.stage_file(stage, name)
        if not path.exists():
            raise RunDirError(
                f"{self.path}: missing {path.relative_to(self.path)}; "
                f"run `mailpipe {stage} {self.path}` again"
            )
        # read, not mapped: mapped pages of a large stage file would count against the RSS
        return pa.ipc.open_stream(pa.OSFile(str(path), "rb"))


# helper processes that write batch files: two keep up with a run's chunks where one
# fell behind (see CHANGELOG, 2026-12-03)
WRITERS = 2


class BatchFileWriter:
    """Batch files, written by small helper processes, a chunk's worth at a time.

    A run may write tens of thousands of request files. Creating them from a
    thread of this process costs three GIL hand-offs a file, which the busy
    stage threads turn into milliseconds; a helper process with its own
    interpreter does it at file-system speed. Each chunk goes down a pipe as
    one buffer of ``(name length, data length, name, data)`` frames, from a
    feeder thread. Chunks go to the ``writers`` helpers in turn (each file of a
    writer's life is written once, so which helper writes it does not matter),
    so at most ``writers + 1`` chunks are in memory. :meth:`close` waits for
    the helpers and raises if one failed.
    """

    def __init__(self, directory: str, writers: int = WRITERS) -> None:
        import subprocess
        import sys
        from concurrent.futures import Future, ThreadPoolExecutor

        self._procs = [
            subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WRITER_CODE, directory],
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(max(1, writers))
        ]
        for proc in self._procs:
            assert proc.stdin is not None
            with contextlib.suppress(OSError, AttributeError):  # a bigger pipe: fewer wake-ups
                fcntl.fcntl(proc.stdin.fileno(), 1031, 1 << 20)  # F_SETPIPE_SZ
        # one feeder a helper: a helper that is behind does not hold up the others
        self._feeders = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-files") for _ in self._procs
        ]
        self._pending: list[Future[None] | None] = [None] * len(self._procs)
        self._turn = 0
        self._files: list[bytes] = []

    def add(self, batch_id: str, kind: str, data: bytes) -> None:
        name = f"{batch_id}.{kind}.json".encode()
        self._files.append(_FRAME.pack(len(name), len(data)) + name)
        self._files.append(data)

    def flush(self) -> None:
        buf, self._files = b"".join(self._files), []
        if not buf:
            return
        i = self._turn
        self._turn = (i + 1) % len(self._procs)
        pending = self._pending[i]
        if pending is not None:
            pending.result()
        self._pending[i] = self._feeders[i].submit(self._send, i, buf)

    def _send(self, i: int, buf: bytes) -> None:
        stdin = self._procs[i].stdin
        assert stdin is not None
        try:
            stdin.write(buf)
            stdin.flush()
        except BrokenPipeError:
            self._fail(i)

    def _fail(self, i: int) -> None:
        stderr = self._procs[i].stderr
        err = stderr.read().decode(errors="replace").strip() if stderr else ""
        # the helper's traceback ends with the error itself: that line is the message
        last = err.splitlines()[-1] if err else "the writer process stopped"
        raise OSError(f"writing batch files failed: {last}")

    def close(self) -> None:
        self.flush()
        try:
            for pending in self._pending:
                if pending is not None:
                    pending.result()
        finally:
            for feeder in self._feeders:
                feeder.shutdown()
            for proc in self._procs:
                assert proc.stdin is not None
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
        for i, proc in enumerate(self._procs):
            if proc.wait() != 0:
                self._fail(i)

    def __enter__(self) -> BatchFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_FRAME = struct.Struct("<II")
# the helper: only os, sys and struct, no site packages, so it starts in milliseconds
_WRITER_CODE = """
import os, struct, sys
d = sys.argv[1]
head = struct.Struct("<II")
flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
buf = bytearray()
pos = 0
eof = False
def need(k):
    global buf, pos, eof
    while len(buf) - pos < k and not eof:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            eof = True
            break
        if pos:
            del buf[:pos]
            pos = 0
        buf += chunk
    return len(buf) - pos >= k
while need(8):
    n, size = head.unpack_from(buf, pos)
    if not need(8 + n + size):
        raise SystemExit("truncated frame")
    name = bytes(buf[pos + 8:pos + 8 + n]).decode()
    fd = os.open(os.path.join(d, name), flags, 0o600)
    try:
        view = memoryview(buf)[pos + 8 + n:pos + 8 + n + size]
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    del view
    pos += 8 + n + size
"""
