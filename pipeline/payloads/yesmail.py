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
        if job.recipient_id == "email":
            rid = field("id", email, esc)
        elif job.recipient_id == "record_id":
            rid = field("id", rows.column("record_id").combine_chunks(), esc)
        else:
            rid = field("id", rows.column(f"f:{job.recipient_id}").combine_chunks(), esc)
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
