"""LISTSERV Maestro on-demand recipients: the ``recip`` array of a trigger URL.

One recipient object, per ``000_…`` (Maestro 9.0 help, "Recipients Selected On
Demand By API Calls")::

    {"email":"first.last@example.com",
     "profile":{"FIRST_NAME":"My First Name","SHIPPING_ADDRESS_LINE1":"12345 Example Blvd."},
     "ifNotExistsAddAndSend":true,"ifExistsDoUpdate":false,"ifExistsForceSending":true}

``profile`` holds list fields and the job's on-demand merge fields, typed as
the list defines them; the three flags are JSON booleans from the job, unless
the source maps a per-row flag column, whose value is passed on as it is (the
platform judges it). A batch is a JSON array sent URL-encoded as
``recip=…``, so it is also bounded by the URL length (``max_url_bytes``).
"""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrowutil import repeat_text, to_bool_np
from pipeline.config import FLAG_NAMES, JobPlan
from pipeline.payloads.base import REDACTED, Builder, encoded_bytes, secret_from_env
from pipeline.payloads.jsonfrag import NULL_STR, field, member, obj, string_literal

__all__ = ["DEFAULT_TRIGGER_URL_BYTES", "OnDemandBuilder", "trigger_url"]

# room kept for the trigger URL when the config does not give it
DEFAULT_TRIGGER_URL_BYTES = 256
_ENCODED_BRACKETS = len("%5B") + len("%5D")
_ENCODED_COMMA = len("%2C")


def trigger_url(plan: JobPlan, redact: bool) -> str | None:
    """The job's trigger URL; its ``{token}`` comes from the environment or is ``***``."""
    url = plan.job.trigger_url
    if url is None:
        return None
    token = REDACTED if redact else (secret_from_env(plan.job.token_env) or REDACTED)
    return url.replace("{token}", token)


class OnDemandBuilder(Builder):
    target = "maestro-ondemand"

    def items(self, rows: pa.Table) -> pa.Array:
        n = rows.num_rows
        esc = rows.column("_esc").to_numpy(zero_copy_only=False)
        members = [field("email", rows.column("email").combine_chunks(), esc)]
        profile = self.profile_members(rows, esc)
        if profile or "profile_json" in rows.column_names:
            inner = obj(profile, n)
            if "profile_json" in rows.column_names:
                inner = merge_profile_json(inner, rows.column("profile_json").combine_chunks())
            members.append(member("profile", pc.if_else(pc.equal(inner, "{}"), NULL_STR, inner)))
        for flag in FLAG_NAMES:
            members.append(member(flag, self._flag(rows, flag, n)))
        return obj(members, n)

    def _flag(self, rows: pa.Table, flag: str, n: int) -> pa.Array:
        default = "true" if getattr(self.plan.job, flag) else "false"
        col = f"flag:{flag}"
        if col not in rows.column_names:
            return repeat_text(default, n)
        raw = rows.column(col).combine_chunks()
        low = pc.utf8_lower(raw)
        as_bool = pc.is_in(low, pa.array(["true", "false"]))
        passed = pc.if_else(as_bool, low, string_literal(raw, None))
        return pc.coalesce(passed, default)

    def costs(self, items: pa.Array) -> np.ndarray:
        return encoded_bytes(items) + _ENCODED_COMMA

    def budget(self) -> int:
        url = trigger_url(self.plan, redact=False)
        base = len(url.encode()) if url else DEFAULT_TRIGGER_URL_BYTES
        # "&recip=" + "[" … "]", with one comma fewer than items (costs count one each)
        return (
            self.plan.job.max_url_bytes - base - len("&recip=") - _ENCODED_BRACKETS + _ENCODED_COMMA
        )

    def envelope(self, batch_id: str) -> tuple[bytes, bytes]:
        head = self._head(batch_id, "GET", trigger_url(self.plan, redact=True))
        return self._open(head, "recip"), b"]}"


def merge_profile_json(profile: pa.Array, extra: pa.Array) -> pa.Array:
    """Add a per-row profile object (a source's ``profile_json`` column) to the mapped fields.

    The value is passed on as the platform would receive it: an object's
    members join the mapped fields (which win on a clash); anything else
    replaces the profile as it is, JSON or not, for the platform to refuse.
    Only rows with a value are touched (one by one: a rare, per-row column).
    """
    idx = np.flatnonzero(to_bool_np(pc.is_valid(extra)))
    if idx.size == 0:
        return profile
    base = profile.take(pa.array(idx)).to_pylist()
    fixed: list[str] = []
    for mapped, text in zip(base, extra.take(pa.array(idx)).to_pylist()):
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            value = text
        if isinstance(value, dict):
            fields = orjson.loads(mapped)
            fixed.append(orjson.dumps({**value, **fields}).decode())
        else:
            fixed.append(orjson.dumps(value).decode())
    mask = np.zeros(len(profile), dtype=bool)
    mask[idx] = True
    return pc.replace_with_mask(profile, pa.array(mask), pa.array(fixed, pa.string()))
