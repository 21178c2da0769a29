"""WAL checkpoints of the sandbox's SQLite store, in a thread of their own.

SQLite in WAL mode copies the log back into the database file (a checkpoint,
with an fsync) at the commit that takes the log past 1,000 pages. The
sandbox commits once per aggregated engine call, and on a large store nearly
every call's pages are new ones, so most commits paid for a checkpoint: on
the benchmark's 1,000,000-subscriber store that was half the engine's time
(44 µs a recipient with, 13 µs without). The sandbox's connections therefore
never checkpoint; :class:`Checkpointer` does it from a thread every
``every`` seconds (``PASSIVE``: it waits for no reader nor writer, and the
sqlite3 module lets go of the GIL while it runs, so the event loop goes on).

A ``PASSIVE`` checkpoint alone never lets the log start over: a writer
restarts it only if no frame was added since the last checkpoint, and the
sandbox writes all the time, so the WAL grew by every page ever written (1.8
GB for the benchmark's million rows, and a third more engine time: each
commit extended the file). So each ``PASSIVE`` pass is followed by a
``RESTART``: it copies the few frames added meanwhile and makes the next
writer start the log over. It holds writers back while it waits for readers,
so it waits at most ``RESTART_WAIT_MS`` (a busy answer just skips the
restart); the engine's transactions start by writing (the sqlite3 module's
implicit ``BEGIN``), so they wait for it rather than fail. Benchmark engine,
1,000,000 rows, 5 requests a transaction: 13.4 s with ``PASSIVE`` alone,
9.2 s with the restart.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import sqlalchemy as sa

from pipeline.store import Store

__all__ = ["Checkpointer"]

RESTART_WAIT_MS = 50


def _no_autocheckpoint(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")


class Checkpointer:
    """Checkpoints a SQLite store's WAL from a thread (other stores: does nothing)."""

    def __init__(self, store: Store, every: float = 0.5) -> None:
        self.every = every
        self.path: str | None = None
        self._stop = threading.Event()
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
        self._thread = threading.Thread(target=self._run, name="sandbox-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (the store's last connection to close checkpoints what is left)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        assert self.path is not None
        conn = sqlite3.connect(self.path, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
            conn.execute("PRAGMA synchronous=NORMAL")
            while not self._stop.wait(self.every):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        finally:
            conn.close()
