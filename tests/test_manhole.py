"""
The SSH manhole as an operator uses it: C{twistd mqttsvc} started with
C{--manhole}, reached with the OpenSSH client.  Only the keys in the
authorized keys file get in, no password is ever asked, the host key is
generated once, kept private and reused, and a bad configuration stops
start-up with one line.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs

from mqttsvc.config import ConfigError
from mqttsvc.control.manhole import AuthorizedKeysFile, load_host_key, read_authorized_keys
from mqttsvc.control.manhole import fingerprint as key_fingerprint
from mqttsvc.tap import DEFAULT_MANHOLE_HOST_KEY, Options, check_manhole
from tests.conftest import BROKER_PORT, free_port
from tests.test_twistd import TWISTD, clean_env, start_fails, wait_for

SSH = shutil.which("ssh") or "/usr/bin/ssh"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
SSH_KEYSCAN = shutil.which("ssh-keyscan") or "/usr/bin/ssh-keyscan"

#: Terminal control sequences ColoredManhole writes around its echo.
_ANSI = re.compile(rb"\x1b(\[[0-9;?]*[A-Za-z]|[=>78DEMc])")


def make_key(path: Path) -> Path:
    """
    A new Ed25519 key pair without passphrase; returns the private key's path.
    """
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


def fingerprint(public_key: Path) -> str:
    out = subprocess.run(
        [SSH_KEYGEN, "-l", "-f", str(public_key)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return out.split()[1]


def ssh_args(port: int, key: Path, *options: str) -> list[str]:
    return [
        SSH,
        "-F",
        "/dev/null",
        "-p",
        str(port),
        "-i",
        str(key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "PasswordAuthentication=no",
        "-o",
        "ConnectTimeout=10",
        *options,
        "127.0.0.1",
    ]


class Console:
    """
    An interactive C{ssh} session on a pseudo-terminal of our own, as an
    operator's terminal would run it.
    """

    def __init__(self, port: int, key: Path) -> None:
        self._master, slave = os.openpty()
        self.resize(24, 80)
        self.process = subprocess.Popen(
            ssh_args(port, key),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self._seen = b""

    def resize(self, rows: int, columns: int) -> None:
        """
        Size the terminal; ssh has no controlling terminal here, so it is
        told of a change with C{SIGWINCH}, as the kernel would.
        """
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        process = getattr(self, "process", None)
        if process is not None:
            process.send_signal(signal.SIGWINCH)

    def expect(self, pattern: str, timeout: float = 10, raw: bool = False) -> str:
        """
        Read until the text (control sequences removed, unless C{raw})
        matches C{pattern}; return the text read so far and forget it.
        """
        deadline = time.monotonic() + timeout
        while True:
            shown = self._seen if raw else _ANSI.sub(b"", self._seen)
            text = shown.decode("utf-8", "replace")
            if re.search(pattern, text):
                self._seen = b""
                return text
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout}s; got {text!r}")
            readable, _, _ = select.select([self._master], [], [], remaining)
            if readable:
                try:
                    chunk = os.read(self._master, 4096)
                except OSError:  # EIO: ssh has exited and closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"ssh ended before {pattern!r}; got {text!r}")
                self._seen += chunk

    def type(self, text: str) -> None:
        os.write(self._master, text.encode())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        os.close(self._master)


class Service:
    """
    C{twistd mqttsvc} with the manhole on a free loopback port.
    """

    def __init__(self, db_dsn: str, directory: Path, keys: Path) -> None:
        self.port = free_port()
        self.host_key = directory / "host-key"
        self.log = directory / "twistd.log"
        self._args = [
            *TWISTD,
            "mqttsvc",
            "--db",
            db_dsn,
            "--rpc",
            f"tcp:{free_port()}:interface=127.0.0.1",
            "--manhole",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--manhole-keys",
            str(keys),
            "--manhole-host-key",
            str(self.host_key),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                self._args, stdout=out, stderr=subprocess.STDOUT, env=clean_env()
            )

        def listening() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True

        wait_for(listening, 30, "the manhole listening")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            finally:
                if self.process.poll() is None:
                    self.process.kill()
                    self.process.wait()
        self.process = None


@pytest.fixture
def operator_key(tmp_path: Path) -> Path:
    return make_key(tmp_path / "operator")


@pytest.fixture
def authorized_keys(tmp_path: Path, operator_key: Path) -> Path:
    path = tmp_path / "authorized_keys"
    path.write_text(f"# operators\n\n{operator_key.with_suffix('.pub').read_text()}")
    path.chmod(0o644)
    return path


@pytest.fixture
def service(
    db_dsn: str, no_sites: None, tmp_path: Path, authorized_keys: Path
) -> Iterator[Service]:
    running = Service(db_dsn, tmp_path, authorized_keys)
    try:
        running.start()
        yield running
    finally:
        running.stop()
    assert "Traceback" not in running.log.read_text()


@pytest.fixture
def sites_removed_after(db_dsn: str, no_sites: None) -> Iterator[None]:
    """
    Remove the sites a test adds once it is over (requested before
    C{service}, this runs after the service has stopped), so that later
    tests sharing the database do not start them.
    """
    yield
    conn = psycopg2.connect(db_dsn)
    with conn, conn.cursor() as cur:
        cur.execute("DELETE FROM mqtt_connection")
    conn.close()


def add_site(sql: Any, site_id: str) -> None:
    with sql.cursor() as cur:
        cur.execute(
            "INSERT INTO mqtt_connection (site_id, host, port) VALUES (%s, '127.0.0.1', %s)",
            (site_id, BROKER_PORT),
        )


def site_connected(sql: Any, site_id: str) -> bool:
    with sql.cursor() as cur:
        cur.execute("SELECT status FROM mqtt_connection WHERE site_id = %s", (site_id,))
        return cur.fetchone() == ("connected",)


def test_console_holds_the_live_service_tree(
    sites_removed_after: None, service: Service, sql: Any, operator_key: Path
) -> None:
    """
    An authorized key opens a Python console whose namespace is the running
    service tree; C{sites} follows sites added while the session is open,
    and Ctrl-D ends the session.
    """
    add_site(sql, "north")
    wait_for(lambda: site_connected(sql, "north"), 20, "north connecting")
    console = Console(service.port, operator_key)
    try:
        console.expect(">>> ")
        console.type(
            "print('tree', type(root).__name__, type(supervisor).__name__, "
            "type(store).__name__, type(ingest).__name__, reactor.running, "
            "supervisor is root.getServiceNamed('sites'))\r"
        )
        assert "tree RootService SiteSupervisor Store Ingest True True" in console.expect(r">>> $")
        console.type("print('sites', sorted(sites), sites['north'].running)\r")
        assert "sites ['north'] 1" in console.expect(r">>> $")

        add_site(sql, "south")
        wait_for(lambda: site_connected(sql, "south"), 20, "south connecting")
        console.type("print('sites', sorted(sites))\r")
        assert "sites ['north', 'south']" in console.expect(r">>> $")

        # A Deferred's result is shown when it fires.
        console.type("from twisted.internet.defer import Deferred\r")
        console.expect(r">>> $")
        console.type("Deferred.fromCoroutine(store.sites.all())\r")
        shown = console.expect(r"called back: \[.*site_id='south'.*\n")
        assert re.search(r"called back: \[.*site_id='north'.*site_id='south'", shown)

        # A resized window is redrawn: clear screen, then the prompt.
        console.resize(30, 100)
        console.expect(r"\x1b\[2J.*>>> ", raw=True)
        console.type("print('still', 'here')\r")
        assert "still here" in console.expect(r">>> $")

        console.type("\x04")
        assert console.process.wait(timeout=10) == 0
    finally:
        console.close()
    log = service.log.read_text()
    assert f"manhole login by {pwd.getpwuid(os.getuid()).pw_name} with key" in log
    assert fingerprint(operator_key.with_suffix(".pub")) in log


def test_piped_script_runs_and_ends_with_its_input(service: Service, operator_key: Path) -> None:
    """
    Lines piped into C{ssh -tt} run in the console, and the session ends
    when the input does.
    """
    result = subprocess.run(
        ssh_args(service.port, operator_key, "-tt"),
        input=b"print('answer', 6 * 7)\n",
        capture_output=True,
        timeout=20,
    )
    assert result.returncode == 0, result
    assert "answer 42" in _ANSI.sub(b"", result.stdout).decode()


def test_a_command_is_refused_with_a_message(service: Service, operator_key: Path) -> None:
    """
    C{ssh HOST COMMAND} gets a message saying the manhole is a console, and
    a failing exit status, rather than a bare "exec request failed".
    """
    result = subprocess.run(
        [*ssh_args(service.port, operator_key), "print('inside')"],
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "The mqttsvc manhole runs no commands" in result.stderr
    assert "inside" not in result.stdout


def test_unlisted_key_is_refused(service: Service, tmp_path: Path) -> None:
    """A key that is not in the authorized keys file does not get in."""
    stranger = make_key(tmp_path / "stranger")
    result = subprocess.run(
        ssh_args(service.port, stranger, "-tt"),
        input="print('inside')\n",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 255
    assert "Permission denied (publickey)." in result.stderr
    assert ">>>" not in result.stdout
    log = service.log.read_text()
    assert f"manhole refused key {fingerprint(stranger.with_suffix('.pub'))}" in log


def test_no_password_is_asked(service: Service, operator_key: Path) -> None:
    """
    A client that only tries passwords (or keyboard-interactive) is told
    that public keys are the only method.
    """
    result = subprocess.run(
        [
            *ssh_args(service.port, operator_key),
            "-o",
            "PasswordAuthentication=yes",
            "-o",
            "KbdInteractiveAuthentication=yes",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 255
    assert "Permission denied (publickey)." in result.stderr


def served_host_key(port: int) -> str:
    """The Ed25519 host key the server presents, as 'TYPE BASE64'."""
    result = subprocess.run(
        [SSH_KEYSCAN, "-T", "10", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert len(lines) == 1, result
    return " ".join(lines[0].split()[1:3])


def test_host_key_is_private_and_reused(
    db_dsn: str, no_sites: None, tmp_path: Path, authorized_keys: Path
) -> None:
    """
    The first start writes the host key with mode 0600; the server presents
    that key, and presents it again after a restart.
    """
    running = Service(db_dsn, tmp_path, authorized_keys)
    assert not running.host_key.exists()
    try:
        running.start()
        assert stat.S_IMODE(running.host_key.stat().st_mode) == 0o600
        first = served_host_key(running.port)
        running.stop()
        running.start()
        assert served_host_key(running.port) == first
    finally:
        running.stop()
    on_disk = subprocess.run(
        [SSH_KEYGEN, "-y", "-f", str(running.host_key)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert " ".join(on_disk.split()[:2]) == first
    assert stat.S_IMODE(running.host_key.stat().st_mode) == 0o600


def test_bad_manhole_configuration_is_one_line(
    db_dsn: str, tmp_path: Path, authorized_keys: Path
) -> None:
    """
    A manhole without keys, with a missing keys file or with an exposed host
    key stops start-up with a single line on stderr naming the option.
    """
    manhole = ["--db", db_dsn, "--rpc", f"tcp:{free_port()}:interface=127.0.0.1"]
    manhole += ["--manhole", f"tcp:{free_port()}:interface=127.0.0.1"]
    host_key = ["--manhole-host-key", str(tmp_path / "host-key")]

    assert start_fails([*manhole, *host_key]) == (
        "mqttsvc: configuration error: manhole-keys: "
        "required with --manhole: the SSH public keys that may log in"
    )
    missing = tmp_path / "missing"
    assert start_fails([*manhole, *host_key, "--manhole-keys", str(missing)]) == (
        f"mqttsvc: configuration error: manhole-keys: cannot read {missing}: "
        "No such file or directory"
    )
    assert not (tmp_path / "host-key").exists()

    exposed = tmp_path / "exposed-host-key"
    exposed.write_text("whatever\n")
    exposed.chmod(0o640)
    assert start_fails(
        [*manhole, "--manhole-keys", str(authorized_keys), "--manhole-host-key", str(exposed)]
    ) == (
        f"mqttsvc: configuration error: manhole-host-key: {exposed} is accessible by group "
        f"or others (mode 0640); run: chmod 600 {exposed}"
    )


# The checks behind those lines, in process: every way a key file can be
# wrong, and what the options read from the environment.


def test_options_come_from_the_environment() -> None:
    """The manhole is off unless asked for; each option has its variable."""
    off = Options(environ={})
    off.parseOptions(["--db", "dbname=x"])
    assert off["manhole"] is None
    assert off["manhole-host-key"] == DEFAULT_MANHOLE_HOST_KEY

    configured = Options(
        environ={
            "MQTTSVC_MANHOLE": "tcp:2222:interface=127.0.0.1",
            "MQTTSVC_MANHOLE_KEYS": "/etc/mqttsvc/manhole_keys",
            "MQTTSVC_MANHOLE_HOST_KEY": "/var/lib/mqttsvc/host-key",
        }
    )
    configured.parseOptions(["--db", "dbname=x"])
    assert configured["manhole"] == "tcp:2222:interface=127.0.0.1"
    assert configured["manhole-keys"] == "/etc/mqttsvc/manhole_keys"
    assert configured["manhole-host-key"] == "/var/lib/mqttsvc/host-key"


def test_check_manhole_names_the_option(tmp_path: Path, authorized_keys: Path) -> None:
    """
    A malformed endpoint or missing keys are named; a listener off loopback
    is allowed (the operator's choice) but warned about.
    """

    def options(*args: str) -> Options:
        parsed = Options(environ={})
        parsed.parseOptions(["--manhole-host-key", str(tmp_path / "host-key"), *args])
        return parsed

    with pytest.raises(ConfigError) as malformed:
        check_manhole(options("--manhole", "nonsense:1"), MemoryReactor())
    assert malformed.value.field == "manhole"
    assert "malformed endpoint 'nonsense:1'" in malformed.value.message
    with pytest.raises(ConfigError) as keyless:
        check_manhole(options("--manhole", "tcp:2222:interface=127.0.0.1"), MemoryReactor())
    assert keyless.value.field == "manhole-keys"

    with capturedLogs() as events:
        check_manhole(
            options(
                "--manhole", "tcp:2222:interface=127.0.0.1", "--manhole-keys", str(authorized_keys)
            ),
            MemoryReactor(),
        )
    assert not [e for e in events if "not on loopback" in e["log_format"]]
    with capturedLogs() as events:
        check_manhole(
            options("--manhole", "tcp:2222", "--manhole-keys", str(authorized_keys)),
            MemoryReactor(),
        )
    assert [e["endpoint"] for e in events if "not on loopback" in e["log_format"]] == ["tcp:2222"]


def test_authorized_keys_file_problems_are_named(tmp_path: Path, operator_key: Path) -> None:
    """
    The keys file must hold at least one public key, every other line must
    be a comment, and nobody but its owner may change it.
    """
    public = operator_key.with_suffix(".pub").read_text()
    path = tmp_path / "keys"

    def problem(text: str, mode: int = 0o644) -> str:
        path.write_text(text)
        path.chmod(mode)
        with pytest.raises(ConfigError) as error:
            read_authorized_keys(str(path))
        assert error.value.field == "manhole-keys"
        return error.value.message

    assert problem("# nobody yet\n\n") == (
        f"{path} holds no public key; add one, e.g. the line of a KEY.pub file"
    )
    assert problem(f"{public}ssh-ed25519 not-base64\n").startswith(
        f"{path} line 2 is not an OpenSSH public key"
    )
    assert problem(f'from="10.0.0.1" {public}').startswith(
        f"{path} line 1 is not an OpenSSH public key"
    )
    assert problem(operator_key.read_text()).startswith(f"{path} line 1 is not")
    assert problem(public, 0o664) == (
        f"{path} is writable by group or others; run: chmod go-w {path}"
    )

    path.write_text(f"# the operator\n{public}")
    path.chmod(0o644)
    (key,) = read_authorized_keys(str(path))
    assert fingerprint(operator_key.with_suffix(".pub")) == key_fingerprint(key)


def test_authorized_keys_are_read_at_each_login(tmp_path: Path, operator_key: Path) -> None:
    """
    A key removed from the file is refused at the next login without a
    restart, and a file broken meanwhile lets nobody in.
    """
    path = tmp_path / "keys"
    path.write_text(operator_key.with_suffix(".pub").read_text())
    other = make_key(tmp_path / "other")
    keys_file = AuthorizedKeysFile(str(path))
    assert [key_fingerprint(k) for k in keys_file.getAuthorizedKeys(b"anyone")] == [
        fingerprint(operator_key.with_suffix(".pub"))
    ]

    path.write_text(other.with_suffix(".pub").read_text())
    assert [key_fingerprint(k) for k in keys_file.getAuthorizedKeys(b"root")] == [
        fingerprint(other.with_suffix(".pub"))
    ]

    path.write_text("garbage\n")
    assert list(keys_file.getAuthorizedKeys(b"root")) == []


def test_host_key_is_created_private_whatever_the_umask(tmp_path: Path) -> None:
    """
    The generated host key has mode 0600 even under a permissive umask, and
    the next load returns the same key.
    """
    path = tmp_path / "host-key"
    previous = os.umask(0)
    try:
        created = load_host_key(str(path))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not created.isPublic()
    assert load_host_key(str(path)) == created
    assert path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")


def test_host_key_problems_are_named(tmp_path: Path) -> None:
    """
    An exposed, encrypted, public or unreadable host key file, or one that
    cannot be created, stops start-up naming the option.
    """

    def problem(path: Path) -> str:
        with pytest.raises(ConfigError) as error:
            load_host_key(str(path))
        assert error.value.field == "manhole-host-key"
        return error.value.message

    good = tmp_path / "good"
    load_host_key(str(good))
    good.chmod(0o604)
    assert problem(good) == (
        f"{good} is accessible by group or others (mode 0604); run: chmod 600 {good}"
    )

    encrypted = tmp_path / "encrypted"
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "secret", "-f", str(encrypted)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    assert problem(encrypted) == f"{encrypted} is encrypted; use a key without passphrase"

    public = encrypted.with_suffix(".pub")
    public.chmod(0o600)
    assert problem(public) == f"{public} is a public key; it must be the private key"

    garbage = tmp_path / "garbage"
    garbage.write_text("not a key\n")
    garbage.chmod(0o600)
    assert problem(garbage) == f"{garbage} is not an SSH private key"

    nowhere = tmp_path / "missing-directory" / "host-key"
    assert problem(nowhere) == f"cannot create {nowhere}: No such file or directory"


def test_a_login_logs_nothing_about_a_moduli_file(service: Service, operator_key: Path) -> None:
    """
    Without /etc/ssh/moduli every login logged Twisted's "cannot find
    moduli file"; the group-exchange key exchange now has primes of its own
    (RFC 3526's 2048-bit group), so a login logs the login only.
    """
    before = len(service.log.read_text())
    result = subprocess.run(
        ssh_args(service.port, operator_key, "-tt"),
        input=b"print('in', 6 * 7)\n",
        capture_output=True,
        timeout=20,
    )
    assert result.returncode == 0, result
    assert "in 42" in _ANSI.sub(b"", result.stdout).decode()

    def since_then() -> str:
        return service.log.read_text()[before:]

    wait_for(lambda: "manhole login by" in since_then(), 10, "the login logged")
    assert "moduli" not in since_then(), since_then()
