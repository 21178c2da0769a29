"""A shared PostgreSQL store: the ledger, crash recovery and two runners on one drop
directory, against a real server started by the fixture."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from click.testing import CliRunner
from conftest import read_jsonl
from pg_server import pg_server, pg_url  # noqa: F401  (fixtures)
from rundir_contract import check_run_dir

from pipeline.cli import main
from pipeline.ledger import Ledger
from pipeline.store import Store

CONFIG = """
[run]
out = "{tmp}/out"
chunk_rows = {chunk}

[watch]
settle = 0
max_files = 4

[store]
url = "{url}"

[lists.shop]
name = "Shop"
d_from_email = "shop@example.com"

[sources.orders]
kind = "orders"
path = "{tmp}/data/orders*.csv"
email = "email"
record_id = "order_id"

[jobs.confirm]
source = "orders"
target = "maestro-ondemand"
list = "shop"
ifNotExistsAddAndSend = true
batch_size = 10
"""


def orders(start: int, n: int) -> str:
    rows = [f"{i},c{i}@example.com" for i in range(start, start + n)]
    return "order_id,email\n" + "\n".join(rows) + "\n"


def setup(tmp: Path, url: str, chunk: int = 20) -> str:
    (tmp / "data").mkdir(exist_ok=True)
    cfg = tmp / "mailpipe.toml"
    cfg.write_text(CONFIG.format(tmp=tmp, url=url, chunk=chunk))
    return str(cfg)


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql))


def test_a_rerun_on_postgresql_sends_nothing_again(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    cfg = setup(tmp_path, pg_url)
    (tmp_path / "data" / "orders.csv").write_text(orders(1, 25))
    assert CliRunner().invoke(main, ["run", "--config", cfg]).exit_code == 0
    assert CliRunner().invoke(main, ["run", "--config", cfg]).exit_code == 0
    first, second = sorted((tmp_path / "out").iterdir())
    assert {r["status"] for r in check_run_dir(first)} == {"completed"}
    rows = check_run_dir(second)
    assert [r["status"] for r in rows] == ["ignored"] * 25
    assert {r["earlier_run"] for r in rows} == {first.name}
    assert query(pg_url, "SELECT state, count(*) FROM ledger GROUP BY state") == [("completed", 25)]


def test_a_crash_on_postgresql_is_resolved_by_the_next_run(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    cfg = setup(tmp_path, pg_url)
    (tmp_path / "data" / "orders.csv").write_text(orders(1, 100))
    killed = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", cfg],
        env={**os.environ, "MAILPIPE_FAULT": "after-send:2"},
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    got = CliRunner().invoke(main, ["run", "--config", cfg, "--json"])
    assert got.exit_code == 0, got.output
    last = sorted((tmp_path / "out").iterdir())[-1]
    check_run_dir(last)
    sends = query(pg_url, "SELECT sends, count(*) FROM platform_log GROUP BY sends")
    assert sends == [(1, 100)]
    assert query(pg_url, "SELECT state, count(*) FROM ledger GROUP BY state") == [
        ("completed", 100)
    ]


def test_concurrent_claims_give_each_key_to_exactly_one_runner(pg_url: str) -> None:  # noqa: F811
    """Two runners claim overlapping key sets at the same moment, over and over."""
    keys = [f"k:{i}" for i in range(3000)]
    store_a, store_b = Store(pg_url), Store(pg_url)
    a, b = Ledger(store_a, "run-a"), Ledger(store_b, "run-b")
    a.start()
    b.start()
    won: dict[str, list[str]] = {"run-a": [], "run-b": []}
    barrier = threading.Barrier(2)

    def claim(ledger: Ledger, mine: list[str]) -> None:
        for i in range(0, len(mine), 250):
            part = mine[i : i + 250]
            barrier.wait()
            got, _, _ = ledger.claim("confirm", part, ["b"] * len(part))
            won[ledger.run_id] += [k for k, c in zip(part, got.tolist(), strict=True) if c]

    rng = np.random.default_rng(7)
    threads = [
        threading.Thread(target=claim, args=(a, list(rng.permutation(keys)))),
        threading.Thread(target=claim, args=(b, list(rng.permutation(keys)))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    both = set(won["run-a"]) & set(won["run-b"])
    assert not both, f"{len(both)} keys claimed by both runners"
    assert set(won["run-a"]) | set(won["run-b"]) == set(keys)
    assert won["run-a"] and won["run-b"]  # both did some of the work


def test_two_runners_over_one_drop_directory_complete_every_row_once(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    cfg = setup(tmp_path, pg_url, chunk=40)
    drop = tmp_path / "drop"
    (drop / "incoming").mkdir(parents=True)
    n_files, per_file = 50, 40
    for f in range(n_files):
        (drop / "incoming" / f"orders_{f:02d}.csv").write_text(orders(f * per_file, per_file))
    # the same orders again under another name: the ledger, not the file, decides
    (drop / "incoming" / "orders_dup.csv").write_text(orders(0, per_file))
    cmd = [sys.executable, "-m", "pipeline", "watch", "--config", cfg, "--once", str(drop)]

    def runner(errors: list[str]) -> None:
        deadline = time.monotonic() + 240
        while any((drop / "incoming").iterdir()) and time.monotonic() < deadline:
            done = subprocess.run(cmd, capture_output=True)
            if done.returncode != 0:
                errors.append(done.stderr.decode()[-2000:])

    errors: list[str] = []
    threads = [threading.Thread(target=runner, args=(errors,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[0]
    assert len(list((drop / "done").iterdir())) == n_files + 1
    assert not list((drop / "failed").iterdir())
    runs = sorted((drop / "results").iterdir())
    assert len(runs) >= 2
    completed: Counter[str] = Counter()
    rows_seen = 0
    for run in runs:
        rows = check_run_dir(run)
        rows_seen += len(rows)
        completed.update(r["record_id"] for r in rows if r["status"] == "completed")
    total = n_files * per_file
    assert rows_seen == total + per_file
    assert set(completed) == {str(i) for i in range(total)}
    assert set(completed.values()) == {1}, "a record completed twice"
    assert query(pg_url, "SELECT sends, count(*) FROM platform_log GROUP BY sends") == [(1, total)]
    # both runners took part (their runs are in the ledger's runs table)
    assert len(query(pg_url, "SELECT DISTINCT pid FROM runs")) >= 2


@pytest.mark.parametrize("sep", ["postgresql://", "postgres://"])
def test_plain_postgresql_urls_use_psycopg(sep: str, pg_url: str) -> None:  # noqa: F811
    store = Store(pg_url.replace("postgresql://", sep))
    assert store.engine.dialect.name == "postgresql"
    assert store.engine.dialect.driver == "psycopg"


def test_dupes_are_reported_ignored_not_lost(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    cfg = setup(tmp_path, pg_url)
    (tmp_path / "data" / "orders.csv").write_text(orders(1, 3) + "1,c1@example.com\n")
    assert CliRunner().invoke(main, ["run", "--config", cfg]).exit_code == 0
    (run,) = (tmp_path / "out").iterdir()
    rows = read_jsonl(run / "results.jsonl")
    assert [r["status"] for r in rows] == ["completed"] * 3 + ["ignored"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_engine_lookup_places_each_answer_at_its_key(
    backend: str,
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    """Store.states answers in the keys' order, on both databases: unknown keys None,
    and a stored state, bounce count and suspension exactly as written — keys that
    JSON must escape or that are not ASCII included, and a key asked twice."""
    from pipeline.store import Store, email_key

    store = Store(pg_url if backend == "postgresql" else f"sqlite:///{tmp_path}/s.db")
    known = {
        "b@x.example": ("subscribed", 0, False),
        "a@x.example": ("unsubscribed", 3, False),
        "d@x.example": ("bounced", 70000, True),
        "c@x.example": ("pending", 0, True),
        'q"uote\\back@x.example': ("subscribed", 1, False),
        "jürgen@bücher.example": ("pending", 2, False),
    }
    with store.begin() as conn:
        store.put_subscribers(
            conn,
            [
                {
                    "list": "l",
                    "email_key": email_key(k),
                    "email": k,
                    "state": st,
                    "bounces": b,
                    "suspended": su,
                    "profile": "{}",
                }
                for k, (st, b, su) in known.items()
            ]
            + [
                {
                    "list": "other",
                    "email_key": "z@x.example",
                    "email": "z@x.example",
                    "state": "subscribed",
                    "profile": "{}",
                }
            ],
        )
    asked = [
        "z@x.example",
        "d@x.example",
        "jürgen@bücher.example",
        "nobody@x.example",
        "a@x.example",
        'q"uote\\back@x.example',
        "c@x.example",
        "b@x.example",
        "d@x.example",
    ]
    with store.begin() as conn:
        state, bounces, suspended = store.states(conn, "l", asked)
    got = [
        None if s is None else (s, int(b), bool(u)) for s, b, u in zip(state, bounces, suspended)
    ]
    assert got == [
        None,
        known["d@x.example"],
        known["jürgen@bücher.example"],
        None,
        known["a@x.example"],
        known['q"uote\\back@x.example'],
        known["c@x.example"],
        known["b@x.example"],
        known["d@x.example"],
    ]
    store.close()
