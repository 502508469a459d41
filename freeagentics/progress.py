"""Progress of long work: a bar redrawn in place on a TTY, a line every few seconds otherwise.

Services take a Progress and never write anywhere else; commands build one around their
stdout, so `call_command(..., stdout=StringIO())` captures the progress lines too.
"""

import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


class Progress:
    """Where services report. out is an OutputWrapper-like object (write(msg, ending=)).

    quiet=True drops the progress ticks but keeps notes (verbosity 0 drops both).
    """

    def __init__(self, out=None, *, verbosity: int = 1, interval: float = 5.0, tty=None):
        self.out = out
        self.verbosity = verbosity
        self.interval = interval
        if tty is None:
            isatty = getattr(out, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty

    def note(self, message: str) -> None:
        if self.out is not None and self.verbosity >= 1:
            self.out.write(message)

    def task(self, label: str, total: int | None = None, *, unit: str = "bytes") -> "Task":
        return Task(self, label, total, unit)

    def _emit(self, text: str, *, final: bool) -> None:
        if self.out is None or self.verbosity < 1:
            return
        if self.tty:
            self.out.write("\r\x1b[2K" + text, ending="\n" if final else "")
            flush = getattr(self.out, "flush", None)
            if flush:
                flush()
        else:
            self.out.write(text)


class Task:
    """One measured piece of work. Use as a context manager; update() is cheap to call often."""

    def __init__(self, progress: Progress, label: str, total: int | None, unit: str):
        self.progress = progress
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.detail = ""
        self.started = time.monotonic()
        self._last = self.started
        self._finished = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finish()
        elif self.progress.tty and not self._finished:
            self.progress._emit(f"{self.label}: interrupted", final=True)

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int, detail: str | None = None) -> None:
        self.done = done
        if detail is not None:
            self.detail = detail
        now = time.monotonic()
        # A TTY redraws 5 times a second; a log gets one line per interval.
        if now - self._last >= (0.2 if self.progress.tty else self.progress.interval):
            self._last = now
            self.progress._emit(self._render(now), final=False)

    def finish(self, detail: str | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        if detail is not None:
            self.detail = detail
        if self.total is not None:
            self.done = max(self.done, self.total)
        self.progress._emit(self._render(time.monotonic(), final=True), final=True)

    def _amount(self, n: float) -> str:
        return human_bytes(n) if self.unit == "bytes" else f"{int(n):,} {self.unit}"

    def _render(self, now: float, final: bool = False) -> str:
        elapsed = max(now - self.started, 1e-6)
        parts = [self.label]
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            if self.progress.tty:
                filled = int(fraction * 24)
                parts.append("[" + "#" * filled + "-" * (24 - filled) + "]")
            parts.append(f"{fraction:4.0%}")
            parts.append(f"{self._amount(self.done)}/{self._amount(self.total)}")
        else:
            parts.append(self._amount(self.done))
        if self.unit == "bytes" and self.done:
            parts.append(f"{human_bytes(self.done / elapsed)}/s")
        parts.append(f"{elapsed:.1f}s" + (" done" if final else ""))
        if self.detail:
            parts.append(self.detail)
        return "  ".join(parts)


NULL_PROGRESS = Progress(None)
