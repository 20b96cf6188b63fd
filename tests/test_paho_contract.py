"""
The contract between mqttsvc and paho-mqtt's internals.

L{mqttsvc.mqtt.pahoclient} is the one module that touches paho's private
names; these tests fail, naming what changed, when a paho release changes
any of them (a method gone or with other parameters, a field of the packet
being read, a reason code, the keepalive's clock), and when a module of
mqttsvc other than the adapter starts touching paho's privates.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import inspect
import pkgutil
import re
import time
from pathlib import Path

import paho.mqtt as paho_package
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from mqttsvc.mqtt import codec
from mqttsvc.mqtt.errors import AUTH_REFUSALS, classify_connack
from mqttsvc.mqtt.pahoclient import (
    IN_PACKET_FIELDS,
    PAHO_VERSIONS,
    PRIVATE_ATTRIBUTES,
    PRIVATE_METHODS,
    PahoClient,
    check_version,
)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mqttsvc"
ADAPTER = PACKAGE / "mqtt" / "pahoclient.py"

#: The parameters (after self) of each private method the adapter calls.
SIGNATURES = {
    "_sock_recv": ["bufsize"],
    "_sock_close": [],
    "_loop_rc_handle": ["rc"],
    "_packet_handle": [],
    "_packet_queue": ["command", "packet", "mid", "qos", "info"],
}


def fresh_client() -> paho.Client:
    return paho.Client(CallbackAPIVersion.VERSION2, client_id="contract")


def paho_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", paho_package.__version__)
    assert match is not None, f"paho-mqtt's version {paho_package.__version__!r} is not N.N..."
    return int(match[1]), int(match[2])


def test_the_installed_paho_is_the_one_the_adapter_was_written_for() -> None:
    """The installed release lies in the adapter's range, and that range is setup.cfg's."""
    assert PAHO_VERSIONS[0] <= paho_version() < PAHO_VERSIONS[1], (
        f"paho-mqtt {paho_package.__version__} is installed; the adapter was written for "
        f"{PAHO_VERSIONS}"
    )
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    [requirement] = [
        line.strip()
        for line in setup["options"]["install_requires"].splitlines()
        if line.strip().startswith("paho-mqtt")
    ]
    (low_major, low_minor), (high_major, high_minor) = PAHO_VERSIONS
    assert requirement == f"paho-mqtt >= {low_major}.{low_minor}, < {high_major}.{high_minor}", (
        f"setup.cfg asks for {requirement!r} but pahoclient.PAHO_VERSIONS is {PAHO_VERSIONS}: "
        "keep them in step"
    )


@pytest.mark.parametrize("found", ["2.0.0", "2.3.0", "3.0.1", "1.6.1", "unknown"])
def test_another_release_is_refused_at_import(found: str) -> None:
    """Outside the range, importing the adapter says which release it found and which it wants."""
    with pytest.raises(ImportError) as raised:
        check_version(found)
    assert f"paho-mqtt {found} is installed" in str(raised.value)
    assert "paho-mqtt >= 2.1, < 2.3" in str(raised.value)


@pytest.mark.parametrize("found", ["2.1.0", "2.2.0", "2.2.7rc1"])
def test_a_release_in_the_range_is_accepted(found: str) -> None:
    check_version(found)


@pytest.mark.parametrize("name", PRIVATE_METHODS)
def test_the_private_methods_are_there_with_their_parameters(name: str) -> None:
    """Each private method the adapter calls exists and takes what it is given."""
    method = inspect.getattr_static(paho.Client, name, None)
    assert inspect.isfunction(method), (
        f"paho.Client.{name} is gone or no longer a plain method ({method!r}): "
        "the adapter (mqttsvc/mqtt/pahoclient.py) calls it"
    )
    parameters = list(inspect.signature(method).parameters)[1:]
    assert parameters == SIGNATURES[name], (
        f"paho.Client.{name} now takes {parameters}, the adapter was written for {SIGNATURES[name]}"
    )
    assert set(SIGNATURES) == set(PRIVATE_METHODS)


def test_the_private_attributes_are_there() -> None:
    """The packet being read is a dict of the expected fields; the last read is a float."""
    client = fresh_client()
    for name in PRIVATE_ATTRIBUTES:
        assert hasattr(client, name), f"a paho.Client no longer has {name}: the adapter sets it"
    assert isinstance(client._in_packet, dict)
    assert tuple(client._in_packet) == IN_PACKET_FIELDS, (
        f"paho's packet being read now has the fields {tuple(client._in_packet)}, "
        f"the adapter fills {IN_PACKET_FIELDS}"
    )
    assert isinstance(client._last_bytes_received, float)


def test_the_in_packet_type_has_the_expected_fields() -> None:
    """paho's own _InPacket TypedDict (declared for type checkers only) lists the same fields."""
    tree = ast.parse(Path(inspect.getfile(paho)).read_text())
    declared = next(
        (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "_InPacket"), None
    )
    assert declared is not None, "paho.mqtt.client no longer declares _InPacket"
    fields = tuple(
        item.target.id
        for item in declared.body
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
    )
    assert fields == IN_PACKET_FIELDS, (
        f"paho's _InPacket now has the fields {fields}, the adapter fills {IN_PACKET_FIELDS}"
    )


def test_the_keepalive_clock_is_monotonic() -> None:
    """The adapter stamps _last_bytes_received with time.monotonic, as paho's keepalive reads it."""
    assert paho.time_func is time.monotonic, (
        f"paho's keepalive now reads {paho.time_func!r}; the adapter's read_block stamps "
        "_last_bytes_received with time.monotonic"
    )


def test_the_adapter_shadows_nothing_of_paho() -> None:
    """The adapter's own method names are not (yet) names of paho.Client."""
    ours = {name for name in vars(PahoClient) if not name.startswith("__")}
    clashing = ours & (set(dir(paho.Client)) | set(vars(fresh_client())))
    assert not clashing, f"paho.Client now has {sorted(clashing)} too: rename the adapter's"


def test_the_adapter_hands_a_packet_to_paho() -> None:
    """A PINGRESP handed over clears paho's ping timer; the packet state is reset after."""
    client = PahoClient(CallbackAPIVersion.VERSION2, client_id="contract")
    client._ping_t = 123.0
    assert client.handle_packet(0xD0, 0, bytearray()) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert client._ping_t == 0
    assert client._in_packet["command"] == 0 and client._in_packet["packet"] == bytearray()


def test_the_packet_types_are_paho_s() -> None:
    """The codec's own constants agree with paho's."""
    assert codec.PUBLISH == paho.PUBLISH
    assert codec.PUBACK == paho.PUBACK


def test_refused_credentials_are_named_as_such() -> None:
    """
    The CONNACK reason codes classify_connack takes for bad credentials:
    MQTT 5's own, and what paho makes of MQTT 3.1.1's return codes 4 and 5.
    """
    names = {
        0x86: "Bad user name or password",
        0x87: "Not authorized",
        0x8C: "Bad authentication method",
    }
    for value, name in names.items():
        reason = ReasonCode(PacketTypes.CONNACK, identifier=value)
        assert reason.getName() == name, f"CONNACK reason {value:#x} is now {reason.getName()!r}"
        assert value in AUTH_REFUSALS
        assert classify_connack(reason).category == "auth"
    for rc in (
        paho.CONNACK_REFUSED_BAD_USERNAME_PASSWORD,
        paho.CONNACK_REFUSED_NOT_AUTHORIZED,
    ):
        reason = paho.convert_connack_rc_to_reason_code(rc)
        assert reason.value in AUTH_REFUSALS, (
            f"paho now turns MQTT 3.1.1 return code {int(rc)} into {reason.value:#x} ({reason})"
        )
    unavailable = paho.convert_connack_rc_to_reason_code(paho.CONNACK_REFUSED_SERVER_UNAVAILABLE)
    assert classify_connack(unavailable).category == "protocol"
    # What abort() reports as the reason of a connection it closed.
    assert str(ReasonCode(PacketTypes.DISCONNECT, "Unspecified error")) == "Unspecified error"


# The architecture check: no module but the adapter touches paho's privates.


def paho_private_names() -> set[str]:
    """
    Every private name of paho-mqtt: module globals, class and instance
    attributes, and whatever its source declares (C{_InPacket} exists for
    type checkers only).
    """
    names: set[str] = set()
    client = fresh_client()
    names.update(vars(client))
    for info in pkgutil.iter_modules(paho_package.__path__):
        module = importlib.import_module(f"paho.mqtt.{info.name}")
        names.update(vars(module))
        for value in vars(module).values():
            if isinstance(value, type) and value.__module__ == module.__name__:
                names.update(dir(value))
        tree = ast.parse(Path(inspect.getfile(module)).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def paho_privates_touched(source: str, private: set[str]) -> list[str]:
    """
    Where C{source} touches a private name of paho: C{from paho... import _x},
    C{_x} on a name imported from paho (C{paho._InPacket}), or any use of
    one of paho's private attribute names (C{client._sock_recv}) other than
    C{self._x} where this module assigns C{self._x} itself (its own
    attribute that happens to share paho's name).
    """
    tree = ast.parse(source)
    from_paho: set[str] = set()
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "paho":
                    from_paho.add(alias.asname or "paho")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "paho":
            from_paho.update(alias.asname or alias.name for alias in node.names)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        ):
            own.add(node.attr)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "paho":
            found += [
                (node.lineno, f"from {node.module} import {alias.name}")
                for alias in node.names
                if alias.name.startswith("_") and not alias.name.startswith("__")
            ]
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if node.attr.startswith("__"):
            continue
        root = node.value
        while isinstance(root, ast.Attribute):
            root = root.value
        on_paho = isinstance(root, ast.Name) and root.id in from_paho
        on_self = isinstance(node.value, ast.Name) and node.value.id == "self"
        if on_paho or (node.attr in private and not (on_self and node.attr in own)):
            found.append((node.lineno, ast.unparse(node)))
    return [f"line {line}: {text}" for line, text in sorted(found)]


def test_only_the_adapter_touches_paho_privates() -> None:
    """
    No module of mqttsvc but mqttsvc/mqtt/pahoclient.py touches a private
    name of paho (read from the code's syntax tree, not its text).
    """
    private = paho_private_names()
    assert set(PRIVATE_METHODS) | set(PRIVATE_ATTRIBUTES) | {"_InPacket"} <= private
    offences = {
        str(path.relative_to(ROOT)): found
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != ADAPTER and (found := paho_privates_touched(path.read_text(), private))
    }
    assert offences == {}, (
        "paho's private names touched outside the adapter (mqttsvc/mqtt/pahoclient.py): "
        f"{offences}; give the adapter a method for it"
    )
    # ... and the adapter is where they are.
    assert paho_privates_touched(ADAPTER.read_text(), private)


def test_the_architecture_check_finds_what_it_looks_for() -> None:
    """The check above is not vacuous: each way of reaching a private is caught."""
    private = paho_private_names()
    source = """
import paho.mqtt.client as paho
from paho.mqtt.client import _InPacket


class Mine:
    def __init__(self, client):
        self._client = client
        self._on_message = None

    def read(self) -> None:
        self._client._sock_recv(10)
        self._client._in_packet = {}
        x: paho._InPacket
        self._on_message
        self.public()
"""
    found = paho_privates_touched(source, private)
    assert found == [
        "line 3: from paho.mqtt.client import _InPacket",
        "line 12: self._client._sock_recv",
        "line 13: self._client._in_packet",
        "line 14: paho._InPacket",
    ], found


def test_the_codec_is_pure() -> None:
    """The codec imports neither paho nor Twisted, and nothing of mqttsvc but its config."""
    tree = ast.parse(Path(inspect.getfile(codec)).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in imported}
    assert not roots & {"paho", "twisted"}, imported
    assert {n for n in imported if n.startswith("mqttsvc")} <= {"mqttsvc.config"}, imported


def test_the_mqtt_room_imports_only_config_and_runtime() -> None:
    """The mqtt package imports, of mqttsvc, only mqttsvc.config, mqttsvc.runtime and itself."""
    allowed = ("mqttsvc.config", "mqttsvc.runtime", "mqttsvc.mqtt")
    offences = []
    for path in sorted((PACKAGE / "mqtt").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offences += [
                f"{path.name}: {name}"
                for name in names
                if name.split(".")[0] == "mqttsvc"
                and not any(name == a or name.startswith(a + ".") for a in allowed)
            ]
    assert offences == []
