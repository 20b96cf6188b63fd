"""
Checks that a test fake still stands for the interface it replaces: a fake
that drifted from its Protocol fails here instead of letting a test pass
while testing nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any


def _members(protocol: type) -> dict[str, Any]:
    """
    The public members a Protocol declares (its methods and properties),
    its own and its bases', by name.
    """
    members: dict[str, Any] = {}
    for klass in reversed(protocol.__mro__):
        if klass is object or klass.__module__ == "typing":
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and (callable(value) or isinstance(value, property)):
                members[name] = value
    return members


def _shape(function: Any) -> list[tuple[str, Any, bool]]:
    """
    A function's parameters after C{self}: name, kind, and whether it has
    a default.
    """
    parameters = list(inspect.signature(function).parameters.values())[1:]
    return [(p.name, p.kind, p.default is not p.empty) for p in parameters]


def assert_implements(fake: type, protocol: type, extra: Iterable[str] = ()) -> None:
    """
    Fail unless C{fake} has every method and property of C{protocol}, each
    method with the same parameters (names, kinds, which have defaults),
    and no other public method but those named in C{extra} (the fake's own
    test helpers): a method the real thing no longer has is a method the
    code no longer calls.
    """
    wanted = _members(protocol)
    for name, member in wanted.items():
        assert hasattr(fake, name), f"{fake.__name__} lacks {protocol.__name__}.{name}"
        if isinstance(member, property):
            continue
        mine = getattr(fake, name)
        assert _shape(mine) == _shape(member), (
            f"{fake.__name__}.{name}{inspect.signature(mine)} does not match "
            f"{protocol.__name__}.{name}{inspect.signature(member)}"
        )
    own = {
        name
        for name, value in vars(fake).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }
    unknown = own - set(wanted) - set(extra)
    assert not unknown, f"{fake.__name__} has {sorted(unknown)}, which {protocol.__name__} lacks"
