"""Crash safety: a run over 30,000 records killed with SIGKILL again and again, then re-run
until done, ends with every record answered exactly once and nothing sent twice."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson
from rundir_contract import check_run_dir

RECORDS = 30_000

CONFIG = """
[run]
out = "{tmp}/out"
chunk_rows = 500

[store]
url = "sqlite:///{tmp}/state/mailpipe.db"

[lists.shop]
name = "Shop"
d_from_email = "shop@example.com"

[lists.shop.fields.FIRST_NAME]
type = "text"

[sources.orders]
kind = "orders"
path = "{tmp}/data/orders.csv"
email = "email"
record_id = "order_id"

[sources.orders.fields]
FIRST_NAME = "first_name"

[jobs.confirm]
source = "orders"
target = "maestro-ondemand"
list = "shop"
ifNotExistsAddAndSend = true
batch_size = 300

[jobs.followup]
source = "orders"
target = "yesmail-send"
list = "shop"
fields = ["FIRST_NAME"]
templateId = "1465362"
attrs = {{ FIRST_NAME = "firstName" }}
batch_size = 100
"""

# where each attempt dies: injected points name the window (ledger written, nothing sent;
# part of a chunk's batches processed; all sent, answers not recorded); "timer" attempts are
# killed from outside after a random delay, wherever the process happens to be. The timers
# come last: in under a second a run gets through dozens of chunks, and the injected points
# must still find work left to be killed in
KILLS = [
    "after-claim:1",
    "mid-chunk:4",
    "after-send:2",
    "after-claim:3",
    "mid-chunk:9",
    "after-send:3",
    "mid-chunk:1",
    "after-claim:2",
    "after-send:1",
    "timer",
    "timer",
    "timer",
]


def test_sigkill_at_random_points_loses_nothing_and_sends_nothing_twice(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    lines = ["order_id,email,first_name"]
    lines += [f"{i},c{i}@example.com,N{i}" for i in range(RECORDS)]
    (tmp_path / "data" / "orders.csv").write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "mailpipe.toml"
    cfg.write_text(CONFIG.format(tmp=tmp_path))
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", str(cfg), "--log-json"]
    rng = random.Random(20261123)
    codes: list[tuple[str, int]] = []
    for kill in KILLS:
        env = {**os.environ}
        if kill == "timer":
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            time.sleep(rng.uniform(0.4, 1.0))
            proc.send_signal(signal.SIGKILL)
            code = proc.wait()
        else:
            env["MAILPIPE_FAULT"] = kill
            code = subprocess.run(cmd, env=env, capture_output=True).returncode
        codes.append((kill, code))
        assert code in (0, -signal.SIGKILL), f"{kill}: exit {code}"
    killed = sum(code == -signal.SIGKILL for _, code in codes)
    print(f"\nattempts: {codes}")
    assert killed >= 10, f"only {killed} of the attempts were killed: {codes}"

    # then run until a run finds nothing left to do
    for _ in range(3):
        done = subprocess.run(cmd, capture_output=True)
        assert done.returncode == 0, done.stderr.decode()[-2000:]

    runs = sorted(p for p in (tmp_path / "out").iterdir() if p.is_dir())
    doubt: dict[str, list[int]] = {"confirm": [], "followup": []}
    seen: list[str] = []
    for r in runs:
        manifest = orjson.loads((r / "manifest.json").read_bytes())
        for job, counts in (manifest.get("in_doubt") or {}).items():
            doubt[job].append(counts["found"])
            seen.append(
                f"{job}: {counts['found']} found, {counts['answered_by_platform']} answered "
                f"by the platform, {counts['resent']} resent"
            )
            assert counts["found"] == (
                counts["answered_by_platform"] + counts["skipped"] + counts["resent"]
            )
    print("\nin doubt, per resolving run:\n  " + "\n  ".join(seen))
    assert sum(doubt["confirm"]) > 0 and sum(doubt["followup"]) > 0

    # every finished run accounts for every row; the last one has nothing left to send
    last = check_run_dir(runs[-1])
    assert len(last) == 2 * RECORDS
    assert {r["status"] for r in last} == {"ignored"}
    assert all(r["earlier_run"] for r in last)
    for r in runs:
        if (r / "summary.json").exists():
            check_run_dir(r)

    with sqlite3.connect(tmp_path / "state" / "mailpipe.ledger.db") as db:
        states = dict(db.execute("SELECT state, count(*) FROM ledger GROUP BY state"))
    with sqlite3.connect(tmp_path / "state" / "mailpipe.db") as db:  # the platforms' own log
        sends = dict(db.execute("SELECT sends, count(*) FROM platform_log GROUP BY sends"))
        per_job = dict(db.execute("SELECT job, count(*) FROM platform_log GROUP BY job"))
    # one final answer per record and job; the platform processed each exactly once
    assert states == {"completed": 2 * RECORDS}
    assert sends == {1: 2 * RECORDS}
    assert per_job == {"confirm": RECORDS, "followup": RECORDS}
