"""
A deadline on everything pytest-twisted runs on the reactor: each test, each
asynchronous fixture's set-up and each one's teardown.

A regression that leaves a Deferred unfired (a writer retrying a batch
forever, a site that never connects) must cost seconds of CI, not its whole
budget.  pytest-timeout cannot be used beside pytest-twisted (its signal
lands in the wrong greenlet and kills the reactor), so the deadline is a
Twisted one: the Deferred that pytest-twisted waits on is cancelled when
its time is up, and the cancellation reaches whatever the test awaits.

C{@pytest.mark.deadline(seconds)} gives a longer-running test (or module,
with C{pytestmark}) more time; C{MQTTSVC_TEST_DEADLINE} changes the default.

pytest-twisted has no public hook for this: its one funnel,
C{_run_inline_callbacks}, is wrapped here and nowhere else, for the version
this was written against (checked below, and by C{tests/test_deadline.py}).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.python.failure import Failure

#: Seconds a test, a fixture's set-up or its teardown may take by default.
DEFAULT_DEADLINE = float(os.environ.get("MQTTSVC_TEST_DEADLINE", "60"))

#: The pytest-twisted versions whose C{_run_inline_callbacks(f, *args)} this wraps.
SUPPORTED = ("1.14.",)

_installed: list[bool] = []
_current = [DEFAULT_DEADLINE]


class DeadlinePassed(AssertionError):
    """The test, or one of its fixtures, did not finish within its deadline."""


def _bounded(seconds: float, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    """
    Run C{f} and cancel what it returns after C{seconds}.  The timer is set
    before C{f} runs (not with C{addTimeout} after), so that a test that
    counts the reactor's delayed calls at its start counts this one too:
    set after, it made test_flapping's "no timer left behind" fail.
    """
    from twisted.internet import reactor

    running: list[defer.Deferred[Any]] = []
    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        running[0].cancel()

    timer = reactor.callLater(seconds, expire)

    def done(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        if expired and isinstance(result, Failure) and result.check(defer.CancelledError):
            raise DeadlinePassed(
                f"did not finish within its deadline of {seconds:g} s "
                "(whatever it awaited was cancelled; give a slow test more time "
                "with @pytest.mark.deadline(seconds))"
            )
        return result

    d = defer.maybeDeferred(f, *args)
    running.append(d)
    return d.addBoth(done)


def install() -> None:
    """Wrap pytest-twisted's funnel once, if it is the version we know."""
    if _installed:
        return
    version = importlib.metadata.version("pytest-twisted")
    if not version.startswith(SUPPORTED):
        raise RuntimeError(
            f"tests/deadline.py wraps pytest-twisted {SUPPORTED}, found {version}: "
            "check that _run_inline_callbacks(f, *args) is still its one funnel"
        )
    original = pytest_twisted._run_inline_callbacks

    def run_with_deadline(f: Callable[..., Any], *args: Any) -> Any:
        return original(_bounded, _current[0], f, *args)

    pytest_twisted._run_inline_callbacks = run_with_deadline
    _installed.append(True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "deadline(seconds): the most a test and each of its async fixtures may take"
    )
    install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    marker = item.get_closest_marker("deadline")
    _current[0] = float(marker.args[0]) if marker else DEFAULT_DEADLINE
    try:
        yield
    finally:
        _current[0] = DEFAULT_DEADLINE
