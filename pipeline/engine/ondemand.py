"""LISTSERV Maestro on-demand recipients, answered from the store (``000_…``).

The engine takes the recipients of one call — or of several consecutive
calls of the same job, which is the same thing since Maestro "processes each
of the supplied recipients one by one" — as columns, and answers each with
the documented object. The checks, in order:

1. request: the mail job exists (``MAIL_JOB_NOT_FOUND``), is authorized
   (``ILLEGAL_JOB_STATE``), its trigger is open (``TRIGGER_CLOSED``), its list
   still exists (``HOSTED_LIST_NOT_FOUND`` / ``DATASET_NOT_FOUND``);
2. the three flags are JSON booleans (``INVALID_FORCE_ADD_FLAG``, …);
   ``profile`` is an object (``INVALID_PROFILE``);
3. the email is there and valid (``MISSING_EMAIL``, ``INVALID_EMAIL``); the
   profile names known fields with values of their type
   (``PROFILE_VALIDATION_ERROR``);
4. the address is not suppressed (``ADDRESS_REJECTED_BY_SUPPRESSION_LIST``);
5. an unknown address needs ``ifNotExistsAddAndSend`` (``ADDRESS_NOT_FOUND``),
   must not have unsubscribed or bounced too often
   (``ADDRESS_REJECTED_BY_LIST_PROTECTION``) and must bring every mandatory
   field without a default (``PROFILE_VALIDATION_ERROR``); it is then added;
6. a known address is sent to unless delivery is suspended or the group's
   limit is reached (``SEND_ERROR``), which ``ifExistsForceSending`` overrides;
   ``ifExistsDoUpdate`` stores the given list fields.

An address met twice is judged the second time against the state the first
left: recipients are processed in rounds of first, second, … occurrences.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrowutil import to_bool_np
from pipeline.config import FLAG_NAMES, JobPlan, MailpipeConfig, ProfileField
from pipeline.emails import INVALID, MISSING, check_emails
from pipeline.engine.subscribe import INT_MAX, INT_MIN, type_problem
from pipeline.errors import MaestroResult as R
from pipeline.normalize import arrow_type
from pipeline.payloads.jsonfrag import field as json_member
from pipeline.payloads.jsonfrag import obj as json_object
from pipeline.store import Store, profile_json

__all__ = [
    "OnDemandAnswer",
    "Precheck",
    "RecipColumns",
    "answer_recip",
    "columns_from_objects",
    "evaluate_ondemand",
    "precheck",
]

_FLAG_CODES = {
    "ifNotExistsAddAndSend": R.INVALID_FORCE_ADD_FLAG,
    "ifExistsDoUpdate": R.INVALID_DO_UPDATE_FLAG,
    "ifExistsForceSending": R.INVALID_FORCE_DELIVERY_FLAG,
}


@dataclass
class RecipColumns:
    """Recipient objects as columns.

    ``flags`` hold ``"true"``/``"false"`` for JSON booleans, null when absent and
    the JSON text of anything else; ``profile`` holds typed values per field;
    ``profile_error`` a problem found while reading the profile (unknown field,
    wrong type); ``profile_invalid`` marks a ``profile`` that is not an object.
    """

    email: pa.Array
    flags: dict[str, pa.Array]
    profile: dict[str, pa.Array]
    profile_error: pa.Array
    profile_invalid: np.ndarray

    def __len__(self) -> int:
        return len(self.email)


@dataclass
class OnDemandAnswer:
    """Per recipient: documented result code and optional message; or one request error."""

    request_error: R | None
    result: list[R] = field(default_factory=list)
    message: list[str | None] = field(default_factory=list)

    def bodies(self) -> list[dict[str, str]]:
        return [code.response(msg) for code, msg in zip(self.result, self.message)]

    def response_json(self) -> bytes:
        """The HTTP body Maestro would send for an array ``recip``: one object a recipient,
        in order — a call the job refuses (``TRIGGER_CLOSED``, …) included, since 000_…
        processes "each of the supplied recipients one by one exactly in the same way
        single recipients are processed"."""
        return orjson.dumps(self.bodies())


def request_error(cfg: MailpipeConfig, plan: JobPlan, store: Store) -> R | None:
    """The call-level answer, if the call itself cannot be processed."""
    sim = cfg.simulate
    if sim.mail_jobs:
        with store.begin() as conn:
            state = store.mail_job_state(conn, plan.mail_job)
        if state is None:
            return R.MAIL_JOB_NOT_FOUND
        if state == "not-authorized":
            return R.ILLEGAL_JOB_STATE
        if state == "closed":
            return R.TRIGGER_CLOSED
    if plan.list_name in sim.missing_datasets:
        return R.DATASET_NOT_FOUND
    if plan.list_name in sim.missing_lists:
        return R.HOSTED_LIST_NOT_FOUND
    return None


@dataclass
class Precheck:
    """What the recipients' own objects decide, before the store is asked (steps 2 and
    3): the codes settled so far (None: still open), each address as given and as the
    store matches it, the flags that are on, and each open recipient's occurrence of its
    address (its round; -1 when settled). Needs no store, so the simulate backend works
    it out for the next chunk while the one before is judged. Judging fills in its
    codes: it serves one call."""

    rc: RecipColumns
    code: np.ndarray
    message: np.ndarray
    flag_on: dict[str, np.ndarray]
    emails: list[str | None]
    keys: np.ndarray
    occurrence: np.ndarray

    def __len__(self) -> int:
        return len(self.rc)


def precheck(rc: RecipColumns) -> Precheck:
    """Steps 2 and 3 for every recipient, with arrays."""
    n = len(rc)
    code = np.full(n, None, dtype=object)
    message = np.full(n, None, dtype=object)
    flag_on: dict[str, np.ndarray] = {}
    for name in FLAG_NAMES:
        col = rc.flags.get(name, pa.nulls(n, pa.string()))
        bad = to_bool_np(pc.invert(pc.is_in(col, pa.array(["true", "false"]))))
        bad &= to_bool_np(pc.is_valid(col))
        _settle(code, message, bad, _FLAG_CODES[name])
        flag_on[name] = to_bool_np(pc.equal(col, "true"))
    _settle(code, message, rc.profile_invalid, R.INVALID_PROFILE)
    verdict = check_emails(rc.email)
    _settle(code, message, verdict.codes == MISSING, R.MISSING_EMAIL)
    invalid = verdict.codes == INVALID
    if invalid.any():
        _settle(
            code, message, invalid, R.INVALID_EMAIL, verdict.message.to_numpy(zero_copy_only=False)
        )
    perr = rc.profile_error.to_numpy(zero_copy_only=False)
    _settle(code, message, perr != None, R.PROFILE_VALIDATION_ERROR, perr)  # noqa: E711
    keys = _store_keys(verdict.email)
    occurrence = np.full(n, -1, dtype=np.int64)
    open_idx = np.flatnonzero(code == None)  # noqa: E711
    occurrence[open_idx] = _occurrences(keys[open_idx])
    return Precheck(rc, code, message, flag_on, verdict.email.to_pylist(), keys, occurrence)


def _settle(
    code: np.ndarray, message: np.ndarray, mask: np.ndarray, result: R, msg: Any = None
) -> None:
    """Give ``result`` (and ``msg``) to the recipients of ``mask`` not answered yet."""
    m = mask & (code == None)  # noqa: E711 - elementwise on an object array
    code[m] = result
    if msg is not None:
        message[m] = msg[m] if isinstance(msg, np.ndarray) else msg


def _occurrences(keys: np.ndarray) -> np.ndarray:
    """For each key, how many times it came before it (0 for its first occurrence);
    integer codes sort much faster than the strings themselves."""
    codes = pc.dictionary_encode(pa.array(keys, pa.string())).indices.to_numpy()
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.ones(order.size, dtype=bool)
    starts[1:] = sorted_codes[1:] != sorted_codes[:-1]
    run_start = np.maximum.accumulate(np.where(starts, np.arange(order.size), 0))
    occurrence = np.empty(order.size, dtype=np.int64)
    occurrence[order] = np.arange(order.size) - run_start
    return occurrence


def evaluate_ondemand(
    cfg: MailpipeConfig,
    plan: JobPlan,
    store: Store,
    rc: RecipColumns | Precheck,
    today: str | None = None,
    log: Callable[[Any, list[R], list[str | None]], None] | None = None,
) -> OnDemandAnswer:
    """Answer every recipient, update the store in one transaction.

    ``rc`` may be its :func:`precheck` already made. ``log(conn, codes, messages)``
    runs in that transaction with the answers (the simulate backend keeps the
    platform's own record of what it processed).
    """
    n = len(rc)
    err = request_error(cfg, plan, store)
    if err is not None:
        return OnDemandAnswer(err, [err] * n, [None] * n)
    pre = rc if isinstance(rc, Precheck) else precheck(rc)
    code, message, keys = pre.code, pre.message, pre.keys
    day = today or dt.date.today().isoformat()
    with store.begin() as conn:
        at = np.flatnonzero(code == None)  # noqa: E711
        suppressed = np.zeros(n, bool)
        suppressed[at] = store.suppressed_mask(conn, keys[at].tolist())
        _settle(code, message, suppressed, R.ADDRESS_REJECTED_BY_SUPPRESSION_LIST)
        _rounds(cfg, plan, store, conn, pre, day)
        code[code == None] = R.SUCCESS  # noqa: E711
        if log is not None:
            log(conn, list(code), list(message))
    return OnDemandAnswer(None, list(code), list(message))


def _store_keys(emails: pa.Array) -> np.ndarray:
    """Each address as the store matches it (``str.lower``; "" for none): pyarrow's ASCII
    lower-casing for ASCII addresses, Python's for the few others."""
    text = pc.fill_null(emails, "")
    keys: np.ndarray = pc.ascii_lower(text).to_numpy(zero_copy_only=False)
    other = np.flatnonzero(~to_bool_np(pc.string_is_ascii(text)))
    for i in other.tolist():
        keys[i] = str(keys[i]).lower()
    return keys


def _rounds(
    cfg: MailpipeConfig, plan: JobPlan, store: Store, conn: Any, pre: Precheck, day: str
) -> None:
    """Judge the open recipients against the store, first occurrences first.

    Each round is judged with arrays: one lookup for all its addresses, masks
    for each rule, one write for all the subscribers it adds. (A suppressed
    address is suppressed at each of its occurrences, so the rounds counted
    before suppression are still right after it.)
    """
    still = pre.code == None  # noqa: E711
    if not still.any():
        return
    for rnd in range(int(pre.occurrence[still].max()) + 1):
        _round(cfg, plan, store, conn, pre, day, np.flatnonzero(still & (pre.occurrence == rnd)))


def _round(
    cfg: MailpipeConfig,
    plan: JobPlan,
    store: Store,
    conn: Any,
    pre: Precheck,
    day: str,
    idx: np.ndarray,
) -> None:
    rc, keys, emails, flag_on = pre.rc, pre.keys, pre.emails, pre.flag_on
    lst = plan.lst
    round_keys = keys[idx].tolist()
    state, bounces, suspended = store.states(conn, plan.list_name, round_keys)
    add = flag_on["ifNotExistsAddAndSend"][idx]
    update = flag_on["ifExistsDoUpdate"][idx]
    force = flag_on["ifExistsForceSending"][idx]
    known = state == "subscribed"
    verdict = np.full(idx.size, None, dtype=object)
    note = np.full(idx.size, None, dtype=object)
    verdict[~known & ~add] = R.ADDRESS_NOT_FOUND
    protected = (
        ~known
        & add
        & (
            (state == "unsubscribed")
            | (state == "bounced")
            | (bounces >= cfg.simulate.bounce_limit)
        )
    )
    verdict[protected] = R.ADDRESS_REJECTED_BY_LIST_PROTECTION
    for i in np.flatnonzero(protected).tolist():
        note[i] = (
            "The address unsubscribed"
            if state[i] == "unsubscribed"
            else f"The address bounced {bounces[i]} times"
        )
    sel = pa.array(idx)
    given = {name: col.take(sel) for name, col in rc.profile.items() if name in lst.fields}
    candidates = ~known & add & ~protected
    missing = _missing_fields(plan, given, candidates)
    for i, names in missing.items():
        verdict[i] = R.PROFILE_VALIDATION_ERROR
        note[i] = "Missing value for " + ", ".join(
            f"{'mandatory' if lst.fields[m].mandatory else 'boolean'} field {m}" for m in names
        )
    adding = candidates & (verdict == None)  # noqa: E711
    _add(store, conn, plan, given, adding, idx, keys, emails)
    if update.any() and given:
        _update_profiles(store, conn, plan, given, known & update, idx, keys)
    limit = cfg.simulate.group_daily_limit if lst.group else None
    blocked = known & suspended & ~force
    note[blocked] = "Not sent: delivery is suspended by the subscriber"
    verdict[blocked] = R.SEND_ERROR
    if limit:
        _group_limit(
            store, conn, lst.group or "", limit, day, round_keys, known, force, verdict, note
        )
    verdict[verdict == None] = R.SUCCESS  # noqa: E711
    pre.code[idx] = verdict
    pre.message[idx] = note


def _missing_fields(
    plan: JobPlan, given: dict[str, pa.Array], rows: np.ndarray
) -> dict[int, list[str]]:
    """For each row to add: the mandatory (or boolean) fields without a value or default."""
    out: dict[int, list[str]] = {}
    for name, spec in plan.lst.fields.items():
        if spec.default is not None or not (spec.mandatory or spec.type == "boolean"):
            continue
        col = given.get(name)
        empty = rows if col is None else rows & ~to_bool_np(pc.is_valid(col))
        for i in np.flatnonzero(empty).tolist():
            out.setdefault(i, []).append(name)
    return out


def _add(
    store: Store,
    conn: Any,
    plan: JobPlan,
    given: dict[str, pa.Array],
    adding: np.ndarray,
    idx: np.ndarray,
    keys: np.ndarray,
    emails: list[str | None],
) -> None:
    """Store the new subscribers, their profile the given list fields plus defaults."""
    rows = np.flatnonzero(adding)
    if rows.size == 0:
        return
    sel = pa.array(rows)
    members = []
    for name in sorted(plan.lst.fields):  # sorted: the store keeps profiles with sorted keys
        spec = plan.lst.fields[name]
        col = given[name].take(sel) if name in given else pa.nulls(rows.size, arrow_type(spec))
        if spec.default is not None:
            col = pc.coalesce(col, pa.scalar(spec.default, col.type))
        members.append(json_member(name, col, None))
    profiles = json_object(members, rows.size).to_pylist()
    at = idx[rows].tolist()
    store.add_subscribers(
        conn, plan.list_name, keys[at].tolist(), [emails[i] for i in at], profiles
    )


def _update_profiles(
    store: Store,
    conn: Any,
    plan: JobPlan,
    given: dict[str, pa.Array],
    rows_mask: np.ndarray,
    idx: np.ndarray,
    keys: np.ndarray,
) -> None:
    """ifExistsDoUpdate: the given list fields replace the stored ones (rare: row by row)."""
    rows = np.flatnonzero(rows_mask)
    if rows.size == 0:
        return
    values = {name: col.take(pa.array(rows)).to_pylist() for name, col in given.items()}
    found = store.subscribers_of(conn, [plan.list_name], [keys[i] for i in idx[rows].tolist()])
    updates = []
    for j, i in enumerate(idx[rows].tolist()):
        changes = {f: v[j] for f, v in values.items() if v[j] is not None}
        row = found.get((plan.list_name, keys[i]))
        if not changes or row is None:
            continue
        stored = orjson.loads(row["profile"] or "{}")
        stored.update(changes)
        updates.append(
            {
                "list": plan.list_name,
                "email_key": keys[i],
                "email": row["email"],
                "state": row["state"],
                "profile": profile_json(stored),
            }
        )
    store.upsert_subscribers(conn, updates)


def _group_limit(
    store: Store,
    conn: Any,
    group: str,
    limit: int,
    day: str,
    keys: list[str],
    known: np.ndarray,
    force: np.ndarray,
    verdict: np.ndarray,
    note: np.ndarray,
) -> None:
    """The list group's daily limit: sends so far today decide, forced sends still count."""
    sent = store.sent_today(conn, group, keys, day)
    sends: list[str] = []
    for i, k in enumerate(keys):
        if verdict[i] is not None:
            continue
        if known[i] and sent.get(k, 0) >= limit and not force[i]:
            verdict[i] = R.SEND_ERROR
            note[i] = f"Not sent: list group limit of {limit} messages a day reached"
            continue
        sends.append(k)
        sent[k] = sent.get(k, 0) + 1
    if sends:
        store.count_sends(conn, group, sends, day)


def _new_address(
    cfg: MailpipeConfig, plan: JobPlan, row: dict[str, Any] | None, given: dict[str, Any], add: bool
) -> tuple[R, str | None] | dict[str, Any]:
    """An address that is not a subscriber: its rejection, or the profile to add it with."""
    if not add:
        return R.ADDRESS_NOT_FOUND, None
    if row is not None and (
        row["state"] in ("unsubscribed", "bounced")
        or int(row["bounces"]) >= cfg.simulate.bounce_limit
    ):
        why = (
            "unsubscribed" if row["state"] == "unsubscribed" else f"bounced {row['bounces']} times"
        )
        return R.ADDRESS_REJECTED_BY_LIST_PROTECTION, f"The address {why}"
    profile: dict[str, Any] = {}
    missing: list[str] = []
    for name, spec in plan.lst.fields.items():
        value = given.get(name, spec.default)
        if value is None and (spec.mandatory or spec.type == "boolean"):
            missing.append(name)
        elif value is not None:
            profile[name] = value
    if missing:
        return R.PROFILE_VALIDATION_ERROR, "Missing value for " + ", ".join(
            f"{'mandatory' if plan.lst.fields[m].mandatory else 'boolean'} field {m}"
            for m in missing
        )
    return profile


def columns_from_objects(objs: list[Any], plan: JobPlan) -> RecipColumns:
    """Parsed ``recip`` objects → columns, judging each profile as the platform does.

    Used for recipients that come as JSON (the sandbox, per-row profile
    objects): flags keep their JSON spelling, profile values are checked
    against the list's fields and the job's on-demand merge fields.

    Built a column at a time: each field's values are gathered and checked with
    a test that passes only values certainly of the field's type; the few
    recipients with a value it does not pass, or a field it does not know, are
    judged one by one (:func:`_judge_profile`), which words their problems.
    """
    n = len(objs)
    recs = [obj if isinstance(obj, dict) else {} for obj in objs]
    emails = [
        e if e is None or isinstance(e, str) else orjson.dumps(e).decode()
        for e in (rec.get("email") for rec in recs)
    ]
    flags: dict[str, list[str | None]] = {
        f: [
            None
            if f not in rec
            else "true"
            if (v := rec[f]) is True
            else "false"
            if v is False
            else orjson.dumps(v).decode()
            for rec in recs
        ]
        for f in FLAG_NAMES
    }
    raw = [rec.get("profile") for rec in recs]
    invalid = np.fromiter((p is not None and not isinstance(p, dict) for p in raw), bool, n)
    profiles: list[dict[str, Any]] = [p if isinstance(p, dict) else {} for p in raw]
    known = set(plan.lst.fields) | set(plan.job.merge_fields)
    doubtful = {i for i, p in enumerate(profiles) if p and not p.keys() <= known}
    values: dict[str, list[Any]] = {}
    for name in known:
        vals = values[name] = [p.get(name) for p in profiles]
        sure = _surely_of_type(plan.field_spec(name))
        if sure is None:  # plain text
            doubtful.update(i for i, v in enumerate(vals) if v is not None and type(v) is not str)
        else:
            doubtful.update(i for i, v in enumerate(vals) if v is not None and not sure(v))
    errors: list[str | None] = [None] * n
    for i in doubtful:
        problems, good = _judge_profile(profiles[i], plan, known)
        errors[i] = "; ".join(problems) or None
        for name in known:
            values[name][i] = good.get(name)
    profile_cols = {name: pa.array(vals, _arrow_type(plan, name)) for name, vals in values.items()}
    return RecipColumns(
        email=pa.array(emails, pa.string()),
        flags={f: pa.array(v, pa.string()) for f, v in flags.items()},
        profile=profile_cols,
        profile_error=pa.array(errors, pa.string()),
        profile_invalid=invalid,
    )


def _judge_profile(
    profile: dict[str, Any], plan: JobPlan, known: set[str]
) -> tuple[list[str], dict[str, Any]]:
    """One recipient's profile: its problems in the order of its members, and the
    values that have none."""
    problems: list[str] = []
    good: dict[str, Any] = {}
    for name, value in profile.items():
        if name not in known:
            problems.append(f"{name}: not a field of the list nor an on-demand merge field")
            continue
        # on-demand merge fields are plain text (JobPlan.field_spec): a value of any
        # other JSON type is a validation error, not a crash when building columns
        bad = type_problem(plan.field_spec(name), value)
        if bad and value is not None:
            problems.append(f"{name}: {bad}")
        else:
            good[name] = value
    return problems, good


def _surely_of_type(spec: ProfileField) -> Callable[[Any], bool] | None:
    """A test that passes a (non-null) value only when :func:`type_problem` finds nothing
    wrong with it (it may fail some that are fine: those are judged one by one); None for
    plain optional text, where the test is ``type(v) is str``."""
    if spec.type == "number":
        return lambda v: type(v) is int and INT_MIN <= v <= INT_MAX
    if spec.type == "boolean":
        return lambda v: v is True or v is False
    if spec.type == "multi-select":
        lookup = frozenset(spec.lookup)
        return lambda v: type(v) is list and all(type(x) is str and x in lookup for x in v)
    if spec.type == "single-select":
        lookup = frozenset(spec.lookup)
        return lambda v: type(v) is str and v in lookup and not (spec.mandatory and not v.strip())
    if spec.mandatory:
        return lambda v: type(v) is str and bool(v.strip())
    return None


def _arrow_type(plan: JobPlan, name: str) -> pa.DataType:
    from pipeline.normalize import arrow_type

    return arrow_type(plan.field_spec(name))


def answer_recip(cfg: MailpipeConfig, plan: JobPlan, store: Store, recip: str | None) -> bytes:
    """The body Maestro answers for a trigger URL's ``recip`` parameter (text as received):
    one object for one recipient, an array for an array; ``PARSE_ERROR`` and
    ``NO_RECIPIENTS`` (no recipient to answer for) one object."""
    if recip is None or not recip.strip():
        return orjson.dumps(R.NO_RECIPIENTS.response())
    try:
        data = orjson.loads(recip)
    except orjson.JSONDecodeError as e:
        return orjson.dumps(R.PARSE_ERROR.response(str(e)))
    single = not isinstance(data, list)
    objs = [data] if single else data
    if not objs:
        return orjson.dumps(R.NO_RECIPIENTS.response())
    answer = evaluate_ondemand(cfg, plan, store, columns_from_objects(objs, plan))
    bodies = answer.bodies()  # a refused call: its error for each recipient
    return orjson.dumps(bodies[0] if single else bodies)
