"""JSON-lines logging for log shippers: ``twistd --logger chatserver.logs.json_observer``.

One JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``namespace``,
``message`` (the formatted text a person would read), then the event's own
structured fields (``user``, ``address``, ``code``, ...) as they were logged.
Twisted's ``jsonFileLogObserver`` writes its internal format instead (the
unformatted template, RFC 7464 record separators), which shippers then have to
re-format; this writes what they index.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, formatEvent

_RESERVED = {"time", "level", "namespace", "message", "traceback"}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def event_as_json_line(event: dict[str, Any]) -> str:
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), tz=UTC).isoformat(
            timespec="milliseconds"
        ),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        # log_* are the logger's own keys; legacy events carry message/format tuples.
        if key.startswith("log_") or key in _RESERVED or key in ("format", "isError", "system"):
            continue
        record[key] = _plain(value)
    return json.dumps(record, ensure_ascii=False) + "\n"


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """The factory twistd's ``--logger`` calls: JSON lines on standard output."""
    return FileLogObserver(out or sys.stdout, event_as_json_line)
