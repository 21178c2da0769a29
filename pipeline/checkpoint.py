"""WAL checkpoints of a SQLite store, in a thread of their own.

SQLite in WAL mode copies the log back into the database file (a checkpoint,
with an fsync) at the commit that takes the log past ``wal_autocheckpoint``
pages, and again when the last connection closes. Either way the writer
waits for it. The stores that write most therefore never checkpoint from
their own connections; :class:`Checkpointer` does it from a thread, and the
sqlite3 module lets go of the GIL while it runs:

- the sandbox, every ``every`` seconds: it commits once per aggregated engine
  call, and on a large store nearly every call's pages are new ones, so most
  commits paid for a checkpoint (on the benchmark's 1,000,000-subscriber
  store that was half the engine's time: 44 µs a recipient with, 13 µs
  without);
- simulate's engine and the ledger (``every=None``), when :meth:`nudge` after
  a chunk finds the log past a size. The 1M-row on-demand deliver stage had
  one 0.4–0.5 s checkpoint inside an engine commit (its log passed 200 MB)
  and 0.24 s (the engine's store) plus 0.3 s (the ledger) at close, all on
  the stage's critical path; with the log kept near 64 MB from a thread, the
  close checkpoints 0.03 s and the engine's commits stop extending the file.

A ``PASSIVE`` checkpoint alone never lets the log start over: a writer
restarts it only if no frame was added since the last checkpoint, and a busy
writer adds frames all the time, so the WAL grew by every page ever written
(1.8 GB for the benchmark's million rows in the sandbox, and a third more
engine time: each commit extended the file). So each ``PASSIVE`` pass is
followed by a ``RESTART``: it copies the few frames added meanwhile and makes
the next writer start the log over. It holds writers back while it waits for
readers, so it waits at most ``RESTART_WAIT_MS`` (a busy answer just skips the
restart); a writer's transaction starts by writing (the sqlite3 module's
implicit ``BEGIN``), so it waits for it rather than fail. Benchmark engine in
the sandbox, 1,000,000 rows, 5 requests a transaction: 13.4 s with
``PASSIVE`` alone, 9.2 s with the restart.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

import sqlalchemy as sa

from pipeline.store import Store

__all__ = ["CHECKPOINT_BYTES", "Checkpointer"]

RESTART_WAIT_MS = 50
# the log's size past which a nudged checkpointer checkpoints (a 1M-row on-demand run
# writes ~260 MB of it in the engine's store and ~100 MB in the ledger)
CHECKPOINT_BYTES = 64 * 1024 * 1024


def _no_autocheckpoint(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")


class Checkpointer:
    """Checkpoints a SQLite store's WAL from a thread (other stores: does nothing)."""

    def __init__(self, store: Store, every: float | None = 0.5) -> None:
        """``every``: seconds between checkpoints; None: one checkpoint each time
        :meth:`nudge` finds the log past ``wal_bytes``."""
        self.every = every
        self.path: str | None = None
        self._stop = threading.Event()
        self._due = threading.Event()
        self._thread: threading.Thread | None = None
        url = store.engine.url
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return
        self.path = url.database
        sa.event.listen(store.engine, "connect", _no_autocheckpoint)
        store.engine.dispose()  # pooled connections reopen with the pragma

    def start(self) -> None:
        if self.path is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="checkpoint", daemon=True)
        self._thread.start()

    def nudge(self, wal_bytes: int) -> None:
        """Have the thread checkpoint now if the log has grown past ``wal_bytes``."""
        if self.path is None or self._due.is_set():
            return
        try:
            size = os.stat(self.path + "-wal").st_size
        except OSError:
            return
        if size > wal_bytes:
            self._due.set()

    def stop(self) -> None:
        """Stop the thread (the store's last connection to close checkpoints what is left)."""
        self._stop.set()
        self._due.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        assert self.path is not None
        conn = sqlite3.connect(self.path, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
            conn.execute("PRAGMA synchronous=NORMAL")
            while not self._wait():
                self._due.clear()  # before: a nudge or a stop meanwhile is not lost
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        finally:
            conn.close()

    def _wait(self) -> bool:
        """Wait for the next checkpoint's time; True when stopped."""
        if self.every is not None:
            return self._stop.wait(self.every)
        self._due.wait()
        return self._stop.is_set()
