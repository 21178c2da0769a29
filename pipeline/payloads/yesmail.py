"""Yesmail ``POST /v2/emails/send``: one request body carries up to 300 recipients.

Per ``003_…``::

    {"transactional":false,"updateProfile":false,
     "content":{"templateId":"1465362"},
     "recipients":[{"email":"jerry.garcia@yesmail.com","id":"jerry.garcia@yesmail.com",
                    "profile":{"userAttrs":[{"lastName":"Garcia"},{"firstName":"Jerry"}]},
                    "subscriptions":{"isMemberOf":["Banjo Lovers"]}}]}

Emails are lower case (the API rejects mixed case); ``id`` is always sent
(a new subscriber needs both: normalize rejects a record without one, see
:data:`NEW_SUBSCRIBER_NEEDS_ID`); ``userAttrs`` is an array of one-key objects,
named by the job's ``attrs`` mapping or the field name. A request file names the
URL the sender posts to (:func:`send_url`, on ``delivery.http.yesmail_url``).
"""

from __future__ import annotations

from urllib.parse import quote

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobPlan
from pipeline.errors import NEW_SUBSCRIBER_NEEDS_ID
from pipeline.payloads.base import Builder
from pipeline.payloads.jsonfrag import NULL_STR, array, constant_member, field, member, obj

__all__ = ["NEW_SUBSCRIBER_NEEDS_ID", "SEND_PATH", "YesmailBuilder", "id_column", "send_url"]

SEND_PATH = "/v2/emails/send"

# ``003_…``, recipients: "id (optional). Customer-defined unique ID." and "One of either
# id or email must be specified, and if the recipient is not in the subscribers database,
# both id and email are required." Whether an address is in the platform's database is
# not known when the payload is built, and no documented rule supplies an id the job
# does not have (the email is an id only where the job says so: recipient_id = "email";
# put in for another, it would become that subscriber's stored id). So a record without
# its id is refused before it is sent, with the answer the platform gives a new
# subscriber sent without one (HTTP 400, NEW_SUBSCRIBER_NEEDS_ID), not sent to fail its
# whole request.


def send_url(api_base: str, ref: str | None, response_uri: str | None = None) -> str:
    """The URL a request is POSTed to: ``delivery.http.yesmail_url``, ``/v2/emails/send``
    and its ``responseRef`` (mailpipe's: the batch id) and ``responseUri`` when given,
    percent-encoded (no secret in it: the key travels in a header). The sandbox's
    tickets show the same in ``request.uri``."""
    params = [(k, v) for k, v in (("responseRef", ref), ("responseUri", response_uri)) if v]
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params)
    return f"{api_base.rstrip('/')}{SEND_PATH}" + (f"?{query}" if query else "")


def id_column(plan: JobPlan) -> str:
    """The normalized column a recipient's ``id`` comes from (``jobs.*.recipient_id``):
    ``email``, ``record_id`` (the row's own value) or a profile field ``f:NAME``."""
    rid = plan.job.recipient_id
    return rid if rid in ("email", "record_id") else f"f:{rid}"


class YesmailBuilder(Builder):
    target = "yesmail-send"

    def items(self, rows: pa.Table) -> pa.Array:
        n = rows.num_rows
        esc = rows.column("_esc").to_numpy(zero_copy_only=False)
        job = self.plan.job
        email = rows.column("email").combine_chunks()
        ids = self._ids(rows)
        if ids.null_count:  # normalize refuses these (NEW_SUBSCRIBER_NEEDS_ID): never sent
            raise ValueError(
                f"yesmail-send job {self.plan.name!r}: {ids.null_count} recipient(s) without "
                f"an id ({self.plan.job.recipient_id}) reached the builder; run normalize again"
            )
        rid = field("id", ids, esc)
        # userAttrs: an array of one-key objects, each item with its own leading comma
        attrs = [
            pc.binary_join_element_wise(
                field(
                    job.attrs.get(name, name),
                    rows.column(f"f:{name}").combine_chunks(),
                    esc,
                    lead=",{",
                ),
                "}",
                "",
            )
            for name in self.plan.fields
        ]
        members = [field("email", email, esc), rid]
        if attrs:
            listed = array(attrs, n)
            profile = pc.binary_join_element_wise('{"userAttrs":', listed, "}", "")
            members.append(member("profile", pc.if_else(pc.equal(listed, "[]"), NULL_STR, profile)))
        if job.subscriptions is not None:
            subs = job.subscriptions.model_dump(exclude_none=True)
            members.append(constant_member("subscriptions", subs, n))
        return obj(members, n)

    def _ids(self, rows: pa.Table) -> pa.Array:
        return rows.column(id_column(self.plan)).combine_chunks()

    def commutes(self, rows: pa.Table) -> pa.Array | None:
        """The recipients' ids, when the job neither changes subscriptions nor updates
        profiles: a recipient then stores only its id and email (its status and
        attributes stay what they were) and is answered from its status alone, which
        such a recipient never changes. Recipients of one address with one id leave the
        same subscriber in any order; an id missing or different orders them, as a new
        subscriber needs both id and email and the last id given is the one stored."""
        job = self.plan.job
        if job.subscriptions is not None or job.updateProfile:
            return None
        ids = self._ids(rows)
        if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
            ids = pc.if_else(pc.equal(ids, ""), pa.scalar(None, ids.type), ids)
        return ids

    def body_head(self) -> bytes:
        job = self.plan.job
        head = {
            "transactional": job.transactional,
            "updateProfile": job.updateProfile,
            "content": {"templateId": job.templateId},
        }
        return orjson.dumps(head)[:-1] + b',"recipients":['

    def envelope(self, batch_id: str) -> tuple[bytes, bytes]:
        head = self._head(batch_id, "POST", send_url(self.http.yesmail_url, batch_id))
        return orjson.dumps(head)[:-1] + b',"body":' + self.body_head(), b"]}}"
