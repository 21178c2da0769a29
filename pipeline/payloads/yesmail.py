"""Yesmail ``POST /v2/emails/send``: one request body carries up to 300 recipients.

Per ``003_…``::

    {"transactional":false,"updateProfile":false,
     "content":{"templateId":"1465362"},
     "recipients":[{"email":"jerry.garcia@yesmail.com","id":"jerry.garcia@yesmail.com",
                    "profile":{"userAttrs":[{"lastName":"Garcia"},{"firstName":"Jerry"}]},
                    "subscriptions":{"isMemberOf":["Banjo Lovers"]}}]}

Emails are lower case (the API rejects mixed case); ``id`` is always sent
(a new subscriber needs both); ``userAttrs`` is an array of one-key objects,
named by the job's ``attrs`` mapping or the field name.
"""

from __future__ import annotations

from urllib.parse import quote

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.payloads.base import Builder
from pipeline.payloads.jsonfrag import NULL_STR, array, constant_member, field, member, obj

__all__ = ["SEND_PATH", "YesmailBuilder"]

SEND_PATH = "/v2/emails/send"
YESMAIL_API = "https://api.yesmail.com"


class YesmailBuilder(Builder):
    target = "yesmail-send"

    def items(self, rows: pa.Table) -> pa.Array:
        n = rows.num_rows
        esc = rows.column("_esc").to_numpy(zero_copy_only=False)
        job = self.plan.job
        email = rows.column("email").combine_chunks()
        rid = field("id", self._ids(rows), esc)
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
        rid = self.plan.job.recipient_id
        name = rid if rid in ("email", "record_id") else f"f:{rid}"
        return rows.column(name).combine_chunks()

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
        url = f"{YESMAIL_API}{SEND_PATH}?responseRef={quote(batch_id, safe='')}"
        head = self._head(batch_id, "POST", url)
        return orjson.dumps(head)[:-1] + b',"body":' + self.body_head(), b"]}}"
