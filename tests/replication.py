"""Fixtures of streaming replication: PostgreSQL primaries with hot standbys of the tests'
own (tests/postgres_cluster.py). A pytest plugin: a test module, or a conftest, names it
in `pytest_plugins = ["tests.replication"]`.

replicated_cluster shares one primary and two standbys for the session; tests that kill,
promote or stop a server use failover_pair, made for the test alone.
"""

from dataclasses import dataclass

import pytest

from tests.postgres_cluster import PostgresCluster

STANDBY_NAMES = ("standby1", "standby2")


@dataclass
class Replication:
    primary: PostgresCluster
    standbys: tuple[PostgresCluster, ...]

    def reset(self) -> None:
        """Asynchronous replication, replay resumed and caught up on every standby: how
        replicated_cluster hands the servers to each test, whatever the last one did."""
        broken = [
            server.name or "primary"
            for server in (self.primary, *self.standbys)
            if not server.running or server.in_recovery() != (server is not self.primary)
        ]
        if broken:
            pytest.fail(
                f"the session's replicated cluster is broken ({', '.join(broken)} stopped "
                "or promoted): kill, promote and stop servers of failover_pair instead",
                pytrace=False,
            )
        self.primary.asynchronous_replication()
        for standby in self.standbys:
            standby.resume_replay()
            standby.wait_until_replayed()


@pytest.fixture(scope="session")
def replicated_cluster_session():
    """A primary and two started standbys (standby1, standby2) for the whole session."""
    with PostgresCluster(replication=True) as primary:
        standbys = tuple(primary.standby(name) for name in STANDBY_NAMES)
        yield Replication(primary, standbys)


@pytest.fixture
def replicated_cluster(replicated_cluster_session):
    """The session's primary and standbys, reset: asynchronous, replaying, caught up."""
    replicated_cluster_session.reset()
    return replicated_cluster_session


@pytest.fixture
def failover_pair():
    """A primary and one standby (standby1) of this test's own, for tests that kill,
    promote or stop them; about 1.5 s to make."""
    with PostgresCluster(replication=True) as primary:
        yield Replication(primary, (primary.standby(STANDBY_NAMES[0]),))
