"""The state store: SQLAlchemy Core tables over SQLite (default) or PostgreSQL.

It holds what the platforms would know, for the simulate engine and the
sandbox — per list the subscribers' profile values and subscription state,
the global suppression list, Maestro mail-job states, Yesmail subscribers and
their subscriptions (divisions) — and, for every mode, the ledger of what was
sent (see :mod:`pipeline.ledger`).

The schema is created on first use and carries a version in ``meta``; an older
store is migrated when opened, and a store written by a newer mailpipe is
refused rather than misread.

Versions: 1 — the first; 2 — on SQLite, the chunks a run has claimed but not
finished live in ``claims`` (one row a chunk) instead of as ``pending`` ledger
rows, and the ledger has no index by state; 3 — the index ``subscribers_state``
replaces ``subscribers_by_email`` (every lookup names the list).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import hashlib
import secrets
import sqlite3
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline.arrowutil import join_items, json_escape
from pipeline.errors import ConfigError, MailpipeError

__all__ = [
    "SCHEMA_VERSION",
    "SUBSCRIBER_STATES",
    "Store",
    "email_key",
    "hash_password",
    "ledger_url",
    "move_ledger_out",
    "sqlite_file",
    "verify_password",
]

SCHEMA_VERSION = 3
SUBSCRIBER_STATES = ("subscribed", "pending", "unsubscribed", "bounced")
_IN_CHUNK = 900
_MAX_BOUNCES = 1 << 24  # a lookup reports bounce counts up to this
_PBKDF2_ROUNDS = 100_000
# the columns of a subscriber as the bulk writes give them
_PUT_COLUMNS = (
    "list",
    "email_key",
    "email",
    "state",
    "bounces",
    "suspended",
    "profile",
    "password_hash",
    "updated",
)

metadata = sa.MetaData()

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
subscribers = sa.Table(
    "subscribers",
    metadata,
    sa.Column("list", sa.String(200), primary_key=True),
    sa.Column("email_key", sa.String(320), primary_key=True),
    sa.Column("email", sa.String(320), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("bounces", sa.Integer, nullable=False, default=0),
    sa.Column("suspended", sa.Boolean, nullable=False, default=False),
    sa.Column("profile", sa.Text, nullable=False, default="{}"),
    sa.Column("password_hash", sa.Text),
    sa.Column("updated", sa.String(32), nullable=False),
    # SQLite: one B-tree keyed by (list, email_key), not a rowid table plus an index
    sqlite_with_rowid=False,
)
# the engine's lookup of a chunk's addresses reads only this narrow index, not the rows
sa.Index(
    "subscribers_state",
    subscribers.c.list,
    subscribers.c.email_key,
    subscribers.c.state,
    subscribers.c.bounces,
    subscribers.c.suspended,
)
suppression = sa.Table(
    "suppression",
    metadata,
    sa.Column("email_key", sa.String(320), primary_key=True),
    sa.Column("email", sa.String(320), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("added_at", sa.String(32), nullable=False),
)
mail_jobs = sa.Table(
    "mail_jobs",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("state", sa.String(32), nullable=False),
)
mail_counts = sa.Table(
    "mail_counts",
    metadata,
    sa.Column("grp", sa.String(200), primary_key=True),
    sa.Column("email_key", sa.String(320), primary_key=True),
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("sent", sa.Integer, nullable=False),
)
ym_subscribers = sa.Table(
    "ym_subscribers",
    metadata,
    sa.Column("email_key", sa.String(320), primary_key=True),
    sa.Column("id", sa.String(320)),
    sa.Column("email", sa.String(320), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attrs", sa.Text, nullable=False, default="{}"),
)
ym_subscriptions = sa.Table(
    "ym_subscriptions",
    metadata,
    sa.Column("email_key", sa.String(320), primary_key=True),
    sa.Column("division", sa.String(200), primary_key=True),
)
# what mailpipe sent: one entry per record key (see pipeline/ledger.py)
ledger = sa.Table(
    "ledger",
    metadata,
    sa.Column("job", sa.String(200), primary_key=True),
    sa.Column("key", sa.String(400), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),  # pending | completed | failed | doubt
    sa.Column("transient", sa.Boolean, nullable=False, default=False),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("batch", sa.String(64)),  # while pending (PostgreSQL; SQLite: in claims)
    sa.Column("outcome", sa.Text),  # the documented answer, as JSON
    sa.Column("updated", sa.String(32), nullable=False),
    sqlite_with_rowid=False,
)
# PostgreSQL keeps claims as pending ledger rows (runners share it) and finds them by state
sa.Index("ledger_by_state", ledger.c.job, ledger.c.state).ddl_if(dialect="postgresql")
# SQLite (one run at a time): the keys of a chunk claimed and not yet finished, one row
# per chunk — ``members`` is the JSON ``[[key, …], [batch, …]]``; finishing the chunk
# deletes the row in the same transaction that writes its answers to the ledger
claims = sa.Table(
    "claims",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("job", sa.String(200), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("members", sa.Text, nullable=False),
)
# runs that hold pending ledger entries: a pending entry of a run that stopped beating
# is in doubt
runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(200), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started", sa.String(32), nullable=False),
    sa.Column("heartbeat", sa.Float, nullable=False),
    sa.Column("finished", sa.String(32)),
)
# the simulated platforms' own record of what they processed (for in-doubt questions)
platform_log = sa.Table(
    "platform_log",
    metadata,
    sa.Column("job", sa.String(200), primary_key=True),
    sa.Column("key", sa.String(400), primary_key=True),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("sends", sa.Integer, nullable=False, default=1),  # how often it was processed
    sqlite_with_rowid=False,
)


def email_key(email: str) -> str:
    """How the store matches addresses: case-insensitively."""
    return email.strip().lower()


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def hash_password(password: str) -> str:
    """Salted PBKDF2-SHA256; only this ever reaches the store."""
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, _PBKDF2_ROUNDS)
    return f"pbkdf2_sha256${_PBKDF2_ROUNDS}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    algo, rounds, salt, digest = stored.split("$")
    if algo != "pbkdf2_sha256":
        return False
    got = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(rounds))
    return secrets.compare_digest(got.hex(), digest)


class Store:
    """Open (and if needed create) the store at a SQLAlchemy URL."""

    def __init__(self, url: str, dry_run: bool = False) -> None:
        url = driver_url(url)
        self.url = url
        self.dry_run = dry_run
        path = sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine: Engine = sa.create_engine(url, future=True)
        except (sa.exc.ArgumentError, ImportError) as e:
            raise ConfigError(
                "store.url",
                f"cannot use {_safe_url(url)!r} ({e}); write e.g. "
                '"sqlite:///state/mailpipe.db" or "postgresql://user@host/db"',
            ) from None
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        _OPEN.add(self)
        self._ensure_schema()

    def _ensure_schema(self) -> None:
        try:
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    # runners starting together on a new database: one creates the tables
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7170221)")
                metadata.create_all(conn)
        except sa.exc.OperationalError as e:
            raise MailpipeError(
                f"store {_safe_url(self.url)}: cannot open ({_first_line(e.orig)}); check "
                "store.url, that the server is up (PostgreSQL: the password in PGPASSWORD "
                "or ~/.pgpass) and that the directory is writable (SQLite)"
            ) from None
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(meta.c.value).where(meta.c.key == "schema_version")
            ).first()
            if row is None:
                conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row[0]) > SCHEMA_VERSION:
                raise MailpipeError(
                    f"store {_safe_url(self.url)} has schema version {row[0]}, "
                    f"newer than this mailpipe ({SCHEMA_VERSION}); upgrade mailpipe"
                )
            elif int(row[0]) < SCHEMA_VERSION:
                if int(row[0]) < 2 and conn.dialect.name == "sqlite":
                    _claims_out_of_ledger(conn)
                if int(row[0]) < 3:
                    conn.exec_driver_sql(
                        "CREATE INDEX IF NOT EXISTS subscribers_state ON subscribers "
                        "(list, email_key, state, bounces, suspended)"
                    )
                    conn.exec_driver_sql("DROP INDEX IF EXISTS subscribers_by_email")
                conn.execute(
                    meta.update()
                    .where(meta.c.key == "schema_version")
                    .values(value=str(SCHEMA_VERSION))
                )

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction (rolled back instead of committed in a dry run)."""
        if self.dry_run:
            with self.engine.connect() as conn:
                trans = conn.begin()
                try:
                    yield conn
                finally:
                    trans.rollback()
            return
        with self.engine.begin() as conn:
            yield conn

    def close(self) -> None:
        """Close the connections: SQLite then checkpoints its WAL into the database file
        and removes it (a copy of the file alone is then the whole store)."""
        self.engine.dispose()

    # -- lookups (one query per chunk of keys, never one per row) -------------------

    def subscribers_of(
        self, conn: Connection, lists: Sequence[str], keys: Iterable[str]
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """(list, email_key) → subscriber row, for the given lists and keys."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for part in _chunks(sorted(set(keys))):
            q = sa.select(subscribers).where(
                subscribers.c.list.in_(list(lists)), subscribers.c.email_key.in_(part)
            )
            for row in conn.execute(q).mappings():
                out[(row["list"], row["email_key"])] = dict(row)
        return out

    def states(
        self, conn: Connection, list_name: str, keys: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(state, bounces, suspended) of each key on a list, as arrays in the keys' order;
        state None where the address is not on the list.

        The engine's hot lookup, one query for all the keys: on SQLite they go in as
        one JSON array (sorted, so neighbouring probes share pages) and each is one
        probe of the narrow ``subscribers_state`` index, which holds all three values.
        """
        n = len(keys)
        state = np.full(n, None, dtype=object)
        bounces = np.zeros(n, dtype=np.int64)
        suspended = np.zeros(n, dtype=bool)
        if not n:
            return state, bounces, suspended
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            # sorted keys: neighbouring probes share index pages (a third faster on
            # SQLite); sorted and written as one JSON array by Arrow's kernels, which
            # let go of the GIL (Python's sort of 73,000 keys held it for ~40 ms)
            col = pa.array(keys, pa.string())
            order = pc.sort_indices(col).to_numpy()
            literals = pc.binary_join_element_wise('"', json_escape(col.take(order)), '"', "")
            # CROSS JOIN keeps the keys the outer loop, each one probe of the narrow index;
            # the answer is one JSON array of integers, one a known key: its position in
            # the array, its state's number, suspended and bounces packed above it
            states = " ".join(f"WHEN '{v}' THEN {i}" for i, v in enumerate(SUBSCRIBER_STATES))
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            (packed,) = cur.execute(
                "SELECT json_group_array(j.key + 4294967296 * ("
                f"CASE s.state {states} ELSE {len(SUBSCRIBER_STATES)} END "
                f"+ 8 * (s.suspended != 0) + 16 * min(s.bounces, {_MAX_BOUNCES}))) "
                "FROM json_each(?) j CROSS JOIN subscribers s INDEXED BY subscribers_state "
                "ON s.list = ? AND s.email_key = j.value",
                ("[" + join_items(literals).decode() + "]", list_name),
            ).fetchone()
            got = np.array(orjson.loads(packed), dtype=np.int64)
            if got.size:
                where = order[got & 0xFFFFFFFF]
                high = got >> 32
                named = np.array([*SUBSCRIBER_STATES, "other"], dtype=object)
                state[where] = named[high & 7]
                suspended[where] = (high & 8) != 0
                bounces[where] = high >> 4
            return state, bounces, suspended
        # sorted keys: neighbouring probes share index pages
        order = sorted(range(n), key=keys.__getitem__)
        ordered = [keys[i] for i in order]
        rows: Sequence[Sequence[Any]]
        if dialect == "postgresql":
            rows = conn.exec_driver_sql(
                "SELECT t.i - 1, s.state, s.bounces, s.suspended "
                "FROM unnest(%(k)s::text[]) WITH ORDINALITY AS t(k, i) "
                "JOIN subscribers s ON s.list = %(l)s AND s.email_key = t.k",
                {"l": list_name, "k": ordered},
            ).fetchall()
        else:
            found = self.subscribers_of(conn, [list_name], ordered)
            rows = [
                (i, r["state"], r["bounces"], r["suspended"])
                for i, k in enumerate(ordered)
                if (r := found.get((list_name, k))) is not None
            ]
        if rows:
            at, st, bo, su = zip(*rows)
            where = np.array(order, dtype=np.int64)[np.asarray(at, dtype=np.int64)]
            state[where] = st
            bounces[where] = np.asarray(bo, dtype=np.int64)
            suspended[where] = np.asarray(su, dtype=bool)
        return state, bounces, suspended

    def put_subscribers(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Insert subscribers, replacing state and profile of those already there.

        A bulk write (one statement for all rows); imports go through
        :meth:`upsert_subscribers`, which counts what changed.
        """
        stamp = now()
        self._put_subscribers(
            conn,
            [
                (
                    r["list"],
                    r["email_key"],
                    r["email"],
                    r["state"],
                    r.get("bounces", 0),
                    bool(r.get("suspended", False)),
                    r.get("profile", "{}"),
                    r.get("password_hash"),
                    stamp,
                )
                for r in rows
            ],
        )

    def add_subscribers(
        self,
        conn: Connection,
        list_name: str,
        keys: Sequence[str],
        emails: Sequence[str | None],
        profiles: Sequence[str],
    ) -> None:
        """New subscribers of one list (subscribed, no bounces, not suspended), given as
        columns: the on-demand engine's bulk write, without a dict a row."""
        stamp = now()
        self._put_subscribers(
            conn,
            [
                (list_name, k, e, "subscribed", 0, False, p, None, stamp)
                for k, e, p in zip(keys, emails, profiles, strict=True)
            ],
        )

    def _put_subscribers(self, conn: Connection, params: list[tuple[Any, ...]]) -> None:
        """Upsert rows of :data:`_PUT_COLUMNS` in one statement."""
        if not params:
            return
        dialect = self.engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            self.upsert_subscribers(conn, [dict(zip(_PUT_COLUMNS, p, strict=True)) for p in params])
            return
        mark = "?" if dialect == "sqlite" else "%s"
        upsert = " ON CONFLICT (list, email_key) DO UPDATE SET " + ", ".join(
            f"{c} = excluded.{c}"
            for c in ("email", "state", "bounces", "suspended", "profile", "updated")
        )
        sql = (
            f"INSERT INTO subscribers ({', '.join(_PUT_COLUMNS)}) VALUES "
            f"({', '.join([mark] * len(_PUT_COLUMNS))})" + upsert
        )
        # plain tuples through the driver, in key order (neighbouring index pages); on
        # SQLite 7.5 against 11.1 µs a row for the rows as one JSON array unpacked by
        # json_each (20,000 new subscribers at a time into the benchmark's 1M-row store)
        params.sort(key=itemgetter(1))
        if dialect == "sqlite":
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            cur.executemany(sql, params)
            return
        conn.exec_driver_sql(sql, params)

    def suppressed_mask(self, conn: Connection, keys: list[str]) -> np.ndarray:
        """Which of the keys are on the suppression list (the engine's lookup: on SQLite
        one query answering with the positions found, as one JSON array)."""
        mask = np.zeros(len(keys), dtype=bool)
        if not keys:
            return mask
        if self.engine.dialect.name == "sqlite":
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            (found,) = cur.execute(
                "SELECT json_group_array(j.key) FROM json_each(?) j "
                "CROSS JOIN suppression s ON s.email_key = j.value",
                (orjson.dumps(keys).decode(),),
            ).fetchone()
            mask[np.array(orjson.loads(found), dtype=np.int64)] = True
            return mask
        listed = self.suppressed(conn, keys)
        if listed:
            mask[:] = [k in listed for k in keys]
        return mask

    def suppressed(self, conn: Connection, keys: Iterable[str]) -> set[str]:
        keys = sorted(set(keys))
        if self.engine.dialect.name == "sqlite" and len(keys) > _IN_CHUNK:
            rows = conn.exec_driver_sql(
                "SELECT s.email_key FROM json_each(?) j "
                "CROSS JOIN suppression s ON s.email_key = j.value",
                (orjson.dumps(keys).decode(),),
            ).fetchall()
            return {r[0] for r in rows}
        found: set[str] = set()
        for part in _chunks(keys):
            q = sa.select(suppression.c.email_key).where(suppression.c.email_key.in_(part))
            found.update(r[0] for r in conn.execute(q))
        return found

    def mail_job_state(self, conn: Connection, job_id: str) -> str | None:
        row = conn.execute(sa.select(mail_jobs.c.state).where(mail_jobs.c.id == job_id)).first()
        return None if row is None else str(row[0])

    def sync_mail_jobs(self, states: dict[str, str]) -> None:
        """Make the store's mail jobs those of the config (simulate section)."""
        with self.begin() as conn:
            conn.execute(mail_jobs.delete())
            if states:
                conn.execute(mail_jobs.insert(), [{"id": k, "state": v} for k, v in states.items()])

    def sent_today(
        self, conn: Connection, group: str, keys: Iterable[str], day: str
    ) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in _chunks(sorted(set(keys))):
            q = sa.select(mail_counts.c.email_key, mail_counts.c.sent).where(
                mail_counts.c.grp == group,
                mail_counts.c.day == day,
                mail_counts.c.email_key.in_(part),
            )
            out.update({r[0]: int(r[1]) for r in conn.execute(q)})
        return out

    def count_sends(self, conn: Connection, group: str, keys: Sequence[str], day: str) -> None:
        counts: dict[str, int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        before = self.sent_today(conn, group, counts, day)
        for k, n in counts.items():
            if k in before:
                conn.execute(
                    mail_counts.update()
                    .where(
                        mail_counts.c.grp == group,
                        mail_counts.c.email_key == k,
                        mail_counts.c.day == day,
                    )
                    .values(sent=before[k] + n)
                )
            else:
                conn.execute(mail_counts.insert().values(grp=group, email_key=k, day=day, sent=n))

    def ym_state(
        self, conn: Connection, keys: Iterable[str]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, set[str]]]:
        """Yesmail subscribers and their divisions, by email key."""
        subs: dict[str, dict[str, Any]] = {}
        divs: dict[str, set[str]] = {}
        for part in _chunks(sorted(set(keys))):
            for row in conn.execute(
                sa.select(ym_subscribers).where(ym_subscribers.c.email_key.in_(part))
            ).mappings():
                subs[row["email_key"]] = dict(row)
            for k, d in conn.execute(
                sa.select(ym_subscriptions).where(ym_subscriptions.c.email_key.in_(part))
            ):
                divs.setdefault(k, set()).add(d)
        return subs, divs

    def ym_keys_by_id(self, conn: Connection, ids: Iterable[str]) -> dict[str, str]:
        """Yesmail customer id → email key, for the given ids that exist."""
        out: dict[str, str] = {}
        for part in _chunks(sorted(set(ids))):
            q = sa.select(ym_subscribers.c.id, ym_subscribers.c.email_key).where(
                ym_subscribers.c.id.in_(part)
            )
            out.update({r[0]: r[1] for r in conn.execute(q)})
        return out

    # -- writes -----------------------------------------------------------------------

    def upsert_subscribers(
        self, conn: Connection, rows: Sequence[dict[str, Any]]
    ) -> tuple[int, int]:
        """Insert or update subscribers; returns (inserted, changed)."""
        if not rows:
            return 0, 0
        existing = self.subscribers_of(
            conn, sorted({r["list"] for r in rows}), [r["email_key"] for r in rows]
        )
        inserted = changed = 0
        fields = ("email", "state", "bounces", "suspended", "profile", "password_hash")
        # the same subscriber twice in one call: applied in order, i.e. the later values win
        collapsed: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            key = (r["list"], r["email_key"])
            collapsed[key] = {**collapsed.get(key, {}), **r}
        new_rows = []
        for r in collapsed.values():
            old = existing.get((r["list"], r["email_key"]))
            if old is None:
                new_rows.append({**r, "updated": now()})
                inserted += 1
            elif any(r.get(f, old.get(f)) != old.get(f) for f in fields):
                values = {f: r[f] for f in fields if f in r}
                conn.execute(
                    subscribers.update()
                    .where(
                        subscribers.c.list == r["list"],
                        subscribers.c.email_key == r["email_key"],
                    )
                    .values(**values, updated=now())
                )
                existing[(r["list"], r["email_key"])] = {**old, **values}
                changed += 1
        if new_rows:
            defaults = {"bounces": 0, "suspended": False, "profile": "{}", "password_hash": None}
            conn.execute(subscribers.insert(), [{**defaults, **r} for r in new_rows])
        return inserted, changed

    def upsert_suppression(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> int:
        have = {r["email_key"] for r in rows} & self.suppressed(
            conn, [r["email_key"] for r in rows]
        )
        unique: dict[str, dict[str, Any]] = {}
        for r in rows:
            if r["email_key"] not in have:
                unique.setdefault(r["email_key"], r)
        if unique:
            conn.execute(suppression.insert(), list(unique.values()))
        return len(unique)

    def set_ym_subscriptions(self, conn: Connection, key: str, divisions: Iterable[str]) -> bool:
        want = set(divisions)
        _, have = self.ym_state(conn, [key])
        if have.get(key, set()) == want:
            return False
        conn.execute(ym_subscriptions.delete().where(ym_subscriptions.c.email_key == key))
        if want:
            conn.execute(
                ym_subscriptions.insert(), [{"email_key": key, "division": d} for d in sorted(want)]
            )
        return True

    def upsert_ym_subscriber(self, conn: Connection, key: str, values: dict[str, Any]) -> None:
        row = conn.execute(
            sa.select(ym_subscribers.c.email_key).where(ym_subscribers.c.email_key == key)
        ).first()
        if row is None:
            conn.execute(ym_subscribers.insert().values(email_key=key, **values))
        else:
            conn.execute(
                ym_subscribers.update().where(ym_subscribers.c.email_key == key).values(**values)
            )

    # -- listing ----------------------------------------------------------------------

    def iter_subscribers(self, list_name: str) -> Iterator[dict[str, Any]]:
        with self.engine.connect() as conn:
            q = (
                sa.select(subscribers)
                .where(subscribers.c.list == list_name)
                .order_by(subscribers.c.email_key)
            )
            for row in conn.execute(q).mappings():
                yield dict(row)

    def iter_suppression(self) -> Iterator[dict[str, Any]]:
        with self.engine.connect() as conn:
            for row in conn.execute(
                sa.select(suppression).order_by(suppression.c.email_key)
            ).mappings():
                yield dict(row)

    def ym_divisions(self, key: str) -> set[str]:
        with self.engine.connect() as conn:
            return self.ym_state(conn, [key])[1].get(key, set())


def profile_json(profile: dict[str, Any]) -> str:
    return orjson.dumps(profile, option=orjson.OPT_SORT_KEYS).decode()


# every store not yet closed, closed when the process exits (the CLI leaves without the
# interpreter's teardown, which would otherwise be what closes them)
_OPEN: weakref.WeakSet[Store] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for store in list(_OPEN):
        store.close()


def _claims_out_of_ledger(conn: Connection) -> None:
    """Version 1 → 2 on SQLite: pending ledger rows become one claim per run and job."""
    held: dict[tuple[str, str], tuple[list[str], list[str | None]]] = {}
    for job, key, run_id, batch in conn.execute(
        sa.select(ledger.c.job, ledger.c.key, ledger.c.run_id, ledger.c.batch).where(
            ledger.c.state == "pending"
        )
    ):
        keys, batches = held.setdefault((run_id, job), ([], []))
        keys.append(key)
        batches.append(batch)
    for (run_id, job), pair in held.items():
        members = orjson.dumps(pair).decode()
        conn.execute(claims.insert().values(run_id=run_id, job=job, seq=0, members=members))
    conn.execute(ledger.delete().where(ledger.c.state == "pending"))
    conn.exec_driver_sql("DROP INDEX IF EXISTS ledger_by_state")


def _chunks(keys: Sequence[str]) -> Iterator[list[str]]:
    for i in range(0, len(keys), _IN_CHUNK):
        yield list(keys[i : i + _IN_CHUNK])


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    # lookups of a chunk's addresses touch pages all over a large table: keep them in memory
    cur.execute("PRAGMA cache_size=-131072")  # 128 MiB
    cur.execute("PRAGMA temp_store=MEMORY")
    # a run writes hundreds of MB (the ledger, the engine's state): checkpoint the WAL into
    # the database every 200 MB rather than every 4 MB (each checkpoint syncs the file)
    cur.execute("PRAGMA wal_autocheckpoint=50000")
    cur.close()


def _safe_url(url: str) -> str:
    """A store URL without its password, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url.split("@")[-1]


def ledger_url(url: str) -> str:
    """Where a store keeps its ledger: for a SQLite file, a file of its own beside it
    (``state/mailpipe.db`` → ``state/mailpipe.ledger.db``); a server database keeps it.

    In WAL mode a connection drops its whole page cache whenever another one has
    committed to the same file; with the ledger in the store's file, the engine
    re-read its pages after every chunk the ledger recorded (1M on-demand rows:
    the engine 17% slower, the deliver stage 13%).
    """
    path = sqlite_file(url)
    if path is None:
        return url
    return "sqlite:///" + str(path.with_name(f"{path.stem}.ledger{path.suffix or '.db'}"))


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for a server or an in-memory database."""
    if not url.startswith("sqlite:///") or url.startswith("sqlite:///:memory:"):
        return None
    return Path(url.removeprefix("sqlite:///"))


def move_ledger_out(store_url: str, ledger: Store) -> None:
    """Once, into a new ledger file: the ledger that a store of an earlier release kept
    in its own file. Copied and marked done in one transaction of the ledger file, then
    emptied in the store's file (a crash in between leaves only a stale copy there).
    A layout upgrade like the schema's, so a dry run makes it too."""
    main = sqlite_file(store_url)
    if main is None or ledger.url == driver_url(store_url):  # the ledger is in the store
        return
    raw = ledger.engine.raw_connection()
    try:
        cur = raw.cursor()
        mark = "SELECT 1 FROM meta WHERE key = 'ledger_from'"
        if cur.execute(mark).fetchone() is not None:
            return
        old = main.exists()
        if old:
            cur.execute("ATTACH DATABASE ? AS old", (str(main),))
        try:
            # the ledger file's write lock alone (BEGIN IMMEDIATE would lock the store's
            # file too, and wait for whoever writes there), taken by the first statement
            cur.execute("BEGIN")
            cur.execute("INSERT OR REPLACE INTO main.meta (key, value) VALUES ('ledger_move', '')")
            if cur.execute(mark).fetchone() is None:  # another process may have been first
                tables = _old_ledger_tables(cur) if old else []
                for table in tables:
                    cur.execute(f"INSERT OR IGNORE INTO main.{table} SELECT * FROM old.{table}")
                cur.execute("INSERT INTO meta (key, value) VALUES ('ledger_from', ?)", (str(main),))
            cur.execute("DELETE FROM main.meta WHERE key = 'ledger_move'")
            cur.execute("COMMIT")
            if old:
                # best effort: a store busy past the timeout keeps a stale copy, never read
                with contextlib.suppress(sqlite3.OperationalError):
                    cur.execute("BEGIN")
                    for table in _old_ledger_tables(cur):
                        cur.execute(f"DELETE FROM old.{table}")
                    cur.execute("COMMIT")
        finally:
            if raw.in_transaction:
                cur.execute("ROLLBACK")
            if old:
                cur.execute("DETACH DATABASE old")
    finally:
        raw.close()


def _old_ledger_tables(cur: Any) -> list[str]:
    have = {n for (n,) in cur.execute("SELECT name FROM old.sqlite_master WHERE type = 'table'")}
    return [t for t in ("ledger", "claims", "runs") if t in have]


def driver_url(url: str) -> str:
    """``postgresql://…`` (and ``postgres://…``) go through psycopg 3."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url.removeprefix(plain)
    return url


def _first_line(err: object) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
