"""``mailpipe sandbox`` and ``mailpipe lists``: the commands of HTTP delivery.

``sandbox`` serves the platforms' documented endpoints locally (see
:mod:`pipeline.sandbox`); ``lists`` keeps the InboxFirst mailing lists in step
with the config (see :mod:`pipeline.inboxfirst`).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import click
import orjson

from pipeline.cli import EXIT_ROWS_FAILED, config_option, handle_errors
from pipeline.config import MailpipeConfig, load_config

__all__ = ["register"]


@click.command()
@config_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8025,
    show_default=True,
    help="Port to listen on (0: any free port, printed at start).",
)
@click.option(
    "--latency",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds to wait before answering each request.",
)
@click.option(
    "--fail-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Share of requests answered with --fail-status instead (to exercise retries).",
)
@click.option(
    "--fail-status",
    type=click.IntRange(400, 599),
    default=503,
    show_default=True,
    help="HTTP status of the injected failures (503, 429, 500, ...).",
)
@click.option(
    "--retry-after",
    type=click.FloatRange(min=0),
    default=None,
    help="Send Retry-After: SECONDS with each injected failure.",
)
@click.option(
    "--print-env",
    is_flag=True,
    help="Print the export lines that point a run at this sandbox, and exit.",
)
@handle_errors
def sandbox(
    config_path: str,
    host: str,
    port: int,
    latency: float,
    fail_rate: float,
    fail_status: int,
    retry_after: float | None,
    print_env: bool,
) -> None:
    """Serve the platforms' HTTP APIs locally, over the engine and the config's store.

    Maestro trigger URLs (one per on-demand job, with its security token) and
    addSubscriberExternally.do, Yesmail /v2/emails/send with tickets and async
    results, InboxFirst /ga/api/v2/mailing_lists. At start it prints, as
    `export NAME=value` lines, the environment that sends a run here; the
    credentials are stable for a config and store, so

        eval "$(mailpipe sandbox --print-env)"
        mailpipe run --mode http

    works against a sandbox started with the same --config, --host and --port.
    """
    from pipeline.sandbox.credentials import env_lines, export_text, load_credentials
    from pipeline.sandbox.server import SandboxOptions
    from pipeline.store import Store

    cfg = load_config(config_path)
    if print_env:
        if port == 0:
            raise click.UsageError("--print-env needs the port the sandbox will use: --port N")
        store = Store(cfg.store.url)
        try:
            creds = load_credentials(store, cfg)
        finally:
            store.close()
        click.echo(export_text(env_lines(cfg, _base(host, port), creds)), nl=False)
        return
    options = SandboxOptions(
        latency=latency, fail_rate=fail_rate, fail_status=fail_status, retry_after=retry_after
    )
    asyncio.run(_serve(cfg, options, host, port))


def _base(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _serve(cfg: MailpipeConfig, options: Any, host: str, port: int) -> None:
    from pipeline.sandbox.credentials import export_text
    from pipeline.sandbox.server import Sandbox

    box = Sandbox(cfg, options)
    try:
        base = await box.start(host, port)
    except OSError as e:
        await box.stop()
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sys.stdout.write(export_text(box.env()))
    sys.stdout.flush()
    click.echo(f"mailpipe sandbox: serving {base} (Ctrl-C stops)", err=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await box.stop()
    click.echo("mailpipe sandbox: stopped", err=True)


@click.group()
def lists() -> None:
    """InboxFirst mailing lists: the config's [lists.*] against the platform.

    Lists are matched by name. Credentials: Basic auth from the variables named
    by delivery.http.inboxfirst_user_env / inboxfirst_key_env.
    """


@lists.command("pull")
@config_option
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the records to this file instead of stdout.",
)
@handle_errors
def lists_pull(config_path: str, out: str | None) -> None:
    """Fetch the platform's mailing lists; print their records as JSON."""
    from pipeline.inboxfirst import pull_lists

    records = pull_lists(load_config(config_path))
    text = orjson.dumps(records, option=orjson.OPT_INDENT_2).decode() + "\n"
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
        click.echo(f"{len(records)} mailing lists written to {out}", err=True)
    else:
        click.echo(text, nl=False)


@lists.command("show")
@config_option
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@handle_errors
def lists_show(config_path: str, names: tuple[str, ...], as_json: bool) -> None:
    """Compare the config's lists (or NAMEs) with the platform; changes nothing.

    Exits 1 when some list is missing or differs (push would change it).
    """
    from pipeline.inboxfirst import show_lists

    results = show_lists(load_config(config_path), names)
    if as_json:
        click.echo(orjson.dumps([r.__dict__ for r in results], option=orjson.OPT_INDENT_2))
    else:
        click.echo(f"{'list':<20} {'name':<28} {'id':>6}  state")
        for r in results:
            state = r.action + (f": {', '.join(r.changed)}" if r.changed else "")
            click.echo(f"{r.key:<20} {r.name:<28} {r.id if r.id is not None else '-':>6}  {state}")
    if any(r.action != "unchanged" for r in results):
        sys.exit(EXIT_ROWS_FAILED)


@lists.command("push")
@config_option
@click.argument("names", nargs=-1, metavar="[NAME]...")
@handle_errors
def lists_push(config_path: str, names: tuple[str, ...]) -> None:
    """Create or update the config's lists (or NAMEs) on the platform.

    Checks first what the API would refuse (autowinner percentage with more
    than two decimals, both seed-list keys, custom_headers_enabled without
    custom_headers) and sends nothing if a list has such a problem.
    """
    from pipeline.inboxfirst import push_lists

    for r in push_lists(load_config(config_path), names):
        detail = f" ({', '.join(r.changed)})" if r.changed else ""
        click.echo(f"{r.action:<9} {r.key} ({r.name!r}, id {r.id}){detail}")


@lists.command("delete")
@config_option
@click.argument("ident", metavar="NAME|ID")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@handle_errors
def lists_delete(config_path: str, ident: str, yes: bool) -> None:
    """Delete a mailing list on the platform (config list name, list name or id).

    The platform deletes its subscribers too. Two steps, as documented: a
    confirmation code is requested and sent back at once; asks first unless --yes.
    """
    from pipeline.inboxfirst import delete_list

    def confirm(record: dict[str, Any]) -> bool:
        if yes:
            return True
        return click.confirm(
            f"Delete mailing list {record.get('name')!r} (id {record.get('id')}) and all its "
            "subscribers on the platform?",
            default=False,
        )

    deleted = delete_list(load_config(config_path), ident, confirm)
    if deleted is None:
        click.echo("nothing deleted", err=True)
        sys.exit(EXIT_ROWS_FAILED)
    click.echo(f"deleted mailing list {deleted.get('name')!r} (id {deleted.get('id')})")


def register(main: click.Group) -> None:
    main.add_command(sandbox)
    main.add_command(lists)
