"""A throwaway PostgreSQL 15 cluster for tests: ``initdb`` + ``pg_ctl`` in a temporary directory.

PostgreSQL refuses to run as root, so when the tests run as root the server's
commands run as the ``postgres`` user (``runuser``) and the data directory is
given to it. The cluster listens on 127.0.0.1 only, on a free port, with
password authentication (the tests connect the way a deployment does, with
credentials in the URL); :meth:`PostgresCluster.stop` and
:meth:`PostgresCluster.start` let a test take the database away and bring it back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SERVER_USER = "postgres"
PASSWORD = "test-password"


_OWN_SCHEMAS = "nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'"
"""The schemas a database's users made (``public`` included), not PostgreSQL's own."""


def _new_name() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """One PostgreSQL cluster in ``directory``; :meth:`database` hands out fresh databases on it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.log = directory / "postgres.log"
        self.port = _free_port()
        self._spare: list[str] = []  # databases given back, empty, for the next tests
        directory.mkdir(parents=True, exist_ok=True)
        password_file = directory / "pwfile"
        password_file.write_text(PASSWORD + "\n")
        self._give_to_server_user(directory)
        self._run(
            PG_BIN / "initdb",
            "-D",
            self.data,
            "-U",
            SERVER_USER,
            "--auth=scram-sha-256",
            f"--pwfile={password_file}",
            "--encoding=UTF8",
            "--no-sync",
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{directory}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
            )
        self.start()

    @staticmethod
    def available() -> bool:
        return (PG_BIN / "initdb").exists() and (os.geteuid() != 0 or shutil.which("runuser") is not None)

    def _give_to_server_user(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, SERVER_USER, SERVER_USER)
            for child in path.rglob("*"):
                shutil.chown(child, SERVER_USER, SERVER_USER)

    def _run(self, *command: object) -> None:
        args = [str(c) for c in command]
        if os.geteuid() == 0:
            args = ["runuser", "-u", SERVER_USER, "--", *args]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}\n{log}")

    def start(self) -> None:
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients, as an outage or a failover does)."""
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SERVER_USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database; its URL: one a test gave back (:meth:`give_back`), emptied and renamed there, or
        else a copy of ``template1``.

        Copied file by file (``STRATEGY FILE_COPY``): PostgreSQL 15's default strategy writes the copy to the WAL
        as well, twice the time. A copy still costs ~0.3 s and as much of the server's CPU once the database
        before it had tables (each copy and drop forces a checkpoint); a given-back one, ~0.02 s."""
        import psycopg

        if self._spare:
            return self.url(self._spare.pop())
        name = _new_name()
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" STRATEGY FILE_COPY')
        return self.url(name)

    def give_back(self, url: str) -> None:
        """Take back the database of ``url`` (one :meth:`database` handed out): its sessions ended, renamed, and
        emptied to what ``template1`` holds, for the next :meth:`database`.

        Sessions may outlive the test by a moment (a proxy's upstream connection, a backend still exiting after its
        client closed, a listener reconnecting): each is ended, and the new name keeps any client of the test
        before from reaching the next test's database. Empty: every schema but PostgreSQL's own dropped and
        ``public`` made again as ``template1`` has it; checked, so a database with anything left fails here."""
        import psycopg

        name, fresh = url.rsplit("/", 1)[1], _new_name()
        with psycopg.connect(self.url(), autocommit=True) as conn:
            deadline = time.monotonic() + 30
            while True:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
                try:
                    conn.execute(f'ALTER DATABASE "{name}" RENAME TO "{fresh}"')
                    break
                except psycopg.errors.ObjectInUse:  # an ended session still exiting, or a new one
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)
        with psycopg.connect(self.url(fresh), autocommit=True) as conn:
            for (schema,) in conn.execute(f"SELECT nspname FROM pg_namespace WHERE {_OWN_SCHEMAS}").fetchall():
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            conn.execute("CREATE SCHEMA public AUTHORIZATION pg_database_owner; GRANT USAGE ON SCHEMA public TO PUBLIC")
            left = conn.execute(
                "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                f" WHERE {_OWN_SCHEMAS}) + (SELECT count(*) FROM pg_largeobject_metadata)"
            ).fetchone()
        if left != (0,):
            raise RuntimeError(f"database {fresh} (was {name}) is not empty after emptying: {left}")
        self._spare.append(fresh)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)
