"""Yesmail ``POST /v2/emails/send``, answered from the store (``003_…``).

A request is judged whole first — any recipient with a mixed-case or invalid
email, a new subscriber without both ``id`` and ``email``, or ``updateProfile``
without ``id`` makes it a ``400 Bad Request``. Then each recipient, in order:
``subscriptions.remove`` (``"*"`` removes all) before ``add``; ``setReferred``
as documented; with ``transactional`` false, ``isMemberOf`` is checked after
add/remove and a non-member fails the whole request at once with ``409``
(nothing is stored). Otherwise the request is accepted (``202``) with a ticket
that passes ``accepted`` → ``processing`` → ``completed``, and an
async-results document counting each recipient ``completed`` — or ``ignored``
when ``transactional`` is false and the subscriber is globally unsubscribed
or dead.
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
import sqlalchemy as sa

from pipeline.emails import check_emails
from pipeline.errors import TicketState, YesmailStatus
from pipeline.store import Store, email_key, ym_subscribers, ym_subscriptions

__all__ = ["SendAnswer", "evaluate_send", "ticket_document"]

SEND_URI = "https://api.yesmail.com/v2/emails/send"
QUEUED = "Send email request queued successfully."
COMPLETED = "Send email request completed."
MAX_RECIPIENTS = 300
_IN_CHUNK = 900  # keys per IN (…) list


@dataclass
class SendAnswer:
    """The HTTP status and body; for 202 also the ticket and the async results."""

    status: YesmailStatus
    body: dict[str, Any]
    ticket: dict[str, Any] | None = None
    async_results: dict[str, Any] | None = None
    per_recipient: list[str] = field(default_factory=list)  # completed | ignored


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error(status: YesmailStatus, message: str) -> SendAnswer:
    return SendAnswer(status, {"status": int(status), "message": message})


def ticket_document(
    ticket_id: str,
    request_id: str,
    user: str,
    uri: str,
    ref: str | None,
    events: list[dict[str, str]],
    location: str | None,
) -> dict[str, Any]:
    """A ticket in the documented shape, its state that of its last event."""
    last = events[-1]
    response: dict[str, Any] | None = None
    if location or ref:
        response = {"ref": ref, "location": location}
    return {
        "id": ticket_id,
        "state": last["state"],
        "message": last["message"],
        "request": {"id": request_id, "user": user, "time": events[0]["time"], "uri": uri},
        "response": response,
        "events": events,
        "lastUpdate": last["time"],
    }


def evaluate_send(
    store: Store,
    body: Any,
    user: str = "mailpipe",
    ref: str | None = None,
    api_base: str = "https://api.yesmail.com",
    log: Callable[[Any, SendAnswer], None] | None = None,
) -> SendAnswer:
    """Judge one request; on 202 the store is updated in one transaction."""
    problem = _request_problem(body)
    if problem:
        return error(YesmailStatus.BAD_REQUEST, problem)
    recipients: list[dict[str, Any]] = body["recipients"]
    keys = [email_key(r["email"]) if isinstance(r.get("email"), str) else None for r in recipients]
    transactional = bool(body.get("transactional", False))
    update_profile = bool(body.get("updateProfile", False))
    with store.begin() as conn:
        # a recipient given by id alone is looked up by that id
        by_id = store.ym_keys_by_id(conn, [r["id"] for r, k in zip(recipients, keys) if k is None])
        subs, divs = _ym_state(store, conn, [k for k in keys if k] + list(by_id.values()))
        known = set(subs)
        for r, k in zip(recipients, keys):
            if k is None and r.get("id") in by_id:
                continue
            if (k is None or k not in known) and not (r.get("id") and r.get("email")):
                return error(
                    YesmailStatus.BAD_REQUEST, "A new subscriber requires both id and email"
                )
            if k:
                known.add(k)  # exists for the recipients after it
        outcomes: list[str] = []
        writes: list[tuple[str, dict[str, Any], set[str]]] = []
        for r, k in zip(recipients, keys):
            key = k or by_id[r["id"]]
            sub = subs.get(key)
            state, member_of = _apply_subscriptions(
                r.get("subscriptions") or {}, sub, set(divs.get(key, set()))
            )
            wanted = (r.get("subscriptions") or {}).get("isMemberOf")
            if not transactional and wanted and not member_of & set(wanted):
                # the whole request fails at once; nothing of it has been stored yet
                return error(
                    YesmailStatus.CONFLICT,
                    f"Subscriber must be a memberOf one of '[{', '.join(wanted)}]'.",
                )
            status = state
            outcomes.append(
                "ignored"
                if not transactional and status in ("unsubscribed", "dead")
                else "completed"
            )
            values: dict[str, Any] = {
                "email": r.get("email") or (sub or {}).get("email", key),
                "id": r.get("id") or (sub or {}).get("id"),
                "status": status,
            }
            if update_profile:  # otherwise the attributes only personalize this email
                attrs = orjson.loads((sub or {}).get("attrs") or "{}")
                for item in (r.get("profile") or {}).get("userAttrs") or []:
                    attrs.update(item)
                values["attrs"] = orjson.dumps(attrs).decode()
            writes.append((key, values, member_of))
            # the same subscriber later in the request is judged against this state
            subs[key] = {**(sub or {}), **values}
            divs[key] = member_of
        _write_subscribers(conn, writes)
        answer = _accepted(recipients, outcomes, user, ref, api_base)
        if log is not None:
            log(conn, answer)
    return answer


def _ym_state(
    store: Store, conn: Any, keys: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, set[str]]]:
    """:meth:`Store.ym_state`; on SQLite with the keys as one JSON parameter (two queries
    a request instead of building two IN lists of up to 300 values)."""
    if conn.dialect.name != "sqlite":
        return store.ym_state(conn, keys)
    cur = conn.connection.driver_connection.cursor()
    listed = orjson.dumps(sorted(set(keys))).decode()
    cols = [c.name for c in ym_subscribers.columns]
    subs = {
        row[0]: dict(zip(cols, row))
        for row in cur.execute(
            f"SELECT {', '.join('y.' + c for c in cols)} FROM json_each(?) j "
            "CROSS JOIN ym_subscribers y ON y.email_key = j.value",
            (listed,),
        )
    }
    divs: dict[str, set[str]] = {}
    for key, division in cur.execute(
        "SELECT s.email_key, s.division FROM json_each(?) j "
        "CROSS JOIN ym_subscriptions s ON s.email_key = j.value",
        (listed,),
    ):
        divs.setdefault(key, set()).add(division)
    return subs, divs


def _write_subscribers(conn: Any, writes: list[tuple[str, dict[str, Any], set[str]]]) -> None:
    """Store the request's subscribers and their divisions: a few statements for all of them.

    The same as upserting each in turn (a subscriber met twice keeps its later
    values), without a round trip per recipient.
    """
    final: dict[str, tuple[dict[str, Any], set[str]]] = {}
    for key, values, member_of in writes:
        before = final.get(key)
        final[key] = ({**before[0], **values} if before else values, member_of)
    if not final:
        return
    keys = list(final)
    divisions = [(k, d) for k, (_, m) in final.items() for d in sorted(m)]
    if conn.dialect.name == "sqlite":
        _write_sqlite(conn, final, keys, divisions)
        return
    existing: set[str] = set()
    for i in range(0, len(keys), _IN_CHUNK):
        part = keys[i : i + _IN_CHUNK]
        q = sa.select(ym_subscribers.c.email_key).where(ym_subscribers.c.email_key.in_(part))
        existing.update(r[0] for r in conn.execute(q))
        conn.execute(ym_subscriptions.delete().where(ym_subscriptions.c.email_key.in_(part)))
    new = [{"attrs": "{}", "email_key": k, **v} for k, (v, _) in final.items() if k not in existing]
    old = [(k, v) for k, (v, _) in final.items() if k in existing]
    if new:
        conn.execute(ym_subscribers.insert(), new)
    for cols in {tuple(v) for _, v in old}:  # one statement per set of columns written
        stmt = (
            ym_subscribers.update()
            .where(ym_subscribers.c.email_key == sa.bindparam("_key"))
            .values({c: sa.bindparam(f"_{c}") for c in cols})
        )
        conn.execute(
            stmt,
            [{"_key": k, **{f"_{c}": v[c] for c in cols}} for k, v in old if tuple(v) == cols],
        )
    if divisions:
        conn.execute(
            ym_subscriptions.insert(), [{"email_key": k, "division": d} for k, d in divisions]
        )


def _write_sqlite(
    conn: Any,
    final: dict[str, tuple[dict[str, Any], set[str]]],
    keys: list[str],
    divisions: list[tuple[str, str]],
) -> None:
    """:func:`_write_subscribers` on SQLite: the keys as one JSON parameter, the DB-API
    cursor's executemany (SQLAlchemy's statement building costs more than the writes)."""
    cur = conn.connection.driver_connection.cursor()
    listed = orjson.dumps(keys).decode()
    existing = {
        r[0]
        for r in cur.execute(
            "SELECT y.email_key FROM json_each(?) j CROSS JOIN ym_subscribers y "
            "ON y.email_key = j.value",
            (listed,),
        )
    }
    cur.execute(
        "DELETE FROM ym_subscriptions WHERE email_key IN (SELECT value FROM json_each(?))",
        (listed,),
    )
    rows: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for k, (v, _) in final.items():
        names = tuple(v)
        if k in existing:
            rows.setdefault(("update", *names), []).append((*v.values(), k))
        else:
            rows.setdefault(("insert", *names), []).append((k, *v.values()))
    for (kind, *cols), params in rows.items():
        if kind == "update":
            sets = ", ".join(f"{c} = ?" for c in cols)
            sql = f"UPDATE ym_subscribers SET {sets} WHERE email_key = ?"
        else:
            listed = ", ".join(["email_key", *cols])
            marks = ", ".join("?" * (len(cols) + 1))
            if "attrs" not in cols:  # the column's default
                listed, marks = listed + ", attrs", marks + ", '{}'"
            sql = f"INSERT INTO ym_subscribers ({listed}) VALUES ({marks})"
        cur.executemany(sql, params)
    if divisions:
        cur.executemany(
            "INSERT INTO ym_subscriptions (email_key, division) VALUES (?, ?)", divisions
        )


def _request_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "The request body must be a JSON object"
    content = body.get("content")
    if not isinstance(content, dict) or not content.get("templateId"):
        return "content.templateId is mandatory"
    for flag in ("transactional", "updateProfile"):
        if flag in body and not isinstance(body[flag], bool):
            return f"{flag} must be true or false"
    recipients = body.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        return "recipients is mandatory: an array of up to 300 recipients"
    if len(recipients) > MAX_RECIPIENTS:
        return f"This request supports up to {MAX_RECIPIENTS} recipients"
    emails = [r.get("email") if isinstance(r, dict) else None for r in recipients]
    verdict = check_emails(
        pa.array([e if isinstance(e, str) else None for e in emails], pa.string())
    )
    problems = verdict.problem.to_pylist()
    for i, r in enumerate(recipients):
        if not isinstance(r, dict):
            return f"recipients[{i}] must be an object"
        email, rid = r.get("email"), r.get("id")
        if email is None and rid is None:
            return f"recipients[{i}]: one of id or email must be specified"
        if rid is not None and not isinstance(rid, str):
            return f"recipients[{i}]: id must be a string"
        if email is not None:
            if not isinstance(email, str) or problems[i] is not None:
                return f"recipients[{i}]: invalid email address"
            if email != email.lower():
                return f"recipients[{i}]: subscriber email address is mixed case"
        if body.get("updateProfile") and not rid:
            return f"recipients[{i}]: id is required when updateProfile is true"
        subs = r.get("subscriptions") or {}
        if not isinstance(subs, dict):
            return f"recipients[{i}]: subscriptions must be an object"
        ref = subs.get("setReferred")
        if ref is not None and ref not in ("newOnly", "newOrNotSubscribed"):
            return f"recipients[{i}]: setReferred must be newOnly or newOrNotSubscribed"
    return None


def _apply_subscriptions(
    subs: dict[str, Any], current: dict[str, Any] | None, member_of: set[str]
) -> tuple[str, set[str]]:
    """remove, then add, then setReferred; returns (status, divisions)."""
    status = (current or {}).get("status", "active")
    is_new = current is None
    remove = subs.get("remove") or []
    add = subs.get("add") or []
    if "*" in remove:
        member_of = set()
    else:
        member_of -= set(remove)
    member_of |= set(add)
    if add and status in ("unsubscribed", "referred"):
        status = "active"
    referred = subs.get("setReferred")
    applies = (referred == "newOnly" and is_new) or (
        referred == "newOrNotSubscribed" and (is_new or not member_of)
    )
    if referred and not add and not (remove and referred == "newOnly") and applies:
        status = "referred"
    if remove and not member_of and not add and status == "active":
        status = "unsubscribed"
    return status, member_of


def _accepted(
    recipients: list[dict[str, Any]], outcomes: list[str], user: str, ref: str | None, api_base: str
) -> SendAnswer:
    ticket_id = secrets.token_hex(12)
    async_id = secrets.token_hex(12)
    request_id = str(uuid.uuid4())
    t0 = _now()
    uri = f"{api_base}/v2/emails/send" + (f"?responseRef={ref}" if ref else "")
    accepted = {"state": TicketState.ACCEPTED.value, "message": QUEUED, "time": t0}
    processing = {
        "state": TicketState.PROCESSING.value,
        "message": "update Ticket for AsyncResult info",
        "time": _now(),
    }
    done = {"state": TicketState.COMPLETED.value, "message": COMPLETED, "time": _now()}
    location = f"{api_base}/v2/async-results/{async_id}"
    ticket = ticket_document(
        ticket_id, request_id, user, uri, ref, [accepted, processing, done], location
    )
    first = ticket_document(ticket_id, request_id, user, uri, ref, [accepted], None)
    times = [_now()] * len(outcomes)  # processed together
    results = {
        "id": async_id,
        "lastUpdated": done["time"],
        "counts": {
            "requested": len(recipients),
            "total": len(recipients),
            "completed": outcomes.count("completed"),
            "ignored": outcomes.count("ignored"),
            "failed": 0,
        },
        "completed": [
            {"index": i, "time": t}
            for i, (o, t) in enumerate(zip(outcomes, times))
            if o == "completed"
        ],
        "failed": [],
        "ignored": [
            {"index": i, "time": t}
            for i, (o, t) in enumerate(zip(outcomes, times))
            if o == "ignored"
        ],
    }
    return SendAnswer(YesmailStatus.ACCEPTED, first, ticket, results, outcomes)
