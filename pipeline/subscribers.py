"""Import and export the store's subscribers and suppression list.

Import files are CSV or JSONL. Subscriber columns: ``email`` (required),
``list`` (or ``--list``, which wins: a row whose ``list`` names another list
is rejected), ``state`` (subscribed | pending | unsubscribed | bounced;
default subscribed), ``bounces``, ``suspended``, ``subscriptions``
(Yesmail divisions, ``A|B``), and one column per profile field of the list
(matched by name, case-insensitively). Suppression columns: ``email``,
``reason``, ``added_at``. A bad row is rejected with its line and reason and
the rest are imported; importing the same file again changes nothing.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson
import pyarrow as pa

from pipeline.config import MailpipeConfig, SourceConfig
from pipeline.emails import check_emails
from pipeline.errors import ConfigError, InputFileError
from pipeline.extract import FileStats, detect_format, extract_file
from pipeline.normalize import coerce
from pipeline.store import SUBSCRIBER_STATES, Store, email_key, now, profile_json

__all__ = ["ImportReport", "export_subscribers", "import_subscribers", "import_suppression"]

_KNOWN = {"list", "email", "state", "bounces", "suspended", "subscriptions"}
_TRUE = {"true", "yes", "1", "y"}
_FALSE = {"false", "no", "0", "n", ""}


@dataclass
class ImportReport:
    rows: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    rejects: list[tuple[int, str]] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)

    def line(self, path: str) -> str:
        text = (
            f"{path}: {self.rows} rows: {self.added} added, {self.updated} updated, "
            f"{self.unchanged} unchanged, {len(self.rejects)} rejected"
        )
        if self.ignored_columns:
            text += f" (ignored columns: {', '.join(self.ignored_columns)})"
        return text


def _columns(path: str) -> list[str]:
    """The column names of a CSV header or of the first objects of a JSONL file."""
    fmt = detect_format(path, "auto")
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            if fmt == "csv":
                return next(csv.reader(fh), [])
            names: dict[str, None] = {}
            for i, line in enumerate(fh):
                if i >= 1000:
                    break
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    names.update(dict.fromkeys(obj))
            return list(names)
    except FileNotFoundError:
        raise InputFileError(path, "file not found") from None
    except UnicodeDecodeError:
        raise InputFileError(path, "not UTF-8 text; re-save it as UTF-8") from None


def _rows(path: str, columns: list[str]) -> Iterator[dict[str, Any]]:
    """Each record of the file as {column: text} plus _line and _reject."""
    lower = {c.strip().lower(): c for c in columns}
    if "email" not in lower:
        raise InputFileError(path, f"no 'email' column (has: {', '.join(columns)})")
    fields = {f"C{i}": c for i, c in enumerate(columns) if c.strip().lower() != "email"}
    source = SourceConfig(kind="signups", path=path, email=lower["email"], fields=fields)
    stats = FileStats(path)
    for batch in extract_file(path, 0, source, stats):
        for r in batch.to_pylist():
            row = {fields[k[2:]]: v for k, v in r.items() if k.startswith("f:")}
            row["email"] = r["email"]
            row["_line"], row["_reject"] = r["_line"], r["_reject"]
            yield row


def import_subscribers(
    store: Store, cfg: MailpipeConfig, path: str, list_name: str | None = None
) -> ImportReport:
    """Upsert the subscribers of a file into the store (one transaction per file)."""
    if list_name is not None and list_name not in cfg.lists:
        raise ConfigError("--list", f"no list {list_name!r}; choose from {', '.join(cfg.lists)}")
    columns = _columns(path)
    report = ImportReport()
    lowered = {c.strip().lower() for c in columns}
    all_fields = {f.lower() for lst in cfg.lists.values() for f in lst.fields}
    report.ignored_columns = [c for c in columns if c.strip().lower() not in _KNOWN | all_fields]
    if list_name is None and "list" not in lowered:
        raise InputFileError(path, "no 'list' column; pass --list NAME")
    good: list[dict[str, Any]] = []
    divisions: dict[str, set[str]] = {}
    for row in _rows(path, columns):
        report.rows += 1
        entry, problem = _subscriber(cfg, row, list_name)
        if problem:
            report.rejects.append((row["_line"], problem))
            continue
        assert entry is not None
        subs = entry.pop("_subscriptions")
        if subs is not None:
            divisions[entry["email_key"]] = subs
        good.append(entry)
    with store.begin() as conn:
        added, updated = store.upsert_subscribers(conn, good)
        for key, divs in divisions.items():
            store.set_ym_subscriptions(conn, key, divs)
            store.upsert_ym_subscriber(conn, key, {"email": key, "id": key, "status": "active"})
    report.added, report.updated = added, updated
    report.unchanged = len(good) - added - updated
    return report


def _subscriber(
    cfg: MailpipeConfig, row: dict[str, Any], list_name: str | None
) -> tuple[dict[str, Any] | None, str | None]:
    if row["_reject"]:
        return None, row["_reject"]
    low = {k.strip().lower(): v for k, v in row.items() if not k.startswith("_")}
    column = (low.get("list") or "").strip()
    if list_name is not None and column and column != list_name:
        # --list wins: a row naming another list is not moved there silently
        return None, (
            f"the row's list column says {column!r} but --list is {list_name!r}; "
            f"import it with --list {column}, or empty or correct its list column"
        )
    name = list_name or column
    if not name or name not in cfg.lists:
        return None, f"unknown list {name!r}; the config has {', '.join(cfg.lists)}"
    verdict = check_emails(pa.array([low.get("email")], pa.string()))
    problem = verdict.problem[0].as_py()
    if problem:
        return None, f"{problem}: {verdict.message[0].as_py() or 'email is required'}"
    email = verdict.email[0].as_py()
    state = (low.get("state") or "subscribed").strip().lower()
    if state not in SUBSCRIBER_STATES:
        return None, f"state {state!r} is not one of {', '.join(SUBSCRIBER_STATES)}"
    try:
        bounces = int((low.get("bounces") or "0").strip())
    except ValueError:
        return None, f"bounces {low.get('bounces')!r} is not a whole number"
    suspended_text = (low.get("suspended") or "").strip().lower()
    if suspended_text not in _TRUE | _FALSE:
        return None, f"suspended {low.get('suspended')!r} is not true or false"
    lst = cfg.lists[name]
    profile: dict[str, Any] = {}
    for field_name, spec in lst.fields.items():
        text = low.get(field_name.lower())
        if text is None or not text.strip():
            continue
        typed, problem_arr = coerce(field_name, spec, pa.array([text.strip()], pa.string()))
        if problem_arr[0].as_py():
            return None, problem_arr[0].as_py()
        profile[field_name] = typed[0].as_py()
    subs_text = low.get("subscriptions")
    subs = None if subs_text is None else {s.strip() for s in subs_text.split("|") if s.strip()}
    return {
        "list": name,
        "email_key": email_key(email),
        "email": email,
        "state": state,
        "bounces": bounces,
        "suspended": suspended_text in _TRUE,
        "profile": profile_json(profile),
        "_subscriptions": subs,
    }, None


def export_subscribers(store: Store, cfg: MailpipeConfig, list_name: str, out: TextIO) -> int:
    """Write a list's subscribers as CSV (the import format); returns the count."""
    if list_name not in cfg.lists:
        raise ConfigError("--list", f"no list {list_name!r}; choose from {', '.join(cfg.lists)}")
    names = list(cfg.lists[list_name].fields)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["list", "email", "state", "bounces", "suspended", *names])
    count = 0
    for row in store.iter_subscribers(list_name):
        profile = orjson.loads(row["profile"] or "{}")
        values = [
            "|".join(v)
            if isinstance(v, list)
            else ("true" if v is True else "false" if v is False else v)
            for v in (profile.get(n, "") for n in names)
        ]
        writer.writerow(
            [
                list_name,
                row["email"],
                row["state"],
                row["bounces"],
                "true" if row["suspended"] else "false",
                *values,
            ]
        )
        count += 1
    return count


def import_suppression(store: Store, path: str) -> ImportReport:
    columns = _columns(path)
    report = ImportReport()
    lower = {c.strip().lower(): c for c in columns}
    good: list[dict[str, Any]] = []
    for row in _rows(path, columns):
        report.rows += 1
        if row["_reject"]:
            report.rejects.append((row["_line"], row["_reject"]))
            continue
        verdict = check_emails(pa.array([row.get("email")], pa.string()))
        if verdict.problem[0].as_py():
            report.rejects.append(
                (
                    row["_line"],
                    f"{verdict.problem[0].as_py()}: "
                    f"{verdict.message[0].as_py() or 'email is required'}",
                )
            )
            continue
        email = verdict.email[0].as_py()
        good.append(
            {
                "email_key": email_key(email),
                "email": email,
                "reason": row.get(lower.get("reason", ""), None),
                "added_at": row.get(lower.get("added_at", ""), None) or now(),
            }
        )
    with store.begin() as conn:
        report.added = store.upsert_suppression(conn, good)
    report.unchanged = len(good) - report.added
    return report


def write_suppression(store: Store, out: TextIO) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["email", "reason", "added_at"])
    count = 0
    for row in store.iter_suppression():
        writer.writerow([row["email"], row["reason"] or "", row["added_at"]])
        count += 1
    return count
