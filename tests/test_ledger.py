"""The ledger: re-runs send nothing twice, crashes lose nothing, one run at a time."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from conftest import read_jsonl
from rundir_contract import check_run_dir

from pipeline.cli import main
from pipeline.lock import RunLock

CONFIG = """
[run]
out = "{out}"
chunk_rows = {chunk}

[store]
url = "sqlite:///{tmp}/state/mailpipe.db"

[lists.shop]
name = "Shop"
d_from_email = "shop@example.com"

[lists.shop.fields.FIRST_NAME]
type = "text"

[sources.orders]
kind = "orders"
path = "{tmp}/data/orders*.csv"
email = "email"
record_id = "order_id"
created_at = "created_at"

[sources.orders.fields]
FIRST_NAME = "first_name"

[sources.notes]
kind = "signups"
path = "{tmp}/data/notes*.csv"
email = "email"

[jobs.confirm]
source = "orders"
target = "maestro-ondemand"
list = "shop"
ifNotExistsAddAndSend = true
batch_size = {batch}

[jobs.notify]
source = "notes"
target = "maestro-ondemand"
list = "shop"
ifNotExistsAddAndSend = true
enabled = false
"""


def orders(n: int, start: int = 1, day: str = "2026-11-01") -> str:
    lines = ["order_id,email,first_name,created_at"]
    lines += [f"{i},c{i}@example.com,N{i},{day}T10:00:00Z" for i in range(start, start + n)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "data").mkdir()
    return {"tmp": tmp_path, "out": tmp_path / "out"}


def write_config(s: dict[str, Any], chunk: int = 65536, batch: int = 300) -> str:
    cfg = s["tmp"] / "mailpipe.toml"
    cfg.write_text(CONFIG.format(out=s["out"], tmp=s["tmp"], chunk=chunk, batch=batch))
    return str(cfg)


def run(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def runs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir()) if out.exists() else []


def sends(tmp: Path) -> dict[str, int]:
    """How often the simulated platform processed each record key."""
    with sqlite3.connect(tmp / "state" / "mailpipe.db") as db:
        return dict(db.execute("SELECT key, sends FROM platform_log WHERE job = 'confirm'"))


def test_rerun_sends_nothing_again(setup: dict[str, Any]) -> None:
    (setup["tmp"] / "data" / "orders.csv").write_text(orders(5))
    cfg = write_config(setup)
    assert run(["run", "--config", cfg]).exit_code == 0
    first = check_run_dir(runs(setup["out"])[-1])
    assert {r["status"] for r in first} == {"completed"}
    assert run(["run", "--config", cfg]).exit_code == 0
    second = check_run_dir(runs(setup["out"])[-1])
    assert [r["status"] for r in second] == ["ignored"] * 5
    assert all(r["result"] == "SUCCESS" for r in second)  # the earlier answer travels along
    assert {r["earlier_run"] for r in second} == {runs(setup["out"])[0].name}
    assert all(r["batch"] is None for r in second)
    assert not list((runs(setup["out"])[-1] / "batches").glob("*.request.json"))
    assert set(sends(setup["tmp"]).values()) == {1}


def test_new_rows_in_a_grown_file_are_the_only_ones_sent(setup: dict[str, Any]) -> None:
    path = setup["tmp"] / "data" / "orders.csv"
    path.write_text(orders(3))
    cfg = write_config(setup)
    run(["run", "--config", cfg])
    path.write_text(orders(5))  # the export grew by two orders
    run(["run", "--config", cfg])
    rows = check_run_dir(runs(setup["out"])[-1])
    assert [r["status"] for r in rows] == ["ignored"] * 3 + ["completed"] * 2
    assert set(sends(setup["tmp"]).values()) == {1}


def test_resend_sends_again_and_says_so(setup: dict[str, Any]) -> None:
    (setup["tmp"] / "data" / "orders.csv").write_text(orders(2))
    cfg = write_config(setup)
    run(["run", "--config", cfg])
    assert run(["run", "--config", cfg, "--resend", "confirm"]).exit_code == 0
    rows = check_run_dir(runs(setup["out"])[-1])
    assert [r["status"] for r in rows] == ["completed"] * 2
    assert all(r["message"].startswith("resent (--resend); earlier completed in run") for r in rows)
    assert all(r["earlier_run"] == runs(setup["out"])[0].name for r in rows)
    assert set(sends(setup["tmp"]).values()) == {2}
    assert run(["run", "--config", cfg, "--resend", "nope"]).exit_code == 2


def test_records_without_a_key_are_keyed_by_file_and_line(setup: dict[str, Any]) -> None:
    (setup["tmp"] / "data" / "notes.csv").write_text("email\na@example.com\nb@example.com\n")
    cfg = write_config(setup)
    run(["run", "--config", cfg, "--job", "notify"])
    run(["run", "--config", cfg, "--job", "notify"])
    assert [r["status"] for r in check_run_dir(runs(setup["out"])[-1])] == ["ignored"] * 2
    # the same rows in a file with other bytes are other records
    (setup["tmp"] / "data" / "notes.csv").write_text("email\na@example.com\nb@example.com\n\n")
    run(["run", "--config", cfg, "--job", "notify"])
    assert [r["status"] for r in check_run_dir(runs(setup["out"])[-1])] == ["completed"] * 2


@pytest.mark.parametrize(
    ("fault", "found", "answered", "completed"),
    [
        # chunk 1 claimed, never handed to the platform
        ("after-claim:1", 20, 0, 100),
        # chunk 1 recorded; chunk 2 answered by the platform, not recorded; chunk 3 claimed
        # while chunk 2 was on its way, not sent (simulate sends a chunk while recording
        # the one before, so two chunks are in doubt)
        ("after-send:2", 40, 20, 60),
    ],
)
def test_a_crash_is_resolved_by_the_next_run(
    setup: dict[str, Any], fault: str, found: int, answered: int, completed: int
) -> None:
    """Killed between claiming a chunk and sending it, or between sending and recording:
    the next run finds the records in doubt, asks the simulated platform, sends what it
    never processed, and every record ends sent exactly once."""
    (setup["tmp"] / "data" / "orders.csv").write_text(orders(100))
    cfg = write_config(setup, chunk=20, batch=10)
    killed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--config", cfg],
        env={**os.environ, "MAILPIPE_FAULT": fault},
        capture_output=True,
    )
    assert killed.returncode == -9
    assert run(["run", "--config", cfg]).exit_code == 0
    last = runs(setup["out"])[-1]
    rows = check_run_dir(last)
    manifest = orjson.loads((last / "manifest.json").read_bytes())
    doubt = manifest["in_doubt"]["confirm"]
    assert doubt["found"] == found
    assert doubt["answered_by_platform"] == answered
    assert doubt["resent"] == found - answered
    assert all(r["status"] in ("completed", "ignored") for r in rows)
    assert sum(r["status"] == "completed" for r in rows) == completed
    assert sends(setup["tmp"]) == {f"k:{i}": 1 for i in range(1, 101)}


def test_in_doubt_without_a_platform_to_ask_follows_the_policy(setup: dict[str, Any]) -> None:
    """Outside simulate nobody can say what was sent: skip (the default) or resend."""
    (setup["tmp"] / "data" / "orders.csv").write_text(orders(30))
    cfg = write_config(setup, chunk=10, batch=10)
    subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--config", cfg],
        env={**os.environ, "MAILPIPE_FAULT": "after-claim:1"},
        capture_output=True,
    )
    from pipeline.config import load_config
    from pipeline.ledger import open_ledger
    from pipeline.run import RunOptions, resolve_in_doubt, start_run

    conf = load_config(cfg, env={})
    http = conf.model_copy(update={"delivery": conf.delivery.model_copy(update={"mode": "http"})})
    rd = start_run(http, options=RunOptions(in_doubt="skip"), out=str(setup["tmp"] / "x"))
    got = resolve_in_doubt(rd, http, open_ledger(conf.store.url, rd.run_id))
    assert got["confirm"]["skipped"] == 10 and got["confirm"]["resent"] == 0
    # a later run reports them ignored, in doubt, and does not send them
    assert run(["run", "--config", cfg]).exit_code == 0
    rows = read_jsonl(runs(setup["out"])[-1] / "results.jsonl")
    doubtful = [r for r in rows if "in doubt" in (r["message"] or "")]
    assert len(doubtful) == 10 and {r["status"] for r in doubtful} == {"ignored"}
    assert len(sends(setup["tmp"])) == 20


def test_a_second_run_on_the_same_store_exits_0_at_once(setup: dict[str, Any]) -> None:
    (setup["tmp"] / "data" / "orders.csv").write_text(orders(2))
    cfg = write_config(setup)
    with RunLock(setup["tmp"] / "state" / "mailpipe.db.lock") as lock:
        lock.acquire("test-holder")
        result = run(["run", "--config", cfg])
    assert result.exit_code == 0
    assert "another run holds the lock" in result.stderr
    assert "test-holder" in result.stderr
    assert runs(setup["out"]) == []
    # the lock is released when its holder goes: the next run takes it
    assert run(["run", "--config", cfg]).exit_code == 0


def test_a_killed_holder_leaves_no_stale_lock(setup: dict[str, Any]) -> None:
    (setup["tmp"] / "data" / "orders.csv").write_text(orders(2))
    cfg = write_config(setup)
    lock_file = setup["tmp"] / "state" / "mailpipe.db.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pipeline.lock import RunLock; "
                f"RunLock({str(lock_file)!r}).acquire('doomed'); print('held', flush=True); "
                "time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    assert "another run holds the lock" in run(["run", "--config", cfg]).stderr
    holder.kill()
    holder.wait()
    assert run(["run", "--config", cfg]).exit_code == 0
    assert len(runs(setup["out"])) == 1


def test_backfill_takes_the_window_and_resumes(setup: dict[str, Any]) -> None:
    data = setup["tmp"] / "data" / "orders.csv"
    lines = ["order_id,email,first_name,created_at"]
    lines += [f"{i},c{i}@example.com,N{i},2026-10-{i:02d}T08:00:00Z" for i in range(1, 21)]
    lines += ["99,late@example.com,L,not a date"]
    data.write_text("\n".join(lines) + "\n")
    cfg = write_config(setup, chunk=4, batch=2)
    args = [
        "backfill",
        "--config",
        cfg,
        "--job",
        "confirm",
        "--since",
        "2026-10-05",
        "--until",
        "2026-10-15",
    ]
    dry = run([*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    rows = check_run_dir(runs(setup["out"])[-1])
    taken = [r["record_id"] for r in rows if r["status"] == "completed"]
    assert taken == [str(i) for i in range(5, 15)]
    assert rows[-1]["status"] == "ignored" and "created_at" in rows[-1]["message"]
    assert sends(setup["tmp"]) == {}  # a dry run stores nothing
    # interrupted after two chunks, then started again with the same arguments
    killed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env={**os.environ, "MAILPIPE_FAULT": "after-send:2"},
        capture_output=True,
    )
    assert killed.returncode == -9
    assert run(args).exit_code == 0
    assert sends(setup["tmp"]) == {f"k:{i}": 1 for i in range(5, 15)}
    again = run(args)
    assert again.exit_code == 0
    final = check_run_dir(runs(setup["out"])[-1])
    assert [r["status"] for r in final if r["record_id"] in taken] == ["ignored"] * 10


def test_backfill_refuses_bad_dates(setup: dict[str, Any]) -> None:
    (setup["tmp"] / "data" / "orders.csv").write_text(orders(1))
    cfg = write_config(setup)
    bad = run(
        [
            "backfill",
            "--config",
            cfg,
            "--job",
            "confirm",
            "--since",
            "yesterday",
            "--until",
            "2026-01-01",
        ]
    )
    assert bad.exit_code == 2 and "--since" in bad.stderr
    backwards = run(
        [
            "backfill",
            "--config",
            cfg,
            "--job",
            "confirm",
            "--since",
            "2026-02-01",
            "--until",
            "2026-01-01",
        ]
    )
    assert backwards.exit_code == 2 and "later than --since" in backwards.stderr


def test_a_claim_on_sqlite_holds_its_keys_until_finished(tmp_path: Path) -> None:
    """On SQLite a chunk's claim is one row, not a pending entry per key. While the
    claiming run lives, another ledger sees its keys pending and cannot claim them;
    once it finishes they are settled; if it dies unfinished they are in doubt."""
    import pyarrow as pa

    from pipeline.ledger import Ledger
    from pipeline.store import Store, runs

    store = Store(f"sqlite:///{tmp_path}/s.db")
    first, second = Ledger(store, "run-a"), Ledger(store, "run-b")
    first.start()
    second.start()
    keys = ["k:1", "k:2", "k:3"]
    claimed, held, _ = first.claim("confirm", keys, ["b-1", "b-1", "b-2"])
    assert claimed.tolist() == [True, True, True] and not held
    # the other run sees them pending in run-a, claims only the new key
    assert {k: e.state for k, e in second.lookup("confirm", [*keys, "k:4"]).items()} == {
        k: "pending" for k in keys
    }
    got, held, _ = second.claim("confirm", ["k:2", "k:4"], ["c-1", "c-1"])
    assert got.tolist() == [False, True] and held["k:2"].run_id == "run-a"
    assert second.in_doubt("confirm") == []  # run-a still beats
    first.finish(
        "confirm",
        pa.array(keys[:2]),
        pa.array(["completed", "failed"]),
        pa.array([False, True]),
        pa.array(['{"status":"completed","result":"SUCCESS"}', None]),
    )
    # finishing ends the chunk's claim: k:3, not answered, was not sent (as when a
    # stopped run releases the rest), so even if run-a dies nothing is in doubt
    with store.begin() as conn:
        conn.execute(runs.update().where(runs.c.run_id == "run-a").values(heartbeat=0.0))
    assert second.in_doubt("confirm") == []
    entries = second.lookup("confirm", keys)
    assert {k: (e.state, e.transient) for k, e in entries.items()} == {
        "k:1": ("completed", False),
        "k:2": ("failed", True),
    }
    assert entries["k:1"].outcome == {"status": "completed", "result": "SUCCESS"}
    # a claim that is never finished: in doubt once its run stops beating
    first.claim("confirm", ["k:3"], ["b-3"])
    with store.begin() as conn:
        conn.execute(runs.update().where(runs.c.run_id == "run-a").values(heartbeat=0.0))
    assert second.in_doubt("confirm") == [("k:3", "run-a", "b-3")]
    store.close()


def test_a_finished_run_leaves_each_store_file_whole(setup: dict[str, Any]) -> None:
    """The command exits without the interpreter's teardown; its stores are closed all the
    same, so SQLite folds each WAL into its database file: a copy of the ledger's file alone is
    the whole store."""
    (setup["tmp"] / "data" / "orders.csv").write_text(orders(40))
    cfg = write_config(setup, chunk=10, batch=10)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", cfg], capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()
    state = setup["tmp"] / "state"
    assert not (state / "mailpipe.db-wal").exists()
    assert not (state / "mailpipe.ledger.db-wal").exists()
    copy = setup["tmp"] / "copy.db"
    copy.write_bytes((state / "mailpipe.ledger.db").read_bytes())
    with sqlite3.connect(copy) as db:
        assert db.execute("SELECT count(*) FROM ledger WHERE state = 'completed'").fetchone() == (
            40,
        )


def test_ledger_url_puts_a_sqlite_ledger_beside_its_store_and_keeps_a_server_one() -> None:
    from pipeline.store import ledger_url

    assert ledger_url("sqlite:///state/mailpipe.db") == "sqlite:///state/mailpipe.ledger.db"
    assert ledger_url("sqlite:////abs/path/shop") == "sqlite:////abs/path/shop.ledger.db"
    assert ledger_url("sqlite:///:memory:") == "sqlite:///:memory:"
    assert ledger_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_an_earlier_stores_ledger_moves_to_its_own_file_once(tmp_path: Path) -> None:
    """A store of an earlier release kept its ledger in its own file: the first open of
    the ledger moves every entry, claim and run there, and never again."""
    import pyarrow as pa

    from pipeline.ledger import Ledger, open_ledger
    from pipeline.store import Store, runs

    url = f"sqlite:///{tmp_path}/s.db"
    old_store = Store(url)  # the earlier layout: the ledger in the store's own file
    old = Ledger(old_store, "old-run")
    old.start()
    old.claim("confirm", ["k:1"], ["b-1"])
    old.finish(
        "confirm",
        pa.array(["k:1"]),
        pa.array(["completed"]),
        pa.array([False]),
        pa.array(['{"result":"SUCCESS"}']),
        old.claim_seq,
    )
    old.claim("confirm", ["k:2"], ["b-2"])
    with old_store.begin() as conn:  # and then it died with k:2 still claimed
        conn.execute(runs.update().where(runs.c.run_id == "old-run").values(heartbeat=0.0))
    old_store.close()

    new = open_ledger(url, "new-run")
    assert (tmp_path / "s.ledger.db").exists()
    assert {k: e.state for k, e in new.lookup("confirm", ["k:1", "k:2"]).items()} == {
        "k:1": "completed",
        "k:2": "pending",
    }
    assert new.in_doubt("confirm") == [("k:2", "old-run", "b-2")]
    new.close()
    with sqlite3.connect(tmp_path / "s.db") as db:  # nothing of it left in the store's file
        left = [db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("ledger", "claims")]
        assert left == [0, 0]
        # an entry appearing there later (an older mailpipe run again) is not taken over
        db.execute(
            "INSERT INTO ledger VALUES ('confirm', 'k:9', 'completed', 0, 'x', NULL, NULL, 'now')"
        )
    again = open_ledger(url, "third-run")
    assert again.lookup("confirm", ["k:9"]) == {}
    assert "k:1" in again.lookup("confirm", ["k:1"])
    again.close()


def test_a_busy_store_keeps_a_stale_copy_of_the_moved_ledger_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Emptying the old ledger in the store's file is best effort: another process
    writing there past the busy timeout leaves the copy, which is never read again."""
    import pipeline.store as store_mod
    from pipeline.ledger import Ledger, open_ledger
    from pipeline.store import Store

    url = f"sqlite:///{tmp_path}/s.db"
    old_store = Store(url)
    old = Ledger(old_store, "old-run")
    old.claim("confirm", ["k:1"], ["b-1"])
    old_store.close()
    plain = store_mod._sqlite_pragmas

    def impatient(conn: Any, record: Any) -> None:
        plain(conn, record)
        conn.execute("PRAGMA busy_timeout=50")

    monkeypatch.setattr(store_mod, "_sqlite_pragmas", impatient)
    writer = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process writing to the store's file
    try:
        new = open_ledger(url, "new-run")
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert {k: e.state for k, e in new.lookup("confirm", ["k:1"]).items()} == {"k:1": "pending"}
    new.close()
    with sqlite3.connect(tmp_path / "s.db") as db:  # the stale copy stayed
        assert db.execute("SELECT count(*) FROM claims").fetchone() == (1,)


def test_the_platform_log_keeps_keys_that_json_must_escape(tmp_path: Path) -> None:
    """log_platform writes a chunk's keys as one JSON array built by Arrow: quotes,
    backslashes, control characters and non-ASCII keys arrive as they were."""
    import pyarrow as pa

    from pipeline.ledger import log_platform
    from pipeline.store import Store

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    keys = ['k"1', "k\\2", "k\x1f3", "k\u00e94", "k\n5", "plain"]
    said = ['{"status":"completed"}'] * 4 + ['{"status":"failed"}'] * 2
    with store.begin() as conn:
        log_platform(conn, "job", pa.array(keys), said)
        log_platform(conn, "job", keys[:1], said[:1])  # a list too; a second send
    with store.begin() as conn:
        rows = conn.exec_driver_sql("SELECT key, outcome, sends FROM platform_log").fetchall()
    got = {k: (o, n) for k, o, n in rows}
    assert got == {k: (o, 2 if k == keys[0] else 1) for k, o in zip(keys, said)}
    store.close()
