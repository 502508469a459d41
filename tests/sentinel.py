"""Fixtures of Redis Sentinel: a master, one replica and three sentinels of the tests' own
(tests/redis_sentinel.py). A pytest plugin: a test module, or a conftest, names it in
`pytest_plugins = ["tests.sentinel"]`.

sentinel_group shares one group for the session, handed to each test healthy and empty;
tests that kill, pause or fail over its servers, or change its configuration, use
fresh_sentinel_group, made for the test alone. A failing test's report carries the tails
of its group's logs; the run ends with a summary of how long groups took to start and of
what tests recorded with record_sentinel_timing.
"""

import pytest

from tests.redis_sentinel import SentinelGroup

MASTER_NAME = "mymaster"
GROUP_FIXTURES = ("sentinel_group", "sentinel_group_session", "fresh_sentinel_group")

_timings: list[tuple[str, float]] = []


@pytest.fixture(scope="session")
def sentinel_group_session():
    """A master, one replica and three sentinels (master name "mymaster") for the session."""
    with SentinelGroup(MASTER_NAME) as group:
        _timings.append(("session group start", group.started_in))
        yield group


@pytest.fixture
def sentinel_group(sentinel_group_session):
    """The session's group, healthy and empty: re-pointed or rebuilt if a test broke it."""
    if sentinel_group_session.reset() == "rebuilt":
        _timings.append(("session group rebuilt", sentinel_group_session.started_in))
    return sentinel_group_session


@pytest.fixture
def fresh_sentinel_group(request):
    """A group of this test's own (master name "mymaster"), about 2.5 s to start."""
    with SentinelGroup(MASTER_NAME) as group:
        _timings.append((f"{request.node.name}: group start", group.started_in))
        yield group


@pytest.fixture
def record_sentinel_timing(request):
    """record(what, seconds): a line of the run's timing summary and a user property."""

    def record(what: str, seconds: float) -> None:
        _timings.append((f"{request.node.name}: {what}", seconds))
        request.node.user_properties.append((what, round(seconds, 3)))

    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    # Before teardown: a fresh group's folders, logs included, are still there.
    if report.failed:
        groups = {}
        for name in GROUP_FIXTURES:
            group = getattr(item, "funcargs", {}).get(name)
            if group is not None and group.processes:
                groups.setdefault(id(group), (name, group))
        for name, group in groups.values():
            report.sections.append((f"{name} logs", group.log_tail()))
    return report


def pytest_terminal_summary(terminalreporter):
    if _timings:
        terminalreporter.section("redis sentinel timings")
        for what, seconds in _timings:
            terminalreporter.write_line(f"{seconds:6.2f} s  {what}")
