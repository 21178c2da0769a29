"""``mailpipe smtp check`` and ``mailpipe confirm``: the commands of SMTP delivery.

``smtp check`` says what the relay offers and whether the config can work
with it (see :mod:`pipeline.deliver.smtpcheck`); ``confirm`` completes a
double opt-in from the token of a confirmation link (see
:mod:`pipeline.mail.tokens`).
"""

from __future__ import annotations

import sys

import click

from pipeline.cli import EXIT_ROWS_FAILED, config_option, handle_errors
from pipeline.config import load_config

__all__ = ["register"]


@click.group()
def smtp() -> None:
    """SMTP delivery ([delivery] mode = "smtp"): check the relay."""


@smtp.command("check")
@config_option
@handle_errors
def smtp_check(config_path: str) -> None:
    """Connect to the configured relay and say what it offers (STARTTLS, AUTH, SMTPUTF8,
    PIPELINING, SIZE) and whether the config can work with it. Sends nothing.

    Exit 0 when mailpipe can send through it, 1 when it cannot (the message
    says why), 2 on a config error (e.g. a credential missing from the
    environment).
    """
    from pipeline.deliver.smtpcheck import check_smtp

    report = check_smtp(load_config(config_path))
    for line in report.lines:
        click.echo(line)
    for problem in report.problems:
        click.echo(f"mailpipe: smtp: cannot work: {problem}", err=True)
    if not report.ok:
        sys.exit(EXIT_ROWS_FAILED)
    click.echo("ok: mailpipe can send through this server (nothing was sent)")


@click.command()
@config_option
@click.argument("token")
@handle_errors
def confirm(config_path: str, token: str) -> None:
    """Confirm a double opt-in: TOKEN is the t= value of the confirmation link.

    The subscriber becomes subscribed. Exit 0 when confirmed (or already
    confirmed), 1 when the token is refused (forged, damaged, expired, or no
    pending subscription), 2 on a config error (e.g. the signing key is not in
    the environment).
    """
    from pipeline.mail.tokens import TokenError, confirm_subscription

    try:
        click.echo(confirm_subscription(load_config(config_path), token))
    except TokenError as e:
        click.echo(f"mailpipe: confirm: refused: {e.message}", err=True)
        sys.exit(EXIT_ROWS_FAILED)


def register(main: click.Group) -> None:
    main.add_command(smtp)
    main.add_command(confirm)
