"""
A test that waits for something that never happens fails within its
deadline, naming it, instead of hanging the run (issue 15, item 6).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest_twisted

ROOT = Path(__file__).resolve().parents[1]

HANGING = """
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred


@pytest_twisted.async_yield_fixture
async def stuck_teardown():
    yield None
    await Deferred()


@pytest.mark.deadline(1)
@pytest_twisted.ensureDeferred
async def test_waits_forever():
    await Deferred()


@pytest.mark.deadline(1)
@pytest_twisted.ensureDeferred
async def test_teardown_waits_forever(stuck_teardown):
    pass


@pytest_twisted.ensureDeferred
async def test_quick():
    assert True
"""


def test_a_hanging_test_and_a_hanging_teardown_fail_within_their_deadline(tmp_path: Path) -> None:
    """
    An unfired Deferred in a test, and one in an async fixture's teardown,
    each fail after the test's deadline with a message that says so; the
    run goes on to the next test and ends.
    """
    test = tmp_path / "test_hanging.py"
    test.write_text(textwrap.dedent(HANGING))
    started = time.monotonic()
    command = ["-q", "-p", "no:cacheprovider", "-p", "tests.deadline", "-o", "addopts="]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *command, "--rootdir", str(tmp_path), str(test)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "1 failed, 2 passed, 1 error in" in out, out
    assert "Unknown pytest.mark.deadline" not in out, out
    assert out.count("did not finish within its deadline of 1 s") >= 2, out
    assert elapsed < 30, elapsed


@pytest_twisted.ensureDeferred
async def test_the_deadline_is_set_before_the_test_starts() -> None:
    """
    A test that counts the reactor's delayed calls as it starts counts its
    own deadline among them: set after the test had started, it was one
    timer more at the end than at the start (test_flapping's "no timer left
    behind" failed on it).
    """
    from twisted.internet import reactor

    assert [c for c in reactor.getDelayedCalls() if getattr(c.func, "__name__", "") == "expire"]
