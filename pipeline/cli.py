"""The ``mailpipe`` command: parse options, call one library function, map the outcome.

Exit codes (for cron and scripts)::

    0  every row completed or was ignored (nothing to do is also 0)
    1  some row failed or was rejected, or an input file could not be read
    2  usage or config error: nothing was sent
    3  internal error: a bug; the message says where to look
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click
import orjson

from pipeline import __version__
from pipeline.config import MailpipeConfig, check_config, load_config
from pipeline.errors import ConfigError, MailpipeError
from pipeline.logs import configure_logging, progress_display
from pipeline.run import RunOptions, RunOutcome, open_run, outcome_of, run_pipeline, run_stage
from pipeline.rundir import STAGES, RunDir

if TYPE_CHECKING:
    from pipeline.store import Store
    from pipeline.subscribers import ImportReport

__all__ = ["main"]

log = logging.getLogger("mailpipe")
F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_CONFIG = "configs/mailpipe.toml"
EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def config_option(f: F) -> F:
    return click.option(
        "--config",
        "config_path",
        envvar="MAILPIPE_CONFIG",
        default=DEFAULT_CONFIG,
        show_default=True,
        type=click.Path(dir_okay=False),
        help="TOML config file (env MAILPIPE_CONFIG).",
    )(f)


def mode_option(f: F) -> F:
    return click.option(
        "--mode",
        type=click.Choice(["simulate", "http", "smtp"]),
        default=None,
        help="Delivery mode, overriding [delivery] mode.",
    )(f)


def ledger_options(f: F) -> F:
    f = click.option(
        "--in-doubt",
        type=click.Choice(["skip", "resend"]),
        default="skip",
        show_default=True,
        help="Records a crashed run may or may not have sent: leave them (skip) or send again.",
    )(f)
    f = click.option(
        "--resend",
        multiple=True,
        metavar="JOB",
        help="Send this job's records again even when the ledger has them (repeatable).",
    )(f)
    return f


def output_options(f: F) -> F:
    f = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print the summary as JSON (with the run directory) on stdout.",
    )(f)
    f = click.option("--log-json", is_flag=True, help="Log JSON lines to stderr.")(f)
    return f


def handle_errors(f: F) -> F:
    """Library errors become one line on stderr and exit code 2; bugs exit 3."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipeline.lock import LockHeld

        try:
            return f(*args, **kwargs)
        except LockHeld as e:
            # overlapping cron runs are normal: the one holding the lock does the work
            click.echo(f"mailpipe: {e.message}", err=True)
            sys.exit(EXIT_OK)
        except MailpipeError as e:
            click.echo(f"mailpipe: error: {e.message}", err=True)
            sys.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            click.echo("mailpipe: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader of our output went away (`| head`)
            _quiet_stdout()
            sys.exit(EXIT_ROWS_FAILED)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except Exception as e:
            log.exception("internal error")
            click.echo(
                f"mailpipe: internal error: {type(e).__name__}: {e} "
                "(this is a bug; the traceback is above)",
                err=True,
            )
            sys.exit(EXIT_INTERNAL)

    return wrapper  # type: ignore[return-value]


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def wants_progress(log_json: bool = False) -> bool:
    """Whether to draw progress bars: only when stdout and stderr are both terminals.

    The bars go to stderr, but stdout decides too: `mailpipe run --json > out.json`
    or `| jq` on a terminal is a script reading the output, and cron captures
    both. With `--log-json` stderr carries JSON lines, which bars would break.
    """
    return not log_json and sys.stdout.isatty() and sys.stderr.isatty()


def _load(config_path: str, mode: str | None = None) -> MailpipeConfig:
    cfg = load_config(config_path)
    if mode:
        cfg = cfg.model_copy(update={"delivery": cfg.delivery.model_copy(update={"mode": mode})})
    return cfg


def _finish(outcome: RunOutcome, as_json: bool) -> None:
    summary = dict(outcome.summary)
    summary["run_dir"] = str(outcome.run.path)
    try:
        if as_json:
            click.echo(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
        else:
            _print_summary(summary)
    except BrokenPipeError:  # `mailpipe run | head`: the run is done all the same
        _quiet_stdout()
    for path in outcome.failed_files:
        err = next(i["error"] for i in summary.get("inputs", []) if i["path"] == path)
        click.echo(f"mailpipe: file failed: {err}", err=True)
    sys.exit(outcome.exit_code)


def _print_summary(summary: dict[str, Any]) -> None:
    rows = summary.get("rows")
    if rows is not None:
        status = summary.get("status", {})
        click.echo(
            f"{rows} rows: "
            + ", ".join(f"{status.get(s, 0)} {s}" for s in ("completed", "failed", "ignored"))
        )
        for job, c in summary.get("jobs", {}).items():
            codes = ", ".join(f"{k} {v}" for k, v in sorted(c.get("codes", {}).items()))
            st = c.get("status", {})
            parts = ", ".join(
                f"{st[s]} {s}" for s in ("completed", "failed", "ignored") if st.get(s)
            )
            line = f"  {job} ({c['target']}): {c['rows']} rows"
            click.echo(line + (f" ({parts})" if parts else "") + (f"; {codes}" if codes else ""))
    click.echo(f"run directory: {summary['run_dir']}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mailpipe")
def main() -> None:
    """Turn order and signup files into documented email-platform payloads.

    Every input row ends as one line of results.jsonl in the run directory.
    Start with `mailpipe config check`, then `mailpipe run`.
    """


@main.command()
@config_option
@click.option(
    "--job",
    "jobs",
    multiple=True,
    metavar="NAME",
    help="Run this job (repeatable). Default: every enabled job.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Where run directories go (default: [run] out, 'out').",
)
@mode_option
@click.option(
    "--until",
    type=click.Choice(list(STAGES)),
    default="report",
    show_default=True,
    help="Stop after this stage (e.g. 'build' to inspect payloads without sending).",
)
@ledger_options
@output_options
@click.argument("inputs", nargs=-1, type=click.Path(dir_okay=False))
@handle_errors
def run(
    config_path: str,
    jobs: tuple[str, ...],
    out: str | None,
    mode: str | None,
    until: str,
    resend: tuple[str, ...],
    in_doubt: str,
    as_json: bool,
    log_json: bool,
    inputs: tuple[str, ...],
) -> None:
    """Run the jobs: extract, normalize, build, deliver, report.

    INPUTS, when given, replace the source's path glob. Records the ledger
    already settled are not sent again (they come back ignored, with the
    earlier answer); records a crashed run left in doubt are resolved first.
    """
    configure_logging(log_json)
    cfg = _load(config_path, mode)
    _check_resend(cfg, resend)
    options = RunOptions(resend=resend, in_doubt=in_doubt)
    with progress_display(wants_progress(log_json)) as progress:
        outcome = run_pipeline(
            cfg, jobs or None, inputs, out, until=until, progress=progress, options=options
        )
    log.info(
        "run finished",
        extra={"run_dir": str(outcome.run.path), "status": outcome.summary.get("status", {})},
    )
    _finish(outcome, as_json)


@main.command()
@config_option
@click.option("--job", "job", required=True, metavar="NAME", help="The job to replay.")
@click.option(
    "--since",
    required=True,
    metavar="DATE",
    help="First created-at taken (ISO 8601 date or time, UTC when no zone).",
)
@click.option(
    "--until",
    "until_",
    required=True,
    metavar="DATE",
    help="First created-at no longer taken (the window is [since, until)).",
)
@click.option(
    "--dry-run", is_flag=True, help="Simulate, write the run directory, send and store nothing."
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.001),
    default=None,
    metavar="N",
    help="At most N recipients a second.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Where run directories go (default: [run] out).",
)
@click.option(
    "--in-doubt",
    type=click.Choice(["skip", "resend"]),
    default="skip",
    show_default=True,
    help="Records a crashed run may have sent: skip or resend.",
)
@output_options
@click.argument("inputs", nargs=-1, type=click.Path(dir_okay=False))
@handle_errors
def backfill(
    config_path: str,
    job: str,
    since: str,
    until_: str,
    dry_run: bool,
    rate: float | None,
    out: str | None,
    in_doubt: str,
    as_json: bool,
    log_json: bool,
    inputs: tuple[str, ...],
) -> None:
    """Replay historical files through a job, taking rows created in [--since, --until).

    Rows outside the window come back ignored. Run it again with the same
    arguments after an interruption: the ledger skips what was already sent.
    """
    configure_logging(log_json)
    cfg = _load(config_path)
    if job not in cfg.jobs:
        raise ConfigError("--job", f"no job {job!r}; choose from {', '.join(cfg.jobs)}")
    if not cfg.sources[cfg.jobs[job].source].created_at:
        raise ConfigError(
            f"sources.{cfg.jobs[job].source}.created_at",
            "backfill selects rows by created-at: map that column on the source",
        )
    window = (_epoch(since, "--since"), _epoch(until_, "--until"))
    if window[0] >= window[1]:
        raise ConfigError("--until", "must be later than --since")
    options = RunOptions(in_doubt=in_doubt, window=window, dry_run=dry_run, rate=rate)
    with progress_display(wants_progress(log_json)) as progress:
        outcome = run_pipeline(cfg, [job], inputs, out, progress=progress, options=options)
    _finish(outcome, as_json)


@main.command()
@config_option
@click.option("--once", is_flag=True, help="One look, then exit (for cron).")
@click.option(
    "--settle",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="A file unchanged this long is complete (default: [watch] settle, 30).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=None,
    metavar="SECONDS",
    help="Without --once: look again after this long (default: [watch] interval, 10).",
)
@mode_option
@ledger_options
@output_options
@click.argument("drop_dir", type=click.Path(file_okay=False))
@handle_errors
def watch(
    config_path: str,
    once: bool,
    settle: float | None,
    interval: float | None,
    mode: str | None,
    resend: tuple[str, ...],
    in_doubt: str,
    as_json: bool,
    log_json: bool,
    drop_dir: str,
) -> None:
    """Run the files that land in DROP_DIR/incoming/.

    \b
    DROP_DIR/incoming/            put files here (NAME.part, then rename)
    DROP_DIR/processing/RUN_ID/   files being run
    DROP_DIR/done/                files that were read
    DROP_DIR/failed/              files refused or unreadable, each with NAME.error
    DROP_DIR/results/RUN_ID/      the run directory: results.jsonl, summary.json

    A file is taken once unchanged for the settle time, or at once when
    NAME.ready is there; dotfiles and *.part / *.tmp are left alone. The
    source (and so the jobs) is the one whose path glob matches the name.
    With --once, exit 0 when every taken row completed or was ignored
    (nothing to do, or another runner holding the directory, is also 0),
    1 when a file failed or a row failed.
    """
    from pipeline.watch import CycleReport
    from pipeline.watch import watch as watch_dir

    configure_logging(log_json)
    cfg = _load(config_path, mode)
    _check_resend(cfg, resend)
    options = RunOptions(resend=resend, in_doubt=in_doubt)

    def show(report: CycleReport) -> None:
        if as_json:
            click.echo(orjson.dumps(report.to_json()).decode())
            return
        if not (report.taken or report.failed or report.recovered):
            log.info("nothing to take", extra={"waiting": report.waiting})
            return
        log.info("watch cycle", extra=report.to_json())
        for name in report.done:
            click.echo(f"done: {name}")
        for why in report.failed.values():
            click.echo(f"failed: {why}")
        if report.run_dir:
            click.echo(f"run directory: {report.run_dir}")

    with progress_display(wants_progress(log_json)) as progress:
        code = watch_dir(
            cfg,
            drop_dir,
            once=once,
            settle=settle,
            interval=interval,
            on_cycle=show,
            progress=progress,
            options=options,
        )
    sys.exit(code)


def _epoch(text: str, option: str) -> int:
    import datetime as dt

    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            option, f"{text!r} is not a date; write e.g. 2026-01-31 or 2026-01-31T12:00:00Z"
        ) from None
    return int((t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp())


def _check_resend(cfg: MailpipeConfig, resend: tuple[str, ...]) -> None:
    for name in resend:
        if name not in cfg.jobs:
            raise ConfigError("--resend", f"no job {name!r}; choose from {', '.join(cfg.jobs)}")


def _stage_command(stage: str) -> None:
    @main.command(
        name=stage,
        help=f"Run the {stage} stage again on RUN_DIR (reads what the previous stage wrote there).",
    )
    @click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
    @click.option(
        "--config",
        "config_path",
        default=None,
        type=click.Path(dir_okay=False),
        help="Use this config instead of the one the run started with.",
    )
    @click.option(
        "--mode",
        type=click.Choice(["simulate", "http", "smtp"]),
        default=None,
        help="Delivery mode for this stage.",
    )
    @output_options
    @handle_errors
    def command(
        run_dir: str, config_path: str | None, mode: str | None, as_json: bool, log_json: bool
    ) -> None:
        configure_logging(log_json)
        cfg = _load(config_path) if config_path else None
        run_, cfg = open_run(run_dir, cfg)
        if mode:
            cfg = cfg.model_copy(
                update={"delivery": cfg.delivery.model_copy(update={"mode": mode})}
            )
        with progress_display(wants_progress(log_json)) as progress:
            run_stage(run_, cfg, stage, progress)
        if stage == "report":
            _finish(outcome_of(run_), as_json)
        click.echo(f"{stage}: completed in {run_.path}")

    _ = command


for _stage in STAGES:
    _stage_command(_stage)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option(
    "--json", "as_json", is_flag=True, help="Print the same counts as JSON (with the total)."
)
@handle_errors
def results(run_dir: str, as_json: bool) -> None:
    """Counts of RUN_DIR's results by job, status and code, with the total.

    The code is the platform's own: Maestro's `result`, a subscribe failure's
    `reason.type`, Yesmail's HTTP status with the ticket state (`202/completed`);
    empty for a row without one (a duplicate in the same run). Exit code as
    for the run: 1 when some row failed.
    """
    outcome = outcome_of(RunDir(run_dir))
    from pipeline.results import result_counts

    rows = result_counts(outcome.run)
    total = sum(r["rows"] for r in rows)
    if as_json:
        doc = {"run_dir": str(outcome.run.path), "counts": rows, "total": total}
        click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    else:
        _print_counts(rows, total)
    sys.exit(outcome.exit_code)


def _print_counts(rows: list[dict[str, Any]], total: int) -> None:
    """The counts as an aligned table, one line per (job, status, code), then the total."""
    head = ("job", "target", "status", "code", "rows")
    cells = [(r["job"], r["target"], r["status"], r["code"] or "", str(r["rows"])) for r in rows]
    foot = ("total", "", "", "", str(total))
    widths = [max(len(c[i]) for c in [head, *cells, foot]) for i in range(len(head))]
    for c in [head, *cells, foot]:
        click.echo(
            "  ".join(v.ljust(w) for v, w in zip(c[:-1], widths, strict=False))
            + "  "
            + c[-1].rjust(widths[-1])
        )


def _store(config_path: str) -> tuple[MailpipeConfig, Store]:
    from pipeline.store import Store  # SQLAlchemy is slow to import: only commands that use it

    cfg = load_config(config_path)
    return cfg, Store(cfg.store.url)


def _report_import(path: str, report: ImportReport) -> None:
    click.echo(report.line(path))
    for line, reason in report.rejects:
        click.echo(f"mailpipe: {path}:{line}: rejected: {reason}", err=True)
    if report.rejects:
        sys.exit(EXIT_ROWS_FAILED)


@main.group()
def subscribers() -> None:
    """Import and export the store's list subscribers (simulate and sandbox state)."""


@subscribers.command("import")
@config_option
@click.option(
    "--list",
    "list_name",
    default=None,
    metavar="NAME",
    help="The list the rows belong to (else the file's 'list' column).",
)
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def subscribers_import(config_path: str, list_name: str | None, file: str) -> None:
    """Add or update the subscribers of FILE (CSV or JSONL); bad rows are rejected.

    Columns: email, list, state (subscribed|pending|unsubscribed|bounced),
    bounces, suspended, subscriptions (Yesmail divisions, A|B), and the
    list's profile fields by name. Importing the same file again changes nothing.
    """
    cfg, store = _store(config_path)
    from pipeline.subscribers import import_subscribers

    _report_import(file, import_subscribers(store, cfg, file, list_name))


@subscribers.command("export")
@config_option
@click.option("--list", "list_name", required=True, metavar="NAME", help="The list to export.")
@handle_errors
def subscribers_export(config_path: str, list_name: str) -> None:
    """Write the list's subscribers to stdout as CSV (the import format)."""
    from pipeline.subscribers import export_subscribers

    cfg, store = _store(config_path)
    export_subscribers(store, cfg, list_name, sys.stdout)


@main.group()
def suppression() -> None:
    """The global suppression list."""


@suppression.command("import")
@config_option
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def suppression_import(config_path: str, file: str) -> None:
    """Add the addresses of FILE (columns email, reason, added_at) to the suppression list."""
    _, store = _store(config_path)
    from pipeline.subscribers import import_suppression

    _report_import(file, import_suppression(store, file))


@suppression.command("list")
@config_option
@handle_errors
def suppression_list(config_path: str) -> None:
    """Write the suppression list to stdout as CSV."""
    from pipeline.subscribers import write_suppression

    _, store = _store(config_path)
    write_suppression(store, sys.stdout)


@main.group()
def config() -> None:
    """Check the configuration."""


@config.command("check")
@config_option
def config_check(config_path: str) -> None:
    """Validate the config file (and MAILPIPE_* overrides); one line per problem."""
    problems = check_config(config_path, os.environ)
    if problems:
        for p in problems:
            click.echo(f"mailpipe: config: {p}", err=True)
        sys.exit(EXIT_USAGE)
    cfg = load_config(config_path)
    click.echo(
        f"{config_path}: ok ({len(cfg.lists)} lists, {len(cfg.sources)} sources, "
        f"{len(cfg.jobs)} jobs: {', '.join(cfg.jobs)})"
    )


# modules that keep their commands next to their feature; each has register(main)
COMMAND_MODULES: list[str] = ["pipeline.httpcli", "pipeline.smtpcli"]


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(main)


def entry() -> None:
    """The program (``python -m pipeline``): :func:`main`, then exit without the teardown.

    Once the command is done and the atexit handlers have run, freeing every
    module and object one by one only costs time (0.1 s a run, 3% of a build
    of a million rows). The exit code is the command's.
    """
    import atexit
    import gc

    # What start-up made lives to the end: out of the collector's sight. A run's threads
    # then make and drop millions of short-lived containers (parsed JSON, Python lists of
    # Arrow values); collected every 700 allocations, each full collection walking all that
    # is alive, they cost the simulate Yesmail stage 0.56 of every 0.70 s spent parsing a
    # chunk's 72,900 recipients. Collect the young generation every 50,000 instead.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    code = [EXIT_INTERNAL]

    def leave() -> None:  # registered first, so it runs after every other handler
        import contextlib

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code[0])

    atexit.register(leave)
    try:
        main()
    except SystemExit as e:
        code[0] = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        raise
    code[0] = EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    # ``python -m pipeline.cli``: run the importable copy, whose commands are registered
    from pipeline.cli import entry as _registered

    _registered()
else:
    _register_commands()
