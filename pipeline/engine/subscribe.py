"""LISTSERV Maestro ``addSubscriberExternally.do``, answered from the store (``002_…``).

One call, one subscriber. The checks, in order:

* the URL parameters are there, name a list and an owner that exist (a list
  in ``simulate.missing_lists`` is gone from the platform: not found), and
  ``mSubscriber`` is a JSON object with an email → else ``FAILED`` with
  ``PARAMETER_VALIDATION_ERROR``;
* the list takes subscribes (open to everyone) → else ``SUBSCRIBE_NOT_POSSIBLE``;
* the address is not already subscribed → else ``ALREADY_SUBSCRIBED`` (the
  profile is ignored);
* the address is not a member of another list of the same group → else
  ``AUTHENTICATION_REQUIRED`` with an ``externalSubscribeURL``;
* the profile names list fields, with values of their type, and every
  mandatory field without a default → else ``PROFILE_VALIDATION_ERROR`` with
  one ``details`` entry per field;

and then ``{"result":"SUCCESS"}``: the subscriber is stored as *pending*
confirmation (never as subscribed), the password only as a salted hash.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import orjson
import pyarrow as pa

from pipeline.config import ListConfig, MailpipeConfig, ProfileField
from pipeline.emails import check_emails
from pipeline.errors import SubscribeFailure as F
from pipeline.store import Store, email_key, hash_password, profile_json

__all__ = ["SubscribeCall", "evaluate_subscribe", "find_list", "profile_problems", "type_problem"]

SUCCESS: dict[str, Any] = {"result": "SUCCESS"}
SubscribeCall = dict[
    str, Any
]  # mContainer, mOwner, mListId (strings), mSubscriber (text or object)


def find_list(cfg: MailpipeConfig, call: SubscribeCall) -> tuple[str | None, str | None]:
    """(list name, None) for the call's identifiers, or (None, what is wrong)."""
    for p in ("mContainer", "mOwner", "mListId", "mSubscriber"):
        if call.get(p) in (None, ""):
            return None, f"Missing parameter {p}"
    owners = {lst.mOwner for lst in cfg.lists.values()}
    if call["mOwner"] not in owners:
        return None, f"Owner {call['mOwner']} does not exist"
    # 002_…: "PARAMETER_VALIDATION_ERROR: Indicates an error related to the URL
    # parameter values (e.g. missing URL parameter, list not found, owner does not
    # exist, subscriber data not a valid JSON, ...)". A list deleted on the platform
    # (simulate.missing_lists) is a list not found, not a SUBSCRIBE_NOT_POSSIBLE.
    for name, lst in cfg.lists.items():
        if (lst.mContainer, lst.mOwner, lst.mListId) == (
            call["mContainer"],
            call["mOwner"],
            call["mListId"],
        ) and name not in cfg.simulate.missing_lists:
            return name, None
    return None, f"List {call['mListId']} not found in list group {call['mContainer']}"


def profile_problems(
    fields: dict[str, ProfileField], profile: Any, need_mandatory: bool = True
) -> tuple[dict[str, Any], list[str]]:
    """(stored profile with defaults, one problem per field)."""
    if profile is None:
        profile = {}
    if not isinstance(profile, dict):
        return {}, ["profile: not a JSON object"]
    problems: list[str] = []
    stored: dict[str, Any] = {}
    for name, value in profile.items():
        spec = fields.get(name)
        if spec is None:
            problems.append(f"{name}: unknown profile field")
            continue
        if value is None:  # a null value is no value: judged below, like a missing entry
            continue
        bad = type_problem(spec, value)
        if bad:
            problems.append(f"{name}: {bad}")
        elif value is not None:
            stored[name] = value
    for name, spec in fields.items():
        if name in stored or profile.get(name) is not None:
            continue
        if spec.default is not None:
            stored[name] = spec.default
        elif need_mandatory and (spec.mandatory or spec.type == "boolean"):
            problems.append(f"{name}: mandatory field has no value")
    return stored, problems


# a number field holds a 64-bit integer (what the store and Arrow columns keep)
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


def type_problem(spec: ProfileField, value: Any) -> str | None:
    """What is wrong with a profile value as the field's type takes it (None: nothing);
    subscribe and on-demand judge a value the same way."""
    if value is None:
        return "mandatory field has no value" if spec.mandatory else None
    if spec.type == "number":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{_shown(value)} is not an integer"
        if not INT_MIN <= value <= INT_MAX:
            return f"{value} is not an integer from {INT_MIN} to {INT_MAX}"
        return None
    if spec.type == "boolean":
        return None if isinstance(value, bool) else f"{_shown(value)} is not a boolean"
    if spec.type == "multi-select":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"{_shown(value)} is not a list of values"
        unknown = [v for v in value if v not in spec.lookup]
        return f"{_shown(unknown)} not among the lookup values" if unknown else None
    if not isinstance(value, str):
        return f"{_shown(value)} is not text"
    if spec.type == "single-select" and value not in spec.lookup:
        return f"{_shown(value)} is not one of the lookup values"
    if spec.mandatory and not value.strip():
        return "mandatory field has no value"
    return None


def _shown(value: Any) -> str:
    """A value for a message: text in single quotes, anything else as the JSON it came as
    (``true``, ``["DE"]``, ``{"x":1}``; Python's repr would say True, ['DE'], {'x': 1})."""
    if isinstance(value, str):
        return repr(value)
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # an integer beyond 64 bits
        return str(value)


def external_subscribe_url(base: str | None, lst: ListConfig, email: str) -> str:
    server = (base or "https://maestro.example.com").rstrip("/")
    return (
        f"{server}/list/subscribe.html?mContainer={quote(lst.mContainer or '', safe='')}"
        f"&mOwner={quote(lst.mOwner or '', safe='')}&mListId={quote(lst.mListId or '', safe='')}"
        f"&email={quote(email, safe='')}"
    )


def evaluate_subscribe(
    cfg: MailpipeConfig,
    store: Store,
    calls: list[SubscribeCall],
    base_url: str | None = None,
    log: Callable[[Any, list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Answer each call in order; the store is updated in one transaction."""
    answers: list[dict[str, Any]] = []
    emails: list[str | None] = []
    subscribers: list[dict[str, Any] | None] = []
    lists: list[str | None] = []
    for call in calls:
        name, problem = find_list(cfg, call)
        sub = call.get("mSubscriber")
        if problem is None and isinstance(sub, str):
            try:
                sub = orjson.loads(sub)
            except orjson.JSONDecodeError:
                problem = "mSubscriber is not valid JSON"
        if problem is None and not isinstance(sub, dict):
            problem = "mSubscriber is not a JSON object"
        answers.append(F.PARAMETER_VALIDATION_ERROR.response(problem) if problem else {})
        subscribers.append(sub if isinstance(sub, dict) else None)
        lists.append(name)
        email = sub.get("email") if isinstance(sub, dict) else None
        emails.append(email if isinstance(email, str) else None)
    verdict = check_emails(pa.array(emails, pa.string()))
    problems = verdict.problem.to_pylist()
    cleaned = verdict.email.to_pylist()
    keys = [email_key(e) if e else "" for e in cleaned]
    groups = {n: lst.group for n, lst in cfg.lists.items()}
    with store.begin() as conn:
        known = store.subscribers_of(conn, list(cfg.lists), [k for k in keys if k])
        writes: list[dict[str, Any]] = []
        for i, ans in enumerate(answers):
            if ans:
                continue
            name = lists[i]
            assert name is not None
            lst = cfg.lists[name]
            answers[i] = _judge(
                cfg,
                name,
                lst,
                subscribers[i] or {},
                problems[i],
                cleaned[i],
                keys[i],
                known,
                groups,
                base_url,
                writes,
            )
        store.upsert_subscribers(conn, writes)
        if log is not None:
            log(conn, answers)
    return answers


def _judge(
    cfg: MailpipeConfig,
    name: str,
    lst: ListConfig,
    sub: dict[str, Any],
    problem: str | None,
    email: str | None,
    key: str,
    known: dict[tuple[str, str], dict[str, Any]],
    groups: dict[str, str | None],
    base_url: str | None,
    writes: list[dict[str, Any]],
) -> dict[str, Any]:
    # the subscriber data is a parameter: it is validated before the list's status
    given = sub.get("email")
    if given is not None and not isinstance(given, str):  # {"email": 5}: there, but not text
        return F.PARAMETER_VALIDATION_ERROR.response(f"Invalid email address: {_shown(given)}")
    if problem == "MISSING_EMAIL":
        return F.PARAMETER_VALIDATION_ERROR.response("Missing email address")
    if problem == "INVALID_EMAIL" or email is None:
        return F.PARAMETER_VALIDATION_ERROR.response(f"Invalid email address: {given}")
    password = sub.get("password")
    if password is not None and not isinstance(password, str):
        # 002_…: "The Maestro login password"; dropping it would leave the default one
        return F.PARAMETER_VALIDATION_ERROR.response(
            f"password must be a JSON string, not {_shown(password)}"
        )
    # 002_…: "SUBSCRIBE_NOT_POSSIBLE: Indicates that a subscribe to the selected list
    # is not possible because of the current list status (e.g. list definition is
    # incomplete, subscribes are not allowed, ...)": the list exists but is not open.
    if not lst.subscribe_open:
        return F.SUBSCRIBE_NOT_POSSIBLE.response(
            f"Subscribes to list {lst.mListId} are not allowed"
        )
    row = known.get((name, key))
    if row is not None and row["state"] == "subscribed":
        return F.ALREADY_SUBSCRIBED.response("The address is already subscribed to the list")
    if lst.group and any(
        other != name
        and g == lst.group
        and known.get((other, key), {}).get("state") == "subscribed"
        for other, g in groups.items()
    ):
        return F.AUTHENTICATION_REQUIRED.response(
            "The address is already registered in the list group; the subscriber must "
            "authenticate to subscribe",
            external_subscribe_url=external_subscribe_url(base_url, lst, email),
        )
    stored, details = profile_problems(lst.fields, sub.get("profile"))
    if details:
        return F.PROFILE_VALIDATION_ERROR.response("Profile validation error", details)
    entry = {
        "list": name,
        "email_key": key,
        "email": email,
        "state": "pending",
        "profile": profile_json(stored),
        "password_hash": hash_password(password) if isinstance(password, str) else None,
    }
    writes.append(entry)
    known[(name, key)] = {**entry, "bounces": 0, "suspended": False}
    return dict(SUCCESS)
