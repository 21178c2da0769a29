"""``mailpipe smtp check``: what the relay offers, and whether the config can work with it.

It connects as a run would (TLS as configured, the credentials from the
environment), reads the EHLO answer, logs in when credentials are set, and
quits: no message is sent.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiosmtplib

from pipeline.config import MailpipeConfig
from pipeline.deliver.smtpconn import Capabilities, SmtpSettings, describe_error, login, tls_error

__all__ = ["CheckReport", "check_smtp"]


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, name: str, text: str) -> None:
        self.lines.append(f"  {name:<11} {text}")


def check_smtp(cfg: MailpipeConfig, env: Mapping[str, str] | None = None) -> CheckReport:
    """Probe the configured relay. Raises :class:`~pipeline.errors.ConfigError` when a
    credential named by the config is missing from the environment."""
    settings = SmtpSettings.from_config(cfg, env)
    return asyncio.run(_check(settings))


async def _check(settings: SmtpSettings) -> CheckReport:
    report = CheckReport([f"smtp {settings.where}, security {settings.security}"])
    smtp = settings.client()
    try:
        greeting = await smtp.connect()
        report.add("greeting", f"{greeting.code} {greeting.message}")
        await smtp.ehlo()
        await _security(smtp, settings, report)
        if report.ok:
            _offers(Capabilities.of(smtp), report)
            await _login(smtp, settings, report)
        await smtp.quit()
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as e:
        tls = tls_error(e)
        what = f"TLS failed ({tls.reason or tls})" if tls else describe_error(e)
        report.problems.append(f"cannot talk to the server: {what}")
    finally:
        smtp.close()
    return report


async def _security(smtp: aiosmtplib.SMTP, settings: SmtpSettings, report: CheckReport) -> None:
    offered = smtp.supports_extension("starttls")
    if settings.security == "starttls":
        if not offered:
            report.add("STARTTLS", "not offered")
            report.problems.append(
                'security = "starttls" but the server does not offer STARTTLS; '
                'use security = "tls" if it speaks TLS at once'
            )
            return
        await smtp.starttls()
        await smtp.ehlo()
    if settings.security == "none":
        report.add("TLS", "not used (security none)" + ("; STARTTLS offered" if offered else ""))
        return
    obj = smtp.get_transport_info("ssl_object")
    if isinstance(obj, ssl.SSLObject):
        cipher = obj.cipher()
        report.add(
            "TLS",
            f"{obj.version()} ({cipher[0] if cipher else '?'}), certificate verified"
            + (" (via STARTTLS)" if settings.security == "starttls" else ""),
        )


def _offers(caps: Capabilities, report: CheckReport) -> None:
    report.add(
        "PIPELINING",
        "offered" if caps.pipelining else "not offered: one command at a time (slower)",
    )
    report.add(
        "SMTPUTF8",
        "offered"
        if caps.smtputf8
        else "not offered: addresses with a non-ASCII local part will fail",
    )
    report.add("SIZE", f"{caps.size} bytes at most" if caps.size else "no limit announced")
    report.add("8BITMIME", "offered" if caps.eightbitmime else "not offered (not needed)")


async def _login(smtp: aiosmtplib.SMTP, settings: SmtpSettings, report: CheckReport) -> None:
    methods = " ".join(m.upper() for m in smtp.server_auth_methods)
    if settings.username is None:
        report.add("AUTH", f"{methods or 'not offered'}; no credentials configured")
        return
    if not smtp.supported_auth_methods:
        report.add("AUTH", methods or "not offered")
        report.problems.append("credentials are set, but the server offers no usable AUTH")
        return
    try:
        await login(smtp, settings)
    except aiosmtplib.SMTPAuthenticationError as e:
        report.add("AUTH", f"{methods}; login refused")
        report.problems.append(
            f"the server refused the login ({e.code} {e.message}); check "
            f"${settings.username_env} and ${settings.password_env}"
        )
        return
    report.add("AUTH", f"{methods}; logged in with ${settings.username_env}")
