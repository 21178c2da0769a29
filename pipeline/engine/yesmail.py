"""Yesmail ``POST /v2/emails/send``, answered from the store (``003_…``).

A request is judged whole first — any recipient with a mixed-case or invalid
email, a new subscriber without both ``id`` and ``email``, or ``updateProfile``
without ``id``, or a ``forwarder`` whose recipients do not all set ``setReferred``
to ``newOrNotSubscribed`` makes it a ``400 Bad Request``. Then each recipient, in order:
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
import itertools
import secrets
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
import sqlalchemy as sa

from pipeline.emails import check_emails
from pipeline.errors import NEW_SUBSCRIBER_NEEDS_ID as _NEW_NEEDS_BOTH
from pipeline.errors import TicketState, YesmailStatus
from pipeline.payloads.yesmail import send_url
from pipeline.store import Store, email_key, ym_subscribers, ym_subscriptions

__all__ = [
    "SendAnswer",
    "evaluate_send",
    "evaluate_sends",
    "send_session",
    "ticket_document",
]

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
    response_uri: str | None = None,
    data: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A ticket in the documented shape, its state that of its last event.

    ``response`` as 003_… prints it: ``null`` while a request without
    ``responseRef``/``responseUri`` is under way; with them, ``uri`` and ``ref``
    and, until it is done, ``time``, ``code``, ``location`` and ``data`` null. Done,
    it holds the single recipient's ``data`` (messageId, sentTime) or, for several,
    the async results' ``location``.
    """
    last = events[-1]
    given = ref is not None or response_uri is not None
    response: dict[str, Any] | None = None
    if last["state"] == TicketState.COMPLETED:
        done: dict[str, Any] = {"uri": response_uri, "ref": ref} if given else {}
        if data is not None:
            done["data"] = data
        if location:
            done["location"] = location
        response = done or None
    elif given:  # under way: nothing known yet but what the request said
        response = {"uri": response_uri, "ref": ref}
        response.update(dict.fromkeys(("time", "code", "location", "data")))
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
    """Judge one request; on 202 the store is updated in one transaction (and ``log``
    called with the connection and the answer, inside it)."""

    def log_one(conn: Any, answers: list[SendAnswer]) -> None:
        if log is not None and answers[0].status is YesmailStatus.ACCEPTED:
            log(conn, answers[0])

    [answer] = evaluate_sends(store, [(body, user, ref)], api_base, log_one)
    return answer


def evaluate_sends(
    store: Store,
    calls: Sequence[tuple[Any, str, str | None]],
    api_base: str = "https://api.yesmail.com",
    log: Callable[[Any, list[SendAnswer]], None] | None = None,
    until_refused: bool = False,
    response_uris: Sequence[str | None] | None = None,
) -> list[SendAnswer]:
    """Judge requests ``(body, user, ref)`` one after the other, in one transaction
    (``ref`` the request's ``responseRef``; ``response_uris`` their ``responseUri``).

    Each answer is exactly what the request would get sent alone after the
    ones before it: a 400 or 409 stores nothing of that request, the requests
    after it see what the accepted ones before it changed. What is shared is
    the cost — one email check, one lookup of the subscribers and one set of
    writes for all of them (a commit writes every page its transaction
    touched, so one commit for several requests costs far less than one each).
    ``log`` is called with the connection and the answers, after the writes.
    ``until_refused``: stop after the first request refused (400/409), which is then
    the last answer, so that a caller can split it before the requests after it go.
    """
    # why each request is refused, or each recipient's email key (None: given by id alone)
    problems, keys = _request_problems([body for body, _, _ in calls])
    answers: list[SendAnswer] = []
    with store.begin() as conn:
        state = _State(store, conn)
        state.load([k for ks in keys if ks is not None for k in ks if k is not None])
        uris = response_uris or [None] * len(calls)
        for (body, user, ref), problem, ks, ruri in zip(calls, problems, keys, uris):
            if problem is not None:
                answers.append(error(YesmailStatus.BAD_REQUEST, problem))
            else:
                assert ks is not None  # made for every well-formed request
                answers.append(_judge(state, body, ks, user, (ref, ruri), api_base))
            if until_refused and answers[-1].status is not YesmailStatus.ACCEPTED:
                break
        state.flush()
        if log is not None:
            log(conn, answers)
    return answers


@contextmanager
def send_session(
    store: Store,
    api_base: str = "https://api.yesmail.com",
    log: Callable[[Any], None] | None = None,
) -> Iterator[Callable[[Any, str, str | None, bool], SendAnswer]]:
    """Requests judged one at a time, each against what the ones before it left, in one
    transaction: ``judge(body, user, ref, emails_checked)`` answers each as
    :func:`evaluate_send` would, for callers whose next request depends on the last
    answer — the simulate backend's halves of a refused request (a request of 300 that
    every recipient fails is 599 of them: one transaction each cost ~1.8 ms a recipient).
    ``emails_checked``: the recipients' emails passed :func:`check_emails` already (a
    half of a request judged before), so it is not asked again. ``log(conn)`` runs in
    the transaction, after the writes."""
    with store.begin() as conn:
        state = _State(store, conn)

        def judge(body: Any, user: str, ref: str | None, emails_checked: bool) -> SendAnswer:
            if emails_checked and isinstance(body, dict) and _shape_problem(body) is None:
                problem, keys = _recipient_problem(body, [0] * len(body["recipients"]))
            else:
                [problem], [keys] = _request_problems([body])
            if problem is not None:
                return error(YesmailStatus.BAD_REQUEST, problem)
            assert keys is not None  # made for every well-formed request
            state.load([k for k in keys if k is not None])
            return _judge(state, body, keys, user, (ref, None), api_base)

        yield judge
        state.flush()
        if log is not None:
            log(conn)


def _judge(
    state: _State,
    body: dict[str, Any],
    keys: list[str | None],
    user: str,
    params: tuple[str | None, str | None],
    api_base: str,
) -> SendAnswer:
    """One well-formed request (``params``: its responseRef and responseUri) against the
    state the requests before it left; ``keys`` its recipients' email keys (None: given
    by id alone)."""
    recipients: list[dict[str, Any]] = body["recipients"]
    transactional = bool(body.get("transactional", False))
    update_profile = bool(body.get("updateProfile", False))
    # a recipient given by id alone is looked up by that id
    by_id = state.keys_by_id([r["id"] for r, k in zip(recipients, keys) if k is None])
    subs, divs = state.subs, state.divs
    # the request's changes, applied to the state only once it is accepted; a Python loop
    # per recipient: each is judged against the ones before it (new or known; remove, add,
    # isMemberOf). A new subscriber without id and email makes it a 400 wherever it is;
    # otherwise the first recipient that is not a member makes it a 409
    staged: dict[str, _Sub] = {}
    staged_divs: dict[str, frozenset[str]] = {}
    outcomes: list[str] = []
    conflict: SendAnswer | None = None
    sub: _Sub | None
    for r, k in zip(recipients, keys):
        if k is None:  # by id alone: known, or new without an email
            key = by_id.get(r["id"])
            if key is None:
                return error(YesmailStatus.BAD_REQUEST, _NEW_NEEDS_BOTH)
        else:
            key = k
        sub = staged.get(key)
        if sub is not None:  # a recipient before it in this request
            member = staged_divs[key]
        else:
            sub = subs.get(key)
            if sub is None and not r.get("id"):  # new, with an email (k) but no id
                return error(YesmailStatus.BAD_REQUEST, _NEW_NEEDS_BOTH)
            member = divs.get(key, _NONE)
        wants = r.get("subscriptions")
        if wants:
            status, changed = _apply_subscriptions(wants, sub[2] if sub else None, set(member))
            wanted = wants.get("isMemberOf")
            if not transactional and wanted and not changed & set(wanted) and conflict is None:
                # the whole request fails; nothing of it is stored
                conflict = error(
                    YesmailStatus.CONFLICT,
                    f"Subscriber must be a memberOf one of '[{', '.join(wanted)}]'.",
                )
            member = frozenset(changed)
        else:
            status = sub[2] if sub else "active"
        outcomes.append(
            "ignored" if not transactional and status in ("unsubscribed", "dead") else "completed"
        )
        attrs = sub[3] if sub else "{}"
        if update_profile:  # otherwise the attributes only personalize this email
            merged = orjson.loads(attrs)
            for item in (r.get("profile") or {}).get("userAttrs") or []:
                merged.update(item)
            attrs = orjson.dumps(merged).decode()
        staged[key] = (
            r.get("id") or (sub[0] if sub else None),
            r.get("email") or (sub[1] if sub else key),
            status,
            attrs,
        )
        staged_divs[key] = member
    if conflict is not None:
        return conflict
    state.apply(staged, staged_divs)
    return _accepted(recipients, outcomes, user, params, api_base)


_Sub = tuple[str | None, str, str, str]  # a Yesmail subscriber: id, email, status, attrs
_Row = tuple[str, str | None, str, str, str]  # email_key and the subscriber
_NONE: frozenset[str] = frozenset()
_ABSENT: tuple[_Sub | None, frozenset[str]] = (None, _NONE)


class _State:
    """The subscribers a batch of requests touches: as stored, and as the requests
    judged so far left them.

    Keys are read once (:meth:`load`); accepted requests change only this state
    (:meth:`apply`); :meth:`flush` writes what differs from the store — before a
    lookup by id (which asks the store) and at the end.
    """

    def __init__(self, store: Store, conn: Any) -> None:
        self.store = store
        self.conn = conn
        self.sqlite = conn.dialect.name == "sqlite"
        self.subs: dict[str, _Sub] = {}
        self.divs: dict[str, frozenset[str]] = {}
        self.read: set[str] = set()  # keys read (or written) once
        # as stored, for the keys read that the store has (others: _ABSENT)
        self.stored: dict[str, tuple[_Sub | None, frozenset[str]]] = {}
        self.dirty: set[str] = set()

    def load(self, keys: Iterable[str]) -> None:
        """Read the subscribers and divisions of the keys not read yet."""
        new = set(keys).difference(self.read)
        if not new:
            return
        self.read.update(new)
        ordered = sorted(new)
        subs, divs = _read_sqlite(self.conn, ordered) if self.sqlite else self._read(ordered)
        self.subs.update(subs)
        self.divs.update(divs)
        for k in subs.keys() | divs.keys():
            self.stored[k] = (subs.get(k), divs.get(k, _NONE))

    def _read(self, keys: list[str]) -> tuple[dict[str, _Sub], dict[str, frozenset[str]]]:
        subs, divs = self.store.ym_state(self.conn, keys)
        return (
            {k: (s["id"], s["email"], s["status"], s["attrs"]) for k, s in subs.items()},
            {k: frozenset(d) for k, d in divs.items()},
        )

    def keys_by_id(self, ids: list[str]) -> dict[str, str]:
        """Customer id → email key, as the store would answer after the requests so far."""
        if not ids:
            return {}
        self.flush()
        found = self.store.ym_keys_by_id(self.conn, ids)
        self.load(found.values())
        return found

    def apply(self, subs: dict[str, _Sub], divs: dict[str, frozenset[str]]) -> None:
        """An accepted request's changes (the same keys in both)."""
        self.subs.update(subs)
        self.divs.update(divs)
        self.dirty.update(subs)

    def flush(self) -> None:
        """Write the subscribers and divisions that differ from the store."""
        new: list[_Row] = []
        changed: list[_Row] = []
        divisions: dict[str, frozenset[str]] = {}
        for key in sorted(self.dirty):  # neighbouring index pages
            sub, member = self.subs[key], self.divs.get(key, _NONE)
            was, was_member = self.stored.get(key, _ABSENT)
            if was is None:
                new.append((key, *sub))
            elif sub != was:
                changed.append((key, *sub))
            if member != was_member:
                divisions[key] = member
            self.stored[key] = (sub, member)
        self.dirty.clear()
        if new or changed or divisions:
            write = _write_sqlite if self.sqlite else _write_any
            write(self.conn, new, changed, divisions)


def _read_sqlite(conn: Any, keys: list[str]) -> tuple[dict[str, _Sub], dict[str, frozenset[str]]]:
    """:meth:`Store.ym_state` on SQLite: the keys as one JSON parameter, two queries."""
    cur = conn.connection.driver_connection.cursor()
    listed = orjson.dumps(keys).decode()
    subs: dict[str, _Sub] = {
        row[0]: row[1:]
        for row in cur.execute(
            "SELECT y.email_key, y.id, y.email, y.status, y.attrs FROM json_each(?) j "
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
    return subs, {k: frozenset(d) for k, d in divs.items()}


def _write_sqlite(
    conn: Any, new: list[_Row], changed: list[_Row], divisions: dict[str, frozenset[str]]
) -> None:
    """:meth:`_State.flush` on SQLite, through the DB-API cursor (SQLAlchemy's statement
    building costs more than the writes)."""
    cur = conn.connection.driver_connection.cursor()
    if new:
        cur.executemany(
            "INSERT INTO ym_subscribers (email_key, id, email, status, attrs) "
            "VALUES (?, ?, ?, ?, ?)",
            new,
        )
    if changed:
        cur.executemany(
            "UPDATE ym_subscribers SET id = ?, email = ?, status = ?, attrs = ? "
            "WHERE email_key = ?",
            [(*row[1:], row[0]) for row in changed],
        )
    if divisions:
        cur.execute(
            "DELETE FROM ym_subscriptions WHERE email_key IN (SELECT value FROM json_each(?))",
            (orjson.dumps(list(divisions)).decode(),),
        )
        cur.executemany(
            "INSERT INTO ym_subscriptions (email_key, division) VALUES (?, ?)",
            [(k, d) for k, member in divisions.items() for d in sorted(member)],
        )


def _write_any(
    conn: Any, new: list[_Row], changed: list[_Row], divisions: dict[str, frozenset[str]]
) -> None:
    """:meth:`_State.flush` on any database SQLAlchemy speaks (PostgreSQL)."""
    cols = ("email_key", "id", "email", "status", "attrs")
    if new:
        conn.execute(ym_subscribers.insert(), [dict(zip(cols, row)) for row in new])
    if changed:
        stmt = (
            ym_subscribers.update()
            .where(ym_subscribers.c.email_key == sa.bindparam("_email_key"))
            .values({c: sa.bindparam(f"_{c}") for c in cols[1:]})
        )
        conn.execute(stmt, [{f"_{c}": v for c, v in zip(cols, row)} for row in changed])
    if divisions:
        keys = list(divisions)
        for i in range(0, len(keys), _IN_CHUNK):
            part = keys[i : i + _IN_CHUNK]
            conn.execute(ym_subscriptions.delete().where(ym_subscriptions.c.email_key.in_(part)))
        rows = [{"email_key": k, "division": d} for k, m in divisions.items() for d in sorted(m)]
        if rows:
            conn.execute(ym_subscriptions.insert(), rows)


def _request_problems(
    bodies: Sequence[Any],
) -> tuple[list[str | None], list[list[str | None] | None]]:
    """Why each request is a ``400 Bad Request``, or None; and for each well-formed one
    its recipients' email keys (None: given by id alone). The emails of all of them are
    checked by one :func:`check_emails` (its cost is mostly per call)."""
    problems = [_shape_problem(body) for body in bodies]
    keys: list[list[str | None] | None] = [None] * len(bodies)
    emails = [
        r.get("email") if isinstance(r, dict) else None
        for body, problem in zip(bodies, problems)
        if problem is None
        for r in body["recipients"]
    ]
    if not emails:
        return problems, keys
    verdicts = check_emails(
        pa.array([e if isinstance(e, str) else None for e in emails], pa.string())
    ).codes.tolist()
    at = 0
    for i, body in enumerate(bodies):
        if problems[i] is None:
            n = len(body["recipients"])
            problems[i], keys[i] = _recipient_problem(body, verdicts[at : at + n])
            at += n
    return problems, keys


def _shape_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "The request body must be a JSON object"
    content = body.get("content")
    if not isinstance(content, dict) or not content.get("templateId"):
        return "content.templateId is mandatory"
    template = content["templateId"]
    if isinstance(template, bool) or not isinstance(template, (str, int)):
        return "content.templateId must be a template's id (a string)"
    for flag in ("transactional", "updateProfile"):
        if flag in body and not isinstance(body[flag], bool):
            return f"{flag} must be true or false"
    recipients = body.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        return "recipients is mandatory: an array of up to 300 recipients"
    if len(recipients) > MAX_RECIPIENTS:
        return f"This request supports up to {MAX_RECIPIENTS} recipients"
    return _forwarder_problem(body)


def _forwarder_problem(body: dict[str, Any]) -> str | None:
    """``forwarder`` (Forward to a Friend), as 003_… documents it: an object whose ``id``
    is "Required if updateProfile=true" and ``note`` optional; each recipient's
    ``setReferred`` "is required and must be set to newOrNotSubscribed"."""
    if "forwarder" not in body:
        return None
    fwd = body["forwarder"]
    if not isinstance(fwd, dict):
        return "forwarder must be an object"
    for name in ("id", "note"):
        if name in fwd and not isinstance(fwd[name], str):
            return f"forwarder.{name} must be a string"
    if body.get("updateProfile") is True and not fwd.get("id"):
        return "forwarder.id is required when updateProfile is true"
    for i, r in enumerate(body["recipients"]):
        if not isinstance(r, dict):
            continue  # refused as such by the recipient checks
        subs = r.get("subscriptions")
        if not isinstance(subs, dict) or subs.get("setReferred") != "newOrNotSubscribed":
            return (
                f"recipients[{i}]: setReferred is required and must be set to "
                "newOrNotSubscribed when using forwarder"
            )
    return None


def _recipient_problem(
    body: dict[str, Any], verdicts: list[int]
) -> tuple[str | None, list[str | None] | None]:
    """The first recipient the request is refused for, or None and the recipients' email
    keys; ``verdicts`` their emails' :func:`check_emails` codes (0: no problem). A Python
    loop per recipient: they are parsed JSON, and most carry neither subscriptions nor
    anything but objects in userAttrs, so those checks are skipped or done in C
    (``map``)."""
    need_id = bool(body.get("updateProfile"))
    keys: list[str | None] = []
    for i, r in enumerate(body["recipients"]):
        if not isinstance(r, dict):
            return f"recipients[{i}] must be an object", None
        email, rid = r.get("email"), r.get("id")
        if email is None and rid is None:
            return f"recipients[{i}]: one of id or email must be specified", None
        if rid is not None and not isinstance(rid, str):
            return f"recipients[{i}]: id must be a string", None
        if email is None:
            keys.append(None)
        elif not isinstance(email, str) or verdicts[i]:
            return f"recipients[{i}]: invalid email address", None
        elif email != email.lower():
            return f"recipients[{i}]: subscriber email address is mixed case", None
        else:
            keys.append(email_key(email))
        if need_id and not rid:
            return f"recipients[{i}]: id is required when updateProfile is true", None
        subs = r.get("subscriptions")
        if subs:  # an empty or missing one asks for nothing
            problem = _subscriptions_problem(subs)
            if problem is not None:
                return f"recipients[{i}]: {problem}", None
        profile = r.get("profile")
        if profile is not None:
            attrs = profile.get("userAttrs") if isinstance(profile, dict) else None
            if not isinstance(profile, dict) or not (
                attrs is None or (isinstance(attrs, list) and all(map(isinstance, attrs, _DICT)))
            ):
                return f"recipients[{i}]: profile.userAttrs must be an array of objects", None
    return None, keys


_DICT = itertools.repeat(dict)  # isinstance's second argument, for map
_STR = itertools.repeat(str)


def _subscriptions_problem(subs: Any) -> str | None:
    if not isinstance(subs, dict):
        return "subscriptions must be an object"
    for name in ("add", "remove", "isMemberOf"):
        names = subs.get(name)
        if names is not None and not (
            isinstance(names, list) and all(map(isinstance, names, _STR))
        ):
            return f"subscriptions.{name} must be an array of strings"
    ref = subs.get("setReferred")
    if ref is not None and ref not in ("newOnly", "newOrNotSubscribed"):
        return "setReferred must be newOnly or newOrNotSubscribed"
    return None


def _apply_subscriptions(
    subs: dict[str, Any], current: str | None, member_of: set[str]
) -> tuple[str, set[str]]:
    """remove, then add, then setReferred, for a subscriber of status ``current`` (None:
    new); returns (status, divisions).

    ``setReferred`` as ``003_…`` documents it:

        newOnly sets the subscriber status to "referred" only for new subscribers,
        otherwise the element is ignored. newOrNotSubscribed sets the subscriber status
        to "referred" if the subscriber is new, or not subscribed to any division.
          • If add and setReferred are specified, setReferred is ignored.
          • If remove and setReferred are specified and setReferred is set to newOnly
            then setReferred is ignored, otherwise the subscribers status is set to
            referred.

    The last bullet's "otherwise" (remove with ``newOrNotSubscribed``) is read as "is
    not ignored": the value's own rule applies, judged after the remove (the documented
    order of operations; ``isMemberOf`` too is judged "after any add or remove
    processing"). So a subscriber whom the remove leaves without a division (or a new
    one) becomes ``referred``; one still subscribed to a division keeps its status. Read
    as "always referred", the bullet would contradict the same section: setReferred is
    "Only for new or unscribered recipients" and "referred ... is a not subscribed
    state". With add (add and remove together included) setReferred is ignored, as the
    add bullet says. Per combination (status after the call):

    - setReferred alone: newOnly → ``referred`` if new, else unchanged;
      newOrNotSubscribed → ``referred`` if new or in no division, else unchanged;
    - with add (with or without remove): ignored, whatever the value;
    - with remove: newOnly → ignored (new or not); newOrNotSubscribed → ``referred``
      if new or no division is left after the remove, else unchanged.

    Where setReferred does not apply, a remove that leaves an active subscriber in no
    division makes it ``unsubscribed``, and an add makes an ``unsubscribed`` or
    ``referred`` one ``active`` (this engine's rules, not the setReferred section's).
    """
    status = current or "active"
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
    recipients: list[dict[str, Any]],
    outcomes: list[str],
    user: str,
    params: tuple[str | None, str | None],
    api_base: str,
) -> SendAnswer:
    """The 202: the ticket as first answered, as completed, and the async results. One
    recipient sent: the completed ticket carries its ``data`` (messageId, sentTime) and
    no async results, as 003_… shows; several (or one not mailed): ``processing`` "update
    Ticket for AsyncResult info", then the async results' ``location``."""
    response_ref, response_uri = params
    ticket_id = secrets.token_hex(12)
    async_id = secrets.token_hex(12)
    request_id = str(uuid.uuid4())
    t0 = _now()
    uri = send_url(api_base, response_ref, response_uri)
    accepted = {"state": TicketState.ACCEPTED.value, "message": QUEUED, "time": t0}

    def ticket(
        events: list[dict[str, str]], location: str | None = None, data: Any = None
    ) -> dict[str, Any]:
        return ticket_document(
            ticket_id, request_id, user, uri, response_ref, events, location, response_uri, data
        )

    first = ticket([accepted])
    if outcomes == ["completed"]:
        done = {"state": TicketState.COMPLETED.value, "message": COMPLETED, "time": _now()}
        data = {"messageId": str(secrets.randbelow(10**12)).zfill(12), "sentTime": done["time"]}
        return SendAnswer(
            YesmailStatus.ACCEPTED, first, ticket([accepted, done], data=data), None, outcomes
        )
    processing = {
        "state": TicketState.PROCESSING.value,
        "message": "update Ticket for AsyncResult info",
        "time": _now(),
    }
    done = {"state": TicketState.COMPLETED.value, "message": COMPLETED, "time": _now()}
    final = ticket([accepted, processing, done], f"{api_base}/v2/async-results/{async_id}")
    at = _now()  # the recipients are processed together
    ignored = [i for i, o in enumerate(outcomes) if o == "ignored"] if "ignored" in outcomes else []
    completed = (
        [i for i, o in enumerate(outcomes) if o == "completed"] if ignored else range(len(outcomes))
    )
    results = {
        "id": async_id,
        "lastUpdated": done["time"],
        "counts": {
            "requested": len(recipients),
            "total": len(recipients),
            "completed": len(completed),
            "ignored": len(ignored),
            "failed": 0,
        },
        "completed": [{"index": i, "time": at} for i in completed],
        "failed": [],
        "ignored": [{"index": i, "time": at} for i in ignored],
    }
    return SendAnswer(YesmailStatus.ACCEPTED, first, final, results, outcomes)
