"""``mailpipe lists``: the config's lists against the InboxFirst Mailing Lists API (``004_…``).

The config's ``[lists.NAME]`` tables carry the InboxFirst list record; a list
on the platform is matched by its ``name``. ``push`` creates the lists the
platform lacks and updates those that differ, after checking what the API
would refuse (the config model's own rules: ``d_autowinner_percentage`` at
most two decimals, sent as a string; only one of ``d_seed_list_ids`` /
``d_seed_list_names``; ``custom_headers`` when ``custom_headers_enabled``).
``delete`` is the documented two steps: request a confirmation code (valid 2
minutes), send it back.

Every answer is read through the ``{data, error_code, error_message,
success}`` envelope; a refusal raises :class:`~pipeline.errors.MailpipeError`
with the API's message. Basic auth comes from the environment
(``delivery.http.inboxfirst_user_env`` / ``inboxfirst_key_env``).
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
from pydantic import ValidationError

from pipeline.config import ListConfig, MailpipeConfig
from pipeline.errors import ConfigError, MailpipeError

__all__ = [
    "ListsApi",
    "PushResult",
    "delete_list",
    "differences",
    "list_payload",
    "pull_lists",
    "push_lists",
    "show_lists",
]

PATH = "/ga/api/v2/mailing_lists"
# the record keys a config list sets (d_seed_list_* are sent as given, read as d_seed_lists)
RECORD_KEYS = (
    "name",
    "d_from_email",
    "d_from_name",
    "d_reply_to",
    "d_sender_email",
    "d_bounce_email",
    "d_virtual_mta",
    "d_url_domain",
    "d_speed",
    "d_autowinner_enabled",
    "d_autowinner_percentage",
    "d_autowinner_delay_amount",
    "d_autowinner_delay_unit",
    "d_autowinner_metric",
    "has_format",
    "has_confirmed",
    "custom_headers_enabled",
    "custom_headers",
)


def check_pushable(key: str, lst: ListConfig) -> None:
    """Raise :class:`ConfigError` for what the API would refuse (the config model's rules)."""
    try:
        ListConfig.model_validate(lst.model_dump())
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "list"
        ctx = err.get("ctx") or {}
        problem = ctx.get("error")
        field = getattr(problem, "key", where)
        raise ConfigError(
            f"lists.{key}.{field}", str(problem or err["msg"]).removeprefix("Value error, ")
        ) from None


def list_payload(lst: ListConfig) -> dict[str, Any]:
    """The ``{"mailing_list": {…}}`` document a config list is created or updated with."""
    record: dict[str, Any] = {k: getattr(lst, k) for k in RECORD_KEYS}
    # the API reads the percentage as a string, and refuses more than two decimals
    pct = lst.d_autowinner_percentage
    record["d_autowinner_percentage"] = None if pct is None else str(pct)
    if lst.d_seed_list_ids is not None:
        record["d_seed_list_ids"] = list(lst.d_seed_list_ids)
    elif lst.d_seed_list_names is not None:
        record["d_seed_list_names"] = list(lst.d_seed_list_names)
    return {"mailing_list": record}


def _same(key: str, want: Any, have: Any) -> bool:
    if key == "d_autowinner_percentage" and want is not None and have is not None:
        return Decimal(str(want)) == Decimal(str(have))
    if key == "d_bounce_email" and not want and not have:
        return True
    return bool(want == have)


def differences(payload: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """The keys whose platform value differs from what the config would send."""
    want = payload["mailing_list"]
    out = [k for k in RECORD_KEYS if not _same(k, want.get(k), record.get(k))]
    seeds = record.get("d_seed_lists") or []
    if "d_seed_list_ids" in want and want["d_seed_list_ids"] != [s.get("id") for s in seeds]:
        out.append("d_seed_list_ids")
    if "d_seed_list_names" in want and want["d_seed_list_names"] != [s.get("name") for s in seeds]:
        out.append("d_seed_list_names")
    return out


class ListsApi:
    """The Mailing Lists API at ``delivery.http.inboxfirst_url`` (use ``async with``)."""

    def __init__(self, cfg: MailpipeConfig) -> None:
        http = cfg.delivery.http
        user = os.environ.get(http.inboxfirst_user_env)
        key = os.environ.get(http.inboxfirst_key_env)
        if not user or not key:
            raise ConfigError(
                "delivery.http.inboxfirst_user_env",
                f"set ${http.inboxfirst_user_env} and ${http.inboxfirst_key_env} "
                "(the InboxFirst user id and API key) in the environment",
            )
        self.base = http.inboxfirst_url.rstrip("/") + PATH
        self.names = f"${http.inboxfirst_user_env}/${http.inboxfirst_key_env}"
        token = base64.b64encode(f"{user}:{key}".encode()).decode()
        self._headers = {
            "Authorization": f"Basic {token}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        self._timeout = aiohttp.ClientTimeout(total=http.timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ListsApi:
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(self, method: str, path: str = "", body: Any = None) -> Any:
        assert self._session is not None
        url = self.base + path
        data = None if body is None else orjson.dumps(body)
        try:
            async with self._session.request(method, url, data=data) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise MailpipeError(f"InboxFirst {method} {url}: {type(e).__name__}: {e}") from None
        if status == 401:
            raise MailpipeError(
                f"InboxFirst {method} {url}: HTTP 401; check the Basic-auth user and key "
                f"({self.names})"
            )
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict) or "success" not in doc:
            text = raw[:300].decode("utf-8", errors="replace")
            raise MailpipeError(
                f"InboxFirst {method} {url}: HTTP {status}, not the API's envelope: {text}"
            )
        if not doc["success"]:
            code = f" ({doc['error_code']})" if doc.get("error_code") else ""
            raise MailpipeError(
                f"InboxFirst {method} {url}: {doc.get('error_message') or 'refused'}{code}"
            )
        return doc.get("data")

    async def all(self) -> list[dict[str, Any]]:
        data = await self._call("GET")
        return list(data or [])

    async def create(self, payload: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._call("POST", "", payload))

    async def update(self, list_id: int, payload: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._call("PUT", f"/{list_id}", payload))

    async def delete_code(self, list_id: int) -> dict[str, Any]:
        return dict(await self._call("GET", f"/{list_id}/delete_confirmation_code"))

    async def confirm_delete(self, list_id: int, code: str) -> None:
        from urllib.parse import quote

        await self._call("DELETE", f"/{list_id}/confirmed/{quote(code, safe=':')}")


@dataclass
class PushResult:
    key: str  # the config's list key
    name: str
    action: str  # created | updated | unchanged (or "would create"/"would update")
    id: int | None
    changed: list[str]


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def pull_lists(cfg: MailpipeConfig) -> list[dict[str, Any]]:
    """The platform's mailing lists, as the API returns them."""

    async def go() -> list[dict[str, Any]]:
        async with ListsApi(cfg) as api:
            return await api.all()

    result: list[dict[str, Any]] = _run(go())
    return result


def _selected(cfg: MailpipeConfig, names: tuple[str, ...]) -> dict[str, ListConfig]:
    for n in names:
        if n not in cfg.lists:
            raise ConfigError(
                "NAME", f"no list {n!r} in the config; choose from {sorted(cfg.lists)}"
            )
    return {k: v for k, v in cfg.lists.items() if not names or k in names}


def show_lists(cfg: MailpipeConfig, names: tuple[str, ...] = ()) -> list[PushResult]:
    """For each config list: its platform id and the keys that differ (nothing is changed)."""
    return push_lists(cfg, names, dry_run=True)


def push_lists(
    cfg: MailpipeConfig, names: tuple[str, ...] = (), dry_run: bool = False
) -> list[PushResult]:
    """Create or update the config's lists (all, or ``names``) so the platform matches."""
    lists = _selected(cfg, names)
    for key, lst in lists.items():
        check_pushable(key, lst)

    async def go() -> list[PushResult]:
        out: list[PushResult] = []
        async with ListsApi(cfg) as api:
            by_name = {r.get("name"): r for r in await api.all()}
            for key, lst in lists.items():
                payload = list_payload(lst)
                have = by_name.get(lst.name)
                if have is None:
                    if dry_run:
                        out.append(PushResult(key, lst.name, "missing", None, []))
                        continue
                    made = await api.create(payload)
                    out.append(PushResult(key, lst.name, "created", made.get("id"), []))
                    continue
                changed = differences(payload, have)
                if not changed:
                    out.append(PushResult(key, lst.name, "unchanged", have.get("id"), []))
                elif dry_run:
                    out.append(PushResult(key, lst.name, "differs", have.get("id"), changed))
                else:
                    await api.update(int(have["id"]), payload)
                    out.append(PushResult(key, lst.name, "updated", have.get("id"), changed))
        return out

    result: list[PushResult] = _run(go())
    return result


def delete_list(
    cfg: MailpipeConfig, ident: str, confirm: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    """Delete a platform list (by config key, name or id) once ``confirm(record)`` agrees.

    Returns the deleted record, or None when ``confirm`` declined.
    """

    async def go() -> dict[str, Any] | None:
        async with ListsApi(cfg) as api:
            records = await api.all()
            wanted = cfg.lists[ident].name if ident in cfg.lists else ident
            found = [r for r in records if r.get("name") == wanted or str(r.get("id")) == ident]
            if not found:
                raise MailpipeError(
                    f"no mailing list {ident!r} on the platform; `mailpipe lists pull` shows them"
                )
            record = found[0]
            if not confirm(record):
                return None
            code = await api.delete_code(int(record["id"]))
            await api.confirm_delete(int(record["id"]), code["delete_confirmation_code"])
            return record

    result: dict[str, Any] | None = _run(go())
    return result
