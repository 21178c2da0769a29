"""One run at a time on a SQLite store (or a drop directory): an advisory file lock.

The lock is ``flock`` on a file next to what it guards, so the kernel releases
it when its holder exits, however it exits: a killed run leaves nothing stale
to clean up, and the next run simply takes the lock. The file also says who
holds it, for the message a second run prints before it leaves.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

import orjson

from pipeline.errors import MailpipeError
from pipeline.rundir import now_iso

__all__ = ["LockHeld", "RunLock", "store_lock_path"]


class LockHeld(MailpipeError):
    """Another run holds the lock: nothing to do now (cron exits 0)."""

    def __init__(self, path: str, holder: str) -> None:
        super().__init__(f"another run holds the lock ({holder}; {path}); leaving it be")
        self.path = path
        self.holder = holder


def store_lock_path(url: str) -> str | None:
    """The lock file of a SQLite store; None for a server database (runs share it)."""
    if not url.startswith("sqlite:///") or url.startswith("sqlite:///:memory:"):
        return None
    return url.removeprefix("sqlite:///") + ".lock"


class RunLock:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, run_id: str) -> None:
        """Take the lock or raise :class:`LockHeld` at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockHeld(str(self.path), holder) from None
        os.ftruncate(fd, 0)
        os.write(
            fd,
            orjson.dumps(
                {
                    "run_id": run_id,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": now_iso(),
                }
            ),
        )
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    try:
        info = orjson.loads(os.pread(fd, 4096, 0) or b"{}")
    except (orjson.JSONDecodeError, OSError):
        return "a run"
    if not info:
        return "a run"
    return f"run {info.get('run_id')} (pid {info.get('pid')} on {info.get('host')})"
