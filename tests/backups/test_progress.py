from io import StringIO

from django.core.management.base import OutputWrapper

from freeagentics.progress import Progress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_log_output_gets_one_line_per_interval(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("freeagentics.progress.time.monotonic", clock)
    out = StringIO()
    progress = Progress(OutputWrapper(out), interval=5.0)

    with progress.task("pg_dump", 100 * 1024 * 1024) as task:
        for step in range(1, 11):
            clock.now += 1
            task.update(step * 10 * 1024 * 1024, detail=f"table {step}")

    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # at 5 s, at 10 s, and the final line
    assert lines[0].startswith("pg_dump   50%  50.0 MiB/100.0 MiB")
    assert "table 5" in lines[0]
    assert lines[-1].endswith("10.0s done  table 10")
    assert "\r" not in out.getvalue()


def test_terminal_output_redraws_a_bar_in_place(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("freeagentics.progress.time.monotonic", clock)
    out = StringIO()
    progress = Progress(OutputWrapper(out), tty=True)

    with progress.task("restore", 4, unit="items") as task:
        for done in range(1, 5):
            clock.now += 0.5
            task.update(done)

    text = out.getvalue()
    assert text.count("\r") == 5
    assert "[############------------]   50%  2 items/4 items" in text
    assert text.endswith("done\n")


def test_verbosity_zero_is_silent():
    out = StringIO()
    progress = Progress(OutputWrapper(out), verbosity=0)
    progress.note("hello")
    with progress.task("x", 1) as task:
        task.update(1)
    assert out.getvalue() == ""
