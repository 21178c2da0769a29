"""What smtp mode needs from the config, checked without reading any file.

:func:`smtp_problems` runs with every config check (it is part of
:func:`pipeline.config._cross_check`); :func:`smtp_job_problems` also runs
when a job's smtp backend starts, so a ``--mode smtp`` override is checked
before anything is sent. Every problem is ``(dotted key, what to write)``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping

from pipeline.config import JobConfig, JobPlan, ListConfig, MailpipeConfig
from pipeline.errors import ConfigError

__all__ = [
    "RESERVED_HEADERS",
    "custom_headers",
    "effective_rate",
    "is_loopback",
    "require_env",
    "smtp_job_problems",
    "smtp_problems",
    "template_name",
    "transactional",
]

# headers mailpipe writes itself: a list's custom headers may not add a second one
RESERVED_HEADERS = frozenset(
    {
        "bcc",
        "cc",
        "content-transfer-encoding",
        "content-type",
        "date",
        "from",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "message-id",
        "mime-version",
        "reply-to",
        "return-path",
        "sender",
        "subject",
        "to",
    }
)
_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ADDRESS = re.compile(r'[^\s<>()\[\]@,;:\\"\x00-\x1f\x7f]+@[^\s<>()\[\]@,;:\\"\x00-\x1f\x7f]+')
Problem = tuple[str, str]


def is_loopback(host: str) -> bool:
    """``localhost``, ``127.0.0.0/8`` or ``::1``: traffic that never leaves the machine."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def transactional(job: JobConfig) -> bool:
    """A transactional message carries no List-Unsubscribe (RFC 8058 is for mailings).

    A double opt-in confirmation is always transactional: its reader is not
    subscribed yet.
    """
    return job.target == "maestro-subscribe" or job.transactional


def template_name(cfg: MailpipeConfig, job_name: str) -> str:
    """The job's template: for Yesmail ``template_ids[templateId]`` (else a directory named
    by the templateId); else ``template``, or the Maestro mail job (on-demand) or the job's
    own name."""
    job = cfg.jobs[job_name]
    if job.target == "yesmail-send":
        tid = job.templateId or ""
        return cfg.delivery.smtp.template_ids.get(tid, tid)
    if job.template:
        return job.template
    return (job.mail_job or job_name) if job.target == "maestro-ondemand" else job_name


def effective_rate(cfg: MailpipeConfig, plan: JobPlan) -> float:
    """Messages per second for the job: the lower of ``rate`` and the list's ``d_speed``
    (0 in either means no limit from it)."""
    limits = [r for r in (cfg.delivery.smtp.rate, float(plan.lst.d_speed)) if r > 0]
    return min(limits) if limits else 0.0


def custom_headers(lst: ListConfig) -> list[tuple[str, str]]:
    """The list's custom headers as (name, value), when they are enabled."""
    if not lst.custom_headers_enabled:
        return []
    out = []
    for line in lst.custom_headers.splitlines():
        if line.strip():
            name, _, value = line.partition(":")
            out.append((name, value.strip()))
    return out


def require_env(key: str, name: str, env: Mapping[str, str] | None = None) -> str:
    """The secret in environment variable ``name`` (config key ``key`` names it)."""
    value = (os.environ if env is None else env).get(name)
    if not value:
        raise ConfigError(key, f"environment variable {name} is not set; export it before the run")
    return value


def smtp_problems(cfg: MailpipeConfig) -> list[Problem]:
    """Problems of ``[delivery.smtp]``, of the jobs' ``template`` keys and of the lists'
    custom headers; in smtp mode also what each enabled job needs."""
    smtp = cfg.delivery.smtp
    key = "delivery.smtp"
    out: list[Problem] = []
    if smtp.security == "none" and not smtp.allow_insecure and not is_loopback(smtp.host):
        out.append(
            (
                f"{key}.security",
                f'"none" sends passwords and messages in clear text, so only to a loopback '
                f'address (127.0.0.1, ::1, localhost), not {smtp.host!r}; use "starttls" '
                'or "tls", or set allow_insecure = true',
            )
        )
    if bool(smtp.username_env) != bool(smtp.password_env):
        missing = "password_env" if smtp.username_env else "username_env"
        out.append(
            (f"{key}.{missing}", "give both username_env and password_env (AUTH), or neither")
        )
    for name in ("confirm_url", "unsubscribe_url"):
        url = getattr(smtp, name)
        if url is None:
            continue
        if "{token}" not in url:
            out.append(
                (
                    f"{key}.{name}",
                    f'must contain {{token}}, e.g. "https://shop.example.com/{name[:-4]}?t={{token}}"',
                )
            )
        elif not url.startswith("https://") and not (
            name == "confirm_url" and url.startswith("http://")
        ):
            why = " (RFC 8058 one-click needs HTTPS)" if name == "unsubscribe_url" else ""
            out.append((f"{key}.{name}", f"must be an https:// URL{why}"))
    for tid, tname in smtp.template_ids.items():
        if not _TEMPLATE_NAME.match(tname):
            out.append((f"{key}.template_ids.{tid}", _bad_name(tname)))
    for job_name, job in cfg.jobs.items():
        if job.template is None:
            continue
        if job.target == "yesmail-send":
            out.append(
                (
                    f"jobs.{job_name}.template",
                    "yesmail-send jobs choose their template by templateId; remove template and "
                    f'map the id in [delivery.smtp.template_ids]: "{job.templateId}" = "NAME"',
                )
            )
        elif not _TEMPLATE_NAME.match(job.template):
            out.append((f"jobs.{job_name}.template", _bad_name(job.template)))
    for list_name, lst in cfg.lists.items():
        for hname, value in custom_headers(lst):
            if hname.lower() in RESERVED_HEADERS:
                out.append(
                    (
                        f"lists.{list_name}.custom_headers",
                        f"{hname} is written by mailpipe itself; remove it or use an X- header",
                    )
                )
            elif not value.isascii():
                out.append(
                    (
                        f"lists.{list_name}.custom_headers",
                        f"the value of {hname} is not ASCII; write it in ASCII",
                    )
                )
    if cfg.delivery.mode == "smtp":
        for job_name, job in cfg.jobs.items():
            if job.enabled and job.source in cfg.sources and job.list in cfg.lists:
                out += smtp_job_problems(cfg, job_name)
    return out


def smtp_job_problems(cfg: MailpipeConfig, job_name: str) -> list[Problem]:
    """What one job needs to be sent over SMTP besides its template: its list's addresses
    (they go into SMTP commands and headers) and its links' settings."""
    job = cfg.jobs[job_name]
    smtp = cfg.delivery.smtp
    out: list[Problem] = _address_problems(job.list, cfg.lists[job.list])
    if job.target == "maestro-subscribe" and not smtp.confirm_url:
        out.append(
            (
                "delivery.smtp.confirm_url",
                f"job {job_name!r} sends double opt-in confirmations in smtp mode; set "
                'confirm_url = "https://shop.example.com/confirm?t={token}"',
            )
        )
    if not transactional(job) and not smtp.unsubscribe_url:
        out.append(
            (
                "delivery.smtp.unsubscribe_url",
                f"job {job_name!r} is not transactional, so its messages carry List-Unsubscribe; "
                'set unsubscribe_url = "https://shop.example.com/unsubscribe?t={token}" '
                f"(or transactional = true on the job)",
            )
        )
    return out


def _address_problems(list_name: str, lst: ListConfig) -> list[Problem]:
    """The list's addresses go into SMTP commands and headers: one plain address each
    (internal domains such as ``.test`` or ``.internal`` are fine)."""
    out: list[Problem] = []
    if "\r" in lst.d_from_name or "\n" in lst.d_from_name:
        out.append((f"lists.{list_name}.d_from_name", "must be one line (it goes into From:)"))
    for key in ("d_from_email", "d_sender_email", "d_reply_to", "d_bounce_email"):
        address = getattr(lst, key)
        if address and not _ADDRESS.fullmatch(address):
            out.append(
                (
                    f"lists.{list_name}.{key}",
                    f"{address!r} is not an email address; write one address, e.g. "
                    '"news@shop.example.com"',
                )
            )
    return out


def _bad_name(name: str) -> str:
    return (
        f"{name!r} is not a template name; write the name of a directory under "
        "delivery.smtp.templates (letters, digits, '.', '_', '-')"
    )
