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

Where the claim lives depends on the store. PostgreSQL, shared by several
runners, needs a row per key that exactly one runner can insert: claimed
keys are ``pending`` ledger rows. SQLite has one run at a time (the store's
lock), so a claim is one ``claims`` row per chunk holding its keys, and
finishing writes each key's row once, in the transaction that deletes the
claim: one B-tree write per key instead of two, the ledger's cost halved.

A crash between 1 and 3 leaves pending keys of a run that no longer
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
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.arrowutil import join_items, json_escape
from pipeline.checkpoint import CHECKPOINT_BYTES, Checkpointer
from pipeline.store import (
    Store,
    claims,
    driver_url,
    ledger,
    ledger_url,
    move_ledger_out,
    now,
    platform_log,
    runs,
)

__all__ = ["STALE_SECONDS", "Answers", "Entry", "Ledger", "open_ledger"]

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


@dataclass(frozen=True)
class Answers:
    """Entries to write, as columns: key, state, transient (booleans), outcome. (A settled
    entry keeps its answer, not its batch: the batch matters while the key is pending.)"""

    keys: pa.Array
    states: pa.Array
    transient: pa.Array
    outcomes: pa.Array

    @classmethod
    def of(cls, rows: Sequence[tuple[str, str, bool, str | None]]) -> Answers:
        k, s, t, o = zip(*rows) if rows else ((),) * 4
        text = pa.string()
        return cls(pa.array(k, text), pa.array(s, text), pa.array(t, pa.bool_()), pa.array(o, text))


def _flat(a: pa.Array | pa.ChunkedArray) -> pa.Array:
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a


def _groups(
    states: pa.Array, transient: pa.Array, outcomes: pa.Array
) -> Iterator[tuple[tuple[str, bool, str | None], np.ndarray]]:
    """The distinct (state, transient, outcome) triples and the positions of each, found
    with array operations (a chunk has few distinct answers and many rows)."""
    st = pc.dictionary_encode(states, null_encoding="encode")
    out = pc.dictionary_encode(outcomes, null_encoding="encode")
    flag = pc.fill_null(transient, False).to_numpy(zero_copy_only=False).astype(np.int64)
    code = (st.indices.to_numpy().astype(np.int64) * 2 + flag) * len(out.dictionary)
    code += out.indices.to_numpy().astype(np.int64)
    order = np.argsort(code, kind="stable")
    cuts = np.flatnonzero(np.diff(code[order])) + 1
    for at in np.split(order, cuts):
        i = int(at[0])
        yield (
            (
                st.dictionary[st.indices[i].as_py()].as_py(),
                bool(flag[i]),
                out.dictionary[out.indices[i].as_py()].as_py(),
            ),
            at,
        )


class Ledger:
    """The ledger of one store, used by one run.

    ``store`` holds the ledger's tables; ``platform_url`` is the store whose
    simulated platforms keep their log (by default the same). :func:`open_ledger`
    opens both for a configured store URL.
    """

    def __init__(self, store: Store, run_id: str, platform_url: str | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.platform_url = platform_url
        self._dialect = store.engine.dialect.name
        # SQLite: claims are rows of ``claims``, numbered per run (see the module's doc)
        self._chunked = self._dialect != "postgresql"
        self._seq = 0
        # the number of the claim :meth:`claim` made last (0: it claimed nothing); hand it
        # to finish/release when several chunks are in flight
        self.claim_seq = 0
        self._checkpoints: Checkpointer | None = None

    def close(self) -> None:
        """Close the ledger's store."""
        if self._checkpoints is not None:
            self._checkpoints.stop()
        self.store.close()

    def _written(self) -> None:
        """After a chunk's answers: the log checkpointed from a thread once it passes
        CHECKPOINT_BYTES, not by a commit of the run's (see pipeline.checkpoint; a store
        other than SQLite has no such log, and the checkpointer does nothing)."""
        if self.store.dry_run:
            return
        if self._checkpoints is None:  # a run that writes: the first chunk starts it
            self._checkpoints = Checkpointer(self.store, every=None)
            self._checkpoints.start()
        self._checkpoints.nudge(CHECKPOINT_BYTES)

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
        out = self._entries(conn, job, keys)
        if self._chunked:
            out.update(self._claimed_by_others(conn, job, keys))
        return out

    def _claimed_by_others(
        self, conn: Connection, job: str, keys: Sequence[str]
    ) -> dict[str, Entry]:
        """Keys of unfinished claims of other runs (SQLite): pending, whatever the ledger
        said of them before. Normally none: a stopped run's are settled before sending."""
        out: dict[str, Entry] = {}
        wanted: set[str] | None = None
        # this run's own claims are not read at all: each is a whole chunk's JSON (~19 ms
        # to parse at 69,000 keys, with the GIL held), and one is in flight at every claim
        for run_id, claimed, _ in self._claims(conn, job, skip={self.run_id}):
            wanted = set(keys) if wanted is None else wanted
            for key in claimed:
                if key in wanted:
                    out[key] = Entry("pending", False, run_id, None)
        return out

    @staticmethod
    def _claims(
        conn: Connection, job: str, skip: Collection[str] = ()
    ) -> Iterator[tuple[str, list[str], list[str | None]]]:
        """(run, keys, batches) of every unfinished claim of the job, in claiming order,
        but those of the runs in ``skip``."""
        query = sa.select(claims.c.run_id, claims.c.members).where(claims.c.job == job)
        if skip:
            query = query.where(claims.c.run_id.not_in(sorted(skip)))
        for run_id, blob in conn.execute(query.order_by(claims.c.run_id, claims.c.seq)):
            keys, batches = orjson.loads(blob)
            yield run_id, keys, batches

    def _entries(self, conn: Connection, job: str, keys: Sequence[str]) -> dict[str, Entry]:
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
        self.claim_seq = 0
        if not keys:
            return claimed, {}, {}
        if self._dialect == "postgresql":
            return self._claim_shared(job, keys, batches, resend)
        with self.store.begin() as conn:
            existing = self._lookup(conn, job, keys)
            live = self.live_runs(conn) if existing else set()
            held: dict[str, Entry] = {}
            previous: dict[str, Entry] = {}
            # most chunks are new keys only: then the claim is the chunk as it is
            pos = {k: i for i, k in enumerate(keys)} if existing else {}
            for k, e in existing.items():
                if e.run_id == self.run_id:
                    continue
                if e.held(resend, live):
                    claimed[pos[k]] = False
                    held[k] = e
                else:
                    previous[k] = e
            if held:
                mine = np.flatnonzero(claimed).tolist()
                members = [[keys[i] for i in mine], [batches[i] for i in mine]]
            else:
                members = [list(keys), list(batches)]
            if members[0]:
                self._seq += 1
                self.claim_seq = self._seq
                conn.execute(
                    claims.insert().values(
                        run_id=self.run_id,
                        job=job,
                        seq=self._seq,
                        members=orjson.dumps(members).decode(),
                    )
                )
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
        keys: pa.Array | pa.ChunkedArray,
        states: pa.Array | pa.ChunkedArray,
        transient: pa.Array | pa.ChunkedArray,
        outcomes: pa.Array | pa.ChunkedArray,
        claim: int | None = None,
    ) -> None:
        """Record the answers of sent keys (string arrays but ``transient``, booleans), in
        one transaction — which, on SQLite, also ends the run's claim of them (``claim``,
        the number :attr:`claim_seq` gave; None: every claim of the job): a chunk is
        finished once, its answers all given or the rest released."""
        with self.store.begin() as conn:
            cols = (_flat(a) for a in (keys, states, transient, outcomes))
            self._write(conn, job, Answers(*cols))
            if self._chunked:
                self._unclaim(conn, job, claim)
            conn.execute(
                runs.update().where(runs.c.run_id == self.run_id).values(heartbeat=time.time())
            )
        self._written()

    def _write(self, conn: Connection, job: str, rows: Answers, run_id: str | None = None) -> None:
        """Upsert entries of this run (or another)."""
        if not len(rows.keys):
            return
        run_id = run_id or self.run_id
        stamp = now()
        upsert = (
            " ON CONFLICT (job, key) DO UPDATE SET "
            "state = excluded.state, transient = excluded.transient, "
            "run_id = excluded.run_id, batch = excluded.batch, "
            "outcome = excluded.outcome, updated = excluded.updated"
        )
        cols = "INSERT INTO ledger (job, key, state, transient, run_id, batch, outcome, updated) "
        if self._dialect == "sqlite":
            # one statement per kind of answer (state, transient, outcome: most of a chunk
            # shares one), its keys as one JSON parameter that SQLite unpacks in C
            pick = "SELECT ?, value, ?, ?, ?, NULL, ?, ? FROM json_each(?) WHERE true"
            sql = cols + pick + upsert
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            for (st, t, o), at in _groups(rows.states, rows.transient, rows.outcomes):
                for i in range(0, at.size, _CHUNK):
                    part = rows.keys.take(pa.array(at[i : i + _CHUNK])).to_pylist()
                    cur.execute(
                        sql, (job, st, int(bool(t)), run_id, o, stamp, orjson.dumps(part).decode())
                    )
            return
        params = [
            (job, k, s, bool(t), run_id, None, o, stamp)
            for k, s, t, o in zip(
                rows.keys.to_pylist(),
                rows.states.to_pylist(),
                rows.transient.to_pylist(),
                rows.outcomes.to_pylist(),
            )
        ]
        sql = cols + f"VALUES ({', '.join(['%s'] * 8)})" + upsert
        for i in range(0, len(params), _CHUNK):
            conn.exec_driver_sql(sql, params[i : i + _CHUNK])

    def release(self, job: str, keys: Sequence[str], claim: int | None = None) -> None:
        """Give back claims of keys this run did not send after all (the run stops)."""
        with self.store.begin() as conn:
            if self._chunked:
                self._unclaim(conn, job, claim)
                return
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
        """(key, run_id, batch) of keys claimed by runs that no longer beat and never
        finished."""
        with self.store.begin() as conn:
            live = self.live_runs(conn) | {self.run_id}
            if not self._chunked:
                rows = conn.execute(
                    sa.select(ledger.c.key, ledger.c.run_id, ledger.c.batch).where(
                        ledger.c.job == job, ledger.c.state == "pending"
                    )
                )
                return [(k, r, b) for k, r, b in rows if r not in live]
            found: dict[str, tuple[str, str | None]] = {}
            for run_id, keys, batches in self._claims(conn, job, skip=live):
                found.update((k, (run_id, b)) for k, b in zip(keys, batches))
            if not found:
                return []
            # a run stopped by the platform records what was answered, then gives the rest
            # back: killed in between, the answered keys are already in the ledger
            done = self._entries(conn, job, list(found))
            return [
                (k, r, b)
                for k, (r, b) in found.items()
                if not (k in done and done[k].run_id == r and done[k].state != "pending")
            ]

    def platform_answers(self, job: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """What the simulated platform recorded for these keys (only simulate has such a log)."""
        out: dict[str, dict[str, Any]] = {}
        url = self.platform_url
        apart = url is not None and driver_url(url) != self.store.url
        # the platforms' log is read only: a dry-run store, whatever this run is
        store = Store(url, dry_run=True) if url is not None and apart else self.store
        try:
            with store.begin() as conn:
                for i in range(0, len(keys), 500):
                    q = sa.select(platform_log.c.key, platform_log.c.outcome).where(
                        platform_log.c.job == job,
                        platform_log.c.key.in_(list(keys[i : i + 500])),
                    )
                    out.update({k: orjson.loads(o) for k, o in conn.execute(q)})
        finally:
            if apart:
                store.close()
        return out

    def settle_doubt(
        self,
        job: str,
        owners: Mapping[str, str],
        decided: Mapping[str, tuple[str, bool, dict[str, Any] | None]],
        skipped: Sequence[str],
        resent: Sequence[str],
    ) -> None:
        """Record how in-doubt keys were resolved. ``owners``: each key's run, which keeps
        the entry. Resent keys lose any entry: this run sends them."""
        with self.store.begin() as conn:
            stamp = now()
            if self._chunked:
                by_run: dict[str, list[tuple[str, str, bool, str | None]]] = {}
                for k, (st, t, o) in decided.items():
                    by_run.setdefault(owners[k], []).append(
                        (k, st, t, orjson.dumps(o).decode() if o else None)
                    )
                for k in skipped:
                    by_run.setdefault(owners[k], []).append((k, "doubt", False, None))
                for run_id, rows in by_run.items():
                    self._write(conn, job, Answers.of(rows), run_id)
                for run_id in sorted(set(owners.values())):
                    conn.execute(
                        claims.delete().where(claims.c.run_id == run_id, claims.c.job == job)
                    )
            else:
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
                for i in range(0, len(skipped), 500):
                    conn.execute(
                        ledger.update()
                        .where(ledger.c.job == job, ledger.c.key.in_(list(skipped[i : i + 500])))
                        .values(state="doubt", updated=stamp)
                    )
            for i in range(0, len(resent), 500):
                conn.execute(
                    ledger.delete().where(
                        ledger.c.job == job, ledger.c.key.in_(list(resent[i : i + 500]))
                    )
                )

    def _unclaim(self, conn: Connection, job: str, claim: int | None) -> None:
        """End the run's claim number ``claim`` of the job (None: all its claims)."""
        mine = (claims.c.run_id == self.run_id) & (claims.c.job == job)
        if claim is not None:
            mine &= claims.c.seq == claim
        conn.execute(claims.delete().where(mine))


def open_ledger(store_url: str, run_id: str, dry_run: bool = False) -> Ledger:
    """The ledger of the store at ``store_url``: for SQLite, in its own file beside the
    store's (:func:`pipeline.store.ledger_url`), an earlier release's ledger moved
    there the first time."""
    store = Store(ledger_url(store_url), dry_run=dry_run)
    move_ledger_out(store_url, store)
    return Ledger(store, run_id, platform_url=store_url)


def log_platform(
    conn: Connection,
    job: str,
    keys: Sequence[str] | pa.Array,
    outcomes: Sequence[str] | pa.Array,
) -> None:
    """The simulated platform notes what it processed, in the same transaction as its state."""
    if len(keys) == 0:
        return
    said = outcomes if isinstance(outcomes, pa.Array) else pa.array(outcomes, pa.string())
    upsert = (
        " ON CONFLICT (job, key) DO UPDATE SET outcome = excluded.outcome, "
        "sends = platform_log.sends + 1"
    )
    if conn.engine.dialect.name == "sqlite":
        # one statement per distinct answer (a chunk has few), its keys as one JSON array
        key_col = keys if isinstance(keys, pa.Array) else pa.array(keys, pa.string())
        # each key a JSON string literal, written by Arrow's kernels (no Python strings)
        literals = pc.binary_join_element_wise('"', json_escape(key_col), '"', "")
        same = pa.nulls(len(said), pa.string())
        no = pa.array(np.zeros(len(said), bool))
        cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        for (_, _, outcome), at in _groups(same, no, said):
            group = literals if len(at) == len(literals) else literals.take(pa.array(at))
            cur.execute(
                "INSERT INTO platform_log (job, key, outcome, sends) "
                "SELECT ?, value, ?, 1 FROM json_each(?) WHERE true" + upsert,
                (job, outcome, "[" + join_items(group).decode() + "]"),
            )
        return
    key_list = keys.to_pylist() if isinstance(keys, pa.Array) else keys
    conn.exec_driver_sql(
        "INSERT INTO platform_log (job, key, outcome, sends) VALUES (%s, %s, %s, 1)" + upsert,
        [(job, k, o) for k, o in zip(key_list, said.to_pylist())],
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
