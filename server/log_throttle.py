"""Log throttling: a flood of one warning or error cannot fill the log (or the disk).

Under resource exhaustion (out of file descriptors, a connection flood) the same record repeats
thousands of times a second, each with a traceback. `LogThrottle` lets `burst` records of one
kind through per `window_s` and drops the rest; the next record of that kind let through says how
many were dropped. A kind is (logger, level, message template, exception type), so per-request
INFO lines (access log, "request ... finished") are never throttled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

BURST = 5
WINDOW_S = 10.0
MAX_KINDS = 1024  # distinct kinds tracked at once; a flood of unique messages resets the table
THROTTLED_LOGGERS = ("", "asyncio", "uvicorn", "uvicorn.error")  # their handlers get the filter


class LogThrottle(logging.Filter):
    """Passes at most `burst` WARNING+ records of one kind per `window_s` seconds."""

    def __init__(self, burst: int = BURST, window_s: float = WINDOW_S) -> None:
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self._kinds: dict[tuple[object, ...], list[float | int]] = {}  # [window start, n, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        kind = (record.name, record.levelno, str(record.msg), exc)
        now = time.monotonic()
        entry = self._kinds.get(kind)
        if entry is None or now - entry[0] >= self.window_s:
            if len(self._kinds) >= MAX_KINDS:
                self._kinds.clear()
            dropped = int(entry[2]) if entry else 0
            self._kinds[kind] = [now, 1, 0]
            if dropped:
                record.msg = f"{record.msg} [{dropped} similar messages suppressed]"
            return True
        if entry[1] < self.burst:
            entry[1] += 1
            return True
        entry[2] += 1
        return False


@contextmanager
def throttled_logs(throttle: LogThrottle | None = None) -> Iterator[LogThrottle]:
    """Adds `throttle` to the handlers of the root, asyncio and uvicorn loggers (not the
    access log) for the duration, so that records reaching them from any logger are throttled."""
    throttle = throttle or LogThrottle()
    handlers = {h for name in THROTTLED_LOGGERS for h in logging.getLogger(name).handlers}
    for handler in handlers:
        handler.addFilter(throttle)
    try:
        yield throttle
    finally:
        for handler in handlers:
            handler.removeFilter(throttle)
