"""Failover: the primary is killed mid-load and its standby promoted, while the same
process (the same pool) keeps writing through the services over a multi-host
DATABASE_URL with target_session_attrs=read-write. With synchronous replication every
commit that returned is on the new primary (RPO 0); with asynchronous replication the
commits lost are counted. RTO is the time from the kill to the first write that
succeeds after it. docs/README-failover.md reports the figures these tests print
(pytest -rP shows them).

Also: the pool after a failover (freeagentics.postgresql), a synchronous standby that is
down, and the side connections of backups and data keys on a multi-host URL.
"""

import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from django.core.management import call_command
from django.db import InterfaceError, OperationalError, close_old_connections, connections

from agents import data_keys
from agents.models import Tenant
from agents.services import AgentSpec, agent_create
from backups import pgtools
from tests.default_database import database_config, default_database, multi_host_url
from tests.factories import make_tenant
from tests.postgres_cluster import PostgresCluster

pytest_plugins = ["tests.replication"]
pytestmark = pytest.mark.slow

DBNAME = "freeagentics_failover"
ENGINE = "freeagentics.postgresql"
# Commits before the kill, and after the first write that follows it.
COMMITS_BEFORE = 300
COMMITS_AFTER = 100
DEADLINE = 25.0
# Idle connections to the old primary left in the pool by the pool tests: more than
# psycopg_pool's backoff between failed checks (0 + 1 + 2 s) fits in POOL_TIMEOUT.
IDLE = 6
POOL_TIMEOUT = 3


@dataclass
class Cluster:
    primary: PostgresCluster
    standby: PostgresCluster
    url: str
    tenant: Tenant


@dataclass
class FailoverRun:
    committed: list[uuid.UUID] = field(default_factory=list)
    # Seconds each write took before the kill: what the replication mode costs a commit.
    latencies: list[float] = field(default_factory=list)
    failures: Counter = field(default_factory=Counter)
    killed_at: float = 0.0
    kill_returned_at: float = 0.0
    promoted_at: float = 0.0
    resumed_at: float = 0.0
    resumed: int = 0
    lost: set = field(default_factory=set)

    @property
    def rto(self) -> float:
        return self.resumed_at - self.killed_at

    @property
    def promote_seconds(self) -> float:
        return self.promoted_at - self.kill_returned_at

    def summary(self, mode: str) -> str:
        failed = ", ".join(f"{n} {name}" for name, n in self.failures.items()) or "none"
        return (
            f"failover ({mode}): {len(self.committed)} commits returned, {len(self.lost)} "
            f"lost; RTO {self.rto:.2f} s (promote {self.promote_seconds:.2f} s); writes "
            f"failed in the gap: {failed}; a write took {1000 * self.latency:.2f} ms "
            "(median before the kill)"
        )

    @property
    def latency(self) -> float:
        return statistics.median(self.latencies) if self.latencies else 0.0


@pytest.fixture
def cluster(failover_pair, django_db_blocker):
    """failover_pair with a migrated database and a tenant, replayed on the standby, and
    Django's default on [primary, standby] with target_session_attrs=read-write, through
    freeagentics.postgresql with the pool settings make of the URL."""
    primary, (standby,) = failover_pair.primary, failover_pair.standbys
    primary.create_database(DBNAME)
    url = multi_host_url(primary, standby, dbname=DBNAME, target_session_attrs="read-write")
    with django_db_blocker.unblock(), default_database(database_config(url, ENGINE=ENGINE)):
        call_command("migrate", verbosity=0)
        tenant = make_tenant()
        close_old_connections()
        standby.wait_until_replayed()
        yield Cluster(primary, standby, url, tenant)


def write(tenant: Tenant) -> uuid.UUID | type[Exception]:
    """One request's write through the service, on a connection from the pool given
    back at the end (as request_finished does): the new agent's id, or the class of the
    database error (not committed, or in doubt)."""
    close_old_connections()
    try:
        return agent_create(tenant=tenant, spec=AgentSpec(name="w", agent_type="explorer")).id
    except (OperationalError, InterfaceError) as e:
        return type(e)
    finally:
        close_old_connections()


def agent_ids(server: PostgresCluster) -> set[uuid.UUID]:
    return {row[0] for row in server.execute("SELECT id FROM agents", dbname=DBNAME)}


def run_failover(cluster: Cluster, hooks: dict[int, Callable] | None = None) -> FailoverRun:
    """Write in a loop; after COMMITS_BEFORE commits another thread kills the primary and
    promotes the standby; stop COMMITS_AFTER commits after the first write that began
    once the old primary was gone. hooks: called after that many commits."""
    run = FailoverRun()
    hooks = hooks or {}
    loaded, abandoned = threading.Event(), threading.Event()
    failed_over = []  # what the failing-over thread raised, if anything

    def fail_over():
        loaded.wait()
        if abandoned.is_set():
            return
        try:
            run.killed_at = time.monotonic()
            cluster.primary.kill()
            run.kill_returned_at = time.monotonic()
            cluster.standby.promote()
            run.promoted_at = time.monotonic()
        except BaseException as e:
            failed_over.append(e)

    thread = threading.Thread(target=fail_over)
    thread.start()
    deadline = time.monotonic() + DEADLINE
    try:
        while run.resumed < COMMITS_AFTER and not failed_over:
            if time.monotonic() > deadline:
                pytest.fail(f"writes did not resume within {DEADLINE:g} s: {run.summary('?')}")
            began = time.monotonic()
            result = write(cluster.tenant)
            if isinstance(result, type):
                run.failures[result.__name__] += 1
                continue
            run.committed.append(result)
            if not run.killed_at:
                run.latencies.append(time.monotonic() - began)
            if hook := hooks.get(len(run.committed)):
                hook()
            if len(run.committed) == COMMITS_BEFORE:
                loaded.set()
            # A write that began once the old primary was gone went to the new one.
            if run.kill_returned_at and began > run.kill_returned_at:
                if not run.resumed:
                    run.resumed_at = time.monotonic()
                run.resumed += 1
    finally:
        abandoned.set()
        loaded.set()
        thread.join()
    if failed_over:
        raise failed_over[0]
    run.lost = set(run.committed) - agent_ids(cluster.standby)
    return run


def stop_wal_receipt(standby: PostgresCluster) -> None:
    """The standby stops streaming (as behind a slow or cut link), having replayed
    everything its primary has flushed so far."""
    standby.wait_until_replayed()
    standby.execute("ALTER SYSTEM SET primary_conninfo = ''")
    standby.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10
    while standby.scalar("SELECT count(*) FROM pg_stat_wal_receiver"):
        assert time.monotonic() < deadline, "the standby's WAL receiver did not stop"
        time.sleep(0.01)


# --- the primary dies mid-load ------------------------------------------------------------


def test_with_synchronous_replication_every_returned_commit_survives_and_writes_resume(cluster):
    cluster.primary.synchronous_replication(cluster.standby, level="on")
    pool = connections["default"].pool

    run = run_failover(cluster)

    print(run.summary("synchronous_commit on, FIRST 1"))
    assert run.lost == set()
    assert run.resumed == COMMITS_AFTER
    assert connections["default"].pool is pool  # the same pool: nothing was restarted


def test_with_asynchronous_replication_writes_resume_and_lost_commits_are_counted(cluster):
    run = run_failover(cluster)

    print(run.summary("asynchronous, standby streaming"))
    assert run.resumed == COMMITS_AFTER
    # Not asserted: what was lost, the WAL not yet sent when the primary died.


def test_with_asynchronous_replication_a_lagging_standby_loses_what_it_had_not_received(
    cluster,
):
    lagging_from = COMMITS_BEFORE - 50

    run = run_failover(cluster, {lagging_from: lambda: stop_wal_receipt(cluster.standby)})

    print(run.summary(f"asynchronous, standby {COMMITS_BEFORE - lagging_from} commits behind"))
    assert run.resumed == COMMITS_AFTER
    assert run.lost <= set(run.committed[lagging_from:])  # all it had received survived


# --- a synchronous standby that is down -------------------------------------------------------


def test_with_the_synchronous_standby_down_commits_wait_until_replication_is_asynchronous(
    cluster,
):
    cluster.primary.synchronous_replication(cluster.standby, level="on")
    cluster.standby.kill()
    results = []
    writer = threading.Thread(target=lambda: results.append(write(cluster.tenant)))

    writer.start()
    writer.join(1.0)
    assert writer.is_alive() and results == []  # the commit waits for the standby
    cluster.primary.asynchronous_replication()
    writer.join(10)

    assert not writer.is_alive()
    assert isinstance(results[0], uuid.UUID)  # committed, on no standby


def test_a_cancelled_wait_for_the_synchronous_standby_returns_success_unreplicated(
    failover_pair,
):
    # Why README-failover says never to cancel those waits: psycopg cancels on Ctrl-C,
    # pg_cancel_backend() does, and the commit "succeeds" with only a WARNING.
    primary, (standby,) = failover_pair.primary, failover_pair.standbys
    primary.execute("CREATE TABLE waits (x int)")
    primary.synchronous_replication(standby, level="on")
    standby.kill()
    notices = []
    with primary.connect() as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        pid = conn.info.backend_pid
        canceller = threading.Timer(
            0.3, lambda: primary.execute("SELECT pg_cancel_backend(%s)", [pid])
        )
        canceller.start()
        conn.execute("INSERT INTO waits VALUES (1)")  # returns: no error
        canceller.join()

    assert notices == ["canceling wait for synchronous replication due to user request"]
    assert primary.execute("SELECT x FROM waits") == [(1,)]


# --- the pool after a failover ----------------------------------------------------------------


def warm_pool(idle: int) -> int:
    """`idle` connections left idle in the default pool; how many it holds."""
    connection = connections["default"]
    pool = connection.pool
    pool.open()
    held = [pool.getconn() for _ in range(idle)]
    for conn in held:
        pool.putconn(conn)
    return pool.get_stats()["pool_available"]


def timed_writes(tenant: Tenant, count: int) -> list[tuple[float, object]]:
    results = []
    for _ in range(count):
        began = time.monotonic()
        result = write(tenant)
        results.append((round(time.monotonic() - began, 2), result))
    return results


def pool_options(cluster: Cluster) -> dict:
    """The OPTIONS settings make of the URL, with a POOL_TIMEOUT pool timeout."""
    options = database_config(cluster.url)["OPTIONS"]
    return {**options, "pool": {**options["pool"], "timeout": POOL_TIMEOUT}}


def failover_with_idle_connections(
    cluster: Cluster, *, rounds: int = 1, **config
) -> tuple[int, list]:
    """With `config` for the pool: IDLE idle connections, the primary killed and the
    standby promoted; then requests one after the other, `rounds` per dead connection
    and two more. (the dead connections, each request's (seconds, result))."""
    with default_database(database_config(cluster.url, **config)):
        dead = warm_pool(IDLE)
        cluster.primary.kill()
        cluster.standby.promote()
        results = timed_writes(cluster.tenant, rounds * dead + 2)
    print(f"{config.get('ENGINE')}: {dead} dead connections; requests: {results}")
    return dead, results


def test_after_a_failover_no_request_is_handed_a_dead_connection_nor_waits_for_them(cluster):
    dead, results = failover_with_idle_connections(
        cluster, ENGINE=ENGINE, OPTIONS=pool_options(cluster)
    )

    assert dead >= IDLE
    assert all(isinstance(result, uuid.UUID) for _, result in results)
    # The first check that failed swept out every dead one: no backoff between them.
    assert results[0][0] < POOL_TIMEOUT


def test_djangos_own_pool_check_waits_between_dead_connections_until_a_request_times_out(
    cluster,
):
    # What freeagentics.postgresql changes: psycopg_pool sleeps 0, 1, 2... s between
    # failed checks, all in the one request that meets them.
    dead, results = failover_with_idle_connections(
        cluster, ENGINE="django.db.backends.postgresql", OPTIONS=pool_options(cluster)
    )

    assert dead >= IDLE
    assert results[0][1] is OperationalError  # the pool timed out, no dead connection
    assert results[0][0] >= POOL_TIMEOUT - 0.1
    assert isinstance(results[-1][1], uuid.UUID)


def test_without_health_checks_each_dead_connection_fails_one_request(cluster):
    # The pool hands its connections out in turn, new ones between the dead: two rounds
    # per dead connection reach every one of them.
    dead, results = failover_with_idle_connections(
        cluster, rounds=2, ENGINE=ENGINE, OPTIONS=pool_options(cluster), CONN_HEALTH_CHECKS=False
    )

    failed = [result for _, result in results if not isinstance(result, uuid.UUID)]
    # Each dead connection handed out fails its request, and none is handed out twice.
    assert failed and set(failed) == {OperationalError} and len(failed) <= dead
    assert all(isinstance(result, uuid.UUID) for _, result in results[-2:])


# --- side connections on a multi-host URL -----------------------------------------------------


@pytest.mark.parametrize(
    "side_connection",
    [
        pytest.param(lambda: pgtools.connect("default"), id="backups.pgtools.connect"),
        pytest.param(lambda: pgtools.maintenance_connection("default"), id="maintenance"),
        pytest.param(data_keys.key_connection, id="agents.data_keys.key_connection"),
    ],
)
def test_side_connections_reach_the_primary_of_a_multi_host_url_listing_a_standby_first(
    replicated_cluster, django_db_blocker, side_connection
):
    primary, standby = replicated_cluster.primary, replicated_cluster.standbys[0]
    url = multi_host_url(standby, primary, dbname="postgres", target_session_attrs="read-write")

    with django_db_blocker.unblock(), default_database(database_config(url)):
        with side_connection() as conn:
            row = conn.execute("SELECT pg_is_in_recovery(), inet_server_port()").fetchone()

    assert row == (False, primary.port)
