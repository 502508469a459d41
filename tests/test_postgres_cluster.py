"""The servers later replication and pooling tests build on do what they claim: standbys
replay the primary, pause, promote; a killed primary stops hard; a synchronous commit
waits for its standby; PgBouncer in transaction mode pools, and loses session state."""

import socket
import threading
import time
import uuid

import psycopg
import pytest

from tests.pgbouncer_server import PgBouncer
from tests.postgres_cluster import PostgresCluster, lsn_bytes

pytest_plugins = ["tests.replication"]
pytestmark = pytest.mark.slow

WAIT = 10.0


def new_table(primary: PostgresCluster) -> str:
    """A table of the test's own on the session's primary (they outlive the test)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    primary.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
    return name


def ids(server: PostgresCluster, table: str) -> list[int]:
    return [row[0] for row in server.execute(f"SELECT id FROM {table} ORDER BY id")]


def wait_for(what: str, condition, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


# --- streaming replication ----------------------------------------------------------------


def test_a_write_on_the_primary_is_readable_on_both_standbys_once_replayed(
    replicated_cluster,
):
    primary = replicated_cluster.primary
    table = new_table(primary)
    primary.execute(f"INSERT INTO {table} VALUES (1, 'one')")
    written = primary.current_lsn()

    for standby in replicated_cluster.standbys:
        replayed = standby.wait_until_replayed(written)
        assert lsn_bytes(replayed) >= lsn_bytes(written)
        assert standby.execute(f"SELECT id, note FROM {table}") == [(1, "one")]


def test_standbys_are_read_only(replicated_cluster):
    table = new_table(replicated_cluster.primary)
    standby = replicated_cluster.standbys[0]
    standby.wait_until_replayed()

    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        standby.execute(f"INSERT INTO {table} VALUES (1, 'one')")


def test_a_paused_standby_misses_a_new_write_that_the_other_standby_sees(replicated_cluster):
    primary = replicated_cluster.primary
    paused, streaming = replicated_cluster.standbys
    table = new_table(primary)
    paused.wait_until_replayed()
    paused.pause_replay()

    primary.execute(f"INSERT INTO {table} VALUES (1, 'one')")
    streaming.wait_until_replayed()

    assert ids(streaming, table) == [1]
    assert ids(paused, table) == []
    with pytest.raises(TimeoutError, match="replay paused"):
        paused.wait_until_replayed(timeout=0.3)

    paused.resume_replay()
    paused.wait_until_replayed()
    assert ids(paused, table) == [1]


def test_remote_apply_commit_returns_only_once_the_standby_has_replayed_it(
    replicated_cluster,
):
    primary = replicated_cluster.primary
    synchronous, asynchronous = replicated_cluster.standbys
    table = new_table(primary)
    synchronous.wait_until_replayed()
    primary.synchronous_replication(synchronous, level="remote_apply")
    synchronous.pause_replay()

    committed = threading.Event()
    with primary.connect() as writer:

        def write():
            writer.execute(f"INSERT INTO {table} VALUES (1, 'one')")
            committed.set()

        thread = threading.Thread(target=write)
        thread.start()
        try:
            wait_for(
                "the commit to wait for the synchronous standby",
                lambda: (
                    primary.execute(
                        "SELECT wait_event FROM pg_stat_activity WHERE pid = %s",
                        [writer.info.backend_pid],
                    )
                    == [("SyncRep",)]
                ),
            )
            assert not committed.is_set()
            # Not visible on the primary until the standby confirms; but the commit is in
            # the primary's flushed WAL, so an asynchronous standby may show it first.
            assert ids(primary, table) == []
            asynchronous.wait_until_replayed()
            assert ids(asynchronous, table) == [1]
        finally:
            synchronous.resume_replay()
            thread.join(WAIT)

    assert committed.is_set()
    # No wait_until_replayed(): remote_apply returned only once the standby had replayed it.
    assert ids(synchronous, table) == [1]


def test_synchronous_commit_on_returns_once_the_standby_has_the_wal_not_replayed_it(
    replicated_cluster,
):
    primary = replicated_cluster.primary
    standby = replicated_cluster.standbys[0]
    table = new_table(primary)
    standby.wait_until_replayed()
    primary.synchronous_replication(standby, level="on")
    standby.pause_replay()

    primary.execute(f"INSERT INTO {table} VALUES (1, 'one')")

    assert ids(standby, table) == []
    assert lsn_bytes(standby.received_lsn()) > lsn_bytes(standby.replay_lsn())
    standby.resume_replay()
    standby.wait_until_replayed()
    assert ids(standby, table) == [1]


def test_synchronous_replication_refuses_a_level_that_waits_for_no_standby(
    replicated_cluster,
):
    primary = replicated_cluster.primary
    with pytest.raises(ValueError, match="would not wait"):
        primary.synchronous_replication(replicated_cluster.standbys[0], level="local")
    with pytest.raises(ValueError, match="standby"):
        primary.synchronous_replication(primary, level="on")


def test_standby_needs_a_primary_made_for_replication():
    with pytest.raises(ValueError, match="replication=True"):
        PostgresCluster().standby("standby1")
    with pytest.raises(ValueError, match="synchronous_commit"):
        PostgresCluster(replication=True, synchronous_commit=False)


def test_promote_makes_a_standby_writable(failover_pair):
    primary, (standby,) = failover_pair.primary, failover_pair.standbys
    table = new_table(primary)
    standby.wait_until_replayed()

    standby.promote()

    assert not standby.in_recovery()
    standby.execute(f"INSERT INTO {table} VALUES (1, 'one')")
    assert ids(standby, table) == [1]
    assert ids(primary, table) == []


def test_kill_stops_the_primary_hard_and_restart_recovers_it(failover_pair):
    primary = failover_pair.primary
    table = new_table(primary)
    primary.execute(f"INSERT INTO {table} VALUES (1, 'one')")
    with primary.connect() as open_connection:
        primary.kill()

        assert not primary.running
        with pytest.raises(psycopg.OperationalError):
            open_connection.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        primary.connect()
    # A clean shutdown removes it.
    assert (primary.data / "postmaster.pid").exists()

    primary.restart()

    assert "not properly shut down; automatic recovery in progress" in primary.log_tail(20000)
    assert ids(primary, table) == [1]


def test_a_synchronous_commit_survives_failover_to_a_standby_that_had_not_replayed_it(
    failover_pair,
):
    primary, (standby,) = failover_pair.primary, failover_pair.standbys
    table = new_table(primary)
    standby.wait_until_replayed()
    primary.synchronous_replication(standby, level="on")
    standby.pause_replay()
    primary.execute(f"INSERT INTO {table} VALUES (1, 'one')")

    primary.kill()
    standby.promote()

    # Promotion replays all the WAL the standby received, paused or not.
    assert ids(standby, table) == [1]


# --- PgBouncer ------------------------------------------------------------------------------


def test_pgbouncer_in_transaction_mode_shares_few_server_connections_among_psycopg_clients(
    replicated_cluster,
):
    primary = replicated_cluster.primary
    with PgBouncer("127.0.0.1", primary.port, pool_mode="transaction", pool_size=2) as bouncer:
        clients = [bouncer.connect(autocommit=True) for _ in range(6)]
        try:
            # More runs than psycopg's default prepare_threshold (5): with None, nothing
            # is prepared on a server connection another client may get next.
            for run in range(8):
                for number, client in enumerate(clients):
                    assert client.execute("SELECT %s::int + %s", [number, run]).fetchone() == (
                        number + run,
                    )
            servers = bouncer.admin("SHOW SERVERS")
        finally:
            for client in clients:
                client.close()

    assert 1 <= len(servers) <= 2


def test_pgbouncer_transaction_mode_moves_session_state_to_another_client(replicated_cluster):
    """The hazard the app must avoid: a SET outside a transaction stays on the server
    connection, which the next transaction, another client's, gets; the client that set
    it loses it."""
    primary = replicated_cluster.primary
    with PgBouncer("127.0.0.1", primary.port, pool_mode="transaction", pool_size=2) as bouncer:
        with bouncer.connect(autocommit=True) as setter, bouncer.connect() as other:
            setter.execute("SET statement_timeout = '1234ms'")
            # A transaction holds a server connection: the one just released (PgBouncer
            # reuses the most recent), so the setter's next statement gets the other.
            leaked = other.execute("SHOW statement_timeout").fetchone()[0]
            lost = setter.execute("SHOW statement_timeout").fetchone()[0]
            other.rollback()

    assert leaked == "1234ms"
    assert lost == "0"


def test_pgbouncer_transaction_mode_breaks_server_side_prepared_statements(
    replicated_cluster,
):
    """Why connections through PgBouncer 1.18 need prepare_threshold=None: psycopg's
    prepared statements (here from the first run; by default from the fifth) live on one
    server connection, which the next transaction may not get, or another client may."""
    primary = replicated_cluster.primary
    with PgBouncer("127.0.0.1", primary.port, pool_mode="transaction", pool_size=2) as bouncer:
        with (
            bouncer.connect(autocommit=True, prepare_threshold=0) as first,
            bouncer.connect(prepare_threshold=0) as second,
        ):
            first.execute("SELECT %s::int", [1])  # prepared as _pg3_0 on a server

            # Gets that server in a transaction: psycopg names its first statement _pg3_0.
            with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
                second.execute("SELECT %s::text", ["a"])
            # Meanwhile `first` runs on the other server, which never saw its _pg3_0.
            with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                first.execute("SELECT %s::int", [2])
            second.rollback()


def test_pgbouncer_fails_loudly_when_it_cannot_listen_or_start(replicated_cluster):
    primary = replicated_cluster.primary
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(pytest.fail.Exception, match="could not listen"):
            PgBouncer("127.0.0.1", primary.port, port=taken.getsockname()[1]).start()

    with pytest.raises(pytest.fail.Exception, match="unknown parameter"):
        PgBouncer("127.0.0.1", primary.port, no_such_setting=1).start()
