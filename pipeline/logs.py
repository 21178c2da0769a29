"""Logging to stderr: readable lines on a terminal, JSON lines under ``--log-json``.

Also the progress display: a rich progress bar when stderr is a terminal,
nothing otherwise (cron mail stays quiet).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

__all__ = ["configure_logging", "progress_display"]

log = logging.getLogger("mailpipe")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields."""

    _skip = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


def configure_logging(json_lines: bool = False, verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("mailpipe: %(levelname)s: %(message)s")
    )
    root = logging.getLogger("mailpipe")
    root.handlers[:] = [handler]
    # a terminal gets warnings only; structured logs (cron, containers) get the run's events too
    root.setLevel(logging.DEBUG if verbose else logging.INFO if json_lines else logging.WARNING)
    root.propagate = False


@contextmanager
def progress_display(enabled: bool) -> Iterator[Any]:
    """Yield a ``progress(stage, rows)`` callback; draws bars only when ``enabled``."""
    if not enabled:
        yield lambda stage, rows: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(stage: str, rows: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=None)
        bars.advance(tasks[stage], rows)

    with bars:
        yield update
