"""InboxFirst Mailing Lists API v2 in the sandbox (``004_…``), kept in the store.

Endpoints, behind Basic auth, every answer in the ``{data, error_code,
error_message, success}`` envelope::

    GET    /ga/api/v2/mailing_lists                                  the lists
    POST   /ga/api/v2/mailing_lists                                  create
    PUT    /ga/api/v2/mailing_lists/{id}                             update
    GET    /ga/api/v2/mailing_lists/{id}/delete_confirmation_code    valid 2 minutes
    DELETE /ga/api/v2/mailing_lists/{id}/confirmed/{code}            delete

Create and update refuse what the document says the API refuses: an
autowinner percentage with more than two decimals, both ``d_seed_list_ids``
and ``d_seed_list_names``, ``custom_headers_enabled`` without
``custom_headers``. The document lists no error codes, so ``error_code`` stays
null and ``error_message`` explains.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import time
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
import sqlalchemy as sa

from pipeline.store import Store

__all__ = ["CODE_SECONDS", "MailingLists", "envelope"]

CODE_SECONDS = 120  # "a confirmation code that will be valid for 2 minutes"

_meta = sa.MetaData()
mailing_lists = sa.Table(
    "sandbox_mailing_lists",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("record", sa.Text, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, default=False),
)

# the record's keys (004: "Get list of mailing lists"), with the value a new list starts with
_DEFAULTS: dict[str, Any] = {
    "name": None,
    "d_from_email": None,
    "d_from_name": "",
    "d_reply_to": "",
    "d_virtual_mta": "System Default Route",
    "d_url_domain": "",
    "d_speed": 0,
    "d_sender_email": "",
    "d_bounce_email": None,
    "d_seed_lists": [],
    "d_autowinner_enabled": False,
    "d_autowinner_percentage": None,
    "d_autowinner_delay_amount": None,
    "d_autowinner_delay_unit": None,
    "d_autowinner_metric": None,
    "has_format": False,
    "has_confirmed": False,
    "custom_headers_enabled": False,
    "custom_headers": "",
    "primary_key_custom_field_id": None,
    "preview_custom_field_data": {},
    "is_remote_list": False,
    "database_connection_id": None,
    "database_connection_name": None,
}
# the record's keys by the type 004 gives them (database_connection_name, documented as
# "Integer" with the example "My SQL Server", is left unchecked)
_STRINGS = (
    "name",
    "d_from_email",
    "d_from_name",
    "d_reply_to",
    "d_virtual_mta",
    "d_url_domain",
    "d_sender_email",
    "d_bounce_email",
    "d_autowinner_metric",
    "custom_headers",
)
_INTEGERS = ("d_autowinner_delay_amount", "primary_key_custom_field_id", "database_connection_id")
_BOOLS = (
    "d_autowinner_enabled",
    "has_format",
    "has_confirmed",
    "custom_headers_enabled",
    "is_remote_list",
)
_UNITS = ("minutes", "hours", "days")


def envelope(data: Any = None, error: str | None = None) -> dict[str, Any]:
    """``{"data":…,"error_code":null,"error_message":…,"success":…}``."""
    return {"data": data, "error_code": None, "error_message": error, "success": error is None}


class Refused(ValueError):
    """What the API refuses, with its explanation and HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _percentage(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Refused("d_autowinner_percentage must be a number")
    text = repr(value) if isinstance(value, float) else str(value)
    try:
        dec = Decimal(text)
    except InvalidOperation:
        raise Refused(f"d_autowinner_percentage {text!r} is not a number") from None
    if not dec.is_finite():
        raise Refused(f"d_autowinner_percentage {text!r} is not a number")
    if not 0 <= dec <= 100:
        raise Refused(f"d_autowinner_percentage {text!r} is not a percentage (0 to 100)")
    exponent = dec.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -2:
        raise Refused(f"d_autowinner_percentage {text!r} has more than two decimals")
    # returned "as a string" in decimal notation, as 004 shows it ("25.0", "94.85")
    fixed = dec.quantize(Decimal("0.01")).normalize()
    return f"{fixed:.1f}" if fixed == fixed.to_integral_value() else f"{fixed:f}"


def _is_int(value: Any) -> bool:
    """A JSON integer an id column holds (not a boolean, at most 64 bits)."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63


def _apply(record: dict[str, Any], given: Any) -> dict[str, Any]:
    """The record after ``mailing_list`` values, or :class:`Refused`."""
    if not isinstance(given, dict):
        raise Refused('the payload must be {"mailing_list": {…}}')
    if "d_seed_list_ids" in given and "d_seed_list_names" in given:
        raise Refused("only one of d_seed_list_ids and d_seed_list_names may be given")
    out = dict(record)
    for key, value in given.items():
        if key in ("d_seed_list_ids", "d_seed_list_names"):
            of_ids = key == "d_seed_list_ids"
            if not isinstance(value, list) or not all(
                _is_int(v) if of_ids else isinstance(v, str) for v in value
            ):
                raise Refused(f"{key} must be an array of {'integers' if of_ids else 'strings'}")
            out["d_seed_lists"] = [
                {"id": v, "name": f"Seed list {v}"}
                if key == "d_seed_list_ids"
                else {"id": i + 1, "name": v}
                for i, v in enumerate(value)
            ]
        elif key == "d_autowinner_percentage":
            out[key] = _percentage(value)
        elif key == "preview_custom_field_data":
            # "the custom fields provided … are merged in with the existing" (004)
            if not isinstance(value, dict):
                raise Refused("preview_custom_field_data must be a hash")
            out[key] = {**(out.get(key) or {}), **value}
        elif key in _DEFAULTS and key != "d_seed_lists":
            out[key] = value
    for key in ("name", "d_from_email"):
        if not isinstance(out.get(key), str) or not out[key].strip():
            raise Refused(f"{key} can't be blank")
    for key in _STRINGS:
        if out.get(key) is not None and not isinstance(out[key], str):
            raise Refused(f"{key} must be a string")
    for key in _BOOLS:
        if not isinstance(out.get(key), bool):
            raise Refused(f"{key} must be true or false")
    if not _is_int(out["d_speed"]):
        raise Refused("d_speed must be an integer")
    for key in _INTEGERS:
        if out.get(key) is not None and not _is_int(out[key]):
            raise Refused(f"{key} must be an integer")
    if out["d_autowinner_delay_unit"] not in (None, *_UNITS):
        raise Refused("d_autowinner_delay_unit must be minutes, hours or days")
    if out["custom_headers_enabled"] and not (out.get("custom_headers") or "").strip():
        raise Refused("custom_headers must be set when custom_headers_enabled is true")
    return out


class MailingLists:
    """The lists, in a table of the store (call from one thread: the sandbox's engine thread)."""

    def __init__(self, store: Store, secret: str) -> None:
        self.store = store
        self.secret = secret
        _meta.create_all(store.engine)

    def all(self) -> list[dict[str, Any]]:
        with self.store.begin() as conn:
            rows = conn.execute(
                sa.select(mailing_lists).where(mailing_lists.c.deleted.is_(False))
            ).fetchall()
        return [{**orjson.loads(r.record), "id": r.id} for r in rows]

    def _get(self, conn: Any, list_id: int) -> dict[str, Any]:
        if not 0 < list_id < 2**63:  # no such list (nor a key SQLite could compare)
            raise Refused(f"mailing list {list_id} not found", 404)
        row = conn.execute(
            sa.select(mailing_lists).where(
                mailing_lists.c.id == list_id, mailing_lists.c.deleted.is_(False)
            )
        ).first()
        if row is None:
            raise Refused(f"mailing list {list_id} not found", 404)
        return {**orjson.loads(row.record), "id": row.id}

    def create(self, payload: Any) -> dict[str, Any]:
        given = payload.get("mailing_list") if isinstance(payload, dict) else None
        record = _apply(dict(_DEFAULTS), given)
        with self.store.begin() as conn:
            made = conn.execute(
                mailing_lists.insert().values(record=orjson.dumps(record).decode(), deleted=False)
            ).inserted_primary_key
        assert made is not None
        return {**record, "id": int(made[0])}

    def update(self, list_id: int, payload: Any) -> dict[str, Any]:
        given = payload.get("mailing_list") if isinstance(payload, dict) else None
        with self.store.begin() as conn:
            current = self._get(conn, list_id)
            current.pop("id")
            record = _apply(current, given)
            conn.execute(
                mailing_lists.update()
                .where(mailing_lists.c.id == list_id)
                .values(record=orjson.dumps(record).decode())
            )
        return {**record, "id": list_id}

    def _code(self, list_id: int, expires: int) -> str:
        digest = hmac.new(
            self.secret.encode(), f"delete:{list_id}:{expires}".encode(), hashlib.sha1
        ).hexdigest()
        return f"{digest}:{expires}"

    def confirmation_code(self, list_id: int) -> dict[str, Any]:
        with self.store.begin() as conn:
            self._get(conn, list_id)
        expires = int(time.time()) + CODE_SECONDS
        at = dt.datetime.fromtimestamp(expires, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "delete_confirmation_code": self._code(list_id, expires),
            "delete_confirmation_expires_at": at,
        }

    def delete(self, list_id: int, code: str) -> None:
        _, _, expires = code.rpartition(":")
        valid = expires.isdigit() and secrets.compare_digest(
            code, self._code(list_id, int(expires))
        )
        with self.store.begin() as conn:
            self._get(conn, list_id)
            if not valid:
                raise Refused("the delete confirmation code is not valid for this mailing list")
            if int(expires) < time.time():
                raise Refused("the delete confirmation code has expired; request a new one")
            conn.execute(
                mailing_lists.update().where(mailing_lists.c.id == list_id).values(deleted=True)
            )
