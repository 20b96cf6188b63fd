"""
The SSH manhole: a Python console inside the running service.

Operators log in with an SSH key listed in an authorized keys file (there
is no password authentication) and get a L{ColoredManhole} whose namespace
holds the live service tree.  The server's host key is generated on first
start and kept in a file only its owner may read.

Whatever is typed into the console runs on the reactor thread: anything
that blocks there freezes the whole service.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.error import ValidPublicKey
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser, ISession
from twisted.conch.manhole import ColoredManhole
from twisted.conch.manhole_ssh import (
    ConchFactory,
    TerminalRealm,
    TerminalSession,
    TerminalUser,
)
from twisted.conch.openssh_compat import primes
from twisted.conch.ssh import _kex, keys
from twisted.conch.ssh.transport import DISCONNECT_BY_APPLICATION, SSHServerTransport
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ProcessDone, ProcessTerminated
from twisted.logger import Logger
from twisted.python import components
from twisted.python.failure import Failure
from zope.interface import implementer

from mqttsvc.config import ConfigError

#: The option names that configuration errors point at.
ENDPOINT_FIELD = "manhole"
KEYS_FIELD = "manhole-keys"
HOST_KEY_FIELD = "manhole-host-key"

#: Builds the console's namespace, once per session.
NamespaceFactory = Callable[[], dict[str, object]]

#: OpenSSH's Diffie-Hellman group-exchange primes, where the system has them.
SYSTEM_MODULI = "/etc/ssh/moduli"

log = Logger()


def group_exchange_primes(path: str = SYSTEM_MODULI) -> dict[int, list[tuple[int, int]]]:
    """
    Primes for the group-exchange key exchanges: the system's moduli file
    when it has one, else RFC 3526's 2048-bit group, which is what OpenSSH
    itself falls back on.  With none, Twisted logs "disabling non-fixed-group
    key exchange algorithms because we cannot find moduli file" at every
    login (issue 15).  C{_kex} is Twisted's private module: used here only.
    """
    try:
        found: dict[int, list[tuple[int, int]]] = primes.parseModuliFile(path)
    except OSError:
        found = {}
    if found:
        return found
    generator, prime = _kex.getDHGeneratorAndPrime(b"diffie-hellman-group14-sha1")
    return {prime.bit_length(): [(generator, prime)]}


def fingerprint(key: keys.Key) -> str:
    """
    A key's fingerprint as C{ssh} and C{ssh-keygen -l} print it.
    """
    digest = key.fingerprint(keys.FingerprintFormats.SHA256_BASE64)
    return "SHA256:" + digest.rstrip("=")


def read_authorized_keys(path: str) -> list[keys.Key]:
    """
    The public keys of an authorized keys file: one OpenSSH public key per
    line (C{ssh-ed25519 AAAA... comment}); blank lines and lines starting
    with C{#} are ignored.  Key options (C{from="..."}) are not supported.

    @raise ConfigError: naming C{manhole-keys} when the file cannot be read,
        may be changed by others than its owner, has a line that is not a
        public key, or holds no key at all.
    """
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as e:
        raise ConfigError(KEYS_FIELD, f"cannot read {path}: {e.strerror}") from None
    # As OpenSSH's StrictModes: whoever may write the file may log in.
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            KEYS_FIELD, f"{path} is writable by group or others; run: chmod go-w {path}"
        )
    found = []
    for number, line in enumerate(data.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            key = keys.Key.fromString(line)
        except Exception:
            raise ConfigError(
                KEYS_FIELD,
                f"{path} line {number} is not an OpenSSH public key "
                "('TYPE BASE64 [COMMENT]', without options)",
            ) from None
        found.append(key)
    if not found:
        raise ConfigError(
            KEYS_FIELD, f"{path} holds no public key; add one, e.g. the line of a KEY.pub file"
        )
    return found


def load_host_key(path: str) -> keys.Key:
    """
    The manhole's host key, generated (Ed25519, in OpenSSH format) and
    written with mode 0600 if C{path} does not exist yet.

    @raise ConfigError: naming C{manhole-host-key} when the file cannot be
        created or read, is accessible by group or others, or is not an
        unencrypted private key.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_host_key(path)
    except OSError as e:
        raise ConfigError(HOST_KEY_FIELD, f"cannot create {path}: {e.strerror}") from None
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    try:
        with os.fdopen(fd, "wb") as f:
            # The umask may only have narrowed the mode; make it exact.
            os.fchmod(f.fileno(), 0o600)
            f.write(pem)
    except OSError as e:
        os.unlink(path)
        raise ConfigError(HOST_KEY_FIELD, f"cannot write {path}: {e.strerror}") from None
    key = keys.Key(private)
    log.info(
        "generated the manhole host key {path} ({fingerprint})",
        path=path,
        fingerprint=fingerprint(key),
    )
    return key


def _read_host_key(path: str) -> keys.Key:
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            data = f.read()
    except OSError as e:
        raise ConfigError(HOST_KEY_FIELD, f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(HOST_KEY_FIELD, f"{path} is not a regular file")
    if info.st_mode & 0o077:
        raise ConfigError(
            HOST_KEY_FIELD,
            f"{path} is accessible by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"run: chmod 600 {path}",
        )
    try:
        key = keys.Key.fromString(data)
    except keys.EncryptedKeyError:
        raise ConfigError(
            HOST_KEY_FIELD, f"{path} is encrypted; use a key without passphrase"
        ) from None
    except Exception:
        raise ConfigError(HOST_KEY_FIELD, f"{path} is not an SSH private key") from None
    if key.isPublic():
        raise ConfigError(HOST_KEY_FIELD, f"{path} is a public key; it must be the private key")
    return key


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """
    The keys of one authorized keys file, whatever user name the client
    gives: the manhole has no users of its own.

    The file is read again at every login (a small local file, read on the
    reactor thread), so that removing a key takes effect without a
    restart.  If it has become unreadable or invalid, every login is
    refused until it is fixed.
    """

    def __init__(self, path: str) -> None:
        self._path = path

    def getAuthorizedKeys(self, username: bytes) -> list[keys.Key]:
        try:
            return read_authorized_keys(self._path)
        except ConfigError as e:
            log.warn("manhole login refused: {problem}", problem=e.message)
            return []


@implementer(ICredentialsChecker)
class _AuditedKeyChecker:
    """
    L{SSHPublicKeyChecker}, logging who logged in with which key and which
    keys were refused.
    """

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, keydb: IAuthorizedKeysDB) -> None:
        self._checker = SSHPublicKeyChecker(keydb)

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        d: Deferred[bytes | tuple[()]] = self._checker.requestAvatarId(credentials)

        def accepted(avatar_id: Any) -> Any:
            log.info(
                "manhole login by {user} with key {fingerprint}",
                user=avatar_id.decode("utf-8", "replace"),
                fingerprint=_blob_fingerprint(credentials.blob),
            )
            return avatar_id

        def refused(failure: Failure) -> Failure:
            # ValidPublicKey is the protocol's "would you take this key?"
            # step, answered before the signed attempt; not a refusal.
            if failure.check(UnauthorizedLogin) and not failure.check(ValidPublicKey):
                log.info(
                    "manhole refused key {fingerprint} for {user}",
                    user=credentials.username.decode("utf-8", "replace"),
                    fingerprint=_blob_fingerprint(credentials.blob),
                )
            return failure

        d.addCallbacks(accepted, refused)
        return d


def _blob_fingerprint(blob: bytes) -> str:
    try:
        return fingerprint(keys.Key.fromString(blob))
    except Exception:
        return "(unreadable key)"


class _Endpoint:
    """
    One side's view of the other in a terminal session: where its writes
    go and how it ends the session.
    """

    def __init__(self, write: Callable[[bytes], object], loseConnection: Callable[[], object]):
        self.write = write
        self.loseConnection = loseConnection


class _ManholeSession(TerminalSession):
    """
    A terminal session running a L{ColoredManhole} on a namespace built when
    the shell opens.

    Unlike L{TerminalSession}, it works without a pseudo-terminal, follows
    window size changes, ends at the end of the client's input, and reports
    exit status 0 when the console is left with Ctrl-D, so that C{ssh}
    exits with 0 too.
    """

    width = 80
    height = 24

    def __init__(self, original: Any, namespace_factory: NamespaceFactory) -> None:
        super().__init__(original)
        self._namespace_factory = namespace_factory
        self._client: Any = None
        self._terminal: insults.ServerProtocol | None = None
        self._ended = False

    def getPty(self, term: bytes, windowSize: tuple[int, ...], modes: object) -> None:
        # A client may not know its size and send 0 (as a pseudo-terminal
        # nobody has sized does); keep the defaults then.
        rows, columns = windowSize[:2]
        self.height, self.width = rows or self.height, columns or self.width

    def openShell(self, proto: Any) -> None:
        channel = proto.session
        connection = IConchUser(self.original).conn
        terminal = insults.ServerProtocol(ColoredManhole, self._namespace_factory())
        proto.makeConnection(
            _Endpoint(terminal.dataReceived, lambda: connection.sendClose(channel))
        )
        terminal.makeConnection(_Endpoint(proto.write, self._end))
        self._client = proto
        self._terminal = terminal
        self._resize()

    def _resize(self) -> None:
        console = self._terminal.terminalProtocol if self._terminal is not None else None
        if console is not None:
            console.terminalSize(self.width, self.height)

    def execCommand(self, proto: Any, cmd: bytes) -> None:
        # TerminalSession raises here, which logs a traceback and leaves the
        # client with a bare "exec request failed": tell the client instead.
        log.info("manhole refused to run a command")
        proto.errReceived(
            b"The mqttsvc manhole runs no commands: connect without one for its Python console.\r\n"
        )
        proto.processEnded(Failure(ProcessTerminated(exitCode=2)))

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._client.processEnded(Failure(ProcessDone(0)))

    def windowChanged(self, newWindowSize: tuple[int, ...]) -> None:
        self.getPty(b"", newWindowSize, None)
        self._resize()

    def eofReceived(self) -> None:
        # The client's input ended (a script piped into ssh): end the
        # session as Ctrl-D would.
        if self._terminal is not None:
            self._terminal.loseConnection()

    def closed(self) -> None:
        if self._terminal is not None:
            self._terminal.connectionLost(Failure(ConnectionDone()))
            self._terminal = None


class _ServerTransport(SSHServerTransport):
    """
    The SSH server transport, quiet about clients that log out normally
    (Twisted logs every disconnect message as an error).
    """

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        if reasonCode == DISCONNECT_BY_APPLICATION:
            log.info(
                "manhole client disconnected: {reason}",
                reason=description.decode("utf-8", "replace"),
            )
        else:
            super().receiveError(reasonCode, description)


@implementer(IRealm)
class _ManholeRealm(TerminalRealm):
    """
    Every authenticated user gets a manhole session of their own.
    """

    def __init__(self, namespace_factory: NamespaceFactory) -> None:
        super().__init__()
        self._namespace_factory = namespace_factory

    def _getAvatar(self, avatarId: bytes) -> TerminalUser:
        component = components.Componentized()
        user = TerminalUser(component, avatarId)
        component.setComponent(IConchUser, user)
        component.setComponent(ISession, _ManholeSession(component, self._namespace_factory))
        return user


def tree_namespace(root: MultiService, reactor: Any) -> NamespaceFactory:
    """
    The console namespace of mqttsvc's service tree: C{root}, C{supervisor}
    (the C{"sites"} service), C{sites} (site id to running C{SiteService},
    the supervisor's live mapping), C{store}, C{ingest} (the writer and
    device liveness) and C{reactor}.
    """

    def namespace() -> dict[str, object]:
        supervisor = root.getServiceNamed("sites")
        return {
            "root": root,
            "supervisor": supervisor,
            "sites": supervisor.namedServices,
            "store": root.getServiceNamed("store"),
            "ingest": root.getServiceNamed("ingest"),
            "reactor": reactor,
        }

    return namespace


def make_manhole_service(
    reactor: Any,
    endpoint_description: str,
    authorized_keys_path: str,
    host_key_path: str,
    namespace_factory: NamespaceFactory,
) -> StreamServerEndpointService:
    """
    The SSH manhole service, named C{"manhole"}, listening on
    C{endpoint_description} (a strports description; prefer one bound to
    loopback, such as C{tcp:2222:interface=127.0.0.1}).

    Blocking (it reads and may write the key files): call it before the
    reactor runs.

    @param namespace_factory: called at each login for the console's
        namespace, so that it shows the service tree as it is then.
    @raise ConfigError: naming the option at fault.
    """
    authorized = read_authorized_keys(authorized_keys_path)
    host_key = load_host_key(host_key_path)

    checker = _AuditedKeyChecker(AuthorizedKeysFile(authorized_keys_path))
    factory = ConchFactory(Portal(_ManholeRealm(namespace_factory), [checker]))
    factory.protocol = _ServerTransport
    # ConchFactory's key dicts are class attributes, shared by every
    # instance.  They hold Key objects, whatever their annotation says.
    factory.publicKeys = {host_key.sshType(): host_key.public()}
    factory.privateKeys = {host_key.sshType(): host_key}  # type: ignore[dict-item]
    factory.primes = group_exchange_primes()
    try:
        service = strports.service(endpoint_description, factory, reactor=reactor)
    except Exception as e:
        raise ConfigError(
            ENDPOINT_FIELD, f"malformed endpoint {endpoint_description!r}: {e}"
        ) from None
    service.setName("manhole")
    log.info(
        "manhole on {endpoint} with host key {fingerprint}, {count} authorized key(s)",
        endpoint=endpoint_description,
        fingerprint=fingerprint(host_key),
        count=len(authorized),
    )
    return service
