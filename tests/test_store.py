"""The state store: schema versioning, idempotent upserts, lookups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from pipeline.errors import MailpipeError
from pipeline.store import SCHEMA_VERSION, Store, email_key, meta, profile_json


def sub(email: str, **row: Any) -> dict[str, Any]:
    return {
        "list": row.pop("list", "shop"),
        "email_key": email_key(email),
        "email": email,
        "state": row.pop("state", "subscribed"),
        "bounces": row.pop("bounces", 0),
        "suspended": row.pop("suspended", False),
        "profile": profile_json(row.pop("profile", {})),
        **row,
    }


def test_schema_created_on_first_use_with_its_version(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "s.db"
    store = Store(f"sqlite:///{path}")
    assert path.exists()
    tables = set(sa.inspect(store.engine).get_table_names())
    assert tables >= {
        "meta",
        "subscribers",
        "suppression",
        "mail_jobs",
        "mail_counts",
        "ym_subscribers",
        "ym_subscriptions",
    }
    with store.begin() as conn:
        version = conn.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version"))
        assert version.scalar_one() == str(SCHEMA_VERSION) == "3"
    store.close()
    # opened again: the same version, one row
    store = Store(f"sqlite:///{path}")
    with store.begin() as conn:
        assert conn.execute(sa.select(meta)).all() == [("schema_version", "3")]
    store.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    store = Store(url)
    with store.begin() as conn:
        conn.execute(
            meta.update()
            .where(meta.c.key == "schema_version")
            .values(value=str(SCHEMA_VERSION + 1))
        )
    store.close()
    with pytest.raises(MailpipeError) as info:
        Store(url)
    assert info.value.message == (
        f"store sqlite:///{tmp_path}/s.db has schema version 4, "
        "newer than this mailpipe (3); upgrade mailpipe"
    )


def test_a_version_1_store_is_migrated_and_its_pending_keys_stay_in_doubt(tmp_path: Path) -> None:
    """Version 1 kept claims as pending ledger rows (with an index by state); opened by
    this version, they become one claim per run and job, which the next run finds, and
    the subscribers get their lookup index."""
    import sqlite3

    from pipeline.ledger import Ledger

    path = tmp_path / "s.db"
    Store(f"sqlite:///{path}").close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.execute("DROP TABLE claims")
    db.execute("CREATE INDEX ledger_by_state ON ledger (job, state)")
    db.execute("DROP INDEX subscribers_state")
    db.execute("CREATE INDEX subscribers_by_email ON subscribers (email_key)")
    db.executemany(
        "INSERT INTO ledger VALUES ('confirm', ?, ?, 0, ?, ?, NULL, '2026-11-01T00:00:00Z')",
        [
            ("k:1", "completed", "old-run", "b-1"),
            ("k:2", "pending", "dead-run", "b-2"),
            ("k:3", "pending", "dead-run", "b-3"),
            ("k:4", "pending", "other-dead-run", "b-4"),
        ],
    )
    db.execute("INSERT INTO runs VALUES ('dead-run', 'h', 1, '2026-11-01T00:00:00Z', 0, NULL)")
    db.commit()
    db.close()
    store = Store(f"sqlite:///{path}")
    with store.begin() as conn:
        assert conn.execute(sa.select(meta.c.value)).scalar_one() == "3"
        states = conn.exec_driver_sql("SELECT key, state FROM ledger ORDER BY key").all()
        assert states == [("k:1", "completed")]
        indexes = conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'")
        names = {n for (n,) in indexes}
        assert "subscribers_state" in names
        assert not names & {"ledger_by_state", "subscribers_by_email"}
    doubt = Ledger(store, "new-run").in_doubt("confirm")
    assert sorted(doubt) == [
        ("k:2", "dead-run", "b-2"),
        ("k:3", "dead-run", "b-3"),
        ("k:4", "other-dead-run", "b-4"),
    ]
    store.close()


def test_reupserting_identical_subscribers_changes_nothing(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/s.db")
    batch = [
        sub("ann@example.com", profile={"FIRST_NAME": "Ann", "TAGS": ["a"]}),
        sub("Bob@Example.com", state="pending", bounces=2, suspended=True, password_hash="h"),
        sub("ann@example.com", list="news"),
    ]
    with store.begin() as conn:
        assert store.upsert_subscribers(conn, batch) == (3, 0)
    before = list(store.iter_subscribers("shop"))
    with store.begin() as conn:
        assert store.upsert_subscribers(conn, batch) == (0, 0)
        assert store.upsert_subscribers(conn, []) == (0, 0)
    assert list(store.iter_subscribers("shop")) == before  # not even "updated" moved
    # a real change counts once
    with store.begin() as conn:
        assert store.upsert_subscribers(conn, [sub("ann@example.com", state="unsubscribed")]) == (
            0,
            1,
        )
    assert {r["email_key"]: r["state"] for r in store.iter_subscribers("shop")} == {
        "ann@example.com": "unsubscribed",
        "bob@example.com": "pending",
    }
    store.close()


def test_same_subscriber_twice_in_one_upsert_keeps_the_later_values(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/s.db")
    rows = [
        sub("z@example.com", state="pending", profile={"AGE": 1}),
        sub("Z@example.com", state="pending", profile={"AGE": 2}),
    ]
    with store.begin() as conn:
        assert store.upsert_subscribers(conn, rows) == (1, 0)
    (row,) = store.iter_subscribers("shop")
    assert (row["email"], row["profile"]) == ("Z@example.com", '{"AGE":2}')
    with store.begin() as conn:
        assert store.upsert_subscribers(conn, rows) == (0, 0)
        assert store.upsert_subscribers(conn, rows[:1]) == (0, 1)
        assert store.upsert_subscribers(conn, rows) == (0, 1)
    (row,) = store.iter_subscribers("shop")
    assert row["profile"] == '{"AGE":2}'
    store.close()


def test_suppression_and_yesmail_lookups(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/s.db")
    entry = {
        "email_key": "a@example.com",
        "email": "A@example.com",
        "reason": "r",
        "added_at": "2024-01-01",
    }
    with store.begin() as conn:
        assert store.upsert_suppression(conn, [entry, entry]) == 1
        assert store.upsert_suppression(conn, [entry]) == 0
        assert store.suppressed(conn, ["a@example.com", "b@example.com"]) == {"a@example.com"}
        mask = store.suppressed_mask(conn, ["b@example.com", "a@example.com", "a@example.com"])
        assert mask.tolist() == [False, True, True]
        store.upsert_ym_subscriber(
            conn, "j@example.com", {"email": "j@example.com", "id": "J-1", "status": "active"}
        )
        assert store.set_ym_subscriptions(conn, "j@example.com", {"A"}) is True
        assert store.set_ym_subscriptions(conn, "j@example.com", {"A"}) is False
        assert store.ym_keys_by_id(conn, ["J-1", "nope"]) == {"J-1": "j@example.com"}
    assert store.ym_divisions("j@example.com") == {"A"}
    store.close()


def test_mail_jobs_follow_the_config(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/s.db")
    store.sync_mail_jobs({"a": "authorized", "b": "closed"})
    store.sync_mail_jobs({"b": "not-authorized"})
    with store.begin() as conn:
        assert store.mail_job_state(conn, "a") is None
        assert store.mail_job_state(conn, "b") == "not-authorized"
    store.close()


IMPORT_CONFIG = """
[store]
url = "sqlite:///{db}"

[lists.shop]
name = "Shop"
d_from_email = "shop@example.com"

[lists.shop.fields.COUNTRY]
type = "text"

[lists.newsletter]
name = "Newsletter"
d_from_email = "news@example.com"
mContainer = "2"
mOwner = "N10"
mListId = "HL#12"

[lists.newsletter.fields.FIRST_NAME]
type = "text"

[sources.signups]
kind = "signups"
path = "s.csv"
email = "email"

[jobs.join]
source = "signups"
target = "maestro-subscribe"
list = "newsletter"
"""


def test_subscribers_import_list_option_wins_over_the_list_column(tmp_path: Path) -> None:
    """`--list` names the list; a row whose list column names another one is rejected."""
    from click.testing import CliRunner

    from pipeline.cli import main

    config = tmp_path / "mailpipe.toml"
    config.write_text(IMPORT_CONFIG.format(db=tmp_path / "s.db"))

    def cli(*args: str) -> Any:
        return CliRunner().invoke(
            main,
            [*args[:2], "--config", str(config), *args[2:]],
            env={"MAILPIPE_STORE_URL": f"sqlite:///{tmp_path}/s.db"},  # not the caller's
            catch_exceptions=False,
        )

    data = tmp_path / "one.csv"
    data.write_text(
        "list,email\nshop,x@example.com\nnewsletter,y@example.com\n,z@example.com\n"
        " newsletter ,w@example.com\n"
    )
    done = cli("subscribers", "import", "--list", "newsletter", str(data))
    assert done.exit_code == 1
    assert done.stdout == f"{data}: 4 rows: 3 added, 0 updated, 0 unchanged, 1 rejected\n"
    assert done.stderr == (
        f"mailpipe: {data}:2: rejected: the row's list column says 'shop' but --list is "
        "'newsletter'; import it with --list shop, or empty or correct its list column\n"
    )
    news = cli("subscribers", "export", "--list", "newsletter")
    assert news.exit_code == 0
    assert news.stdout == (
        "list,email,state,bounces,suspended,FIRST_NAME\n"
        "newsletter,w@example.com,subscribed,0,false,\n"
        "newsletter,y@example.com,subscribed,0,false,\n"
        "newsletter,z@example.com,subscribed,0,false,\n"
    )
    shop = cli("subscribers", "export", "--list", "shop")
    assert shop.stdout == "list,email,state,bounces,suspended,COUNTRY\n"  # nothing moved there
    # importing it again changes nothing and rejects the same row
    again = cli("subscribers", "import", "--list", "newsletter", str(data))
    assert (again.exit_code, again.stdout, again.stderr) == (
        1,
        f"{data}: 4 rows: 0 added, 0 updated, 3 unchanged, 1 rejected\n",
        done.stderr,
    )
    # without --list the list column decides (an empty one names no list)
    done = cli("subscribers", "import", str(data))
    assert done.exit_code == 1
    assert done.stdout == f"{data}: 4 rows: 1 added, 0 updated, 2 unchanged, 1 rejected\n"
    assert done.stderr == (
        f"mailpipe: {data}:4: rejected: unknown list ''; the config has shop, newsletter\n"
    )
    shop = cli("subscribers", "export", "--list", "shop")
    assert shop.stdout == (
        "list,email,state,bounces,suspended,COUNTRY\nshop,x@example.com,subscribed,0,false,\n"
    )
