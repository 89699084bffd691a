"""Workers' logs reach the supervisor's log as structured events, one JSON line each.

A worker writes every log event as a JSON line on its stdout; the supervisor
reads the lines and publishes the events into its own log with the worker's
name as the log system (``[worker 2]`` in twistd's text log). So whatever log
format the supervisor was started with (text, or ``chatserver.logs.json_observer``)
applies to the workers too, with their fields, levels and times intact.
Anything a worker writes to stderr outside its log (a crash before logging
started) arrives as one warning per line.
"""

from __future__ import annotations

import time
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    eventAsJSON,
    eventFromJSON,
    globalLogPublisher,
)

MAX_LINE = 1 << 20


def _portable(event: dict[str, Any]) -> dict[str, Any]:
    """A failure's exception does not survive JSON; its traceback text does."""
    failure = event.get("log_failure")
    if failure is None:
        return event
    event = dict(event)
    del event["log_failure"]
    event["log_format"] = (event.get("log_format") or "") + "\n{failure_traceback}"
    event["failure_traceback"] = failure.getTraceback()
    return event


def worker_observer(out: IO[str]) -> ILogObserver:
    """The worker's only log observer: JSON lines on ``out`` (its stdout pipe)."""
    return FileLogObserver(out, lambda event: eventAsJSON(_portable(event)) + "\n")


class LineRelay:
    """Turns one worker's output stream into log events (bounded line length)."""

    def __init__(self, system: str, index: int, structured: bool) -> None:
        self._system = system
        self._index = index
        self._structured = structured
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._line(line)
        if len(self._buffer) > MAX_LINE:
            line, self._buffer = self._buffer, b""
            self._line(line)

    def flush(self) -> None:
        if self._buffer:
            line, self._buffer = self._buffer, b""
            self._line(line)

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if not text:
            return
        event: dict[str, Any] | None = None
        if self._structured:
            try:
                event = eventFromJSON(text)
            except ValueError:
                event = None
            if not isinstance(event, dict) or "log_time" not in event:
                event = None
        if event is None:
            event = {
                "log_format": "{line}",
                "line": text,
                "log_level": LogLevel.warn,
                "log_namespace": "chatserver.workers",
                "log_time": time.time(),
            }
        event["log_system"] = self._system
        event.setdefault("worker", self._index)
        globalLogPublisher(event)
