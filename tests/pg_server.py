"""A throwaway PostgreSQL server for tests, run from the Debian package's binaries (`apt-get install postgresql`,
as .ci/run does).

    with postgres_server() as pg:            # initdb + pg_ctl start in a temporary folder; stopped and removed
        url = pg.new_database()              # a fresh, empty database: postgresql://postgres@127.0.0.1:PORT/NAME

The server listens on 127.0.0.1 only, on a free port, with its unix socket in its own temporary folder, trusts
local connections (no password) and runs without fsync (a test server: fast, not durable). initdb refuses to
run as root, so as root the server runs as the `postgres` user the package creates. In tests, use the
session-scoped fixture `pg_server` of tests/conftest.py. Without the binaries, `postgres_server()` raises
`PostgresUnavailable` with what to install: tests that need PostgreSQL fail (they do not skip).
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Iterator

BIN_GLOB = "/usr/lib/postgresql/*/bin"
_names = itertools.count()


class PostgresUnavailable(RuntimeError):
    pass


def find_bindir() -> str:
    """The bin folder of the newest PostgreSQL installed under /usr/lib/postgresql/<version>/bin."""
    found = [d for d in glob.glob(BIN_GLOB) if os.path.exists(os.path.join(d, "initdb"))]
    if not found:
        raise PostgresUnavailable(
            f"no PostgreSQL server binaries under {BIN_GLOB}: install them with `apt-get install -y postgresql` "
            "(.ci/run does); tests of the PostgreSQL state backend need a real server")
    return max(found, key=lambda d: int(d.split("/")[-2].split(".")[0]))


@dataclass
class PgServer:
    host: str
    port: int
    user: str
    sockdir: str

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def new_database(self, prefix: str = "test") -> str:
        """Create an empty database with a new name; returns its URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser") is None:
        raise PostgresUnavailable("running as root, and `runuser` (util-linux) is missing to start PostgreSQL as "
                                  "the postgres user")
    return ["runuser", "-u", "postgres", "--", *cmd]


def _run(cmd: list[str], what: str, log: str | None = None) -> None:
    r = subprocess.run(_as_server_user(cmd), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        extra = ""
        if log and os.path.exists(log):
            with open(log, errors="replace") as f:
                extra = "\nserver log:\n" + f.read()[-4000:]
        raise PostgresUnavailable(f"{what} failed ({r.returncode}): {r.stdout}{r.stderr}{extra}")


@contextlib.contextmanager
def postgres_server(start_tries: int = 3) -> Iterator[PgServer]:
    """Start a PostgreSQL server in a temporary folder; stop it and remove the folder on exit."""
    bindir = find_bindir()
    user = "postgres"
    # Not under pytest's tmp_path: the server user must be able to reach its folder.
    base = tempfile.mkdtemp(prefix="pg-")
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base, ignore_errors=True)
            raise PostgresUnavailable("running as root and there is no `postgres` user to run the server as "
                                      "(the Debian package creates it)") from None
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data, log = os.path.join(base, "data"), os.path.join(base, "server.log")
    started = False
    try:
        _run([os.path.join(bindir, "initdb"), "-D", data, "-U", user, "-A", "trust", "-E", "UTF8", "--locale=C",
              "--no-sync"], "initdb")
        for attempt in range(start_tries):
            port = _free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off -c synchronous_commit=off "
                    "-c full_page_writes=off")
            try:
                _run([os.path.join(bindir, "pg_ctl"), "-D", data, "-l", log, "-w", "-t", "60", "-o", opts, "start"],
                     "pg_ctl start", log)
                started = True
                break
            except PostgresUnavailable:
                if attempt == start_tries - 1:  # another process may have taken the port: try another
                    raise
        yield PgServer("127.0.0.1", port, user, base)
    finally:
        if started:
            subprocess.run(_as_server_user([os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "-w",
                                            "stop"]), capture_output=True, stdin=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)
