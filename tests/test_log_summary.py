"""SummaryLog: the first event of a kind at once, repeats as counted summaries, never silent."""

import logging
import re
import time

import pytest

from freeagentics.log_summary import SummaryLog

LOGGER = "tests.log_summary"
WAIT = 30.0  # seconds: generous, for a loaded machine; never a measured duration


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def _wait_for(condition, what: str):
    deadline = time.monotonic() + WAIT
    while not (result := condition()):
        assert time.monotonic() < deadline, f"no {what} within {WAIT:.0f} s"
        time.sleep(0.02)
    return result


@pytest.fixture
def summary():
    made = []

    def make(interval: float, level=logging.WARNING) -> SummaryLog:
        made.append(log := SummaryLog(logging.getLogger(LOGGER), interval=interval, level=level))
        return log

    yield make
    for log in made:
        log.flush()


def test_the_first_event_is_logged_at_once_and_repeats_are_not(summary, caplog):
    log = summary(3600)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        log.event("Flush failed", "Flush failed: %s", "connection refused")
        for _ in range(99):
            log.event("Flush failed", "Flush failed: %s", "connection refused")
        log.event("Other", "Something else (%d)", 7, count=3)
    assert _messages(caplog) == [
        "Flush failed: connection refused",
        "Something else (7) (3 at once)",
    ]
    assert caplog.records[0].levelno == logging.WARNING
    # The record names the caller, not log_summary.py.
    assert caplog.records[0].filename == "test_log_summary.py"


def test_repeats_are_counted_in_the_timers_summary(summary, caplog):
    # Long enough that the timer cannot tick between these back-to-back calls.
    log = summary(1.0, level=logging.ERROR)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        log.event("Points dropped", "Dropped %d point(s)", 1)
        for i in range(2, 6):
            log.event("Points dropped", "Dropped %d point(s)", i, count=10)
        summary_line = _wait_for(
            lambda: [m for m in _messages(caplog) if m.startswith("Points dropped:")],
            "summary line",
        )
        # Then a quiet interval ends the episode, without another line.
        _wait_for(lambda: not log.active("Points dropped"), "end of the episode")
    assert summary_line[0].startswith("Points dropped: 40 more in the last ")
    # The summary quotes the latest repeat.
    assert summary_line[0].endswith("; the last: Dropped 5 point(s)")
    assert _messages(caplog) == ["Dropped 1 point(s)", summary_line[0]]
    assert all(r.levelno == logging.ERROR for r in caplog.records)


def test_a_quiet_interval_ends_the_episode(summary, caplog):
    log = summary(0.1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        log.event("Outage", "Outage: %s", "first")
        assert log.active("Outage")
        _wait_for(lambda: not log.active("Outage"), "end of the episode")
        log.event("Outage", "Outage: %s", "second episode")
    # Nothing to summarise, so the quiet interval logged nothing; the next event is new.
    assert _messages(caplog) == ["Outage: first", "Outage: second episode"]


def test_flush_logs_pending_counts_and_ends_the_episodes(summary, caplog):
    log = summary(3600)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        log.event("A", "a happened")
        log.event("A", "a happened", count=4)
        log.event("B", "b happened")
        log.event("B", "b happened")
        log.flush("A")
        assert not log.active("A") and log.active("B")
        log.flush()
        assert not log.active("B")
        log.flush()  # nothing pending: nothing logged
        log.event("A", "a again")
    # The window's length is whatever the machine took: not asserted.
    messages = [re.sub(r"in the last \d+ s", "in the last N s", m) for m in _messages(caplog)]
    assert messages == [
        "a happened",
        "b happened",
        "A: 4 more in the last N s; the last: a happened",
        "B: 1 more in the last N s; the last: b happened",
        "a again",
    ]


def test_an_episode_without_repeats_flushes_to_nothing(summary, caplog):
    log = summary(3600)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        log.event("A", "a happened")
        log.flush()
    assert _messages(caplog) == ["a happened"]


@pytest.mark.parametrize("interval", [0, -1, 0.0])
def test_an_interval_that_is_not_positive_is_refused(interval):
    with pytest.raises(ValueError, match="interval must be positive"):
        SummaryLog(logging.getLogger(LOGGER), interval=interval)
