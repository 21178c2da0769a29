"""The drop directory: files land in ``incoming/``, each ends in ``done/`` or ``failed/``.

Layout under DROP_DIR::

    incoming/                 producers put files here (write NAME.part, rename when done)
    processing/<run_id>/      files a run has claimed (an atomic rename out of incoming/)
    done/                     files that were read, whatever their rows' outcome
    failed/                   files that could not be taken or read, each with NAME.error
    results/<run_id>/         the run directory (results.jsonl, summary.json, ...)

A file is taken when it is complete: its name does not start with ``.`` and
does not end in ``.part`` or ``.tmp``, and it has not changed for the settle
time or its ``NAME.ready`` marker is there. Which source (and so which jobs)
a file feeds is decided by the config: the file name matches the file-name
part of the source's ``path`` glob.

One cycle at a time per drop directory on a SQLite store (a lock file; an
overlapping cron run leaves at once). With PostgreSQL several runners may
share a drop directory: the rename into ``processing/`` gives each file to
exactly one of them, and the ledger's claims keep every record single.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import MailpipeConfig
from pipeline.errors import ConfigError, MailpipeError
from pipeline.lock import RunLock, store_lock_path
from pipeline.run import run_pipeline, sources_for_name
from pipeline.rundir import new_run_id

__all__ = ["CycleReport", "DropDir", "watch"]

log = logging.getLogger("mailpipe.watch")

SUBDIRS = ("incoming", "processing", "done", "failed", "results")
IGNORED_SUFFIXES = (".part", ".tmp")
MARKER = ".ready"
# a processing/<run_id>/ left by a runner that died is given back after this long
ABANDONED_SECONDS = 120.0


@dataclass
class CycleReport:
    """What one look at the drop directory did."""

    run_id: str | None = None
    taken: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason
    waiting: list[str] = field(default_factory=list)  # not settled yet
    recovered: list[str] = field(default_factory=list)  # given back from a dead runner
    exit_code: int = 0
    run_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_dir": self.run_dir,
            "taken": self.taken,
            "done": self.done,
            "failed": self.failed,
            "waiting": self.waiting,
            "recovered": self.recovered,
        }


class DropDir:
    """The directory layout and the moves between its parts."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        path = Path(root)
        if path.is_symlink():
            raise ConfigError("DROP_DIR", f"{path} is a symlink; give the real directory")
        if not path.is_dir():
            raise ConfigError("DROP_DIR", f"{path}: no such directory; create it (mkdir -p)")
        self.root = path.resolve()
        for name in SUBDIRS:
            sub = self.root / name
            if sub.is_symlink():
                raise ConfigError(
                    "DROP_DIR", f"{sub} is a symlink; the drop directory's parts must be its own"
                )
            sub.mkdir(mode=0o700, exist_ok=True)

    def sub(self, name: str) -> Path:
        return self.root / name

    def lock_path(self) -> Path:
        return self.root / ".mailpipe-watch.lock"

    def park(self, src: Path, where: str, reason: str | None = None, run_id: str = "") -> Path:
        """Move ``src`` into done/ or failed/ (never over an existing file); a reason is
        written next to it as NAME.error."""
        dest = self._free(self.sub(where), src.name, run_id)
        os.rename(src, dest)
        if reason is not None:
            err = dest.with_name(dest.name + ".error")
            fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(reason.rstrip("\n") + "\n")
        return dest

    @staticmethod
    def _free(folder: Path, name: str, run_id: str) -> Path:
        dest = folder / name
        if not dest.exists() and not dest.is_symlink():
            return dest
        stem = f"{name}.{run_id}" if run_id else name
        for n in range(1, 10_000):
            alt = folder / (stem if n == 1 else f"{stem}.{n}")
            if not alt.exists() and not alt.is_symlink():
                return alt
        raise MailpipeError(f"{folder}: too many files named {name}; clear it out")


def _text_problem(path: Path, has_marker: bool) -> str | None:
    """Reasons a CSV/JSONL file cannot be taken as it is (Parquet checks its own footer)."""
    size = path.stat().st_size
    if size == 0:
        return f"{path.name}: file is empty (0 bytes); export it again with a header line"
    if path.suffix.lower() in (".parquet", ".pq"):
        with path.open("rb") as f:
            head = f.read(4)
            f.seek(max(0, size - 4))
            tail = f.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            return (
                f"{path.name}: not a complete Parquet file (no PAR1 magic at both ends); "
                "it may be half-written: upload it again as NAME.part and rename it when complete"
            )
        return None
    with path.open("rb") as f:
        if b"\x00" in f.read(65536):
            return f"{path.name}: binary data (NUL bytes), not a text file; check the export"
        f.seek(size - 1)
        last = f.read(1)
    if last not in (b"\n", b"\r") and not has_marker:
        return (
            f"{path.name}: does not end with a line break, so it looks half-written; "
            "upload it again as NAME.part and rename it when complete (or add NAME.ready)"
        )
    return None


class Watcher:
    """Looks at one drop directory and runs what is ready."""

    def __init__(
        self,
        cfg: MailpipeConfig,
        drop: DropDir,
        settle: float | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.drop = drop
        self.settle = cfg.watch.settle if settle is None else settle
        self.now = now
        self.shared = store_lock_path(cfg.store.url) is None  # a server store: runners share

    # -- one cycle -------------------------------------------------------------------

    def cycle(self, progress: Any = None, options: Any = None) -> CycleReport:
        """Take what is ready in incoming/, run it, park every file. Raises LockHeld when
        another runner holds this drop directory (SQLite store)."""
        locks: list[RunLock] = []
        try:
            if not self.shared:
                for path in (str(self.drop.lock_path()), store_lock_path(self.cfg.store.url)):
                    assert path is not None
                    lock = RunLock(path)
                    lock.acquire("watch")
                    locks.append(lock)
            return self._cycle(progress, options)
        finally:
            for lock in reversed(locks):
                lock.release()

    def _cycle(self, progress: Any, options: Any) -> CycleReport:
        report = CycleReport()
        report.recovered = self._recover()
        ready = self._scan(report)
        if not ready:
            return report
        run_id = new_run_id()
        claimed = self._claim(run_id, ready)
        if not claimed:
            return report
        report.run_id = run_id
        report.taken = [p.name for p in claimed]
        self._run(run_id, claimed, report, progress, options)
        with contextlib.suppress(OSError):
            (self.drop.sub("processing") / run_id).rmdir()
        return report

    def _scan(self, report: CycleReport) -> list[Path]:
        """Sort incoming/: refuse what must not be read, leave what is still being
        written, and return the files that are ready, oldest first."""
        incoming = self.drop.sub("incoming")
        now = self.now()
        entries = sorted(os.scandir(incoming), key=lambda e: e.name)
        names = {e.name for e in entries}
        ready: list[tuple[float, Path]] = []
        for e in entries:
            name = e.name
            if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
                continue
            path = incoming / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # another runner took it since the listing
            settled = now - st.st_mtime >= self.settle
            if name.endswith(MARKER):
                if name[: -len(MARKER)] not in names and settled:
                    self._refuse(
                        path,
                        f"{name}: a .ready marker without its file "
                        f"{name[: -len(MARKER)]!r}; upload the file first, then the marker",
                        report,
                    )
                continue
            if stat.S_ISLNK(st.st_mode):
                self._refuse(path, f"{name}: is a symlink; drop the file itself", report)
                continue
            if ".." in name:
                self._refuse(path, f"{name}: a name with '..' is not taken; rename it", report)
                continue
            if not stat.S_ISREG(st.st_mode):
                self._refuse(path, f"{name}: not a regular file", report)
                continue
            if path.resolve().parent != incoming:
                self._refuse(path, f"{name}: resolves outside the drop directory", report)
                continue
            marked = name + MARKER in names
            if not (marked or settled):
                report.waiting.append(name)
                continue
            hits = sources_for_name(self.cfg, name)
            if len(hits) != 1:
                globs = ", ".join(
                    f"{s}: {os.path.basename(src.path)}" for s, src in self.cfg.sources.items()
                )
                why = "no source takes" if not hits else f"sources {', '.join(hits)} all take"
                self._refuse(
                    path,
                    f"{name}: {why} this name (sources take {globs}); rename the file "
                    "or fix the source's path glob",
                    report,
                )
                continue
            if not any(j.enabled and j.source == hits[0] for j in self.cfg.jobs.values()):
                self._refuse(
                    path, f"{name}: source {hits[0]!r} feeds no enabled job; enable one", report
                )
                continue
            ready.append((st.st_mtime, path))
        ready.sort(key=lambda t: (t[0], t[1].name))
        return [p for _, p in ready[: self.cfg.watch.max_files]]

    def _refuse(self, path: Path, reason: str, report: CycleReport) -> None:
        try:
            self.drop.park(path, "failed", reason)
        except FileNotFoundError:
            return  # another runner got to it first
        report.failed[path.name] = reason
        log.info("file refused: %s", reason, extra={"file": path.name})

    def _claim(self, run_id: str, ready: list[Path]) -> list[Path]:
        """Move the ready files (and their markers) into processing/<run_id>/; a file
        another runner renamed first is simply not ours."""
        target = self.drop.sub("processing") / run_id
        target.mkdir(mode=0o700)
        claimed: list[Path] = []
        for path in ready:
            try:
                os.rename(path, target / path.name)
            except FileNotFoundError:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.rename(path.with_name(path.name + MARKER), target / (path.name + MARKER))
            claimed.append(target / path.name)
            log.info("file taken: %s", path.name, extra={"file": path.name, "run_id": run_id})
        if not claimed:
            with contextlib.suppress(OSError):
                target.rmdir()
        return claimed

    def _run(
        self, run_id: str, claimed: list[Path], report: CycleReport, progress: Any, options: Any
    ) -> None:
        good: list[Path] = []
        for path in claimed:
            marker = path.with_name(path.name + MARKER)
            problem = _text_problem(path, marker.exists())
            if problem:
                self._park(path, "failed", problem, run_id, report)
            else:
                good.append(path)
        if not good:
            return
        sources = {sources_for_name(self.cfg, p.name)[0] for p in good}
        jobs = [n for n, j in self.cfg.jobs.items() if j.enabled and j.source in sources]
        kwargs: dict[str, Any] = {"options": options} if options is not None else {}
        if progress is not None:
            kwargs["progress"] = progress
        try:
            outcome = run_pipeline(
                self.cfg,
                jobs,
                [str(p) for p in good],
                out=str(self.drop.sub("results")),
                run_id=run_id,
                locked=True,
                **kwargs,
            )
        except MailpipeError as e:
            for path in good:
                self._park(path, "failed", f"{path.name}: {e.message}", run_id, report)
            return
        report.run_dir = str(outcome.run.path)
        errors = {
            i["path"]: i["error"] for i in outcome.summary.get("inputs", []) if i.get("error")
        }
        for path in good:
            err = errors.get(str(path))
            if err:
                self._park(path, "failed", err.replace(str(path.parent) + "/", ""), run_id, report)
            else:
                self._park(path, "done", None, run_id, report)
        report.exit_code = max(report.exit_code, outcome.exit_code)

    def _park(
        self, path: Path, where: str, reason: str | None, run_id: str, report: CycleReport
    ) -> None:
        marker = path.with_name(path.name + MARKER)
        dest = self.drop.park(path, where, reason, run_id)
        with contextlib.suppress(FileNotFoundError):
            os.rename(marker, dest.with_name(dest.name + MARKER))
        if where == "done":
            report.done.append(path.name)
            log.info("file done: %s", path.name, extra={"file": path.name, "run_id": run_id})
        else:
            assert reason is not None
            report.failed[path.name] = reason
            log.info("file failed: %s", reason, extra={"file": path.name})

    def _recover(self) -> list[str]:
        """Give back to incoming/ the files of runners that died mid-run (their ledger
        keeps what was sent: the next run sends only the rest, once)."""
        processing = self.drop.sub("processing")
        live = self._live_runs()
        back: list[str] = []
        for d in sorted(processing.iterdir()):
            if not d.is_dir() or d.is_symlink() or d.name in live:
                continue
            try:
                age = self.now() - d.stat().st_mtime
            except FileNotFoundError:
                continue
            if self.shared and age < ABANDONED_SECONDS:
                continue  # another runner may be starting it
            try:
                files = sorted(d.iterdir())
            except FileNotFoundError:
                continue  # another runner gave it back first
            for f in files:
                dest = DropDir._free(self.drop.sub("incoming"), f.name, d.name)
                try:
                    os.rename(f, dest)
                except FileNotFoundError:
                    continue
                back.append(dest.name)
            with contextlib.suppress(OSError):
                d.rmdir()
            log.warning(
                "files of stopped run %s given back to incoming/",
                d.name,
                extra={"run_id": d.name, "files": back},
            )
        return back

    def _live_runs(self) -> set[str]:
        if not self.shared:
            return set()  # we hold the drop directory's lock: nobody else is in it
        from pipeline.ledger import open_ledger

        ledger = open_ledger(self.cfg.store.url, "watch")
        try:
            with ledger.store.begin() as conn:
                return ledger.live_runs(conn)
        finally:
            ledger.close()


def watch(
    cfg: MailpipeConfig,
    root: str | os.PathLike[str],
    once: bool,
    settle: float | None = None,
    interval: float | None = None,
    on_cycle: Callable[[CycleReport], None] | None = None,
    progress: Any = None,
    options: Any = None,
) -> int:
    """Run cycles over a drop directory; returns the worst exit code seen.

    ``once``: one cycle (for cron). Otherwise cycles every ``interval`` seconds
    until SIGTERM or SIGINT, finishing the cycle in hand first.
    """
    drop = DropDir(root)
    watcher = Watcher(cfg, drop, settle)
    pause = cfg.watch.interval if interval is None else interval
    stop = {"now": False}

    def _stop(signum: int, frame: Any) -> None:
        stop["now"] = True

    if not once:
        signal.signal(signal.SIGTERM, _stop)
    worst = 0
    while True:
        from pipeline.lock import LockHeld

        try:
            report = watcher.cycle(progress, options)
        except LockHeld:
            if once:
                raise
            report = CycleReport()
        worst = max(worst, report.exit_code, 1 if report.failed else 0)
        if on_cycle is not None:
            on_cycle(report)
        if once:
            return worst
        if stop["now"]:
            return 0  # a service stopped on purpose; failures are in failed/ and the log
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline and not stop["now"]:
            time.sleep(min(0.2, pause))
        if stop["now"]:
            return 0
