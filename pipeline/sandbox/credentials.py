"""What a run needs to reach the sandbox: its URLs and credentials, as ``export`` lines.

The credentials are derived (HMAC-SHA256) from a random secret kept in the
store's ``meta`` table, created on first use: they stay the same for a given
config and store, so ``mailpipe sandbox --print-env`` and a sandbox started
later with the same arguments agree.

The lines point a run at the sandbox through the config's own environment
overrides (``MAILPIPE_<SECTION>_<KEY>``) and the variables the config names
for its secrets::

    export MAILPIPE_DELIVERY_HTTP_YESMAIL_URL=http://127.0.0.1:8025
    export MAILPIPE_JOBS_ORDER_CONFIRMATION_TRIGGER_URL='http://127.0.0.1:8025/trigger/order-confirmation?token={token}'
    export MAILPIPE_TOKEN_ORDER_CONFIRMATION=…
    export YESMAIL_API_USER=mailpipe
    export YESMAIL_API_KEY=…
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import shlex
from dataclasses import dataclass

import sqlalchemy as sa

from pipeline.config import MailpipeConfig
from pipeline.store import Store, meta

__all__ = ["Credentials", "env_lines", "export_text", "load_credentials", "trigger_path"]

_SECRET_KEY = "sandbox_secret"
INBOXFIRST_USER = "1"  # the documents' Basic-auth user id


@functools.lru_cache(maxsize=64)
def _derive(secret: str, purpose: str, size: int) -> str:
    """One credential; cached: every request to the sandbox checks one."""
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).hexdigest()[:size]


@dataclass(frozen=True)
class Credentials:
    """The sandbox's secrets, all derived from one store secret."""

    secret: str
    api_user: str

    def _derive(self, purpose: str, size: int = 40) -> str:
        return _derive(self.secret, purpose, size)

    def token(self, job: str) -> str:
        """The security token of an on-demand job's trigger URL."""
        return self._derive(f"maestro-token:{job}")

    @property
    def api_key(self) -> str:
        return self._derive("yesmail-api-key")

    @property
    def inboxfirst_user(self) -> str:
        return INBOXFIRST_USER

    @property
    def inboxfirst_key(self) -> str:
        return self._derive("inboxfirst-api-key")


def load_credentials(store: Store, cfg: MailpipeConfig) -> Credentials:
    """The store's sandbox secret (made on first use) and the credentials it gives."""
    with store.begin() as conn:
        row = conn.execute(sa.select(meta.c.value).where(meta.c.key == _SECRET_KEY)).first()
        if row is None:
            value = secrets.token_hex(32)
            conn.execute(meta.insert().values(key=_SECRET_KEY, value=value))
        else:
            value = str(row[0])
    return Credentials(value, cfg.simulate.api_user)


def _env_name(job: str) -> str:
    return job.upper().replace("-", "_")


def trigger_path(job: str) -> str:
    return f"/trigger/{job}"


def env_lines(cfg: MailpipeConfig, base: str, creds: Credentials) -> list[tuple[str, str]]:
    """(name, value) for everything a run (and ``mailpipe lists``) needs to use the sandbox."""
    http = cfg.delivery.http
    out = [
        ("MAILPIPE_DELIVERY_HTTP_YESMAIL_URL", base),
        ("MAILPIPE_DELIVERY_HTTP_MAESTRO_URL", base),
        ("MAILPIPE_DELIVERY_HTTP_INBOXFIRST_URL", base),
    ]
    for name, job in cfg.jobs.items():
        key = f"MAILPIPE_JOBS_{_env_name(name)}"
        if job.target == "maestro-ondemand":
            token_env = job.token_env or f"MAILPIPE_TOKEN_{_env_name(name)}"
            out.append((f"{key}_TRIGGER_URL", f"{base}{trigger_path(name)}?token={{token}}"))
            if job.token_env is None:
                out.append((f"{key}_TOKEN_ENV", token_env))
            out.append((token_env, creds.token(name)))
        elif job.target == "maestro-subscribe":
            out.append((f"{key}_SUBSCRIBE_URL", base))
    out += [
        (http.api_user_env, creds.api_user),
        (http.api_key_env, creds.api_key),
        (http.inboxfirst_user_env, creds.inboxfirst_user),
        (http.inboxfirst_key_env, creds.inboxfirst_key),
    ]
    return out


def export_text(lines: list[tuple[str, str]]) -> str:
    """``export NAME=value`` lines, quoted for the shell (``eval "$(…)"``)."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in lines)
