"""
Log lines that a stranger can make us write many times a second (a device
sending bad data, say), summarized: at most one line per interval.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

#: Seconds between two lines of one summary.
SUMMARY_INTERVAL = 60.0


class Summary:
    """
    Counts occurrences of one kind of event and lets one of them be logged
    per C{interval}, with how many happened since the last line.

    @param clock: tells the time.
    """

    def __init__(self, clock: IReactorTime, interval: float = SUMMARY_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._next = float("-inf")
        self._unlogged = 0

    def occurred(self, log: Callable[[int], object]) -> None:
        """
        One more occurrence: call C{log} with the number of earlier ones not
        logged, if a line is due now.
        """
        now = self._clock.seconds()
        if now < self._next:
            self._unlogged += 1
            return
        self._next = now + self._interval
        unlogged, self._unlogged = self._unlogged, 0
        log(unlogged)
