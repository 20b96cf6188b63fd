"""
The real servers a run of mqttsvc is measured or tested against, private to
that run: a free loopback port, a Mosquitto of its own (which the run may
stop and start again), and a scratch PostgreSQL database (created, migrated
with C{mqttsvc.db.schema.migrate}, dropped).

One copy for the benchmarks (L{bench.environment}) and the test suite
(C{tests/conftest.py}).  It lives here, not in C{tests}, because the tests
already import C{bench} (its MQTT wire helpers) and C{bench} must not
depend on the test suite; and not in C{mqttsvc}, because it blocks
(subprocesses, sleeps, a synchronous database driver) as no module of the
service may.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

from mqttsvc.db import schema


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Mosquitto:
    """
    A Mosquitto of our own on a free loopback port, which its owner may
    stop and start again (on the same port).

    @param directory: holds its C{mosquitto.conf} and C{mosquitto.log}
        (and its persistence, when the settings ask for it); made if missing.
    @param settings: C{mosquitto.conf} settings beside the listener, one
        line each (C{allow_anonymous true} unless they say otherwise).
    @param extra_config: more lines, written last: settings of the
        listener such as TLS files or a password file.
    """

    def __init__(
        self, directory: Path, settings: Mapping[str, str], extra_config: str = ""
    ) -> None:
        self.port = free_port()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.settings = {"allow_anonymous": "true", **settings}
        self.config = directory / "mosquitto.conf"
        # Started as root, mosquitto drops to its own user, which may not
        # read our (private) directory: stay root.
        lines = ["user root"] if os.geteuid() == 0 else []
        lines.append(f"listener {self.port} 127.0.0.1")
        lines += [f"{key} {value}" for key, value in self.settings.items()]
        self.config.write_text("\n".join(lines) + "\n" + extra_config)
        self.log = directory / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """
        Start it and return once it accepts connections.

        @raise RuntimeError: with the end of its log, if it exits or does
            not listen within 10 s.
        """
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [mosquitto, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    text = self.log.read_text(errors="replace")
                    raise RuntimeError(
                        f"mosquitto exited with {self.process.returncode}: {text[-500:]}"
                    ) from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        """
        Stop it with SIGTERM (so that a persistent broker saves its
        queues), and with SIGKILL if it takes over 10 s.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ScratchDatabase:
    """
    A database of its own, named C{name}, on the PostgreSQL server that
    C{admin_dsn} reaches (as a user allowed to create databases): created
    and migrated by L{create}, dropped by L{drop}; as a context manager,
    both.

    @ivar dsn: reaches the database itself.
    """

    def __init__(self, admin_dsn: str, name: str) -> None:
        self.admin_dsn = admin_dsn
        self.name = name
        self.dsn: str = psycopg2.extensions.make_dsn(admin_dsn, dbname=name)

    def _admin(self, statement: str) -> None:
        conn: Any = psycopg2.connect(self.admin_dsn)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    def create(self) -> None:
        """
        Create the database and migrate it to the newest schema (or drop
        it again if the migration fails).
        """
        self._admin(f'CREATE DATABASE "{self.name}"')
        try:
            schema.migrate(self.dsn)
        except BaseException:
            self.drop()
            raise

    def drop(self) -> None:
        """Drop the database, ending whatever is still connected to it."""
        # FORCE terminates what is still connected and drops in one step
        # (a separate pg_terminate_backend races with backends exiting).
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def __enter__(self) -> ScratchDatabase:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.drop()
