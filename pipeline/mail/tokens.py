"""Signed, expiring tokens for the links in messages, and ``mailpipe confirm``.

A token is ``<payload>.<signature>``, both base64url without padding: the
payload is ``[purpose, list, email, expires]`` as JSON, the signature its
HMAC-SHA256 under the key in the environment variable that
``[delivery.smtp] token_key_env`` names. The purpose is signed with the rest,
so an unsubscribe token cannot confirm anything. ``expires`` is a Unix time
(0: never; unsubscribe links do not expire).

    >>> key = b"k" * 32
    >>> t = sign(key, "confirm", "newsletter", "ann@example.com", expires=4102444800)
    >>> verify(key, t, "confirm", now=0).email
    'ann@example.com'
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.config import MailpipeConfig
from pipeline.errors import ConfigError, MailpipeError
from pipeline.mail.settings import require_env

__all__ = ["Claims", "TokenError", "confirm_subscription", "sign", "token_key", "verify"]

MIN_KEY_BYTES = 16


class TokenError(MailpipeError):
    """A token that is forged, damaged, expired, or for something else."""


@dataclass(frozen=True)
class Claims:
    purpose: str
    list: str
    email: str
    expires: int


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, b"mailpipe-token." + payload, hashlib.sha256).digest()


def sign(key: bytes, purpose: str, list_name: str, email: str, expires: int) -> str:
    payload = _b64(orjson.dumps([purpose, list_name, email, int(expires)]))
    return (payload + b"." + _b64(_mac(key, payload))).decode()


def verify(key: bytes, token: str, purpose: str, now: float | None = None) -> Claims:
    """The token's claims, if it is genuine, unexpired and for ``purpose``."""
    head, _, sig = token.strip().partition(".")
    try:
        given = _unb64(sig)
        good = hmac.compare_digest(given, _mac(key, head.encode("ascii")))
        data: Any = orjson.loads(_unb64(head)) if good else None
    except (ValueError, UnicodeEncodeError, orjson.JSONDecodeError):
        good, data = False, None
    if not good or not isinstance(data, list) or len(data) != 4:
        raise TokenError("the token is not genuine (forged or damaged); nothing was changed")
    claims = Claims(str(data[0]), str(data[1]), str(data[2]), int(data[3]))
    if claims.purpose != purpose:
        raise TokenError(f"this is a {claims.purpose} token, not a {purpose} token")
    if claims.expires and (time.time() if now is None else now) > claims.expires:
        raise TokenError("the token has expired; subscribe again to get a new confirmation message")
    return claims


def token_key(cfg: MailpipeConfig, env: Mapping[str, str] | None = None) -> bytes:
    """The signing key, from the environment (never from the config file)."""
    name = cfg.delivery.smtp.token_key_env
    key = require_env("delivery.smtp.token_key_env", name, env).encode()
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            "delivery.smtp.token_key_env",
            f"the key in {name} is shorter than {MIN_KEY_BYTES} bytes; use e.g. "
            "`openssl rand -hex 32`",
        )
    return key


def confirm_subscription(
    cfg: MailpipeConfig, token: str, env: Mapping[str, str] | None = None
) -> str:
    """Mark the subscriber a confirmation token names as subscribed; say what was done.

    Raises :class:`TokenError` for a token that is not genuine, has expired, or
    names no pending subscriber.
    """
    from pipeline.store import Store, email_key

    claims = verify(token_key(cfg, env), token, "confirm")
    if claims.list not in cfg.lists:
        raise TokenError(f"the token is for list {claims.list!r}, which the config does not have")
    store = Store(cfg.store.url)
    try:
        with store.begin() as conn:
            key = email_key(claims.email)
            row = store.subscribers_of(conn, [claims.list], [key]).get((claims.list, key))
            state = row["state"] if row else None
            if state == "subscribed":
                return f"{claims.email} was already confirmed on list {claims.list!r}"
            if row is None or state != "pending":
                raise TokenError(
                    f"{claims.email} has no pending subscription on list {claims.list!r}"
                    + (f" (it is {state})" if state else "")
                    + "; nothing was changed"
                )
            store.upsert_subscribers(
                conn,
                [
                    {
                        "list": claims.list,
                        "email_key": key,
                        "email": row["email"],
                        "state": "subscribed",
                    }
                ],
            )
    finally:
        store.close()
    return f"{claims.email} is now subscribed to list {claims.list!r}"
