"""Rate-limited logging that is never silent.

During an outage the same failure can repeat thousands of times a second. ``SummaryLog``
logs the first occurrence of each kind at once, counts the repeats, and logs one summary
line with the count per interval, from a timer, so an outage that ends (or a process that
goes quiet) still reports what it suppressed. An interval without any repeat ends the
kind's episode: its next occurrence is logged in full again. Counts still pending when the
process exits are logged at exit.
"""

import atexit
import logging
import threading
import time
import weakref
from dataclasses import dataclass

_instances: "weakref.WeakSet[SummaryLog]" = weakref.WeakSet()


@dataclass(slots=True)
class _Episode:
    since: float  # start of the current summary window
    count: int = 0
    message: str = ""
    args: tuple = ()


class SummaryLog:
    """Log events by kind: the first of an episode in full, the rest as counted summaries.

    ``kind`` names what happened in a summary line ("Metrics flush failed"); ``count`` is
    in whatever unit the caller counts (attempts, points...).
    """

    def __init__(self, logger: logging.Logger, *, interval: float = 60.0, level=logging.WARNING):
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        self.logger = logger
        self.interval = interval
        self.level = level
        self._lock = threading.Lock()
        self._episodes: dict[str, _Episode] = {}
        self._timer: threading.Timer | None = None
        _instances.add(self)

    def event(self, kind: str, message: str, *args, count: int = 1, exc_info=None) -> None:
        """Record `count` occurrences of `kind`: logs `message % args` at once if no episode
        of `kind` is going on, otherwise counts them for the next summary."""
        with self._lock:
            episode = self._episodes.get(kind)
            if episode is not None:
                episode.count += count
                episode.message, episode.args = message, args
                return
            self._episodes[kind] = _Episode(since=time.monotonic())
            if self._timer is None:
                self._start_timer()
        suffix = f" ({count} at once)" if count > 1 else ""
        # stacklevel: the record names the caller, not this module.
        self.logger.log(self.level, message + suffix, *args, exc_info=exc_info, stacklevel=2)

    def flush(self, kind: str | None = None) -> None:
        """Log what is counted now (for `kind`, or for every kind) and end those episodes,
        e.g. when the failure is over."""
        with self._lock:
            kinds = list(self._episodes) if kind is None else [kind]
            ended = [(k, self._episodes.pop(k)) for k in kinds if k in self._episodes]
            if not self._episodes and self._timer is not None:
                # Nothing left to summarise: no timer thread waits for nothing.
                self._timer.cancel()
                self._timer = None
        now = time.monotonic()
        for name, episode in ended:
            self._summarise(name, episode, now)

    def active(self, kind: str) -> bool:
        """Whether an episode of `kind` is going on: its next event would only be counted."""
        with self._lock:
            return kind in self._episodes

    def _start_timer(self) -> None:
        self._timer = threading.Timer(self.interval, self._tick)
        self._timer.daemon = True
        self._timer.start()

    def _tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            if threading.current_thread() is not self._timer:
                # Cancelled by flush() while it was already due; a newer timer runs.
                return
            due = []
            for name, episode in list(self._episodes.items()):
                if episode.count:
                    due.append(
                        (
                            name,
                            _Episode(episode.since, episode.count, episode.message, episode.args),
                        )
                    )
                    episode.since, episode.count = now, 0
                else:
                    # A quiet interval ends the episode.
                    del self._episodes[name]
            self._timer = None
            if self._episodes:
                self._start_timer()
        for name, episode in due:
            self._summarise(name, episode, now)

    def _summarise(self, kind: str, episode: _Episode, now: float) -> None:
        if not episode.count:
            return
        self.logger.log(
            self.level,
            "%s: %d more in the last %.0f s; the last: " + episode.message,
            kind,
            episode.count,
            now - episode.since,
            *episode.args,
        )


@atexit.register
def flush_all() -> None:
    """Log every pending count now. Also runs at exit (registered after logging's own
    exit handler, so before logging shuts down); a host that closes its log streams
    earlier (pytest's capture) calls it before closing them."""
    for summary in list(_instances):
        summary.flush()
