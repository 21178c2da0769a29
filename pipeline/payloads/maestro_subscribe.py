"""LISTSERV Maestro external subscribe: one ``addSubscriberExternally.do`` call per subscriber.

Per ``002_…`` (Maestro 11.0 help, "Add Subscribers By API Calls")::

    GET https://SERVER/list/action/addSubscriberExternally.do
        ?mContainer=2&mOwner=N10&mListId=HL%2312&mSubscriber=SUBSCRIBER_DATA

    SUBSCRIBER_DATA = {"email":"first.last@example.com","password":"…",
                       "profile":{"FIRST_NAME":"First","LAST_NAME":"Last"},
                       "remoteAddress":"192.168.1.1","userAgent":"Mozilla/5.0 …"}

A batch file holds up to ``batch_size`` such calls. The password is sent but
never written: request files show ``"password":"***"``. Their ``url`` is the
endpoint the sender calls (:func:`subscribe_endpoint`): the job's
``subscribe_url``, else ``delivery.http.maestro_url``.
"""

from __future__ import annotations

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import HttpConfig, JobPlan
from pipeline.payloads.base import REDACTED, Builder, url_quote
from pipeline.payloads.jsonfrag import NULL_STR, field, member, obj

__all__ = ["SUBSCRIBE_PATH", "SubscribeBuilder", "subscribe_endpoint", "subscribe_query"]

SUBSCRIBE_PATH = "/list/action/addSubscriberExternally.do"
_PASSWORD = r'"password":"(?:[^"\\]|\\.)*"'


def subscribe_endpoint(plan: JobPlan, http: HttpConfig) -> str:
    """``addSubscriberExternally.do`` on the job's ``subscribe_url``, else on the server of
    ``delivery.http.maestro_url`` (the query, one per call, is :func:`subscribe_query`)."""
    base = plan.job.subscribe_url or http.maestro_url
    return base.rstrip("/") + SUBSCRIBE_PATH


def subscribe_query(m_container: str, m_owner: str, m_list_id: str, subscriber_json: str) -> str:
    """The query string of one call, encoded as the seeds show (``HL#12`` → ``HL%2312``)."""
    return (
        f"mContainer={url_quote(m_container)}&mOwner={url_quote(m_owner)}"
        f"&mListId={url_quote(m_list_id)}&mSubscriber={url_quote(subscriber_json)}"
    )


class SubscribeBuilder(Builder):
    target = "maestro-subscribe"

    def items(self, rows: pa.Table) -> pa.Array:
        """One call object per subscriber: the list identifiers and ``mSubscriber``."""
        n = rows.num_rows
        esc = rows.column("_esc").to_numpy(zero_copy_only=False)
        lst = self.plan.lst

        def opt(name: str) -> pa.Array | None:
            if name not in rows.column_names:
                return None
            return field(name, rows.column(name).combine_chunks(), esc)

        members = [field("email", rows.column("email").combine_chunks(), esc)]
        members += [m for m in (opt("password"),) if m is not None]
        profile = self.profile_members(rows, esc)
        if profile:
            inner = obj(profile, n)
            members.append(member("profile", pc.if_else(pc.equal(inner, "{}"), NULL_STR, inner)))
        members += [m for m in (opt("remoteAddress"), opt("userAgent")) if m is not None]
        subscriber = obj(members, n)
        ids = orjson.dumps(
            {"mContainer": lst.mContainer, "mOwner": lst.mOwner, "mListId": lst.mListId}
        ).decode()[:-1]
        return pc.binary_join_element_wise(ids + ',"mSubscriber":', subscriber, "}", "")

    def redacted(self, items: pa.Array) -> pa.Array:
        return pc.replace_substring_regex(items, _PASSWORD, f'"password":"{REDACTED}"')

    def envelope(self, batch_id: str) -> tuple[bytes, bytes]:
        url = subscribe_endpoint(self.plan, self.http)
        return self._open(self._head(batch_id, "GET", url), "calls"), b"]}"
