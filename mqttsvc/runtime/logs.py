"""
Where and how mqttsvc logs: human-readable text (the default) or JSON
lines, to standard output or to a file rotated by size with a bounded
number of old files kept (the old service's logs grew forever).

twistd builds its log observer from an optional factory (its C{--logger});
the plugin's options install one made here, so C{--log-format},
C{--log-file}, C{--log-max-bytes} and C{--log-keep} (or twistd's own
C{--logfile}) decide.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python.logfile import LogFile

FORMATS = ("text", "json")

#: Rotate a log file at this size, and keep this many old files: 110 MB of
#: logs at most, where the old service's grew forever.
MAX_BYTES = 10 * 1024 * 1024
KEEP = 10

#: Keys of an event that describe the event itself rather than its fields.
_INTERNAL = ("log_", "failure")


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return str(value)


def event_as_json_line(event: LogEvent) -> str:
    """
    One event as one line of JSON: time, level, namespace, the formatted
    message, the traceback of a failure if any, and every field.
    """
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if not key.startswith(_INTERNAL) and key not in record:
            record[key] = _json_value(value)
    return json.dumps(record, ensure_ascii=False) + "\n"


def _text_line(event: LogEvent) -> str | None:
    return formatEventAsClassicLogText(event)


def make_observer(
    log_format: str,
    path: str | None,
    max_bytes: int,
    keep: int,
    stream: IO[str] | None = None,
) -> ILogObserver:
    """
    An observer writing C{log_format} lines to C{path}, rotated when it
    passes C{max_bytes} with the C{keep} newest old files kept, or to
    C{stream} (standard output) when there is no path.
    """
    out: Any
    if path and path != "-":
        directory = os.path.dirname(os.path.abspath(path))
        out = LogFile(
            os.path.basename(path), directory, rotateLength=max_bytes, maxRotatedFiles=keep
        )
    else:
        out = stream or sys.stdout
    formatter = event_as_json_line if log_format == "json" else _text_line
    # Debug events (Twisted's own SSH key exchange, for one) stay out.
    observer: ILogObserver = FilteringLogObserver(
        FileLogObserver(out, formatter),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
    )
    return observer


# twistd takes its observer factory by name (it imports C{--logger}), so the
# settings parsed from our options wait here for it.
_settings: tuple[str, str | None, int, int] = (FORMATS[0], None, MAX_BYTES, KEEP)

#: The name to give twistd as its logger.
FACTORY_NAME = "mqttsvc.runtime.logs.configured_observer"


def configure(log_format: str, path: str | None, max_bytes: int, keep: int) -> str:
    """
    Remember how to log, for L{configured_observer}.

    @return: the factory's name, for twistd's C{logger} option.
    """
    global _settings
    _settings = (log_format, path, max_bytes, keep)
    return FACTORY_NAME


def configured_observer() -> ILogObserver:
    """
    The observer L{configure} described (twistd calls this).
    """
    return make_observer(*_settings)
