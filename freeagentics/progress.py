"""Progress reporting for long commands: a bar on a terminal, periodic lines otherwise."""

import time
from typing import TextIO


class Progress:
    """Report `done` out of `total` units of work to a stream.

    On a TTY it redraws one line; elsewhere (CI, cron, logs) it prints a line every
    `interval` seconds so the log shows the work moving without flooding it.
    """

    def __init__(self, stream: TextIO, *, total: int | None, label: str, interval: float = 5.0):
        self.stream = stream
        self.total = total
        self.label = label
        self.interval = interval
        self.done = 0
        self.started = time.monotonic()
        self._last = 0.0
        isatty = getattr(stream, "isatty", None)
        self.tty = bool(isatty and isatty())

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty or now - self._last >= self.interval:
            self._last = now
            self._draw(final=False)

    def finish(self) -> None:
        self._draw(final=True)

    def _draw(self, *, final: bool) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            width = 30
            bar = "#" * int(fraction * width)
            text = (
                f"{self.label}: [{bar:<{width}}] {fraction:6.1%} "
                f"{self.done}/{self.total} ({rate:,.0f}/s)"
            )
        else:
            text = f"{self.label}: {self.done} ({rate:,.0f}/s)"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
