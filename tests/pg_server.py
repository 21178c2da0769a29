"""A real PostgreSQL server for the tests, started from the installed binaries.

``initdb`` into a temporary directory, ``postgres`` on a free loopback port,
one fresh database per test, everything torn down after. The binaries are the
distribution's (`.ci/run` installs its package) or, where it has none, those of
the ``pgserver`` wheel, a test dependency. As root, the server runs as the
``postgres`` system user (``nobody`` when there is none).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def _bindir() -> Path:
    """The distribution's PostgreSQL binaries, else those the ``pgserver`` wheel bundles
    (a test dependency: `make test` on a machine without PostgreSQL still runs these)."""
    for cand in [shutil.which("initdb"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))]:
        if cand and os.access(cand, os.X_OK):
            return Path(os.path.realpath(cand)).parent
    try:
        import pgserver
    except ImportError:
        pgserver = None
    if pgserver is not None:
        bundled = Path(pgserver.__file__).parent / "pginstall" / "bin"
        if os.access(bundled / "initdb", os.X_OK):
            return bundled
    pytest.fail(
        "PostgreSQL server binaries (initdb, postgres) not found: `make install` brings "
        "them with the pgserver wheel, or install them with `apt-get install postgresql`"
    )


def _server_user() -> pwd.struct_passwd:
    """Who runs the server when the tests run as root (postgres refuses root): the
    distribution's ``postgres`` user, else ``nobody``."""
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.fail("running as root, and neither a 'postgres' nor a 'nobody' user exists")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self) -> None:
        self.bindir = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="mailpipe-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.kw: dict[str, Any] = {}
        if os.geteuid() == 0:  # postgres refuses to run as root
            pw = _server_user()
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self.count = 0

    def _run(self, *args: str) -> None:
        done = subprocess.run(args, capture_output=True, cwd=self.root, **self.kw)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr.decode()[-2000:]}")

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "mailpipe",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
        )
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def new_database(self) -> str:
        """A fresh, empty database; returns its mailpipe store URL."""
        import psycopg

        self.count += 1
        name = f"t{self.count}_{int(time.time() * 1000) % 10**8}"
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="mailpipe", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://mailpipe@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    return pg_server.new_database()
