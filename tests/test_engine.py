"""The simulate engine answers every documented code, letter for letter.

Expected bodies are written out literally from the documents in
``shared/seeds/`` (000 = Maestro on-demand, 002 = Maestro
``addSubscriberExternally.do``, 003 = Yesmail ``emails/send``) — never
rebuilt from the code under test — so a changed text or shape fails here.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from conftest import SEEDS, small_config
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pg_server import pg_server, pg_url  # noqa: F401  (fixtures)

from pipeline.config import MailpipeConfig
from pipeline.engine.ondemand import (
    _judge_profile,
    answer_recip,
    columns_from_objects,
    evaluate_ondemand,
    precheck,
)
from pipeline.engine.subscribe import evaluate_subscribe
from pipeline.engine.yesmail import evaluate_send, evaluate_sends
from pipeline.errors import MaestroResult, YesmailStatus
from pipeline.store import Store, email_key, profile_json, verify_password

# -- the documents' texts, copied from 000_… ----------------------------------------

DOC_ERRORS = {
    "PARSE_ERROR": "Parse error in JSON data",
    "NO_RECIPIENTS": "No recipients specified",
    "MAIL_JOB_NOT_FOUND": "Mail job not found",
    "ILLEGAL_JOB_STATE": "Illegal mail job state",
    "TRIGGER_CLOSED": "Trigger closed",
    "DATASET_NOT_FOUND": "Dataset not found",
    "HOSTED_LIST_NOT_FOUND": "Subscriber list not found",
    "PROFILE_VALIDATION_ERROR": "Profile validation error",
    "ADDRESS_NOT_FOUND": (
        "No subscriber with specified address found and property ifNotExistsAddAndSend not set"
    ),
    "ADDRESS_REJECTED_BY_SUPPRESSION_LIST": "Address on suppression list",
    "ADDRESS_REJECTED_BY_LIST_PROTECTION": (
        "List protection is enabled and address was previously unsubscribed or bounced too often"
    ),
    "SEND_ERROR": "Sending failed",
    "INTERNAL_ERROR": "Internal execution error",
    "INVALID_EMAIL": "Invalid email address",
    "MISSING_EMAIL": "Missing email address",
    "INVALID_DO_UPDATE_FLAG": "Invalid ifExistsDoUpdate property",
    "INVALID_FORCE_ADD_FLAG": "Invalid ifNotExistsAddAndSend property",
    "INVALID_FORCE_DELIVERY_FLAG": "Invalid ifExistsForceSending property",
    "INVALID_PROFILE": "Invalid profile property",
}
OK = {"result": "SUCCESS"}
ADD = {"ifNotExistsAddAndSend": True}


def err(code: str, message: str | None = None) -> dict[str, str]:
    """The documented error object; ``message`` only when there are details."""
    body = {"result": code, "error": DOC_ERRORS[code]}
    if message is not None:
        body["message"] = message
    return body


# -- fixtures and helpers -------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Any) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/s.db")
    yield s
    s.close()


def od_config(simulate: dict[str, Any] | None = None, **job: Any) -> MailpipeConfig:
    """The small config's list, one on-demand job with an on-demand merge field."""
    return small_config(
        jobs={
            "confirm": {
                "source": "orders",
                "target": "maestro-ondemand",
                "list": "shop",
                "merge_fields": ["SHIP1"],
                **job,
            }
        },
        simulate=simulate or {},
    )


def call(cfg: MailpipeConfig, store: Store, recip: Any) -> Any:
    """Answer a ``recip`` value (JSON-encoded unless already text), parsed back."""
    text = recip if isinstance(recip, str) or recip is None else orjson.dumps(recip).decode()
    if cfg.simulate.mail_jobs:
        store.sync_mail_jobs(dict(cfg.simulate.mail_jobs))
    return orjson.loads(answer_recip(cfg, cfg.plan("confirm"), store, text))


def seed(store: Store, email: str, list_name: str = "shop", **row: Any) -> None:
    profile = row.pop("profile", {})
    with store.begin() as conn:
        store.upsert_subscribers(
            conn,
            [
                {
                    "list": list_name,
                    "email_key": email_key(email),
                    "email": email,
                    "state": row.pop("state", "subscribed"),
                    "bounces": row.pop("bounces", 0),
                    "suspended": row.pop("suspended", False),
                    "profile": profile_json(profile),
                    **row,
                }
            ],
        )


def rows(store: Store, list_name: str = "shop") -> dict[str, dict[str, Any]]:
    return {r["email_key"]: r for r in store.iter_subscribers(list_name)}


def profile_of(store: Store, email: str, list_name: str = "shop") -> dict[str, Any]:
    profile: dict[str, Any] = orjson.loads(rows(store, list_name)[email_key(email)]["profile"])
    return profile


def suppress(store: Store, email: str) -> None:
    with store.begin() as conn:
        store.upsert_suppression(
            conn,
            [{"email_key": email_key(email), "email": email, "reason": "x", "added_at": "2024"}],
        )


# == maestro-ondemand ================================================================


def test_maestro_result_texts_are_the_documents_own() -> None:
    text = (SEEDS / "000_153cd279dc41487d.txt").read_text(encoding="utf-8")
    documented = dict(re.findall(r'\{"result":"([A-Z_]+)", "error":"([^"]+)"\}', text))
    assert documented == DOC_ERRORS
    assert {m.value for m in MaestroResult} == {"SUCCESS", *DOC_ERRORS}
    for code, error in DOC_ERRORS.items():
        assert MaestroResult[code].response() == {"result": code, "error": error}


def test_ondemand_success_adds_the_subscriber_with_its_profile(store: Store) -> None:
    cfg = od_config()
    recip = {
        "email": "Ann.Lee@Example.COM",
        "profile": {"FIRST_NAME": "Ann", "AGE": 41, "TAGS": ["a", "c"], "COLOR": "red"},
        **ADD,
    }
    body = answer_recip(cfg, cfg.plan("confirm"), store, orjson.dumps(recip).decode())
    assert body == b'{"result":"SUCCESS"}'
    row = rows(store)["ann.lee@example.com"]
    assert (row["email"], row["state"], row["bounces"], row["suspended"]) == (
        "Ann.Lee@example.com",
        "subscribed",
        0,
        False,
    )
    # the boolean's default is stored with the given values
    assert orjson.loads(row["profile"]) == {
        "FIRST_NAME": "Ann",
        "AGE": 41,
        "TAGS": ["a", "c"],
        "COLOR": "red",
        "VIP": False,
    }


def test_ondemand_array_in_array_out_in_order(store: Store) -> None:
    cfg = od_config()
    seed(store, "known@example.com", profile={"FIRST_NAME": "K"})
    one = answer_recip(cfg, cfg.plan("confirm"), store, '[{"email":"known@example.com"}]')
    assert one == b'[{"result":"SUCCESS"}]'
    recips = [
        {"email": "nobody@example.com"},
        {"email": "known@example.com"},
        {"email": ""},
        {"email": "new@example.com", "profile": {"FIRST_NAME": "N"}, **ADD},
        {"email": "known@example.com", "ifExistsForceSending": "yes"},
    ]
    assert call(cfg, store, recips) == [
        err("ADDRESS_NOT_FOUND"),
        OK,
        err("MISSING_EMAIL"),
        OK,
        err("INVALID_FORCE_DELIVERY_FLAG"),
    ]


# ``recip`` text → orjson's ``JSONDecodeError`` text, which the engine passes on as the
# PARSE_ERROR ``message`` (``answer_recip``); written out so that a changed text fails
_PARSE_DETAILS = {
    '{"email":': "unexpected end of data: line 1 column 10 (char 9)",
    "[{]": "unexpected character, expected a string key: line 1 column 3 (char 2)",
    "recip": "unexpected character, expected a JSON value: line 1 column 1 (char 0)",
    '{"email":"a@example.com"} x': "unexpected content after document: line 1 column 27 (char 26)",
}


def _orjson_says(text: str) -> str:
    with pytest.raises(orjson.JSONDecodeError) as e:
        orjson.loads(text)
    return str(e.value)


@pytest.mark.parametrize(("text", "detail"), list(_PARSE_DETAILS.items()))
def test_ondemand_parse_error(store: Store, text: str, detail: str) -> None:
    # the literal is orjson's own text (if this fails, orjson changed it: update the table)
    assert _orjson_says(text) == detail
    cfg = od_config()
    assert call(cfg, store, text) == {
        "result": "PARSE_ERROR",
        "error": "Parse error in JSON data",
        "message": detail,
    }
    assert rows(store) == {}


def test_ondemand_no_recipients(store: Store) -> None:
    cfg = od_config()
    for text in ("[]", " [ ] ", "", "   ", None):
        assert call(cfg, store, text) == {
            "result": "NO_RECIPIENTS",
            "error": "No recipients specified",
        }, text


def test_ondemand_mail_job_not_found(store: Store) -> None:
    cfg = od_config({"mail_jobs": {"some-other-job": "authorized"}})
    expected = {"result": "MAIL_JOB_NOT_FOUND", "error": "Mail job not found"}
    # one object for one recipient; for an array, the error for each recipient, in order
    # (000_…: "processes each of the supplied recipients one by one exactly in the same
    # way single recipients are processed. The result … is also a JSON array")
    assert call(cfg, store, {"email": "a@example.com", **ADD}) == expected
    two = [{"email": "a@example.com"}, {"email": "b@example.com"}]
    assert call(cfg, store, two) == [expected, expected]
    # the job's own mail_job name is what is looked up
    cfg = od_config({"mail_jobs": {"MJ-7": "authorized"}}, mail_job="MJ-7")
    assert call(cfg, store, {"email": "a@example.com", "profile": {"FIRST_NAME": "A"}, **ADD}) == OK


def test_ondemand_illegal_job_state(store: Store) -> None:
    cfg = od_config({"mail_jobs": {"confirm": "not-authorized"}})
    expected = {"result": "ILLEGAL_JOB_STATE", "error": "Illegal mail job state"}
    assert call(cfg, store, {"email": "a@example.com", **ADD}) == expected
    assert call(cfg, store, [{"email": "a@example.com"}]) == [expected]
    assert rows(store) == {}


def test_ondemand_trigger_closed(store: Store) -> None:
    cfg = od_config({"mail_jobs": {"confirm": "closed"}})
    expected = {"result": "TRIGGER_CLOSED", "error": "Trigger closed"}
    assert call(cfg, store, {"email": "a@example.com", **ADD}) == expected
    assert call(cfg, store, [{"email": "a@example.com"}]) == [expected]
    # authorized: the same call goes through
    cfg = od_config({"mail_jobs": {"confirm": "authorized"}})
    assert call(cfg, store, {"email": "a@example.com", "profile": {"FIRST_NAME": "A"}, **ADD}) == OK


def test_ondemand_dataset_not_found(store: Store) -> None:
    cfg = od_config({"missing_datasets": ["shop"]})
    expected = {"result": "DATASET_NOT_FOUND", "error": "Dataset not found"}
    assert call(cfg, store, {"email": "a@example.com", **ADD}) == expected
    two = [{"email": "a@example.com"}, {"email": "b@example.com"}]
    assert call(cfg, store, two) == [expected, expected]


def test_ondemand_hosted_list_not_found(store: Store) -> None:
    cfg = od_config({"missing_lists": ["shop"]})
    expected = {"result": "HOSTED_LIST_NOT_FOUND", "error": "Subscriber list not found"}
    assert call(cfg, store, {"email": "a@example.com", **ADD}) == expected
    assert call(cfg, store, [{"email": "a@example.com"}]) == [expected]


@pytest.mark.parametrize(
    ("flag", "code", "text"),
    [
        (
            "ifNotExistsAddAndSend",
            "INVALID_FORCE_ADD_FLAG",
            "Invalid ifNotExistsAddAndSend property",
        ),
        ("ifExistsDoUpdate", "INVALID_DO_UPDATE_FLAG", "Invalid ifExistsDoUpdate property"),
        (
            "ifExistsForceSending",
            "INVALID_FORCE_DELIVERY_FLAG",
            "Invalid ifExistsForceSending property",
        ),
    ],
)
def test_ondemand_invalid_flag(store: Store, flag: str, code: str, text: str) -> None:
    cfg = od_config()
    seed(store, "known@example.com", profile={"FIRST_NAME": "K"})
    bad_values: list[Any] = ["true", 1, "false", 0, None, [True], {"v": True}]
    answers = call(cfg, store, [{"email": "known@example.com", flag: v} for v in bad_values])
    assert answers == [{"result": code, "error": text}] * len(bad_values)
    # JSON booleans are fine
    good = call(cfg, store, [{"email": "known@example.com", flag: v} for v in (True, False)])
    assert good == [OK, OK]


def test_ondemand_invalid_profile(store: Store) -> None:
    cfg = od_config()
    bad: list[Any] = ["FIRST_NAME=Ann", ["Ann"], 5, True]
    answers = call(cfg, store, [{"email": "a@example.com", "profile": p, **ADD} for p in bad])
    assert answers == [{"result": "INVALID_PROFILE", "error": "Invalid profile property"}] * 4
    assert rows(store) == {}


def test_ondemand_missing_email(store: Store) -> None:
    cfg = od_config()
    recips: list[Any] = [
        {**ADD},
        {"email": "", **ADD},
        {"email": "   ", **ADD},
        {"email": None, **ADD},
    ]
    assert (
        call(cfg, store, recips)
        == [{"result": "MISSING_EMAIL", "error": "Missing email address"}] * 4
    )


# address → email-validator's ``EmailNotValidError`` text (check_deliverability=False),
# which the engine passes on as the INVALID_EMAIL ``message`` (``pipeline.emails``)
_EMAIL_DETAILS = {
    "not-an-address": "An email address must have an @-sign.",
    "a@b@example.com": "The part after the @-sign contains invalid characters: '@'.",
    "ann@": "There must be something after the @-sign.",
    "ann@example..com": "An email address cannot have two periods in a row.",
    "bad": "An email address must have an @-sign.",
}


def _validator_says(email: str) -> str:
    with pytest.raises(EmailNotValidError) as e:
        validate_email(email, check_deliverability=False)
    return str(e.value)


def test_ondemand_invalid_email(store: Store) -> None:
    # the literals are email-validator's own texts (if this fails, the library changed
    # them: update the table)
    assert {e: _validator_says(e) for e in _EMAIL_DETAILS} == _EMAIL_DETAILS
    cfg = od_config()
    emails = ["not-an-address", "a@b@example.com", "ann@", "ann@example..com"]
    for email in emails:
        body = call(cfg, store, {"email": email, "profile": {"FIRST_NAME": "A"}, **ADD})
        assert body == {
            "result": "INVALID_EMAIL",
            "error": "Invalid email address",
            "message": _EMAIL_DETAILS[email],
        }, email
    # in an array, each recipient gets its own address's explanation
    recips = [{"email": e, "profile": {"FIRST_NAME": "A"}, **ADD} for e in emails]
    assert call(cfg, store, recips) == [err("INVALID_EMAIL", _EMAIL_DETAILS[e]) for e in emails]
    assert rows(store) == {}


def test_ondemand_address_rejected_by_suppression_list(store: Store) -> None:
    cfg = od_config()
    suppress(store, "Gone@Example.com")
    seed(store, "known@example.com", profile={"FIRST_NAME": "K"})
    suppress(store, "known@example.com")
    expected = {
        "result": "ADDRESS_REJECTED_BY_SUPPRESSION_LIST",
        "error": "Address on suppression list",
    }
    recips = [
        {"email": "gone@example.com", "profile": {"FIRST_NAME": "G"}, **ADD},
        {"email": "known@example.com", "ifExistsForceSending": True},
    ]
    assert call(cfg, store, recips) == [expected, expected]
    assert set(rows(store)) == {"known@example.com"}


def test_ondemand_address_not_found(store: Store) -> None:
    cfg = od_config()
    expected = {
        "result": "ADDRESS_NOT_FOUND",
        "error": "No subscriber with specified address found and property "
        "ifNotExistsAddAndSend not set",
    }
    recips = [
        {"email": "new@example.com", "profile": {"FIRST_NAME": "N"}},
        {"email": "new@example.com", "ifNotExistsAddAndSend": False},
    ]
    assert call(cfg, store, recips) == [expected, expected]
    assert rows(store) == {}


def test_ondemand_address_rejected_by_list_protection(store: Store) -> None:
    cfg = od_config({"bounce_limit": 3})
    seed(store, "left@example.com", state="unsubscribed", profile={"FIRST_NAME": "L"})
    seed(store, "dead@example.com", state="bounced", bounces=3)
    seed(store, "often@example.com", state="pending", bounces=3)
    seed(store, "twice@example.com", state="pending", bounces=2)
    text = "List protection is enabled and address was previously unsubscribed or bounced too often"
    recips = [
        {"email": e, "profile": {"FIRST_NAME": "X"}, **ADD}
        for e in ("left@example.com", "dead@example.com", "often@example.com", "twice@example.com")
    ]
    assert call(cfg, store, recips) == [
        {
            "result": "ADDRESS_REJECTED_BY_LIST_PROTECTION",
            "error": text,
            "message": "The address unsubscribed",
        },
        {
            "result": "ADDRESS_REJECTED_BY_LIST_PROTECTION",
            "error": text,
            "message": "The address bounced 3 times",
        },
        {
            "result": "ADDRESS_REJECTED_BY_LIST_PROTECTION",
            "error": text,
            "message": "The address bounced 3 times",
        },
        OK,  # below the bounce limit: added
    ]
    stored = rows(store)
    assert stored["left@example.com"]["state"] == "unsubscribed"
    assert orjson.loads(stored["left@example.com"]["profile"]) == {"FIRST_NAME": "L"}
    assert stored["dead@example.com"]["state"] == "bounced"
    assert stored["often@example.com"]["state"] == "pending"
    assert stored["twice@example.com"]["state"] == "subscribed"


def test_ondemand_profile_validation_error(store: Store, tmp_path: Any) -> None:
    cfg = od_config()
    seed(store, "known@example.com", profile={"FIRST_NAME": "K"})
    text = "Profile validation error"
    recips: list[Any] = [
        # a new address without a mandatory field that has no default
        {"email": "a@example.com", "profile": {"LAST_NAME": "Lee"}, **ADD},
        {"email": "b@example.com", "profile": {"FIRST_NAME": None}, **ADD},
        # unknown field (new or known address alike)
        {"email": "c@example.com", "profile": {"FIRST_NAME": "C", "NOPE": "x"}, **ADD},
        {"email": "known@example.com", "profile": {"NOPE": "x"}},
        # wrong types
        {"email": "d@example.com", "profile": {"FIRST_NAME": "D", "AGE": "41"}, **ADD},
        {"email": "known@example.com", "profile": {"AGE": 4.5}},
        {"email": "known@example.com", "profile": {"VIP": "yes"}},
        {"email": "known@example.com", "profile": {"COLOR": "blue"}},
        {"email": "known@example.com", "profile": {"TAGS": ["a", "z"]}},
        {"email": "known@example.com", "profile": {"FIRST_NAME": ""}},
        {"email": "known@example.com", "profile": {"SHIP1": 12345}},
        {"email": "known@example.com", "profile": {"AGE": "x", "NOPE": 1}},
        # beyond 64 bits: refused, not a crash building the column (JSON integers from 2**63
        # to 2**64 - 1 parse as integers; larger ones as floats: "not an integer")
        {"email": "known@example.com", "profile": {"AGE": 2**63}},
        # values shown as the JSON they came as
        {"email": "known@example.com", "profile": {"COLOR": ["red"], "VIP": None}},
        {"email": "known@example.com", "profile": {"SHIP1": True}},
    ]
    assert call(cfg, store, recips) == [
        {"result": "PROFILE_VALIDATION_ERROR", "error": text, "message": m}
        for m in (
            "Missing value for mandatory field FIRST_NAME",
            "Missing value for mandatory field FIRST_NAME",
            "NOPE: not a field of the list nor an on-demand merge field",
            "NOPE: not a field of the list nor an on-demand merge field",
            "AGE: '41' is not an integer",
            "AGE: 4.5 is not an integer",
            "VIP: 'yes' is not a boolean",
            "COLOR: 'blue' is not one of the lookup values",
            'TAGS: ["z"] not among the lookup values',
            "FIRST_NAME: mandatory field has no value",
            # on-demand merge fields are text; a number is refused, not a crash
            "SHIP1: 12345 is not text",
            "AGE: 'x' is not an integer; "
            "NOPE: not a field of the list nor an on-demand merge field",
            f"AGE: {2**63} is not an integer from {-(2**63)} to {2**63 - 1}",
            'COLOR: ["red"] is not text',
            "SHIP1: true is not text",
        )
    ]
    # the largest 64-bit integers are numbers like any other
    for age in (2**63 - 1, -(2**63)):
        assert call(cfg, store, [{"email": "known@example.com", "profile": {"AGE": age}}]) == [
            {"result": "SUCCESS"}
        ]
    assert set(rows(store)) == {"known@example.com"}
    assert profile_of(store, "known@example.com") == {"FIRST_NAME": "K"}

    # a boolean field with neither a value nor a default
    lists = {
        "shop": {
            "name": "Shop",
            "d_from_email": "shop@example.com",
            "fields": {"FIRST_NAME": {"type": "text"}, "OPTIN": {"type": "boolean"}},
        }
    }
    cfg2 = small_config(
        lists=lists,
        jobs={
            "confirm": {
                "source": "orders",
                "target": "maestro-ondemand",
                "list": "shop",
                "fields": ["FIRST_NAME"],
            }
        },
    )
    store2 = Store(f"sqlite:///{tmp_path}/s2.db")
    assert call(
        cfg2,
        store2,
        [
            {"email": "e@example.com", "profile": {"FIRST_NAME": "E"}, **ADD},
            {"email": "f@example.com", "profile": {"OPTIN": None}, **ADD},
            {"email": "g@example.com", "profile": {"OPTIN": False}, **ADD},
        ],
    ) == [
        {
            "result": "PROFILE_VALIDATION_ERROR",
            "error": text,
            "message": "Missing value for boolean field OPTIN",
        },
        {
            "result": "PROFILE_VALIDATION_ERROR",
            "error": text,
            "message": "Missing value for boolean field OPTIN",
        },
        OK,
    ]
    assert set(rows(store2)) == {"g@example.com"}
    store2.close()


def test_ondemand_send_error_and_force_sending(store: Store) -> None:
    cfg = od_config()
    seed(store, "paused@example.com", suspended=True, profile={"FIRST_NAME": "P"})
    send_error = {
        "result": "SEND_ERROR",
        "error": "Sending failed",
        "message": "Not sent: delivery is suspended by the subscriber",
    }
    assert call(cfg, store, {"email": "paused@example.com"}) == send_error
    assert call(cfg, store, {"email": "paused@example.com", **ADD}) == send_error
    assert call(cfg, store, {"email": "paused@example.com", "ifExistsForceSending": False}) == (
        send_error
    )
    assert call(cfg, store, {"email": "paused@example.com", "ifExistsForceSending": True}) == OK
    assert rows(store)["paused@example.com"]["suspended"] is True


def test_ondemand_send_error_group_daily_limit(store: Store) -> None:
    cfg = od_config({"group_daily_limit": 2})
    seed(store, "busy@example.com", profile={"FIRST_NAME": "B"})
    limit = {
        "result": "SEND_ERROR",
        "error": "Sending failed",
        "message": "Not sent: list group limit of 2 messages a day reached",
    }
    busy = {"email": "busy@example.com"}
    assert call(cfg, store, [busy, busy, busy]) == [OK, OK, limit]
    # the count is kept in the store: a later call is still over the limit
    assert call(cfg, store, busy) == limit
    assert call(cfg, store, {**busy, "ifExistsForceSending": True}) == OK
    # another address has its own count
    assert (
        call(cfg, store, {"email": "new@example.com", "profile": {"FIRST_NAME": "N"}, **ADD}) == OK
    )


def test_ondemand_do_update_stores_only_the_given_fields(store: Store) -> None:
    cfg = od_config()
    before = {"FIRST_NAME": "Ann", "LAST_NAME": "Old", "AGE": 40, "VIP": True}
    seed(store, "ann@example.com", profile=before)
    given = {"LAST_NAME": "New", "TAGS": ["b"]}
    # without the flag (absent or false) the stored profile is untouched
    assert call(cfg, store, {"email": "ann@example.com", "profile": given}) == OK
    assert (
        call(cfg, store, {"email": "ann@example.com", "profile": given, "ifExistsDoUpdate": False})
        == OK
    )
    assert profile_of(store, "ann@example.com") == before
    # with it, only the given fields change
    assert (
        call(cfg, store, {"email": "ANN@example.com", "profile": given, "ifExistsDoUpdate": True})
        == OK
    )
    assert profile_of(store, "ann@example.com") == {**before, "LAST_NAME": "New", "TAGS": ["b"]}
    row = rows(store)["ann@example.com"]
    assert (row["email"], row["state"]) == ("ann@example.com", "subscribed")


def test_ondemand_merge_fields_are_accepted_and_never_stored(store: Store) -> None:
    cfg = od_config()
    seed(store, "known@example.com", profile={"FIRST_NAME": "K"})
    recips = [
        {
            "email": "new@example.com",
            "profile": {"FIRST_NAME": "N", "SHIP1": "12345 Example Blvd."},
            **ADD,
        },
        {
            "email": "known@example.com",
            "profile": {"SHIP1": "52345 Sample City", "LAST_NAME": "L"},
            "ifExistsDoUpdate": True,
        },
    ]
    assert call(cfg, store, recips) == [OK, OK]
    assert profile_of(store, "new@example.com") == {"FIRST_NAME": "N", "VIP": False}
    assert profile_of(store, "known@example.com") == {"FIRST_NAME": "K", "LAST_NAME": "L"}
    # columns keep the merge field for mail-merging
    rc = columns_from_objects(recips, cfg.plan("confirm"))
    assert rc.profile["SHIP1"].to_pylist() == ["12345 Example Blvd.", "52345 Sample City"]


def test_ondemand_same_address_twice_sees_the_first_ones_state(store: Store) -> None:
    cfg = od_config()
    recips = [
        {"email": "twin@example.com", "profile": {"FIRST_NAME": "T"}, **ADD},
        {"email": "other@example.com"},
        # found existing now: no ADDRESS_NOT_FOUND, no mandatory-field check
        {"email": "TWIN@example.com"},
        {"email": "twin@example.com", "profile": {"LAST_NAME": "Two"}, "ifExistsDoUpdate": True},
    ]
    assert call(cfg, store, recips) == [OK, err("ADDRESS_NOT_FOUND"), OK, OK]
    assert profile_of(store, "twin@example.com") == {
        "FIRST_NAME": "T",
        "LAST_NAME": "Two",
        "VIP": False,
    }
    # the other way round: the first fails, the second adds
    recips = [
        {"email": "late@example.com"},
        {"email": "late@example.com", "profile": {"FIRST_NAME": "L"}, **ADD},
    ]
    assert call(cfg, store, recips) == [err("ADDRESS_NOT_FOUND"), OK]


def test_ondemand_precheck_made_ahead_answers_as_the_engine_does(tmp_path: Any) -> None:
    """The simulate backend works out each chunk's precheck while the chunk before is
    judged: given it, the engine answers and stores exactly what it does from the
    columns, rounds of repeated addresses included (a suppressed address repeated, a
    repeated address first refused before the store is asked)."""
    cfg = od_config()
    plan = cfg.plan("confirm")
    recips = [
        {"email": "twin@example.com", "ifExistsDoUpdate": "yes"},  # refused before the store
        {"email": "gone@example.com", **ADD, "profile": {"FIRST_NAME": "G"}},
        {"email": "twin@example.com", "profile": {"FIRST_NAME": "T"}, **ADD},
        {"email": "bad"},
        {"email": "gone@example.com"},
        {"email": "TWIN@example.com", "profile": {"LAST_NAME": "Two"}, "ifExistsDoUpdate": True},
        {"email": "late@example.com"},
        {"email": "late@example.com", "profile": {"FIRST_NAME": "L"}, **ADD},
        {"email": "twin@example.com", "ifExistsForceSending": 1},
    ]
    answers, stored = [], []
    for ahead in (False, True):
        store = Store(f"sqlite:///{tmp_path}/store-{ahead}.db")
        suppress(store, "gone@example.com")
        rc = columns_from_objects(recips, plan)
        answer = evaluate_ondemand(cfg, plan, store, precheck(rc) if ahead else rc)
        answers.append(answer.bodies())
        stored.append({k: (r["state"], r["profile"]) for k, r in rows(store).items()})
        store.close()
    assert answers[0] == answers[1]
    assert stored[0] == stored[1]
    assert answers[0] == [
        err("INVALID_DO_UPDATE_FLAG"),
        err("ADDRESS_REJECTED_BY_SUPPRESSION_LIST"),
        OK,
        err("INVALID_EMAIL", _EMAIL_DETAILS["bad"]),
        err("ADDRESS_REJECTED_BY_SUPPRESSION_LIST"),
        OK,
        err("ADDRESS_NOT_FOUND"),
        OK,
        err("INVALID_FORCE_DELIVERY_FLAG"),
    ]
    assert orjson.loads(stored[0]["twin@example.com"][1]) == {
        "FIRST_NAME": "T",
        "LAST_NAME": "Two",
        "VIP": False,
    }


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=False)
    | st.text(max_size=3)
    | st.sampled_from(["red", "green", "a", "b", " ", ""]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=2)
    ),
    max_leaves=4,
)
_NAMES = st.sampled_from(
    ["FIRST_NAME", "LAST_NAME", "AGE", "VIP", "COLOR", "TAGS", "SHIP1", "NOPE"]
)
_RECIP = st.one_of(
    _JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "email": _JSON | st.just("a@example.com"),
            "ifNotExistsAddAndSend": _JSON,
            "ifExistsDoUpdate": _JSON,
            "profile": st.dictionaries(_NAMES, _JSON, max_size=4) | _JSON,
        },
    ),
)


# a value of the wrong type for each kind of field
_WRONG = [
    ("AGE", True),
    ("AGE", 2.0),
    ("VIP", 1),
    ("FIRST_NAME", " "),
    ("LAST_NAME", 5),
    ("COLOR", "blue"),
    ("COLOR", ["red"]),
    ("TAGS", ["a", 1]),
    ("TAGS", "a"),
    ("SHIP1", False),
    ("NOPE", "x"),
]


@settings(max_examples=300, deadline=None)
@given(st.lists(_RECIP, max_size=8))
@example(
    [
        # one doubt a recipient: nothing else sends it to be judged alone
        *({"profile": {name: value}} for name, value in _WRONG),
        {"profile": {"COLOR": "blue", "TAGS": ["a", 1], "NOPE": 1, "SHIP1": 5, "AGE": 2.0}},
        {"profile": {"LAST_NAME": None, "COLOR": "red", "TAGS": ["b"], "AGE": 3, "VIP": False}},
        {"profile": ["AGE"], "ifExistsDoUpdate": "true"},
        "a@example.com",
    ]
)
def test_ondemand_columns_are_each_objects_own_judgement(objs: list[Any]) -> None:
    """Columns built a field at a time say, for every recipient, what judging its object
    alone says: the profile's problems in its own order, the values without one, the
    flags' JSON spelling (a value of the wrong type never passes as of the right one)."""
    plan = od_config().plan("confirm")
    known = set(plan.lst.fields) | set(plan.job.merge_fields)
    rc = columns_from_objects(objs, plan)
    for i, obj in enumerate(objs):
        rec = obj if isinstance(obj, dict) else {}
        profile = rec.get("profile")
        is_object = isinstance(profile, dict)
        assert rc.profile_invalid[i] == (profile is not None and not is_object)
        problems, good = _judge_profile(profile if is_object else {}, plan, known)
        assert rc.profile_error[i].as_py() == ("; ".join(problems) or None)
        for name in known:
            assert rc.profile[name][i].as_py() == good.get(name)
        email = rec.get("email")
        assert rc.email[i].as_py() == (
            email if email is None or isinstance(email, str) else orjson.dumps(email).decode()
        )
        for f in ("ifNotExistsAddAndSend", "ifExistsDoUpdate", "ifExistsForceSending"):
            want = None if f not in rec else orjson.dumps(rec[f]).decode()
            assert rc.flags[f][i].as_py() == want


def test_ondemand_checks_run_in_the_documented_order(store: Store) -> None:
    cfg = od_config()
    suppress(store, "gone@example.com")
    worst = {
        "email": "",
        "profile": {"NOPE": 1},
        "ifExistsDoUpdate": 1,
        "ifNotExistsAddAndSend": "x",
    }
    recips: list[Any] = [
        worst,  # flags first, in FLAG_NAMES order
        {**worst, "ifNotExistsAddAndSend": True},
        {**worst, "ifNotExistsAddAndSend": True, "ifExistsDoUpdate": True, "profile": "x"},
        {"email": "", "profile": {"NOPE": 1}},
        {"email": "bad", "profile": {"NOPE": 1}},
        {"email": "gone@example.com", "profile": {"NOPE": 1}},
        {"email": "gone@example.com"},
    ]
    assert call(cfg, store, recips) == [
        err("INVALID_FORCE_ADD_FLAG"),
        err("INVALID_DO_UPDATE_FLAG"),
        err("INVALID_PROFILE"),
        err("MISSING_EMAIL"),
        err("INVALID_EMAIL", _EMAIL_DETAILS["bad"]),
        err(
            "PROFILE_VALIDATION_ERROR", "NOPE: not a field of the list nor an on-demand merge field"
        ),
        err("ADDRESS_REJECTED_BY_SUPPRESSION_LIST"),
    ]


def test_ondemand_internal_error_is_documented_but_never_answered() -> None:
    assert MaestroResult.INTERNAL_ERROR.response() == {
        "result": "INTERNAL_ERROR",
        "error": "Internal execution error",
    }
    assert MaestroResult.INTERNAL_ERROR.response("boom") == {
        "result": "INTERNAL_ERROR",
        "error": "Internal execution error",
        "message": "boom",
    }
    assert MaestroResult.SUCCESS.response("ignored") == {"result": "SUCCESS"}


def test_evaluate_ondemand_request_error_answers_every_recipient(store: Store) -> None:
    cfg = od_config({"mail_jobs": {"confirm": "closed"}})
    store.sync_mail_jobs(dict(cfg.simulate.mail_jobs))
    plan = cfg.plan("confirm")
    rc = columns_from_objects([{"email": "a@example.com"}, {"email": "b@example.com"}], plan)
    answer = evaluate_ondemand(cfg, plan, store, rc)
    assert answer.request_error is MaestroResult.TRIGGER_CLOSED
    assert answer.result == [MaestroResult.TRIGGER_CLOSED] * 2
    one = b'{"result":"TRIGGER_CLOSED","error":"Trigger closed"}'
    assert answer.response_json() == b"[" + one + b"," + one + b"]"


# == maestro-subscribe ===============================================================

SUB_LISTS = {
    # the seeds' own identifiers, a list without mandatory fields
    "plain": {
        "name": "Plain",
        "d_from_email": "p@example.com",
        "group": "G",
        "mContainer": "2",
        "mOwner": "N10",
        "mListId": "HL#12",
        "fields": {"LAST_NAME": {"type": "text"}},
    },
    "shop": {
        "name": "Shop",
        "d_from_email": "s@example.com",
        "group": "G",
        "mContainer": "2",
        "mOwner": "N10",
        "mListId": "HL#14",
        "fields": {
            "FIRST_NAME": {"type": "text", "mandatory": True},
            "CITY": {"type": "text", "mandatory": True, "default": "Paris"},
            "AGE": {"type": "number"},
            "VIP": {"type": "boolean", "default": False},
            "OPTIN": {"type": "boolean"},
            "COLOR": {"type": "single-select", "lookup": ["red", "green"]},
        },
    },
    "closed": {
        "name": "Closed",
        "d_from_email": "c@example.com",
        "subscribe_open": False,
        "mContainer": "5",
        "mOwner": "N10",
        "mListId": "HL#30",
    },
    "elsewhere": {
        "name": "Elsewhere",
        "d_from_email": "e@example.com",
        "group": "H",
        "mContainer": "7",
        "mOwner": "N20",
        "mListId": "HL#40",
    },
}
PLAIN = {"mContainer": "2", "mOwner": "N10", "mListId": "HL#12"}
SHOP = {"mContainer": "2", "mOwner": "N10", "mListId": "HL#14"}
GOOD = {"FIRST_NAME": "Ann", "OPTIN": True}


def sub_config(**simulate: Any) -> MailpipeConfig:
    return small_config(
        lists=SUB_LISTS,
        sources={"signups": {"kind": "signups", "path": "s.csv", "email": "email"}},
        jobs={"join": {"source": "signups", "target": "maestro-subscribe", "list": "shop"}},
        simulate=simulate,
    )


def failed(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"result": "FAILED", "reason": {"type": kind, "message": message, **extra}}


def test_subscribe_seed_example_succeeds(store: Store) -> None:
    cfg = sub_config()
    call_ = {**PLAIN, "mSubscriber": '{"email":"first.last@example.com"}'}
    assert evaluate_subscribe(cfg, store, [call_]) == [{"result": "SUCCESS"}]
    row = rows(store, "plain")["first.last@example.com"]
    assert (row["state"], row["profile"], row["password_hash"]) == ("pending", "{}", None)


def test_subscribe_success_is_pending_with_a_salted_password_hash(store: Store) -> None:
    cfg = sub_config()
    password = "jgajgworfsgsggsgg"
    sub = {
        "email": "First.Last@Example.com",
        "password": password,
        "profile": {"FIRST_NAME": "First", "OPTIN": False, "AGE": 33},
        "remoteAddress": "192.168.1.1",
        "userAgent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:86.0) "
        "Gecko/20100101 Firefox/86.0",
    }
    answers = evaluate_subscribe(cfg, store, [{**SHOP, "mSubscriber": orjson.dumps(sub).decode()}])
    assert answers == [{"result": "SUCCESS"}]
    row = rows(store)["first.last@example.com"]
    assert row["state"] == "pending"  # awaiting the double opt-in, never "subscribed"
    assert row["email"] == "First.Last@example.com"
    assert orjson.loads(row["profile"]) == {
        "FIRST_NAME": "First",
        "OPTIN": False,
        "AGE": 33,
        "CITY": "Paris",
        "VIP": False,
    }
    stored = row["password_hash"]
    assert password not in stored
    assert verify_password(password, stored)
    assert not verify_password(password + "x", stored)
    # salted: the same password hashes differently for another subscriber
    evaluate_subscribe(cfg, store, [{**SHOP, "mSubscriber": {**sub, "email": "b@example.com"}}])
    other = rows(store)["b@example.com"]["password_hash"]
    assert other != stored and verify_password(password, other)


@pytest.mark.parametrize(
    ("call_", "message"),
    [
        (
            {"mOwner": "N10", "mListId": "HL#12", "mSubscriber": {"email": "a@example.com"}},
            "Missing parameter mContainer",
        ),
        (
            {"mContainer": "2", "mListId": "HL#12", "mSubscriber": {"email": "a@example.com"}},
            "Missing parameter mOwner",
        ),
        (
            {
                "mContainer": "2",
                "mOwner": "N10",
                "mListId": "",
                "mSubscriber": {"email": "a@x.com"},
            },
            "Missing parameter mListId",
        ),
        ({**PLAIN}, "Missing parameter mSubscriber"),
        (
            {**PLAIN, "mOwner": "N99", "mSubscriber": {"email": "a@example.com"}},
            "Owner N99 does not exist",
        ),
        (
            {**PLAIN, "mListId": "HL#99", "mSubscriber": {"email": "a@example.com"}},
            "List HL#99 not found in list group 2",
        ),
        (
            {**PLAIN, "mContainer": "7", "mSubscriber": {"email": "a@example.com"}},
            "List HL#12 not found in list group 7",
        ),
        ({**PLAIN, "mSubscriber": '{"email":"a@example.com"'}, "mSubscriber is not valid JSON"),
        ({**PLAIN, "mSubscriber": '["a@example.com"]'}, "mSubscriber is not a JSON object"),
        ({**PLAIN, "mSubscriber": "{}"}, "Missing email address"),
        ({**PLAIN, "mSubscriber": {"email": "  "}}, "Missing email address"),
        ({**PLAIN, "mSubscriber": {"email": "first.last"}}, "Invalid email address: first.last"),
        # the subscriber data is judged before the list's status (docstring order)
        (
            {"mContainer": "5", "mOwner": "N10", "mListId": "HL#30", "mSubscriber": {}},
            "Missing email address",
        ),
    ],
)
def test_subscribe_parameter_validation_error(
    store: Store, call_: dict[str, Any], message: str
) -> None:
    answers = evaluate_subscribe(sub_config(), store, [call_])
    assert answers == [failed("PARAMETER_VALIDATION_ERROR", message)]
    assert rows(store, "plain") == {}


def test_subscribe_not_possible(store: Store) -> None:
    closed = {
        "mContainer": "5",
        "mOwner": "N10",
        "mListId": "HL#30",
        "mSubscriber": {"email": "a@example.com"},
    }
    assert evaluate_subscribe(sub_config(), store, [closed]) == [
        failed("SUBSCRIBE_NOT_POSSIBLE", "Subscribes to list HL#30 are not allowed")
    ]
    assert rows(store, "closed") == {}


def test_subscribe_to_a_list_gone_from_the_platform_is_list_not_found(store: Store) -> None:
    # 002_…: PARAMETER_VALIDATION_ERROR covers "list not found"; SUBSCRIBE_NOT_POSSIBLE is
    # for a list that exists but whose status takes no subscribes
    cfg = sub_config(missing_lists=["plain"])
    gone = {**PLAIN, "mSubscriber": {"email": "a@example.com"}}
    assert evaluate_subscribe(cfg, store, [gone]) == [
        {
            "result": "FAILED",
            "reason": {
                "type": "PARAMETER_VALIDATION_ERROR",
                "message": "List HL#12 not found in list group 2",
            },
        }
    ]
    # the list is a URL parameter: judged before the subscriber data, like an unknown list
    no_email = {**PLAIN, "mSubscriber": {}}
    assert evaluate_subscribe(cfg, store, [no_email]) == [
        {
            "result": "FAILED",
            "reason": {
                "type": "PARAMETER_VALIDATION_ERROR",
                "message": "List HL#12 not found in list group 2",
            },
        }
    ]
    # the other lists still answer as before
    ok = {**SHOP, "mSubscriber": {"email": "b@example.com", "profile": GOOD}}
    assert evaluate_subscribe(cfg, store, [ok]) == [{"result": "SUCCESS"}]
    assert rows(store, "plain") == {}
    assert list(rows(store)) == ["b@example.com"]


def test_subscribe_already_subscribed_ignores_the_profile(store: Store) -> None:
    seed(store, "ann@example.com", profile={"FIRST_NAME": "Old", "OPTIN": True})
    before = rows(store)
    sub = {
        "email": "Ann@example.com",
        "password": "new-secret",
        "profile": {"FIRST_NAME": "New", "OPTIN": False},
    }
    assert evaluate_subscribe(sub_config(), store, [{**SHOP, "mSubscriber": sub}]) == [
        failed("ALREADY_SUBSCRIBED", "The address is already subscribed to the list")
    ]
    assert rows(store) == before


def test_subscribe_authentication_required(store: Store) -> None:
    seed(store, "ann@example.com", list_name="plain")
    seed(store, "pend@example.com", list_name="plain", state="pending")
    seed(store, "far@example.com", list_name="elsewhere")
    calls = [
        {**SHOP, "mSubscriber": {"email": "ann@example.com", "profile": GOOD}},
        # pending in the group is not registered; another group does not count
        {**SHOP, "mSubscriber": {"email": "pend@example.com", "profile": GOOD}},
        {**SHOP, "mSubscriber": {"email": "far@example.com", "profile": GOOD}},
    ]
    answers = evaluate_subscribe(sub_config(), store, calls, "https://lists.example.org/")
    assert answers == [
        failed(
            "AUTHENTICATION_REQUIRED",
            "The address is already registered in the list group; the subscriber must "
            "authenticate to subscribe",
            externalSubscribeURL="https://lists.example.org/list/subscribe.html"
            "?mContainer=2&mOwner=N10&mListId=HL%2314&email=ann%40example.com",
        ),
        {"result": "SUCCESS"},
        {"result": "SUCCESS"},
    ]
    assert set(rows(store)) == {"pend@example.com", "far@example.com"}


def test_subscribe_profile_validation_error_one_detail_per_field(store: Store) -> None:
    cfg = sub_config()
    bad = {"FIRST_NAME": 5, "AGE": "41", "COLOR": "blue", "NOPE": 1, "VIP": "yes", "OPTIN": True}
    calls = [
        {**SHOP, "mSubscriber": {"email": "a@example.com", "profile": bad}},
        {**SHOP, "mSubscriber": {"email": "b@example.com"}},
        # a null value is no value: the mandatory field and the boolean still miss theirs
        {
            **SHOP,
            "mSubscriber": {
                "email": "c@example.com",
                "profile": {"FIRST_NAME": None, "OPTIN": None, "CITY": None},
            },
        },
        {**SHOP, "mSubscriber": {"email": "d@example.com", "profile": ["Ann"]}},
    ]
    assert evaluate_subscribe(cfg, store, calls) == [
        failed("PROFILE_VALIDATION_ERROR", "Profile validation error", details=d)
        for d in (
            [
                "FIRST_NAME: 5 is not text",
                "AGE: '41' is not an integer",
                "COLOR: 'blue' is not one of the lookup values",
                "NOPE: unknown profile field",
                "VIP: 'yes' is not a boolean",
            ],
            ["FIRST_NAME: mandatory field has no value", "OPTIN: mandatory field has no value"],
            ["FIRST_NAME: mandatory field has no value", "OPTIN: mandatory field has no value"],
            ["profile: not a JSON object"],
        )
    ]
    assert rows(store) == {}


def test_subscribe_same_address_twice_in_one_batch_keeps_the_last(store: Store) -> None:
    calls = [
        {**SHOP, "mSubscriber": {"email": "z@example.com", "profile": {**GOOD, "AGE": 1}}},
        {**SHOP, "mSubscriber": {"email": "z@example.com", "profile": {**GOOD, "AGE": 2}}},
    ]
    assert evaluate_subscribe(sub_config(), store, calls) == [{"result": "SUCCESS"}] * 2
    assert profile_of(store, "z@example.com")["AGE"] == 2


# == yesmail-send ====================================================================

QUEUED = "Send email request queued successfully."
COMPLETED = "Send email request completed."


def send(store: Store, recipients: list[Any], ref: str | None = None, **flags: Any) -> Any:
    body = {"content": {"templateId": "1465362"}, **flags, "recipients": recipients}
    return evaluate_send(store, body, "jefftronics3", ref)


def ym_seed(
    store: Store,
    email: str,
    divisions: set[str],
    status: str = "active",
    attrs: dict[str, Any] | None = None,
    id_: str | None = None,
) -> None:
    with store.begin() as conn:
        store.upsert_ym_subscriber(
            conn,
            email,
            {
                "email": email,
                "id": id_ or email,
                "status": status,
                "attrs": orjson.dumps(attrs or {}).decode(),
            },
        )
        store.set_ym_subscriptions(conn, email, divisions)


def ym(store: Store, email: str) -> tuple[dict[str, Any] | None, set[str]]:
    with store.begin() as conn:
        subs, divs = store.ym_state(conn, [email])
    return subs.get(email), divs.get(email, set())


def assert_400(answer: Any, message: str) -> None:
    assert answer.status is YesmailStatus.BAD_REQUEST
    assert answer.body == {"status": 400, "message": message}
    assert answer.ticket is None and answer.async_results is None


def test_yesmail_400_mixed_case_email(store: Store) -> None:
    a = send(
        store,
        [
            {"email": "jerry.garcia@yesmail.com", "id": "j"},
            {"email": "Jerry.Garcia@yesmail.com", "id": "J"},
        ],
    )
    assert_400(a, "recipients[1]: subscriber email address is mixed case")
    assert ym(store, "jerry.garcia@yesmail.com") == (None, set())


def test_yesmail_400_new_subscriber_needs_id_and_email(store: Store) -> None:
    ym_seed(store, "known@example.com", {"A"}, id_="K-1")
    msg = "A new subscriber requires both id and email"
    assert_400(send(store, [{"email": "new@example.com"}], transactional=True), msg)
    assert_400(send(store, [{"id": "NEW-1"}], transactional=True), msg)
    assert_400(
        send(store, [{}], transactional=True), "recipients[0]: one of id or email must be specified"
    )
    assert_400(send(store, [{"id": ["K-1"]}]), "recipients[0]: id must be a string")
    assert_400(send(store, [{"email": "bad@", "id": "x"}]), "recipients[0]: invalid email address")
    assert ym(store, "new@example.com") == (None, set())
    # a known subscriber needs only one of them, by email or by id
    assert send(store, [{"email": "known@example.com"}]).status is YesmailStatus.ACCEPTED
    assert send(store, [{"id": "K-1"}]).status is YesmailStatus.ACCEPTED
    # a new one with both is added
    assert send(store, [{"email": "new@example.com", "id": "N"}]).status is YesmailStatus.ACCEPTED
    assert ym(store, "new@example.com")[0] is not None


def test_yesmail_400_update_profile_without_id(store: Store) -> None:
    ym_seed(store, "known@example.com", set())
    a = send(
        store,
        [{"email": "known@example.com", "profile": {"userAttrs": [{"a": 1}]}}],
        updateProfile=True,
    )
    assert_400(a, "recipients[0]: id is required when updateProfile is true")
    assert ym(store, "known@example.com")[0]["attrs"] == "{}"  # type: ignore[index]


def test_yesmail_409_not_a_member_stores_nothing(store: Store) -> None:
    jerry = {
        "email": "jerry.garcia@yesmail.com",
        "id": "jerry.garcia@yesmail.com",
        "profile": {"userAttrs": [{"lastName": "Garcia"}, {"firstName": "Jerry"}]},
        "subscriptions": {"isMemberOf": ["Banjo Lovers"]},
    }
    first = {"email": "bob@example.com", "id": "bob", "subscriptions": {"add": ["Banjo Lovers"]}}
    a = send(store, [first, jerry], transactional=False, updateProfile=False)
    assert a.status is YesmailStatus.CONFLICT
    assert a.body == {
        "status": 409,
        "message": "Subscriber must be a memberOf one of '[Banjo Lovers]'.",
    }
    assert a.ticket is None and a.per_recipient == []
    assert ym(store, "bob@example.com") == (None, set())
    assert ym(store, "jerry.garcia@yesmail.com") == (None, set())
    two = {**jerry, "subscriptions": {"isMemberOf": ["Banjo Lovers", "9 finger club"]}}
    assert send(store, [two]).body == {
        "status": 409,
        "message": "Subscriber must be a memberOf one of '[Banjo Lovers, 9 finger club]'.",
    }
    # transactional: no check; a member (after add) passes too
    assert send(store, [jerry], transactional=True).status is YesmailStatus.ACCEPTED
    joined = {**jerry, "subscriptions": {"add": ["Banjo Lovers"], "isMemberOf": ["Banjo Lovers"]}}
    assert send(store, [joined]).status is YesmailStatus.ACCEPTED
    # removed before the check: not a member any more
    left = {**jerry, "subscriptions": {"remove": ["*"], "isMemberOf": ["Banjo Lovers"]}}
    assert send(store, [left]).status is YesmailStatus.CONFLICT
    assert ym(store, "jerry.garcia@yesmail.com")[1] == {"Banjo Lovers"}


def test_yesmail_a_new_subscriber_without_id_outranks_an_earlier_409(store: Store) -> None:
    """The request is refused whole for a new subscriber without id and email (400) even
    when a recipient before it is not a member (409): the 400 is about the request."""
    member_of = {"isMemberOf": ["Banjo Lovers"]}
    stranger = {"email": "stranger@example.com", "id": "s", "subscriptions": member_of}
    no_id = {"email": "no.id@example.com"}
    a = send(store, [stranger, no_id], transactional=False)
    assert_400(a, "A new subscriber requires both id and email")
    # without the one lacking an id, the same request is the 409
    b = send(store, [stranger], transactional=False)
    assert b.status is YesmailStatus.CONFLICT
    assert b.body == {
        "status": 409,
        "message": "Subscriber must be a memberOf one of '[Banjo Lovers]'.",
    }
    assert b.ticket is None and b.async_results is None
    assert ym(store, "stranger@example.com") == (None, set())


def test_yesmail_remove_before_add(store: Store) -> None:
    ym_seed(store, "a@example.com", {"X", "Y"})
    subs = {"remove": ["X"], "add": ["X"]}
    assert send(store, [{"email": "a@example.com", "subscriptions": subs}]).status == 202
    assert ym(store, "a@example.com")[1] == {"X", "Y"}
    subs = {"remove": ["*"], "add": ["Z"]}
    send(store, [{"email": "a@example.com", "subscriptions": subs}])
    assert ym(store, "a@example.com")[1] == {"Z"}
    send(store, [{"email": "a@example.com", "subscriptions": {"add": ["W"], "remove": ["Z"]}}])
    assert ym(store, "a@example.com")[1] == {"W"}
    send(store, [{"email": "a@example.com", "subscriptions": {"remove": ["*"]}}])
    assert ym(store, "a@example.com")[1] == set()


def test_yesmail_same_subscriber_twice_in_one_request(store: Store) -> None:
    recips = [
        {"email": "j@example.com", "id": "J", "subscriptions": {"add": ["A"]}},
        {"email": "j@example.com", "subscriptions": {"add": ["B"]}},  # exists by now
    ]
    a = send(store, recips, transactional=True)
    assert a.status is YesmailStatus.ACCEPTED
    assert ym(store, "j@example.com")[1] == {"A", "B"}


def status_after(store: Store, email: str, subs: dict[str, Any]) -> str:
    a = send(store, [{"email": email, "id": email, "subscriptions": subs}], transactional=True)
    assert a.status is YesmailStatus.ACCEPTED
    row = ym(store, email)[0]
    assert row is not None
    return str(row["status"])


def test_yesmail_set_referred_new_only(store: Store) -> None:
    assert status_after(store, "new1@example.com", {"setReferred": "newOnly"}) == "referred"
    ym_seed(store, "old@example.com", set())
    assert status_after(store, "old@example.com", {"setReferred": "newOnly"}) == "active"
    # with add: ignored
    add = {"setReferred": "newOnly", "add": ["A"]}
    assert status_after(store, "new2@example.com", add) == "active"
    # with remove and newOnly: ignored (the new subscriber's remove leaves it in no
    # division, which makes it unsubscribed)
    rem = {"setReferred": "newOnly", "remove": ["A"]}
    assert status_after(store, "new3@example.com", rem) == "unsubscribed"


def test_yesmail_set_referred_new_or_not_subscribed(store: Store) -> None:
    ref = {"setReferred": "newOrNotSubscribed"}
    assert status_after(store, "new@example.com", ref) == "referred"
    ym_seed(store, "none@example.com", set())
    assert status_after(store, "none@example.com", ref) == "referred"
    ym_seed(store, "member@example.com", {"A"})
    assert status_after(store, "member@example.com", ref) == "active"
    assert ym(store, "member@example.com")[1] == {"A"}
    # with add: ignored
    assert status_after(store, "new2@example.com", {**ref, "add": ["A"]}) == "active"
    # with remove (not newOnly): referred once no division is left
    ym_seed(store, "leaving@example.com", {"A"})
    assert status_after(store, "leaving@example.com", {**ref, "remove": ["A"]}) == "referred"
    bad = send(
        store, [{"email": "x@example.com", "id": "x", "subscriptions": {"setReferred": "always"}}]
    )
    assert_400(bad, "recipients[0]: setReferred must be newOnly or newOrNotSubscribed")


# 003_…, setReferred: "newOnly sets the subscriber status to "referred" only for new
# subscribers, otherwise the element is ignored. newOrNotSubscribed sets the subscriber
# status to "referred" if the subscriber is new, or not subscribed to any division.
#  • If add and setReferred are specified, setReferred is ignored.
#  • If remove and setReferred are specified and setReferred is set to newOnly then
#    setReferred is ignored, otherwise the subscribers status is set to referred."
# Read as in ``_apply_subscriptions``: with remove, newOrNotSubscribed is judged after
# the remove (referred only if no division is left), since setReferred is "Only for new
# or unscribered recipients". Cases: (before: None = new, else (status, divisions)),
# subscriptions, (status, divisions) after.
_REFERRED_CASES = {
    # newOnly alone: new only
    "newOnly/new": (None, {"setReferred": "newOnly"}, ("referred", set())),
    "newOnly/known-in-A": (
        ("active", {"A"}),
        {"setReferred": "newOnly"},
        ("active", {"A"}),
    ),
    "newOnly/known-in-none": (("active", set()), {"setReferred": "newOnly"}, ("active", set())),
    # newOnly with add: ignored
    "newOnly+add/new": (None, {"setReferred": "newOnly", "add": ["A"]}, ("active", {"A"})),
    "newOnly+add/known-in-A": (
        ("active", {"A"}),
        {"setReferred": "newOnly", "add": ["B"]},
        ("active", {"A", "B"}),
    ),
    # newOnly with remove: ignored, new or not (a remove leaving no division unsubscribes)
    "newOnly+remove/new": (
        None,
        {"setReferred": "newOnly", "remove": ["A"]},
        ("unsubscribed", set()),
    ),
    "newOnly+remove/known-in-A-B": (
        ("active", {"A", "B"}),
        {"setReferred": "newOnly", "remove": ["A"]},
        ("active", {"B"}),
    ),
    "newOnly+remove-all/known-in-A": (
        ("active", {"A"}),
        {"setReferred": "newOnly", "remove": ["*"]},
        ("unsubscribed", set()),
    ),
    "newOnly+remove+add/new": (
        None,
        {"setReferred": "newOnly", "remove": ["A"], "add": ["B"]},
        ("active", {"B"}),
    ),
    # newOrNotSubscribed alone: new, or in no division
    "newOrNot/new": (None, {"setReferred": "newOrNotSubscribed"}, ("referred", set())),
    "newOrNot/known-in-none": (
        ("active", set()),
        {"setReferred": "newOrNotSubscribed"},
        ("referred", set()),
    ),
    "newOrNot/unsubscribed-in-none": (
        ("unsubscribed", set()),
        {"setReferred": "newOrNotSubscribed"},
        ("referred", set()),
    ),
    "newOrNot/known-in-A": (
        ("active", {"A"}),
        {"setReferred": "newOrNotSubscribed"},
        ("active", {"A"}),
    ),
    # newOrNotSubscribed with add: ignored
    "newOrNot+add/new": (
        None,
        {"setReferred": "newOrNotSubscribed", "add": ["A"]},
        ("active", {"A"}),
    ),
    "newOrNot+add/known-in-none": (
        ("active", set()),
        {"setReferred": "newOrNotSubscribed", "add": ["A"]},
        ("active", {"A"}),
    ),
    # newOrNotSubscribed with remove: referred when new or no division is left
    "newOrNot+remove/new": (
        None,
        {"setReferred": "newOrNotSubscribed", "remove": ["A"]},
        ("referred", set()),
    ),
    "newOrNot+remove/known-in-A": (
        ("active", {"A"}),
        {"setReferred": "newOrNotSubscribed", "remove": ["A"]},
        ("referred", set()),
    ),
    "newOrNot+remove-all/known-in-A-B": (
        ("active", {"A", "B"}),
        {"setReferred": "newOrNotSubscribed", "remove": ["*"]},
        ("referred", set()),
    ),
    # ... and the status kept while a division is left (not "always referred")
    "newOrNot+remove/known-in-A-B": (
        ("active", {"A", "B"}),
        {"setReferred": "newOrNotSubscribed", "remove": ["A"]},
        ("active", {"B"}),
    ),
    # with add and remove both: the add bullet, ignored
    "newOrNot+remove-all+add/known-in-A-B": (
        ("active", {"A", "B"}),
        {"setReferred": "newOrNotSubscribed", "remove": ["*"], "add": ["C"]},
        ("active", {"C"}),
    ),
    "newOrNot+remove+add/new": (
        None,
        {"setReferred": "newOrNotSubscribed", "remove": ["A"], "add": ["A"]},
        ("active", {"A"}),
    ),
}


@pytest.mark.parametrize(
    ("before", "subs", "after"), list(_REFERRED_CASES.values()), ids=list(_REFERRED_CASES)
)
def test_yesmail_set_referred_per_combination(
    store: Store,
    before: tuple[str, set[str]] | None,
    subs: dict[str, Any],
    after: tuple[str, set[str]],
) -> None:
    email = "sub@example.com"
    if before is not None:
        ym_seed(store, email, before[1], status=before[0])
    assert status_after(store, email, subs) == after[0]
    assert ym(store, email)[1] == after[1]


@pytest.mark.parametrize(
    ("recipient", "problem"),
    [
        ({"subscriptions": ["Shop News"]}, "subscriptions must be an object"),
        ({"subscriptions": {"add": "A"}}, "subscriptions.add must be an array of strings"),
        ({"subscriptions": {"add": [1]}}, "subscriptions.add must be an array of strings"),
        (
            {"subscriptions": {"remove": {"*": 1}}},
            "subscriptions.remove must be an array of strings",
        ),
        (
            {"subscriptions": {"isMemberOf": [None]}},
            "subscriptions.isMemberOf must be an array of strings",
        ),
        ({"profile": ["x"]}, "profile.userAttrs must be an array of objects"),
        ({"profile": {"userAttrs": {"a": "b"}}}, "profile.userAttrs must be an array of objects"),
        ({"profile": {"userAttrs": ["a"]}}, "profile.userAttrs must be an array of objects"),
    ],
)
def test_yesmail_400_malformed_subscriptions_or_profile(
    store: Store, recipient: dict[str, Any], problem: str
) -> None:
    """Values of the wrong JSON type are invalid parameter values: a 400, nothing stored."""
    bad = send(store, [{"email": "x@example.com", "id": "x", **recipient}])
    assert_400(bad, f"recipients[0]: {problem}")
    assert ym(store, "x@example.com") == (None, set())


def test_yesmail_202_ticket_and_async_results(store: Store) -> None:
    ym_seed(store, "gone@example.com", {"A"}, status="unsubscribed")
    ym_seed(store, "dead@example.com", set(), status="dead")
    recips = [
        {
            "email": "mickey.hart@yesmail.com",
            "id": "mickey.hart@yesmail.com",
            "profile": {"userAttrs": [{"lastName": "Mickey"}, {"firstName": "Hart"}]},
        },
        {"email": "gone@example.com"},
        {"email": "phil.lesh@yesmail.com", "id": "phil.lesh@yesmail.com"},
        {"email": "dead@example.com"},
    ]
    a = send(store, recips, ref="PO611", transactional=False, updateProfile=False)
    assert a.status is YesmailStatus.ACCEPTED
    t, r = a.ticket, a.async_results
    assert t is not None and r is not None
    # what differs from call to call: the ids and the times, each in the documents' format
    ticket_id, request_id, async_id = t["id"], t["request"]["id"], r["id"]
    assert re.fullmatch(r"[0-9a-f]{24}", ticket_id) and re.fullmatch(r"[0-9a-f]{24}", async_id)
    assert re.fullmatch(r"[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}", request_id)
    t0, t1, t2 = (e["time"] for e in t["events"])
    at = r["completed"][0]["time"]
    times = [t0, t1, t2, at]
    assert times == sorted(times)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", x) for x in times)
    uri = "https://api.yesmail.com/v2/emails/send?responseRef=PO611"
    request = {"id": request_id, "user": "jefftronics3", "time": t0, "uri": uri}
    accepted = {"state": "accepted", "message": QUEUED, "time": t0}
    # the initial response is the ticket as queued
    assert a.body == {
        "id": ticket_id,
        "state": "accepted",
        "message": QUEUED,
        "request": request,
        # 003_…: with a responseRef, the response so far (uri null: no responseUri given)
        "response": {
            "uri": None,
            "ref": "PO611",
            "time": None,
            "code": None,
            "location": None,
            "data": None,
        },
        "events": [accepted],
        "lastUpdate": t0,
    }
    assert t == {
        "id": ticket_id,
        "state": "completed",
        "message": COMPLETED,
        "request": request,
        "response": {
            "uri": None,
            "ref": "PO611",
            "location": f"https://api.yesmail.com/v2/async-results/{async_id}",
        },
        "events": [
            accepted,
            {"state": "processing", "message": "update Ticket for AsyncResult info", "time": t1},
            {"state": "completed", "message": COMPLETED, "time": t2},
        ],
        "lastUpdate": t2,
    }
    # not transactional: the unsubscribed and the dead are ignored
    assert a.per_recipient == ["completed", "ignored", "completed", "ignored"]
    assert r == {
        "id": async_id,
        "lastUpdated": t2,
        "counts": {"requested": 4, "total": 4, "completed": 2, "ignored": 2, "failed": 0},
        "completed": [{"index": 0, "time": at}, {"index": 2, "time": at}],
        "failed": [],
        "ignored": [{"index": 1, "time": at}, {"index": 3, "time": at}],
    }
    # updateProfile false: the attributes only personalize, they are not stored
    assert ym(store, "mickey.hart@yesmail.com")[0]["attrs"] == "{}"  # type: ignore[index]

    # transactional: everyone completed
    b = send(store, recips, transactional=True)
    assert b.per_recipient == ["completed"] * 4
    bt, br = b.ticket, b.async_results
    b0, at = bt["events"][0]["time"], br["completed"][0]["time"]
    assert br == {
        "id": br["id"],
        "lastUpdated": bt["lastUpdate"],
        "counts": {"requested": 4, "total": 4, "completed": 4, "ignored": 0, "failed": 0},
        "completed": [{"index": i, "time": at} for i in range(4)],
        "failed": [],
        "ignored": [],
    }
    # no ref: the uri without it, and nothing to report in the initial response
    request = {
        "id": bt["request"]["id"],
        "user": "jefftronics3",
        "time": b0,
        "uri": "https://api.yesmail.com/v2/emails/send",
    }
    assert b.body == {
        "id": bt["id"],
        "state": "accepted",
        "message": QUEUED,
        "request": request,
        "response": None,
        "events": [{"state": "accepted", "message": QUEUED, "time": b0}],
        "lastUpdate": b0,
    }
    assert bt["request"] == request
    # 003_…'s completed ticket of several recipients: only the async results' location
    assert bt["response"] == {"location": f"https://api.yesmail.com/v2/async-results/{br['id']}"}


def test_yesmail_one_recipient_ticket_carries_its_data(store: Store) -> None:
    """003_…'s single-recipient examples: the completed ticket's response holds ``data``
    (messageId, sentTime), its events are accepted → completed, no async results; the
    request's responseRef and responseUri are echoed, percent-encoded in its uri."""
    a = evaluate_sends(
        store,
        [
            (
                {
                    "content": {"templateId": "1465362"},
                    "recipients": [{"email": "jerry.garcia@yesmail.com", "id": "j"}],
                },
                "jefftronics3",
                "PO611",
            )
        ],
        response_uris=["http://requestb.in/pd212hpd"],
    )[0]
    assert a.status is YesmailStatus.ACCEPTED and a.per_recipient == ["completed"]
    assert a.async_results is None
    t = a.ticket
    assert t is not None
    t0, t1 = (e["time"] for e in t["events"])
    uri = (
        "https://api.yesmail.com/v2/emails/send?responseRef=PO611"
        "&responseUri=http%3A%2F%2Frequestb.in%2Fpd212hpd"
    )
    request = {"id": t["request"]["id"], "user": "jefftronics3", "time": t0, "uri": uri}
    accepted = {"state": "accepted", "message": QUEUED, "time": t0}
    assert a.body["request"] == request
    assert a.body["response"] == {
        "uri": "http://requestb.in/pd212hpd",
        "ref": "PO611",
        "time": None,
        "code": None,
        "location": None,
        "data": None,
    }
    message_id = t["response"]["data"]["messageId"]
    assert re.fullmatch(r"\d{12}", message_id)
    assert t == {
        "id": a.body["id"],
        "state": "completed",
        "message": COMPLETED,
        "request": request,
        "response": {
            "uri": "http://requestb.in/pd212hpd",
            "ref": "PO611",
            "data": {"messageId": message_id, "sentTime": t1},
        },
        "events": [accepted, {"state": "completed", "message": COMPLETED, "time": t1}],
        "lastUpdate": t1,
    }
    # one recipient not mailed (transactional false, unsubscribed): the async results say so
    ym_seed(store, "gone@example.com", {"A"}, status="unsubscribed")
    b = send(store, [{"email": "gone@example.com"}])
    assert b.per_recipient == ["ignored"]
    assert b.async_results is not None and b.async_results["counts"]["ignored"] == 1
    assert [e["state"] for e in b.ticket["events"]] == ["accepted", "processing", "completed"]


def test_yesmail_update_profile_stores_the_attributes(store: Store) -> None:
    ym_seed(
        store,
        "jerry.garcia@yesmail.com",
        set(),
        attrs={"lastName": "Old", "city": "SF"},
        id_="jerry.garcia@yesmail.com",
    )
    jerry = {
        "email": "jerry.garcia@yesmail.com",
        "id": "jerry.garcia@yesmail.com",
        "profile": {
            "userAttrs": [
                {"lastName": "Garcia"},
                {"firstName": "Jerry"},
                {"Birth Date": "1942-08-01"},
            ]
        },
        "subscriptions": {"add": ["Banjo Lovers", "9 finger club"]},
    }
    assert send(store, [jerry], updateProfile=True).status is YesmailStatus.ACCEPTED
    row, divs = ym(store, "jerry.garcia@yesmail.com")
    assert row is not None
    assert orjson.loads(row["attrs"]) == {
        "lastName": "Garcia",
        "city": "SF",
        "firstName": "Jerry",
        "Birth Date": "1942-08-01",
    }
    assert divs == {"Banjo Lovers", "9 finger club"}


# -- Yesmail: requests judged together (the sandbox) -------------------------------------


def ym_tables(store: Store) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with store.begin() as conn:
        subs = conn.exec_driver_sql(
            "SELECT email_key, id, email, status, attrs FROM ym_subscribers ORDER BY email_key"
        ).fetchall()
        divs = conn.exec_driver_sql(
            "SELECT email_key, division FROM ym_subscriptions ORDER BY email_key, division"
        ).fetchall()
    return [tuple(r) for r in subs], [tuple(r) for r in divs]


def ym_clear(store: Store) -> None:
    with store.begin() as conn:
        conn.exec_driver_sql("DELETE FROM ym_subscriptions")
        conn.exec_driver_sql("DELETE FROM ym_subscribers")


def ym_body(recipients: list[Any], **flags: Any) -> dict[str, Any]:
    return {"content": {"templateId": "1465362"}, **flags, "recipients": recipients}


def outcome(answer: Any) -> tuple[Any, ...]:
    """An answer without what differs between two evaluations: ids and times."""
    if answer.status is not YesmailStatus.ACCEPTED:
        return (answer.status, answer.body, answer.ticket, answer.per_recipient)
    r = answer.async_results
    if r is None:  # one recipient sent: its data on the ticket
        return (answer.status, answer.per_recipient, None, None, answer.ticket["state"])
    listed = {k: [x["index"] for x in r[k]] for k in ("completed", "ignored", "failed")}
    return (answer.status, answer.per_recipient, r["counts"], listed, answer.ticket["state"])


def one_by_one_then_together(
    store: Store, bodies: list[dict[str, Any]], seed: Any = None
) -> tuple[list[Any], list[Any], Any, Any]:
    """The requests sent one after the other, then (from the same start) judged together."""
    states = []
    answers = []
    for together in (False, True):
        ym_clear(store)
        if seed is not None:
            seed(store)
        calls = [(b, "jefftronics3", f"ref-{i}") for i, b in enumerate(bodies)]
        if together:
            answers.append(evaluate_sends(store, calls))
        else:
            answers.append([evaluate_send(store, b, u, r) for b, u, r in calls])
        states.append(ym_tables(store))
    return [outcome(a) for a in answers[0]], [outcome(a) for a in answers[1]], *states


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: Any, tmp_path: Any) -> Iterator[Store]:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path}/s.db"
    s = Store(url)
    yield s
    s.close()


def test_yesmail_a_refused_request_in_a_batch_stores_nothing_and_the_others_apply(
    any_store: Store,
) -> None:
    store = any_store
    ym_seed(store, "member@example.com", {"A"})
    first = ym_body([{"email": "a@example.com", "id": "a", "subscriptions": {"add": ["A"]}}])
    conflict = ym_body(
        [
            {"email": "b@example.com", "id": "b", "subscriptions": {"add": ["B"]}},
            {"email": "member@example.com", "subscriptions": {"remove": ["*"]}},
            {"email": "c@example.com", "id": "c", "subscriptions": {"isMemberOf": ["A"]}},
        ],
        transactional=False,
    )
    mixed = ym_body([{"email": "d@example.com", "id": "d"}, {"email": "E@example.com", "id": "e"}])
    new_without_id = ym_body([{"email": "f@example.com", "id": "f"}, {"email": "g@example.com"}])
    last = ym_body([{"email": "h@example.com", "id": "h"}], transactional=False)
    calls = [(b, "jefftronics3", None) for b in (first, conflict, mixed, new_without_id, last)]
    answers = evaluate_sends(store, calls)
    assert [a.status for a in answers] == [202, 409, 400, 400, 202]
    assert answers[1].body == {
        "status": 409,
        "message": "Subscriber must be a memberOf one of '[A]'.",
    }
    assert_400(answers[2], "recipients[1]: subscriber email address is mixed case")
    assert_400(answers[3], "A new subscriber requires both id and email")
    # the refused requests stored nothing, not even their recipients before the offender
    for email in ("b@example.com", "c@example.com", "d@example.com", "f@example.com"):
        assert ym(store, email) == (None, set())
    assert ym(store, "member@example.com")[1] == {"A"}
    assert ym(store, "a@example.com")[1] == {"A"}
    assert ym(store, "h@example.com")[0] is not None
    assert answers[4].per_recipient == ["completed"]


_ADDRESSES = ["ann@example.com", "bob@example.com", "cy@example.com", "dee@example.com"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    transactional=st.booleans(),
    statuses=st.lists(
        st.sampled_from([None, "active", "unsubscribed", "dead", "referred"]),
        min_size=len(_ADDRESSES),
        max_size=len(_ADDRESSES),
    ),
)
def test_yesmail_requests_without_subscriptions_or_profile_updates_commute(
    store: Store, data: Any, transactional: bool, statuses: list[str | None]
) -> None:
    """What lets the http client send such requests to one address in any order
    (``YesmailBuilder.commutes``): recipients that carry the same id for an address,
    with no subscriptions and no updateProfile, get the same answers and leave the
    same subscribers whichever request goes first."""
    ids = {e: f"id-{i}" for i, e in enumerate(_ADDRESSES)}
    recipient = st.builds(
        lambda e, name: {
            "email": e,
            "id": ids[e],
            "profile": {"userAttrs": [{"firstName": name}]},
        },
        st.sampled_from(_ADDRESSES),
        st.text(alphabet="abc", max_size=2),
    )
    bodies = data.draw(
        st.lists(
            st.lists(recipient, min_size=1, max_size=3).map(
                lambda rs: ym_body(rs, transactional=transactional, updateProfile=False)
            ),
            min_size=2,
            max_size=5,
        )
    )
    order = data.draw(st.permutations(range(len(bodies))))

    def seed(store: Store) -> None:
        for e, status in zip(_ADDRESSES, statuses):
            if status is not None:
                ym_seed(store, e, {"A"}, status, {"firstName": "Old"}, ids[e])

    got = []
    for sequence in (range(len(bodies)), order):
        ym_clear(store)
        seed(store)
        answers = {i: outcome(evaluate_send(store, bodies[i], "u", None)) for i in sequence}
        got.append(([answers[i] for i in range(len(bodies))], ym_tables(store)))
    assert got[0] == got[1]


def test_yesmail_requests_judged_until_the_first_refused_one(store: Store) -> None:
    """``until_refused``: the answers stop at the first 400/409 (so a caller can split it
    before the requests after it), and nothing after it is judged or stored."""
    first = ym_body([{"email": "a@example.com", "id": "a", "subscriptions": {"add": ["A"]}}])
    refused = ym_body(
        [{"email": "b@example.com", "id": "b", "subscriptions": {"isMemberOf": ["Z"]}}],
        transactional=False,
    )
    after = ym_body([{"email": "c@example.com", "id": "c"}])
    seen: list[int] = []
    answers = evaluate_sends(
        store,
        [(b, "jefftronics3", None) for b in (first, refused, after)],
        log=lambda conn, got: seen.extend(int(a.status) for a in got),
        until_refused=True,
    )
    assert [int(a.status) for a in answers] == [202, 409] == seen
    assert ym(store, "a@example.com")[1] == {"A"}
    assert ym(store, "b@example.com") == (None, set())
    assert ym(store, "c@example.com") == (None, set())


def test_yesmail_requests_in_a_batch_see_each_others_changes_in_order(any_store: Store) -> None:
    """The same address in several requests of one batch: each request is answered, and
    the store left, exactly as if they had been sent one after the other."""
    jerry = "jerry@example.com"

    def seed(store: Store) -> None:
        ym_seed(store, "phil@example.com", {"A"}, status="unsubscribed", id_="P-1")

    bodies = [
        # a new subscriber, then found by its id alone in the next request
        ym_body([{"email": jerry, "id": "J-1", "subscriptions": {"add": ["A"]}}]),
        ym_body([{"id": "J-1", "subscriptions": {"remove": ["A"], "add": ["B"]}}]),
        # A was removed by the request before: a 409, and nothing of it is stored
        ym_body(
            [
                {"email": "bob@example.com", "id": "bob", "subscriptions": {"add": ["A"]}},
                {"email": jerry, "subscriptions": {"isMemberOf": ["A"]}},
            ]
        ),
        # so bob is still new here: without an id, a 400
        ym_body([{"email": "bob@example.com"}]),
        ym_body([{"email": jerry, "subscriptions": {"isMemberOf": ["B"]}}]),
        ym_body([{"email": jerry, "subscriptions": {"setReferred": "newOnly"}}]),
        ym_body(
            [
                {"email": jerry, "id": "J-1", "profile": {"userAttrs": [{"firstName": "J"}]}},
                {"email": jerry, "id": "J-1", "profile": {"userAttrs": [{"lastName": "G"}]}},
            ],
            updateProfile=True,
        ),
        ym_body([{"email": jerry, "subscriptions": {"remove": ["*"]}}]),
        ym_body([{"id": "J-1"}, {"id": "P-1"}], transactional=False),
        ym_body([{"id": "P-1", "subscriptions": {"add": ["C"]}}, {"email": "phil@example.com"}]),
        ym_body([{"email": jerry, "subscriptions": {"setReferred": "newOrNotSubscribed"}}]),
    ]
    alone, together, stored_alone, stored_together = one_by_one_then_together(
        any_store, bodies, seed
    )
    assert [a[0] for a in alone] == [202, 202, 409, 400, 202, 202, 202, 202, 202, 202, 202]
    assert alone[8][1] == ["ignored", "ignored"]  # unsubscribed both, not transactional
    assert together == alone
    assert stored_together == stored_alone
    subs, divs = stored_alone
    assert ("jerry@example.com", "C") not in divs and ("phil@example.com", "C") in divs
    jerry_row = next(r for r in subs if r[0] == jerry)
    assert jerry_row[3] == "referred" and orjson.loads(jerry_row[4]) == {
        "firstName": "J",
        "lastName": "G",
    }


@pytest.mark.parametrize("seed", range(6))
def test_yesmail_a_batch_answers_as_one_request_after_the_other(seed: int, store: Store) -> None:
    """Random requests over a few addresses: judged together, the same answers and the
    same store as one by one."""
    rng = random.Random(seed)
    emails = [f"u{i}@example.com" for i in range(6)]
    divisions = ["A", "B", "C"]

    def recipient() -> dict[str, Any]:
        r: dict[str, Any] = {}
        i = rng.randrange(len(emails))
        if rng.random() < 0.8:
            r["email"] = emails[i] if rng.random() < 0.97 else emails[i].upper()
        if "email" not in r or rng.random() < 0.7:
            r["id"] = f"ID-{i}"
        subs: dict[str, Any] = {}
        for op in ("remove", "add", "isMemberOf"):
            if rng.random() < 0.3:
                subs[op] = rng.sample(divisions + ["*"] * (op == "remove"), rng.randint(1, 2))
        if rng.random() < 0.2:
            subs["setReferred"] = rng.choice(["newOnly", "newOrNotSubscribed"])
        if subs:
            r["subscriptions"] = subs
        if rng.random() < 0.3:
            r["profile"] = {"userAttrs": [{rng.choice("xyz"): rng.randrange(9)}]}
        return r

    bodies = [
        ym_body(
            [recipient() for _ in range(rng.randint(1, 4))],
            transactional=rng.random() < 0.5,
            updateProfile=rng.random() < 0.3,
        )
        for _ in range(40)
    ]
    alone, together, stored_alone, stored_together = one_by_one_then_together(store, bodies)
    assert {a[0] for a in alone} >= {202, 400}
    assert together == alone
    assert stored_together == stored_alone


_REFERRED = {"setReferred": "newOrNotSubscribed"}
_FWD_REFERRED = (
    "recipients[0]: setReferred is required and must be set to newOrNotSubscribed "
    "when using forwarder"
)


def test_yesmail_forwarder_example_of_the_seed_is_accepted(store: Store) -> None:
    """003_…'s Forward-to-a-Friend request, as printed: every recipient referred."""
    from tests.test_payloads import yesmail_seed_requests

    body = yesmail_seed_requests()[3]
    assert "forwarder" in body
    answer = evaluate_send(store, body, "jefftronics3", None)
    assert answer.status is YesmailStatus.ACCEPTED
    assert answer.per_recipient == ["completed"] * len(body["recipients"])
    for r in body["recipients"]:  # new subscribers, referred: in no division
        sub, divisions = ym(store, r["email"])
        assert sub is not None and sub["status"] == "referred" and divisions == set()


@pytest.mark.parametrize(
    ("forwarder", "subscriptions", "flags", "problem"),
    [
        ({"id": "f@example.com"}, None, {}, _FWD_REFERRED),
        ({"id": "f@example.com"}, {"setReferred": "newOnly"}, {}, _FWD_REFERRED),
        ({"id": "f@example.com"}, {"add": ["A"]}, {}, _FWD_REFERRED),
        ("f@example.com", _REFERRED, {}, "forwarder must be an object"),
        ({"id": 7}, _REFERRED, {}, "forwarder.id must be a string"),
        ({"note": ["hi"]}, _REFERRED, {}, "forwarder.note must be a string"),
        (
            {"note": "hi"},
            _REFERRED,
            {"updateProfile": True},
            "forwarder.id is required when updateProfile is true",
        ),
    ],
)
def test_yesmail_400_forwarder_without_its_requirements(
    store: Store,
    forwarder: Any,
    subscriptions: dict[str, Any] | None,
    flags: dict[str, Any],
    problem: str,
) -> None:
    """003_…: with forwarder, "setReferred is required and must be set to
    newOrNotSubscribed"; its id is "Required if updateProfile=true"."""
    recipient: dict[str, Any] = {"email": "x@example.com", "id": "x"}
    if subscriptions is not None:
        recipient["subscriptions"] = subscriptions
    bad = send(store, [recipient], forwarder=forwarder, **flags)
    assert_400(bad, problem)
    assert ym(store, "x@example.com") == (None, set())


def test_subscribe_a_number_beyond_64_bits_is_a_profile_error(store: Store) -> None:
    """The integer a number field holds is 64-bit; a larger one is refused, not stored."""
    cfg = sub_config()
    big = 2**64 - 1
    calls = [{**SHOP, "mSubscriber": {"email": "a@example.com", "profile": {**GOOD, "AGE": big}}}]
    assert evaluate_subscribe(cfg, store, calls) == [
        failed(
            "PROFILE_VALIDATION_ERROR",
            "Profile validation error",
            details=[f"AGE: {big} is not an integer from {-(2**63)} to {2**63 - 1}"],
        )
    ]
    assert rows(store) == {}


def test_subscribe_email_or_password_of_the_wrong_type_is_a_parameter_error(
    store: Store,
) -> None:
    """{"email": 5} is there but not an address (not "missing"); a password that is not
    a string is refused rather than dropped (which would leave the default password)."""
    cfg = sub_config()
    calls = [
        {**SHOP, "mSubscriber": {"email": 5, "profile": GOOD}},
        {**SHOP, "mSubscriber": {"email": "p@example.com", "profile": GOOD, "password": 12345}},
    ]
    assert evaluate_subscribe(cfg, store, calls) == [
        failed("PARAMETER_VALIDATION_ERROR", "Invalid email address: 5"),
        failed("PARAMETER_VALIDATION_ERROR", "password must be a JSON string, not 12345"),
    ]
    assert rows(store) == {}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ({}, "content.templateId is mandatory"),
        ({"templateId": ""}, "content.templateId is mandatory"),
        ({"templateId": [1]}, "content.templateId must be a template's id (a string)"),
        ({"templateId": {"id": 1}}, "content.templateId must be a template's id (a string)"),
        ({"templateId": True}, "content.templateId must be a template's id (a string)"),
    ],
)
def test_yesmail_400_without_a_template_id(
    store: Store, content: dict[str, Any], problem: str
) -> None:
    body = {"content": content, "recipients": [{"email": "x@example.com", "id": "x"}]}
    assert_400(evaluate_send(store, body, "u", None), problem)
    assert ym(store, "x@example.com") == (None, set())


def test_yesmail_session_judges_each_request_after_the_ones_before(store: Store) -> None:
    """send_session: requests answered one at a time in one transaction, each as
    evaluate_send would after the ones before (the simulate backend's halves of a
    refused request); written when the session ends."""
    from pipeline.engine.yesmail import send_session

    def body(recipients: list[dict[str, Any]]) -> dict[str, Any]:
        return {"content": {"templateId": "1"}, "transactional": False, "recipients": recipients}

    joins = {"email": "j@example.com", "id": "j", "subscriptions": {"add": ["A"]}}
    member = {"email": "j@example.com", "subscriptions": {"isMemberOf": ["A"]}}
    stranger = {"email": "s@example.com", "id": "s", "subscriptions": {"isMemberOf": ["A"]}}
    logged: list[Any] = []
    with send_session(store, log=logged.append) as judge:
        first = judge(body([joins]), "u", "R", False)
        second = judge(body([member]), "u", "R", True)  # j is a member now
        third = judge(body([stranger]), "u", "R", True)
        assert ym(store, "j@example.com") == (None, set())  # not written yet
    assert first.status is second.status is YesmailStatus.ACCEPTED
    assert third.status is YesmailStatus.CONFLICT
    assert third.body["message"] == "Subscriber must be a memberOf one of '[A]'."
    assert len(logged) == 1  # log(conn) ran once, in the transaction
    sub, divisions = ym(store, "j@example.com")
    assert sub is not None and sub["status"] == "active" and divisions == {"A"}
    assert ym(store, "s@example.com") == (None, set())
    # a refused shape is still refused when its emails were checked before
    with send_session(store) as judge:
        bad = judge({"content": {}, "recipients": [joins]}, "u", None, True)
    assert_400(bad, "content.templateId is mandatory")
