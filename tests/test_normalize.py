"""Normalize: grouping, duplicates, email and profile checks, row for row."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pytest
from conftest import small_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import keyset
from pipeline.arrowutil import blank_to_null
from pipeline.build import primary_rows
from pipeline.config import JobPlan, MailpipeConfig, ProfileField
from pipeline.engine import yesmail as engine_yesmail
from pipeline.extract import PROVENANCE, FileStats, extract_file, extracted_schema, make_batch
from pipeline.normalize import InputRef, Normalizer, arrow_type, coerce, normalized_schema
from pipeline.payloads.yesmail import NEW_SUBSCRIBER_NEEDS_ID, YesmailBuilder
from pipeline.results import problem_outcome

# -- a config with every field type ----------------------------------------------

FIELDS = {
    "FIRST_NAME": "first_name",
    "LAST_NAME": "last_name",
    "AGE": "age",
    "VIP": "vip",
    "COLOR": "color",
    "TAGS": "tags",
}
SOURCES = {
    "orders": {
        "kind": "orders",
        "path": "orders*.csv",
        "email": "email",
        "record_id": "order_id",
        "created_at": "created",
        "fields": FIELDS,
    },
    "signups": {
        "kind": "signups",
        "path": "signups*.csv",
        "email": "email",
        "fields": {"FIRST_NAME": "first_name"},
    },
}
JOBS = {
    "confirm": {
        "source": "orders",
        "target": "maestro-ondemand",
        "list": "shop",
        "ifNotExistsAddAndSend": True,
    },
    "send": {"source": "orders", "target": "yesmail-send", "list": "shop", "templateId": "1465362"},
    "welcome": {"source": "signups", "target": "maestro-subscribe", "list": "shop"},
}


def config() -> MailpipeConfig:
    return small_config(sources=SOURCES, jobs=JOBS)


CFG = config()
CONFIRM = CFG.plan("confirm")
SEND = CFG.plan("send")
WELCOME = CFG.plan("welcome")

# -- helpers ---------------------------------------------------------------------

Row = dict[str, Any]


def batch(plan: JobPlan, rows: Sequence[Row], file_id: int = 0, lines: Iterable[int] = ()) -> Any:
    """An extracted batch: rows use internal names (email, record_id, f:AGE…) and _reject."""
    schema = extracted_schema(plan.source)
    n = len(rows)
    line_no = list(lines) or [r.get("_line", i + 2) for i, r in enumerate(rows)]
    values = {
        name: pa.array([r.get(name) for r in rows], pa.string())
        for name in schema.names[len(PROVENANCE) :]
    }
    return make_batch(
        schema,
        file_id,
        np.array(line_no, dtype=np.int64),
        pa.array([json.dumps(r) for r in rows], pa.string()),
        pa.array([False] * n),
        pa.array([r.get("_reject") for r in rows], pa.string()),
        values,
    )


def normalize(
    plan: JobPlan, batches: Iterable[Any], inputs: Sequence[InputRef] | None = None
) -> list[Row]:
    norm = Normalizer(plan, list(inputs or [InputRef(f"f{i}") for i in range(4)]))
    out: list[Any] = []
    for b in batches:
        out.extend(norm.feed(b))
    out.extend(norm.finish())
    for b in out:
        assert b.schema == normalized_schema(plan)
    rows: list[Row] = [r for b in out for r in b.to_pylist()]
    return rows


def order(
    key: str | None, email: str | None = "ann@example.com", _line: int | None = None, **fields: Any
) -> Row:
    """An orders row; ``fields`` are profile fields by list name (AGE="41")."""
    row: Row = {"record_id": key, "email": email}
    row.update({f"f:{k}": v for k, v in fields.items()})
    if _line is not None:
        row["_line"] = _line
    return row


# -- grouping ----------------------------------------------------------------------


def test_adjacent_rows_become_one_recipient() -> None:
    rows = [
        order("1001", email="  ", FIRST_NAME=" ", AGE="41"),
        order("1001", email=" Ann@Example.COM ", FIRST_NAME="Ann", LAST_NAME="Lee"),
        order("1001", email="other@example.com", FIRST_NAME="Bob", LAST_NAME="Other", VIP="yes"),
        order("1002", email="bo@example.com", FIRST_NAME="Bo"),
    ]
    out = normalize(CONFIRM, [batch(CONFIRM, rows)])
    assert [r["_rec"] for r in out] == [0, 0, 0, 1]
    assert [r["_primary"] for r in out] == [True, False, False, True]
    assert [r["_status"] for r in out] == ["pending"] * 4
    assert [r["_problem"] for r in out] == [None] * 4
    # the record takes the first non-empty value of each field, even past an empty first cell
    first = out[0]
    assert first["email"] == "Ann@example.com"
    assert first["f:FIRST_NAME"] == "Ann"
    assert first["f:LAST_NAME"] == "Lee"
    assert first["f:AGE"] == 41
    assert first["f:VIP"] is True
    # every row of the record follows it; only the primary carries the values
    assert [r["email"] for r in out[:3]] == ["Ann@example.com"] * 3
    for r in out[1:3]:
        assert r["f:FIRST_NAME"] is None and r["f:AGE"] is None and r["f:VIP"] is None
    assert [r["record_id"] for r in out] == ["1001", "1001", "1001", "1002"]
    assert out[3]["f:FIRST_NAME"] == "Bo"


def test_all_rows_of_a_group_share_its_outcome() -> None:
    rows = [
        order("7", email="bad address", FIRST_NAME="A"),
        order("7", email="ann@example.com"),  # the record's email is the first: bad
        order("8", email="ann@example.com", AGE="x"),
        order("8", AGE="3"),
    ]
    out = normalize(CONFIRM, [batch(CONFIRM, rows)])
    assert [r["_status"] for r in out] == ["failed"] * 4
    assert [r["_problem"] for r in out] == ["invalid_email"] * 2 + ["profile"] * 2
    assert [r["_rec"] for r in out] == [-1] * 4
    assert [r["_primary"] for r in out] == [True, False, True, False]
    assert out[0]["_message"] == out[1]["_message"] is not None
    assert out[2]["_details"] == out[3]["_details"] == ["AGE: 'x' is not a whole number"]


def test_key_is_trimmed_before_grouping() -> None:
    rows = [order("1001", FIRST_NAME="A"), order(" 1001\t", FIRST_NAME="B"), order("1002")]
    out = normalize(CONFIRM, [batch(CONFIRM, rows)])
    assert [r["_rec"] for r in out] == [0, 0, 1]
    assert [r["record_id"] for r in out] == ["1001", "1001", "1002"]


def test_non_adjacent_repeat_is_ignored_and_points_at_the_first() -> None:
    rows = [
        order("A", _line=2),
        order("A", _line=3),
        order("B", _line=5),
        order("A", email="new@example.com", _line=6),  # comes back: a duplicate
        order("A", _line=7),
        order("C", _line=8),
        order("B", _line=9),
    ]
    out = normalize(CONFIRM, [batch(CONFIRM, rows)])
    assert [r["_status"] for r in out] == ["pending"] * 3 + ["ignored"] * 2 + ["pending", "ignored"]
    assert [r["_problem"] for r in out] == [None] * 3 + ["duplicate"] * 2 + [None, "duplicate"]
    assert [r["_rec"] for r in out] == [0, 0, 1, -1, -1, 2, -1]
    assert [r["_dup_file"] for r in out] == [None] * 3 + [0, 0, None, 0]
    assert [r["_dup_line"] for r in out] == [None] * 3 + [2, 2, None, 5]
    assert [r["_primary"] for r in out] == [True, False, True, True, False, True, True]


def test_key_repeated_in_another_file_is_a_duplicate() -> None:
    first = batch(CONFIRM, [order("1"), order("2"), order("2")], file_id=0, lines=[2, 3, 4])
    second = batch(CONFIRM, [order("2"), order("3"), order("1")], file_id=1, lines=[2, 3, 4])
    out = normalize(CONFIRM, [first, second])
    assert [r["_status"] for r in out] == ["pending"] * 3 + ["ignored", "pending", "ignored"]
    assert [(r["_dup_file"], r["_dup_line"]) for r in out[3:]] == [(0, 3), (None, None), (0, 2)]
    assert out[4]["_rec"] == 2


def test_same_key_at_a_file_boundary_is_not_one_group() -> None:
    """Adjacent rows only group within one file: the next file's row is a duplicate."""
    rows0 = batch(CONFIRM, [order("9", FIRST_NAME="A")], file_id=0, lines=[2])
    rows1 = batch(CONFIRM, [order("9", FIRST_NAME="B")], file_id=1, lines=[2])
    for batches in ([rows0, rows1], [pa.concat_batches([rows0, rows1])]):
        out = normalize(CONFIRM, batches)
        assert [r["_status"] for r in out] == ["pending", "ignored"]
        assert [r["_primary"] for r in out] == [True, True]
        assert (out[1]["_dup_file"], out[1]["_dup_line"]) == (0, 2)


def test_rows_without_a_key_are_not_deduplicated() -> None:
    same = order(None, email="ann@example.com", FIRST_NAME="Ann")
    blank = order("   ", email="ann@example.com", FIRST_NAME="Ann")
    out = normalize(CONFIRM, [batch(CONFIRM, [same, same, blank, blank])])
    assert [r["_status"] for r in out] == ["pending"] * 4
    assert [r["_rec"] for r in out] == [0, 1, 2, 3]
    assert all(r["_primary"] for r in out)
    # a source without a key column: each row is its own record
    signup = {"email": "ann@example.com", "f:FIRST_NAME": "Ann"}
    files = [batch(WELCOME, [signup, signup], file_id=f) for f in (0, 1)]
    out = normalize(WELCOME, files)
    assert [r["_status"] for r in out] == ["pending"] * 4
    assert [r["_rec"] for r in out] == [0, 1, 2, 3]


def test_a_file_read_twice_repeats_its_keyless_rows() -> None:
    rows = [order("1", _line=2), order(None, _line=3), order("", _line=4), order("2", _line=5)]
    inputs = [InputRef("a.csv"), InputRef("b.csv"), InputRef("copy-of-a.csv", same_as=0)]
    out = normalize(
        CONFIRM,
        [batch(CONFIRM, rows, file_id=0), batch(CONFIRM, rows, file_id=1)],
        inputs,
    )
    # another file with other bytes: keyless rows are new, keyed ones repeat
    assert [r["_status"] for r in out[4:]] == ["ignored", "pending", "pending", "ignored"]
    out = normalize(
        CONFIRM,
        [batch(CONFIRM, rows, file_id=0), batch(CONFIRM, rows, file_id=2)],
        inputs,
    )
    assert [r["_status"] for r in out[4:]] == ["ignored"] * 4
    assert [r["_problem"] for r in out[4:]] == ["duplicate"] * 4
    assert [(r["_dup_file"], r["_dup_line"]) for r in out[4:]] == [(0, 2), (0, 3), (0, 4), (0, 5)]
    # also without a key column
    signup = {"email": "ann@example.com"}
    out = normalize(
        WELCOME,
        [batch(WELCOME, [signup, signup], file_id=0), batch(WELCOME, [signup], file_id=2)],
        inputs,
    )
    assert [r["_status"] for r in out] == ["pending", "pending", "ignored"]
    assert (out[2]["_dup_file"], out[2]["_dup_line"]) == (0, 2)


def test_reject_row_is_unreadable_and_does_not_break_its_group() -> None:
    rows = [
        order("5", email=None, FIRST_NAME="Ann"),
        {"_reject": "ragged row: 3 fields, the header has 9"},
        order("5", email="ann@example.com"),
        order("6", email="bo@example.com"),
    ]
    out = normalize(CONFIRM, [batch(CONFIRM, rows)])
    assert [r["_status"] for r in out] == ["pending", "failed", "pending", "pending"]
    assert [r["_problem"] for r in out] == [None, "unreadable", None, None]
    assert out[1]["_message"] == "ragged row: 3 fields, the header has 9"
    assert out[1]["_raw"] is not None  # a failed row keeps its text
    assert [r["_rec"] for r in out] == [0, -1, 0, 1]
    assert [r["_primary"] for r in out] == [True, False, False, True]
    assert out[0]["email"] == out[2]["email"] == "ann@example.com"
    assert out[0]["f:FIRST_NAME"] == "Ann"


def test_a_batch_of_rejects_only() -> None:
    """Every row unreadable: no record at all in the batch (this used to raise IndexError)."""
    rejects = [{"_reject": "not UTF-8"}, {"_reject": "ragged"}]
    out = normalize(CONFIRM, [batch(CONFIRM, rejects), batch(CONFIRM, [order("1")])])
    assert [r["_status"] for r in out] == ["failed", "failed", "pending"]
    assert [r["_problem"] for r in out] == ["unreadable", "unreadable", None]
    assert [r["_seq"] for r in out] == [0, 1, 2]
    assert [r["_rec"] for r in out] == [-1, -1, 0]


def test_empty_batch() -> None:
    assert normalize(CONFIRM, [batch(CONFIRM, [])]) == []


@pytest.mark.parametrize(
    ("email", "problem"),
    [
        ("not-an-email", "invalid_email"),
        ("ann@example", "invalid_email"),
        ("ann@b.test", "invalid_email"),
        ("", "missing_email"),
        ("   ", "missing_email"),
        (None, "missing_email"),
    ],
)
def test_email_problems(email: str | None, problem: str) -> None:
    out = normalize(CONFIRM, [batch(CONFIRM, [order("1", email=email), order("2")])])
    bad, good = out
    assert bad["_status"] == "failed"
    assert bad["_problem"] == problem
    assert bad["_field"] == "email"
    assert bad["_rec"] == -1
    assert (bad["_message"] is not None) == (problem == "invalid_email")
    assert bad["_raw"] is not None
    assert (good["_status"], good["_rec"], good["_problem"], good["_field"]) == (
        "pending",
        0,
        None,
        None,
    )
    assert good["_raw"] is None


def test_profile_problems_list_every_bad_field() -> None:
    rows = [
        order("1", AGE="forty", VIP="maybe", COLOR="blue", TAGS="a|z"),
        order("2", VIP="perhaps"),
        order("3", AGE=" +5 ", VIP="Yes", COLOR="green", TAGS='["a", "c"]'),
        order("4", AGE="-0", VIP="OFF", COLOR=" red ", TAGS=" b | a "),
    ]
    out = normalize(CONFIRM, [batch(CONFIRM, rows)])
    assert [r["_status"] for r in out] == ["failed", "failed", "pending", "pending"]
    assert [r["_problem"] for r in out[:2]] == ["profile", "profile"]
    details = out[0]["_details"]
    assert len(details) == 4
    assert [d.split(":")[0] for d in details] == ["AGE", "VIP", "COLOR", "TAGS"]
    assert "'forty'" in details[0] and "'maybe'" in details[1] and "'blue'" in details[2]
    assert "'z'" in details[3]
    assert out[0]["_field"] == "AGE"
    assert out[0]["_message"] == "; ".join(details)
    assert out[1]["_details"] == ["VIP: 'perhaps' is not a boolean (true/false, yes/no, 1/0)"]
    assert out[1]["_field"] == "VIP"
    # the failed records carry no typed values that could be sent
    assert out[0]["f:AGE"] is None and out[0]["f:VIP"] is None and out[0]["f:TAGS"] is None
    ok = out[2]
    assert (ok["f:AGE"], ok["f:VIP"], ok["f:COLOR"], ok["f:TAGS"]) == (5, True, "green", ["a", "c"])
    ok = out[3]
    assert (ok["f:AGE"], ok["f:VIP"], ok["f:COLOR"], ok["f:TAGS"]) == (0, False, "red", ["b", "a"])


def test_email_problem_comes_before_profile_problems() -> None:
    out = normalize(CONFIRM, [batch(CONFIRM, [order("1", email="nope", AGE="x")])])
    assert (out[0]["_problem"], out[0]["_field"], out[0]["_details"]) == (
        "invalid_email",
        "email",
        None,
    )


def test_duplicate_wins_over_problems() -> None:
    rows = [order("1", email="bad"), order("2"), order("1", email="ann@example.com")]
    out = normalize(CONFIRM, [batch(CONFIRM, rows)])
    assert [r["_status"] for r in out] == ["failed", "pending", "ignored"]
    assert out[2]["_problem"] == "duplicate"


def test_yesmail_send_lowercases_the_whole_address() -> None:
    rows = [order("1", email=" Ann.Lee@Example.COM "), order("2", email="ÅSA@Bücher.DE")]
    send = normalize(SEND, [batch(SEND, rows)])
    assert [r["email"] for r in send] == ["ann.lee@example.com", "åsa@bücher.de"]
    confirm = normalize(CONFIRM, [batch(CONFIRM, rows)])
    assert [r["email"] for r in confirm] == ["Ann.Lee@example.com", "ÅSA@bücher.de"]


# yesmail-send: a record without its recipient id never reaches the builder
ID_JOBS = {
    "by-order": {**JOBS["send"], "recipient_id": "record_id"},
    "by-field": {**JOBS["send"], "recipient_id": "LAST_NAME"},
}
ID_CFG = small_config(sources=SOURCES, jobs={**JOBS, **ID_JOBS})


@pytest.mark.parametrize(
    ("job", "missing"),
    [
        ("by-order", {"key": None}),
        ("by-order", {"key": "  "}),
        ("by-field", {"key": "4", "LAST_NAME": ""}),
        ("by-field", {"key": "4"}),
    ],
)
def test_yesmail_send_refuses_a_record_without_its_id(job: str, missing: dict[str, Any]) -> None:
    """What the platform answers a new subscriber sent without an id (400, its message),
    answered before sending: the row keeps its line, and the request files never hold a
    recipient without "id" (so no request of several is refused whole for it)."""
    plan = ID_CFG.plan(job)
    rows = [
        order("1", LAST_NAME="Lee", _line=2),
        order(missing.pop("key"), email="bob@example.com", _line=3, **missing),
        order(None, email="no-at-sign", _line=4),  # its email is the first problem
        order("5", email="cy@example.com", LAST_NAME="Cy", _line=5),
    ]
    norm = Normalizer(plan, [InputRef("orders.csv")])
    batches = [*norm.feed(batch(plan, rows)), *norm.finish()]
    out = [r for b in batches for r in b.to_pylist()]
    assert [r["_status"] for r in out] == ["pending", "failed", "failed", "pending"]
    bad = out[1]
    assert (bad["_line"], bad["_problem"], bad["_field"]) == (
        3,
        "missing_id",
        plan.job.recipient_id,
    )
    assert bad["_message"] == NEW_SUBSCRIBER_NEEDS_ID
    assert bad["_raw"] is not None  # for rejects.jsonl, with its line
    assert out[2]["_problem"] == "invalid_email"
    # the row's result: the documented 400, with the platform's own message
    assert problem_outcome(plan.target, bad["_problem"], bad["_message"], bad["_details"]) == {
        "http_status": 400,
        "message": NEW_SUBSCRIBER_NEEDS_ID,
    }
    assert NEW_SUBSCRIBER_NEEDS_ID == engine_yesmail._NEW_NEEDS_BOTH  # the sandbox's answer
    # every recipient the builder renders carries its id
    builder = YesmailBuilder(plan)
    items = [
        orjson.loads(i) for t in primary_rows(iter(batches)) for i in builder.items(t).to_pylist()
    ]
    want = ["1", "5"] if job == "by-order" else ["Lee", "Cy"]
    assert [(i["email"], i["id"]) for i in items] == list(
        zip(["ann@example.com", "cy@example.com"], want, strict=True)
    )


def test_yesmail_send_by_email_needs_no_other_id() -> None:
    """recipient_id = "email" (the default): the email is the id, so no record lacks one."""
    out = normalize(SEND, [batch(SEND, [order(None, email="bob@example.com")])])
    assert out[0]["_status"] == "pending"


def test_created_at_and_record_id_are_per_row() -> None:
    rows = [
        {**order("1"), "created_at": "2024-05-01"},
        {**order(" 1 "), "created_at": " 2024-05-02 "},
        {**order("1"), "created_at": None},
    ]
    out = normalize(CONFIRM, [batch(CONFIRM, rows)])
    assert [r["_rec"] for r in out] == [0, 0, 0]
    assert [r["created_at"] for r in out] == ["2024-05-01", "2024-05-02", None]
    assert [r["record_id"] for r in out] == ["1", "1", "1"]


# -- batch boundaries ------------------------------------------------------------------


def test_group_split_over_batches_is_one_record() -> None:
    rows = [
        order("1", email=None, _line=2),
        order("1", FIRST_NAME="Ann", _line=3),
        order("1", _line=4),
        order("2", _line=5),
        order("2", _line=6),
        order("3", _line=7),
    ]
    whole = normalize(CONFIRM, [batch(CONFIRM, rows)])
    assert [r["_rec"] for r in whole] == [0, 0, 0, 1, 1, 2]
    assert [r["_status"] for r in whole] == ["pending"] * 6
    assert whole[0]["f:FIRST_NAME"] == "Ann"
    for size in (1, 2, 4, 5):
        parts = [batch(CONFIRM, rows[i : i + size]) for i in range(0, len(rows), size)]
        assert normalize(CONFIRM, parts) == whole, size


# random runs: the output is compared with a model of the rules, and must not depend on
# how the rows were cut into batches

keys = st.one_of(st.none(), st.sampled_from(["1", "1", "2", "3", "#1", "01", " 2", ""]))
emails = st.sampled_from(["ann@example.com", "Bo@Example.COM", "", None, "bad", "x@b.test"])
ages = st.sampled_from([None, "", "7", "+7", "seven"])
row_strategy = st.one_of(
    st.builds(
        lambda k, e, a, f: {"record_id": k, "email": e, "f:AGE": a, "f:FIRST_NAME": f},
        keys,
        emails,
        ages,
        st.sampled_from([None, "", "Ann", "Bo"]),
    ),
    st.just({"_reject": "ragged"}),
)


@st.composite
def runs(draw: st.DrawFn) -> tuple[list[list[Row]], list[list[int]]]:
    """Files of rows, and for the whole run the sizes of the batches fed."""
    files = draw(st.lists(st.lists(row_strategy, max_size=8), min_size=1, max_size=3))
    cuts: list[list[int]] = []
    for rows in files:
        sizes: list[int] = []
        left = len(rows)
        while left > 0:
            size = draw(st.integers(1, left))
            sizes.append(size)
            left -= size
        cuts.append(sizes)
    return files, cuts


def model(files: list[list[Row]]) -> list[Row]:
    """What each row should become: (status, problem, group id, primary, dup where)."""
    out: list[Row] = []
    seen: dict[str, tuple[int, int]] = {}
    group = -1
    prev: tuple[int, str] | None = None
    groups: dict[int, list[int]] = {}
    for f, rows in enumerate(files):
        prev = None
        for i, row in enumerate(rows):
            line = i + 2
            if row.get("_reject"):
                out.append({"status": "failed", "problem": "unreadable", "group": None})
                continue
            key = (row["record_id"] or "").strip() or None
            if key is None or prev != (f, key):
                group += 1
                prev = (f, key) if key is not None else None
                groups[group] = []
                primary = True
            else:
                primary = False
            groups[group].append(len(out))
            out.append({"group": group, "primary": primary, "key": key, "where": (f, line)})
    # per group: the merged record and its outcome
    rec = 0
    flat = [r for rows in files for r in rows]
    for members in groups.values():
        first = out[members[0]]
        rows_of = [flat[m] for m in members]

        def merged(name: str, rows_of: list[Row] = rows_of) -> str | None:
            return next((v.strip() for r in rows_of if (v := r.get(name)) and v.strip()), None)

        email, age = merged("email"), merged("f:AGE")
        key = first["key"]
        if key is not None and key in seen:
            outcome = ("ignored", "duplicate", seen[key])
        else:
            if key is not None:
                seen[key] = first["where"]
            if email is None:
                outcome = ("failed", "missing_email", None)
            elif email in ("bad", "x@b.test"):
                outcome = ("failed", "invalid_email", None)
            elif age is not None and not re.fullmatch(r"[+-]?[0-9]+", age):
                outcome = ("failed", "profile", None)
            else:
                outcome = ("pending", None, None)
        r = rec if outcome[0] == "pending" else -1
        rec += outcome[0] == "pending"
        for m in members:
            out[m].update(status=outcome[0], problem=outcome[1], dup=outcome[2], rec=r)
        out[members[0]]["first_name"] = merged("f:FIRST_NAME")
    return out


def feed_run(files: list[list[Row]], cuts: list[list[int]]) -> list[Row]:
    batches = []
    for f, (rows, sizes) in enumerate(zip(files, cuts)):
        at = 0
        for size in sizes:
            part = rows[at : at + size]
            batches.append(batch(CONFIRM, part, file_id=f, lines=range(at + 2, at + 2 + size)))
            at += size
    return normalize(CONFIRM, batches)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs())
def test_random_runs_follow_the_rules_whatever_the_batches(
    run: tuple[list[list[Row]], list[list[int]]],
) -> None:
    files, cuts = run
    out = feed_run(files, cuts)
    flat = [r for rows in files for r in rows]
    # one output row per input row, in order
    assert len(out) == len(flat)
    assert [r["_seq"] for r in out] == list(range(len(flat)))
    assert [(r["_file"], r["_line"]) for r in out] == [
        (f, i + 2) for f, rows in enumerate(files) for i in range(len(rows))
    ]
    # the same rows in one batch per file give exactly the same result
    assert feed_run(files, [[len(rows)] if rows else [] for rows in files]) == out
    want = model(files)
    for got, exp in zip(out, want):
        assert got["_status"] == exp["status"], (got, exp)
        assert got["_problem"] == exp["problem"], (got, exp)
        if exp["group"] is None:
            assert (got["_rec"], got["_primary"]) == (-1, False)
            continue
        assert got["_rec"] == exp["rec"]
        assert got["_primary"] == exp["primary"]
        dup = (got["_dup_file"], got["_dup_line"])
        assert dup == (exp["dup"] or (None, None))
        if exp["primary"] and exp["status"] == "pending":
            assert got["f:FIRST_NAME"] == exp["first_name"]
    # all rows of a group carry the same outcome and email
    by_group: dict[int, list[Row]] = {}
    for got, exp in zip(out, want):
        if exp["group"] is not None:
            by_group.setdefault(exp["group"], []).append(got)
    for members in by_group.values():
        outcome = {(r["_status"], r["_problem"], r["_rec"], r["email"]) for r in members}
        assert len(outcome) == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs())
def test_keys_on_disk_give_the_same_rows(run: tuple[list[list[Row]], list[list[int]]]) -> None:
    """Every key spilled to disk at once: duplicates found there exactly as in memory."""
    files, cuts = run
    in_memory = feed_run(files, cuts)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(keyset, "SPILL_AT", 1)
        assert feed_run(files, cuts) == in_memory


# -- real files ----------------------------------------------------------------------


def test_csv_files_through_extract(tmp_path: Path) -> None:
    header = "order_id,email,created,first_name,last_name,age,vip,color,tags\n"
    (tmp_path / "orders1.csv").write_text(
        header
        + "1001,ann@example.com,2024-01-01,Ann,Lee,41,yes,red,a|b\n"
        + "1001,,2024-01-01,,,,,,\n"
        + "1002,Bo@Example.COM,2024-01-02,Bo,,x,,,\n"
        + "1003,too,few\n"
        + "1004,,2024-01-03,Cy,,,,,\n"
    )
    (tmp_path / "orders2.csv").write_text(
        header + "1001,ann@example.com,2024-02-01,Ann,,,,,\n" + "1005,dee@example.com,,Dee,,,,,\n"
    )
    source = CONFIRM.source
    batches = []
    for fid, name in enumerate(["orders1.csv", "orders2.csv"]):
        stats = FileStats(str(tmp_path / name))
        batches += list(extract_file(str(tmp_path / name), fid, source, stats, block_bytes=64))
    out = normalize(CONFIRM, batches, [InputRef("orders1.csv"), InputRef("orders2.csv")])
    got = [(r["_file"], r["_line"], r["_status"], r["_problem"], r["_rec"]) for r in out]
    assert got == [
        (0, 2, "pending", None, 0),
        (0, 3, "pending", None, 0),
        (0, 4, "failed", "profile", -1),
        (0, 5, "failed", "unreadable", -1),
        (0, 6, "failed", "missing_email", -1),
        (1, 2, "ignored", "duplicate", -1),
        (1, 3, "pending", None, 1),
    ]
    assert out[0]["f:TAGS"] == ["a", "b"] and out[0]["f:AGE"] == 41
    assert out[2]["email"] == "Bo@example.com"
    assert (out[5]["_dup_file"], out[5]["_dup_line"]) == (0, 2)
    assert out[3]["_raw"].startswith("1003,too,few")


# -- profile values ------------------------------------------------------------------

SPECS = {
    "NOTE": ProfileField(type="text"),
    "AGE": ProfileField(type="number"),
    "VIP": ProfileField(type="boolean"),
    "COLOR": ProfileField(type="single-select", lookup=("red", "green")),
    "TAGS": ProfileField(type="multi-select", lookup=("a", "b", "c")),
}
TRUE = {"true", "yes", "1", "y", "on"}
FALSE = {"false", "no", "0", "n", "off"}


def expected(spec: ProfileField, v: str) -> tuple[Any, bool]:
    """(typed value, ok) for a non-null value, by the documented rules."""
    if spec.type == "text":
        return v, True
    if spec.type == "number":
        ok = re.fullmatch(r"[+-]?[0-9]{1,18}", v) is not None
        return (int(v) if ok else None), ok
    if spec.type == "boolean":
        low = v.lower()
        return (True if low in TRUE else False if low in FALSE else None), low in TRUE | FALSE
    if spec.type == "single-select":
        return v, v in spec.lookup
    if v.startswith("["):
        try:
            items = json.loads(v)
        except ValueError:
            return None, False
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            return None, False
    else:
        items = [i.strip() for i in v.split("|") if i.strip()]
    ok = all(i in spec.lookup for i in items)
    return (items if ok else None), ok


profile_text = st.one_of(
    st.none(),
    st.text(),
    st.text(alphabet=" +-0123456789٣", max_size=22),
    st.sampled_from(
        [
            "TRUE",
            "Off",
            " yes ",
            "ON",
            "red",
            "Red",
            "green ",
            "a|b",
            "a||c",
            "|",
            "[]",
            '["a","b"]',
            '["a",1]',
            '{"a":1}',
            "[",
            '["a"',
            "[" * 300,
            "9" * 19,
            "-" + "9" * 18,
        ]
    ),
    st.lists(st.sampled_from(["a", "b", "c", "d", " ", ""]), max_size=4).map("|".join),
    st.lists(st.text(max_size=3), max_size=3).map(json.dumps),
)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_any_string_is_a_typed_value_or_a_problem(name: str) -> None:
    spec = SPECS[name]

    @settings(max_examples=100, deadline=None)
    @given(st.lists(profile_text, max_size=10), st.booleans())
    def check(values: list[str | None], trimmed: bool) -> None:
        col = pa.array(values, pa.string())
        if trimmed:  # as the normalizer passes them: trimmed, blanks as nulls
            col = blank_to_null(col)
        typed, problem = coerce(name, spec, col)
        assert typed.type == arrow_type(spec)
        assert len(typed) == len(problem) == len(values)
        for v, t, p in zip(col.to_pylist(), typed.to_pylist(), problem.to_pylist()):
            if v is None:
                assert (t, p) == (None, None)
                continue
            want, ok = expected(spec, v)
            if ok:
                assert p is None, (v, p)
                assert t == want, v
            else:
                assert p is not None and p.startswith(f"{name}: "), (v, p)
                if spec.type != "single-select":  # keeps the text; the record fails
                    assert t is None, v

    check()


def test_number_edges() -> None:
    typed, problem = coerce(
        "AGE",
        SPECS["AGE"],
        pa.array(["+5", "-12", "007", "9" * 18, "9" * 19, "1.5", "1e3", " 5", "5\n", "٣"]),
    )
    assert typed.to_pylist() == [5, -12, 7, int("9" * 18)] + [None] * 6
    assert problem.null_count == 4
