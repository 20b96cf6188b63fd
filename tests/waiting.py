"""
Waiting for an expected outcome, with a deadline instead of a fixed sleep.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.task import deferLater

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T] | T],
    *,
    within: float = 10.0,
    interval: float = 0.02,
    what: str = "the condition",
) -> T:
    """
    Re-check C{check} until it returns something truthy and return that;
    fail with the last value seen once C{within} seconds have passed.
    """
    from twisted.internet import reactor

    deadline = time.monotonic() + within
    last: Any = None
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        last = result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within}s (last: {last!r})")
        await deferLater(reactor, interval, lambda: None)
