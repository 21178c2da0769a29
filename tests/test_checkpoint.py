"""WAL checkpoints from a thread: the nudged mode simulate's engine and the ledger use."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pyarrow as pa

from pipeline.checkpoint import Checkpointer
from pipeline.ledger import Ledger
from pipeline.store import Store


def _in_the_database_file(path: Path, table: str) -> bool:
    """Whether the table is in the database file itself (immutable: the log is not read)."""
    with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as db:
        found = db.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (table,))
        return bool(found.fetchone()[0])


def _wait_for(check: object, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_a_nudged_checkpointer_checkpoints_once_the_log_passes_the_size(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(f"sqlite:///{path}")
    checkpoints = Checkpointer(store, every=None)
    checkpoints.start()
    try:
        with store.begin() as conn:
            # the store's own commits never checkpoint
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
            conn.exec_driver_sql("CREATE TABLE t (x)")
        checkpoints.nudge(1 << 40)  # the log is far below that: nothing happens
        time.sleep(0.3)
        assert not _in_the_database_file(path, "t")
        checkpoints.nudge(0)
        assert _wait_for(lambda: _in_the_database_file(path, "t")), "no checkpoint in 5 s"
    finally:
        checkpoints.stop()
        store.close()


def test_a_checkpointer_stops_when_asked_while_a_checkpoint_is_due(tmp_path: Path) -> None:
    """A stop that comes while a nudged checkpoint runs is not lost: the thread ends
    instead of waiting for a nudge that never comes. Another connection holds the write
    lock, so the checkpoint's RESTART waits (up to RESTART_WAIT_MS) and the stop lands
    inside it."""
    path = tmp_path / "s.db"
    store = Store(f"sqlite:///{path}")
    with store.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x)")
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        for _ in range(5):
            checkpoints = Checkpointer(store, every=None)
            checkpoints.start()
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("INSERT INTO t VALUES (1)")
            checkpoints.nudge(0)
            time.sleep(0.02)  # the thread is in its checkpoint, waiting on the writer
            stopper = threading.Thread(target=checkpoints.stop)
            stopper.start()
            time.sleep(0.1)
            writer.execute("COMMIT")
            stopper.join(5)
            assert not stopper.is_alive(), "stop() did not return"
    finally:
        writer.close()
        store.close()


def test_the_ledger_is_checkpointed_by_a_thread_not_by_its_commits(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    ledger = Ledger(Store(f"sqlite:///{path}"), "run-1")
    ledger.start()
    keys = [f"k{i}" for i in range(50)]
    claimed, _, _ = ledger.claim("job", keys, ["b"] * 50, False)
    assert claimed.all()
    n = len(keys)
    ledger.finish(
        "job",
        pa.array(keys),
        pa.array(["completed"] * n),
        pa.array([False] * n),
        pa.array(['{"status":"completed"}'] * n),
        ledger.claim_seq,
    )
    with ledger.store.begin() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
    ledger.close()
    # closed: what was written is in the database file, the log folded back
    with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as db:
        assert db.execute("SELECT count(*) FROM ledger").fetchone()[0] == n
