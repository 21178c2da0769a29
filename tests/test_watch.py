"""`mailpipe watch`: the drop directory, from incoming/ to done/ or failed/."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import read_jsonl
from rundir_contract import check_run_dir

from pipeline.cli import main
from pipeline.lock import RunLock

CONFIG = """
[run]
out = "{tmp}/out"
chunk_rows = 4

[watch]
settle = 0

[store]
url = "sqlite:///{tmp}/state/mailpipe.db"

[lists.shop]
name = "Shop"
d_from_email = "shop@example.com"

[sources.orders]
kind = "orders"
path = "/nowhere/orders*.csv"
email = "email"
record_id = "order_id"

[sources.signups]
kind = "signups"
path = "/nowhere/signups*.parquet"
email = "email"

[jobs.confirm]
source = "orders"
target = "maestro-ondemand"
list = "shop"
ifNotExistsAddAndSend = true
batch_size = 2

[jobs.welcome]
source = "signups"
target = "maestro-ondemand"
list = "shop"
ifNotExistsAddAndSend = true
"""


def orders(start: int, n: int) -> str:
    rows = [f"{i},c{i}@example.com" for i in range(start, start + n)]
    return "order_id,email\n" + "\n".join(rows) + "\n"


@pytest.fixture
def drop(tmp_path: Path) -> dict[str, Any]:
    cfg = tmp_path / "mailpipe.toml"
    cfg.write_text(CONFIG.format(tmp=tmp_path))
    root = tmp_path / "drop"
    (root / "incoming").mkdir(parents=True)
    return {"tmp": tmp_path, "cfg": str(cfg), "root": root, "in": root / "incoming"}


def watch(d: dict[str, Any], *extra: str, env: dict[str, str] | None = None) -> Any:
    args = ["watch", "--config", d["cfg"], "--once", *extra, str(d["root"])]
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def sends(tmp: Path) -> dict[str, int]:
    with sqlite3.connect(tmp / "state" / "mailpipe.db") as db:
        return dict(db.execute("SELECT key, sends FROM platform_log"))


def test_good_files_end_in_done_with_their_results(drop: dict[str, Any]) -> None:
    (drop["in"] / "orders_1.csv").write_text(orders(1, 5))
    pq.write_table(
        pa.table({"email": ["s1@example.com", "s2@example.com"]}), drop["in"] / "signups_1.parquet"
    )
    got = watch(drop)
    assert got.exit_code == 0, got.output
    assert names(drop["root"] / "done") == ["orders_1.csv", "signups_1.parquet"]
    assert names(drop["in"]) == [] and names(drop["root"] / "processing") == []
    (run_dir,) = (drop["root"] / "results").iterdir()
    rows = check_run_dir(run_dir)
    assert len(rows) == 7 and {r["status"] for r in rows} == {"completed"}
    assert {r["job"] for r in rows} == {"confirm", "welcome"}
    # results hold addresses: private to the user that runs mailpipe
    assert stat.S_IMODE((run_dir / "results.jsonl").stat().st_mode) == 0o600
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert f"run directory: {run_dir}" in got.output


def test_bad_files_fail_with_a_reason_and_do_not_block_the_rest(drop: dict[str, Any]) -> None:
    inc = drop["in"]
    (inc / "orders_a_empty.csv").write_bytes(b"")
    (inc / "orders_b_binary.csv").write_bytes(b"order_id,email\n\x00\x01\x02\xff\n")
    (inc / "orders_c_half.csv").write_text("order_id,email\n1,a@example.com\n2,b@exa")
    (inc / "orders_d_columns.csv").write_text("id,mail\n1,a@example.com\n")
    (inc / "orders_e_orphan.csv.ready").write_bytes(b"")
    (inc / "signups_f_half.parquet").write_bytes(b"PAR1" + b"\x00" * 20)
    (inc / "newsletter.xlsx").write_text("not ours\n")
    (inc / "orders_z_good.csv").write_text(orders(1, 3))
    got = watch(drop)
    assert got.exit_code == 1  # some file failed: cron should tell someone
    failed = drop["root"] / "failed"
    errors = [p for p in failed.iterdir() if p.suffix == ".error"]
    reasons = {p.name.removesuffix(".error"): p.read_text() for p in errors}
    assert set(reasons) == {
        "orders_a_empty.csv",
        "orders_b_binary.csv",
        "orders_c_half.csv",
        "orders_d_columns.csv",
        "orders_e_orphan.csv.ready",
        "signups_f_half.parquet",
        "newsletter.xlsx",
    }
    assert "empty (0 bytes)" in reasons["orders_a_empty.csv"]
    assert "binary data" in reasons["orders_b_binary.csv"]
    assert "half-written" in reasons["orders_c_half.csv"]
    assert "missing column(s) 'email', 'order_id'" in reasons["orders_d_columns.csv"]
    assert "without its file" in reasons["orders_e_orphan.csv.ready"]
    assert "PAR1" in reasons["signups_f_half.parquet"]
    assert "no source takes" in reasons["newsletter.xlsx"]
    for name in reasons:  # the file itself sits next to its reason
        assert (failed / name).exists()
    assert names(drop["root"] / "done") == ["orders_z_good.csv"]
    (run_dir,) = (drop["root"] / "results").iterdir()
    rows = read_jsonl(run_dir / "results.jsonl")
    assert [r["status"] for r in rows] == ["completed"] * 3
    assert all(str(p).endswith("\n") for p in reasons.values())


def test_incomplete_files_wait(drop: dict[str, Any]) -> None:
    inc = drop["in"]
    (inc / "orders_1.csv").write_text(orders(1, 2))  # just written: not settled
    (inc / "orders_2.csv.part").write_text(orders(3, 2))
    (inc / "orders_3.csv.tmp").write_text(orders(5, 2))
    (inc / ".orders_4.csv").write_text(orders(7, 2))
    got = watch(drop, "--settle", "3600")
    assert got.exit_code == 0
    assert names(inc) == [".orders_4.csv", "orders_1.csv", "orders_2.csv.part", "orders_3.csv.tmp"]
    assert not (drop["root"] / "results").exists() or names(drop["root"] / "results") == []
    # a .ready marker says the file is complete, whatever its age
    (inc / "orders_1.csv.ready").write_bytes(b"")
    assert watch(drop, "--settle", "3600").exit_code == 0
    assert names(drop["root"] / "done") == ["orders_1.csv", "orders_1.csv.ready"]
    # and settled by age (mtime an hour ago), it is taken too
    old = time.time() - 7200
    os.rename(inc / "orders_2.csv.part", inc / "orders_2.csv")
    os.utime(inc / "orders_2.csv", (old, old))
    assert watch(drop, "--settle", "3600").exit_code == 0
    assert "orders_2.csv" in names(drop["root"] / "done")


def test_symlinks_and_dotted_names_are_refused(drop: dict[str, Any], tmp_path: Path) -> None:
    outside = tmp_path / "secret.csv"
    outside.write_text(orders(1, 2))
    (drop["in"] / "orders_link.csv").symlink_to(outside)
    (drop["in"] / "orders..csv").write_text(orders(3, 2))
    got = watch(drop)
    assert got.exit_code == 1
    failed = drop["root"] / "failed"
    assert "symlink" in (failed / "orders_link.csv.error").read_text()
    assert "'..'" in (failed / "orders..csv.error").read_text()
    assert outside.read_text() == orders(1, 2)  # never read, never moved
    assert (failed / "orders_link.csv").is_symlink()
    # a drop directory whose incoming/ is a link elsewhere is not used at all
    other = tmp_path / "other"
    other.mkdir()
    (other / "incoming").symlink_to(tmp_path)
    bad = CliRunner().invoke(main, ["watch", "--config", drop["cfg"], "--once", str(other)])
    assert bad.exit_code == 2 and "symlink" in bad.stderr


def test_a_second_watch_leaves_at_once_while_the_first_holds_the_lock(
    drop: dict[str, Any],
) -> None:
    (drop["in"] / "orders_1.csv").write_text(orders(1, 2))
    lock = RunLock(drop["root"] / ".mailpipe-watch.lock")
    lock.acquire("the-other-one")
    try:
        got = watch(drop)
    finally:
        lock.release()
    assert got.exit_code == 0 and "another run holds the lock" in got.stderr
    assert "the-other-one" in got.stderr
    assert names(drop["in"]) == ["orders_1.csv"]  # untouched, for the holder or the next tick
    assert watch(drop).exit_code == 0
    assert names(drop["root"] / "done") == ["orders_1.csv"]


def test_a_killed_watch_gives_its_files_back_and_nothing_is_sent_twice(
    drop: dict[str, Any],
) -> None:
    (drop["in"] / "orders_1.csv").write_text(orders(1, 10))
    cmd = [sys.executable, "-m", "pipeline", "watch", "--config", drop["cfg"], "--once"]
    killed = subprocess.run(
        [*cmd, str(drop["root"])],
        env={**os.environ, "MAILPIPE_FAULT": "after-send:2"},
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL
    (stuck,) = (drop["root"] / "processing").iterdir()
    assert names(stuck) == ["orders_1.csv"]
    got = watch(drop)
    assert got.exit_code == 0, got.output
    assert names(drop["root"] / "done") == ["orders_1.csv"]
    assert names(drop["root"] / "processing") == []
    assert sends(drop["tmp"]) == {f"k:{i}": 1 for i in range(1, 11)}
    last = sorted((drop["root"] / "results").iterdir())[-1]
    rows = check_run_dir(last)
    assert len(rows) == 10 and {r["status"] for r in rows} <= {"completed", "ignored"}


def test_the_same_file_dropped_again_sends_nothing_again(drop: dict[str, Any]) -> None:
    (drop["in"] / "orders_1.csv").write_text(orders(1, 3))
    assert watch(drop).exit_code == 0
    (drop["in"] / "orders_1.csv").write_text(orders(1, 3))
    assert watch(drop).exit_code == 0
    assert names(drop["root"] / "done")[0] == "orders_1.csv"
    assert len(names(drop["root"] / "done")) == 2  # the second copy is kept beside the first
    last = sorted((drop["root"] / "results").iterdir())[-1]
    assert [r["status"] for r in read_jsonl(last / "results.jsonl")] == ["ignored"] * 3
    assert sends(drop["tmp"]) == {f"k:{i}": 1 for i in range(1, 4)}


def test_long_running_watch_takes_files_as_they_come_and_stops_on_sigterm(
    drop: dict[str, Any],
) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "watch",
            "--config",
            drop["cfg"],
            "--interval",
            "0.2",
            "--log-json",
            str(drop["root"]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        for n in (1, 2):
            part = drop["in"] / f"orders_{n}.csv.part"
            part.write_text(orders(10 * n, 2))
            os.rename(part, drop["in"] / f"orders_{n}.csv")
            deadline = time.monotonic() + 30
            while f"orders_{n}.csv" not in names(drop["root"] / "done"):
                assert time.monotonic() < deadline, proc.stderr
                assert proc.poll() is None
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert b'"file taken: orders_2.csv"' in err or b"file taken: orders_2.csv" in err
    assert len(names(drop["root"] / "results")) == 2
