"""The ledger: one entry per record key, so that nothing is sent twice and nothing is lost.

A record's key is its job plus its record key (``k:<value>``), or, for a
source without one, the digest of its file and its line (``f:<sha256>:<line>``).
Around every chunk of batches the deliver stage

1. **claims** the chunk's keys — ``pending``, with the run and the batch — in
   one transaction, before anything is sent; a key already ``completed`` (or
   failed for good), or held by another live run, is not claimed and its row
   comes back ``ignored`` with the earlier answer;
2. sends the claimed recipients;
3. **finishes** them — ``completed`` or ``failed`` with the documented answer
   and whether the failure was transient — in one transaction.

A crash between 1 and 3 leaves ``pending`` entries of a run that no longer
beats: they are *in doubt*. The next run resolves them first: by asking the
platform where that is possible (the simulate engine's own log; a Yesmail
ticket), otherwise by the ``--in-doubt`` policy — ``skip`` (the default:
they stay unsent, reported ``ignored``) or ``resend``.

States: ``pending`` · ``completed`` · ``failed`` (``transient`` says whether a
later run may try again) · ``doubt`` (in doubt, skipped by policy).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.store import Store, ledger, now, platform_log, runs

__all__ = ["STALE_SECONDS", "Entry", "Ledger"]

STALE_SECONDS = 120.0  # a run that has not beaten for this long is taken for dead
_CHUNK = 20000


@dataclass(frozen=True)
class Entry:
    state: str
    transient: bool
    run_id: str
    outcome: dict[str, Any] | None

    @property
    def final(self) -> bool:
        """Nothing more to do for this key (unless asked to resend)."""
        return (
            self.state == "completed"
            or (self.state == "failed" and not self.transient)
            or self.state == "doubt"
        )

    def held(self, resend: bool, live: set[str]) -> bool:
        """Not for this run to send: settled (unless resending), or pending in a live run."""
        return (self.final and not resend) or (self.state == "pending" and self.run_id in live)


class Ledger:
    """The ledger of one store, used by one run."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self._dialect = store.engine.dialect.name

    # -- the run itself ----------------------------------------------------------------

    def start(self) -> None:
        with self.store.begin() as conn:
            conn.execute(runs.delete().where(runs.c.run_id == self.run_id))
            conn.execute(
                runs.insert().values(
                    run_id=self.run_id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    started=now(),
                    heartbeat=time.time(),
                )
            )

    def beat(self) -> None:
        with self.store.begin() as conn:
            conn.execute(
                runs.update().where(runs.c.run_id == self.run_id).values(heartbeat=time.time())
            )

    def stop(self) -> None:
        with self.store.begin() as conn:
            conn.execute(
                runs.update()
                .where(runs.c.run_id == self.run_id)
                .values(heartbeat=time.time(), finished=now())
            )

    def live_runs(self, conn: Connection) -> set[str]:
        """Runs other than this one that still beat (and have not finished).

        A run on this host whose process is gone is dead at once, without
        waiting for its heartbeat to go stale.
        """
        cutoff = time.time() - STALE_SECONDS
        rows = conn.execute(
            sa.select(runs.c.run_id, runs.c.host, runs.c.pid).where(
                runs.c.finished.is_(None), runs.c.heartbeat >= cutoff, runs.c.run_id != self.run_id
            )
        )
        host = socket.gethostname()
        return {r for r, h, pid in rows if h != host or _alive(pid)}

    # -- lookups -----------------------------------------------------------------------

    def lookup(self, job: str, keys: Sequence[str]) -> dict[str, Entry]:
        """The entries of the given keys that exist (one query per chunk of keys)."""
        if not keys:
            return {}
        with self.store.begin() as conn:
            return self._lookup(conn, job, keys)

    def _lookup(self, conn: Connection, job: str, keys: Sequence[str]) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        cols = "l.key, l.state, l.transient, l.run_id, l.outcome"
        if self._dialect == "sqlite":
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            rows = cur.execute(
                f"SELECT {cols} FROM json_each(?) j CROSS JOIN ledger l "
                "ON l.job = ? AND l.key = j.value",
                (orjson.dumps(list(keys)).decode(), job),
            ).fetchall()
        elif self._dialect == "postgresql":
            rows = conn.exec_driver_sql(
                f"SELECT {cols} FROM ledger l WHERE l.job = %(j)s AND l.key = ANY(%(k)s)",
                {"j": job, "k": list(keys)},
            ).fetchall()
        else:
            rows = []
            for i in range(0, len(keys), 500):
                q = sa.select(
                    ledger.c.key,
                    ledger.c.state,
                    ledger.c.transient,
                    ledger.c.run_id,
                    ledger.c.outcome,
                ).where(ledger.c.job == job, ledger.c.key.in_(list(keys[i : i + 500])))
                rows += list(conn.execute(q))
        for key, state, transient, run_id, outcome in rows:
            out[key] = Entry(
                state, bool(transient), run_id, orjson.loads(outcome) if outcome else None
            )
        return out

    # -- claim and finish --------------------------------------------------------------

    def claim(
        self, job: str, keys: Sequence[str], batches: Sequence[str], resend: bool = False
    ) -> tuple[np.ndarray, dict[str, Entry], dict[str, Entry]]:
        """Mark the keys pending for this run, in one transaction, before any is sent.

        Returns which keys were claimed; the entries of those that were not
        (final ones unless ``resend``, pending ones of another live run); and the
        earlier entries of keys claimed all the same (a resend, a retry).
        """
        claimed = np.ones(len(keys), dtype=bool)
        if not keys:
            return claimed, {}, {}
        if self._dialect == "postgresql":
            return self._claim_shared(job, keys, batches, resend)
        with self.store.begin() as conn:
            existing = self._lookup(conn, job, keys)
            live = self.live_runs(conn) if existing else set()
            held: dict[str, Entry] = {}
            previous: dict[str, Entry] = {}
            for i, k in enumerate(keys):
                e = existing.get(k)
                if e is None or e.run_id == self.run_id:
                    continue
                if e.held(resend, live):
                    claimed[i] = False
                    held[k] = e
                else:
                    previous[k] = e
            mine = [(k, b) for k, b, c in zip(keys, batches, claimed.tolist()) if c]
            self._write(conn, job, [(k, "pending", False, b, None) for k, b in mine])
        return claimed, held, previous

    def _claim_shared(
        self, job: str, keys: Sequence[str], batches: Sequence[str], resend: bool
    ) -> tuple[np.ndarray, dict[str, Entry], dict[str, Entry]]:
        """PostgreSQL, where several runners share the ledger: new keys are claimed by
        ``INSERT … ON CONFLICT DO NOTHING`` (exactly one runner's insert wins), known keys
        by ``SELECT … FOR UPDATE SKIP LOCKED`` (a key another runner is claiming right now
        is held, not waited for). Keys go in sorted order so two claims cannot deadlock."""
        claimed = np.zeros(len(keys), dtype=bool)
        pos = {k: i for i, k in enumerate(keys)}
        held: dict[str, Entry] = {}
        previous: dict[str, Entry] = {}
        stamp = now()
        order = sorted(pos)
        with self.store.begin() as conn:
            for i in range(0, len(order), _CHUNK):
                part = order[i : i + _CHUNK]
                rows = conn.exec_driver_sql(
                    "INSERT INTO ledger (job, key, state, transient, run_id, batch, outcome, "
                    "updated) SELECT %(job)s, k, 'pending', false, %(run)s, b, NULL, %(at)s "
                    "FROM unnest(%(keys)s::text[], %(batches)s::text[]) AS t(k, b) "
                    "ORDER BY k ON CONFLICT (job, key) DO NOTHING RETURNING key",
                    {
                        "job": job,
                        "run": self.run_id,
                        "at": stamp,
                        "keys": part,
                        "batches": [batches[pos[k]] for k in part],
                    },
                )
                for (k,) in rows:
                    claimed[pos[k]] = True
            rest = [k for k in order if not claimed[pos[k]]]
            live = self.live_runs(conn) if rest else set()
            take: list[str] = []
            for i in range(0, len(rest), _CHUNK):
                part = rest[i : i + _CHUNK]
                rows = conn.exec_driver_sql(
                    "SELECT key, state, transient, run_id, outcome FROM ledger "
                    "WHERE job = %(job)s AND key = ANY(%(keys)s::text[]) ORDER BY key "
                    "FOR UPDATE SKIP LOCKED",
                    {"job": job, "keys": part},
                )
                locked = set()
                for k, state, transient, run_id, outcome in rows:
                    locked.add(k)
                    e = Entry(
                        state, bool(transient), run_id, orjson.loads(outcome) if outcome else None
                    )
                    if run_id == self.run_id:
                        take.append(k)
                    elif e.held(resend, live):
                        held[k] = e
                    else:
                        previous[k] = e
                        take.append(k)
                for k in part:
                    if k not in locked:  # another runner is claiming it at this moment
                        held[k] = Entry("pending", False, "", None)
            for i in range(0, len(take), _CHUNK):
                part = take[i : i + _CHUNK]
                conn.exec_driver_sql(
                    "UPDATE ledger l SET state = 'pending', transient = false, run_id = %(run)s, "
                    "batch = t.b, outcome = NULL, updated = %(at)s "
                    "FROM unnest(%(keys)s::text[], %(batches)s::text[]) AS t(k, b) "
                    "WHERE l.job = %(job)s AND l.key = t.k",
                    {
                        "job": job,
                        "run": self.run_id,
                        "at": stamp,
                        "keys": part,
                        "batches": [batches[pos[k]] for k in part],
                    },
                )
                for k in part:
                    claimed[pos[k]] = True
        return claimed, held, previous

    def finish(
        self,
        job: str,
        keys: Sequence[str],
        states: Sequence[str],
        transient: Sequence[bool],
        batches: Sequence[str],
        outcomes: Sequence[str | None],
    ) -> None:
        """Record the answers of sent keys, in one transaction."""
        with self.store.begin() as conn:
            self._write(conn, job, list(zip(keys, states, transient, batches, outcomes)))
            conn.execute(
                runs.update().where(runs.c.run_id == self.run_id).values(heartbeat=time.time())
            )

    def _write(
        self, conn: Connection, job: str, rows: list[tuple[str, str, bool, str | None, str | None]]
    ) -> None:
        if not rows:
            return
        stamp = now()
        upsert = (
            " ON CONFLICT (job, key) DO UPDATE SET "
            "state = excluded.state, transient = excluded.transient, "
            "run_id = excluded.run_id, batch = excluded.batch, "
            "outcome = excluded.outcome, updated = excluded.updated"
        )
        cols = "INSERT INTO ledger (job, key, state, transient, run_id, batch, outcome, updated) "
        if self._dialect == "sqlite":
            # the whole chunk as one JSON parameter: SQLite unpacks it in C, no per-row binding
            sql = (
                cols + "SELECT ?, json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
                "json_extract(value, '$[2]'), ?, json_extract(value, '$[3]'), "
                "json_extract(value, '$[4]'), ? FROM json_each(?) WHERE true" + upsert
            )
            for i in range(0, len(rows), _CHUNK):
                part = orjson.dumps(
                    [(k, s, int(bool(t)), b, o) for k, s, t, b, o in rows[i : i + _CHUNK]]
                )
                conn.exec_driver_sql(sql, (job, self.run_id, stamp, part.decode()))
            return
        params = [(job, k, s, bool(t), self.run_id, b, o, stamp) for k, s, t, b, o in rows]
        sql = cols + f"VALUES ({', '.join(['%s'] * 8)})" + upsert
        for i in range(0, len(params), _CHUNK):
            conn.exec_driver_sql(sql, params[i : i + _CHUNK])

    def release(self, job: str, keys: Sequence[str]) -> None:
        """Give back claims of keys this run did not send after all (the run stops)."""
        with self.store.begin() as conn:
            for i in range(0, len(keys), 500):
                conn.execute(
                    ledger.delete().where(
                        ledger.c.job == job,
                        ledger.c.run_id == self.run_id,
                        ledger.c.state == "pending",
                        ledger.c.key.in_(list(keys[i : i + 500])),
                    )
                )

    # -- in doubt ----------------------------------------------------------------------

    def in_doubt(self, job: str) -> list[tuple[str, str, str | None]]:
        """(key, run_id, batch) of pending entries left by runs that no longer beat."""
        with self.store.begin() as conn:
            live = self.live_runs(conn) | {self.run_id}
            rows = conn.execute(
                sa.select(ledger.c.key, ledger.c.run_id, ledger.c.batch).where(
                    ledger.c.job == job, ledger.c.state == "pending"
                )
            )
            return [(k, r, b) for k, r, b in rows if r not in live]

    def platform_answers(self, job: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """What the simulated platform recorded for these keys (only simulate has such a log)."""
        out: dict[str, dict[str, Any]] = {}
        with self.store.begin() as conn:
            for i in range(0, len(keys), 500):
                q = sa.select(platform_log.c.key, platform_log.c.outcome).where(
                    platform_log.c.job == job, platform_log.c.key.in_(list(keys[i : i + 500]))
                )
                out.update({k: orjson.loads(o) for k, o in conn.execute(q)})
        return out

    def settle_doubt(
        self,
        job: str,
        decided: Mapping[str, tuple[str, bool, dict[str, Any] | None]],
        skipped: Sequence[str],
        resent: Sequence[str],
    ) -> None:
        """Record how in-doubt keys were resolved (their earlier run keeps the entry)."""
        with self.store.begin() as conn:
            stamp = now()
            for key, (state, transient, outcome) in decided.items():
                conn.execute(
                    ledger.update()
                    .where(ledger.c.job == job, ledger.c.key == key)
                    .values(
                        state=state,
                        transient=transient,
                        updated=stamp,
                        outcome=orjson.dumps(outcome).decode() if outcome else None,
                    )
                )
            if skipped:
                for i in range(0, len(skipped), 500):
                    conn.execute(
                        ledger.update()
                        .where(ledger.c.job == job, ledger.c.key.in_(list(skipped[i : i + 500])))
                        .values(state="doubt", updated=stamp)
                    )
            if resent:
                for i in range(0, len(resent), 500):
                    conn.execute(
                        ledger.delete().where(
                            ledger.c.job == job, ledger.c.key.in_(list(resent[i : i + 500]))
                        )
                    )


def log_platform(conn: Connection, job: str, keys: Sequence[str], outcomes: Sequence[str]) -> None:
    """The simulated platform notes what it processed, in the same transaction as its state."""
    if not keys:
        return
    dialect = conn.engine.dialect.name
    mark = "?" if dialect == "sqlite" else "%s"
    conn.exec_driver_sql(
        f"INSERT INTO platform_log (job, key, outcome, sends) VALUES ({mark}, {mark}, {mark}, 1) "
        "ON CONFLICT (job, key) DO UPDATE SET outcome = excluded.outcome, "
        "sends = platform_log.sends + 1",
        [(job, k, o) for k, o in zip(keys, outcomes)],
    )


def _alive(pid: int | None) -> bool:
    """Whether a process with this id exists on this host."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
