"""Rate-limited logging that is never silent.

During an outage the same failure can repeat thousands of times a second. ``SummaryLog``
logs the first occurrence of each kind at once, counts the repeats, and logs one summary
line with the count per interval, from a timer, so an outage that ends (or a process that
goes quiet) still reports what it suppressed.
"""

import logging
import threading
import time
from collections import Counter


class SummaryLog:
    """Log events by kind: the first of a window in full, the rest as one counted summary."""

    def __init__(self, logger: logging.Logger, *, interval: float = 60.0, level=logging.WARNING):
        self.logger = logger
        self.interval = interval
        self.level = level
        self._lock = threading.Lock()
        self._window_start: dict[str, float] = {}
        self._suppressed: Counter = Counter()
        self._timer: threading.Timer | None = None

    def event(self, kind: str, message: str, *args, count: int = 1, exc_info=None) -> None:
        """Record `count` occurrences of `kind`; logs `message % args` if its window is new."""
        now = time.monotonic()
        with self._lock:
            started = self._window_start.get(kind)
            if started is not None and now - started < self.interval:
                self._suppressed[kind] += count
                self._schedule_flush()
                return
            self._window_start[kind] = now
        suffix = f" ({count} at once)" if count > 1 else ""
        self.logger.log(self.level, message + suffix, *args, exc_info=exc_info)

    def flush(self) -> None:
        """Log the counts suppressed so far and start new windows."""
        with self._lock:
            suppressed, self._suppressed = self._suppressed, Counter()
            self._window_start.clear()
            self._timer = None
        for kind, count in sorted(suppressed.items()):
            self.logger.log(
                self.level, "%s: %d more in the last %.0f s", kind, count, self.interval
            )

    def _schedule_flush(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(self.interval, self.flush)
            self._timer.daemon = True
            self._timer.start()
