"""The app behind PgBouncer 1.18 in transaction pooling mode (DATABASE_PGBOUNCER).

For this module Django's default alias goes through a PgBouncer of 2 server connections
in front of the test database, configured as DATABASE_PGBOUNCER configures it, and
DATABASES["direct"] goes to the server itself, as DATABASE_DIRECT_URL adds it. The
service and selector tests of agents and coalitions run again through it; the tests
below run the same services from several threads, so server connections change hands
between clients, and show each piece of session state the app relies on to be safe there
or routed past the pooler: the maintenance lock, the key store's lock timeout, iterator()
cursors, prepared statements, the time zone.
"""

import contextlib
import copy
import threading
import uuid
from collections import Counter
from io import StringIO

import numpy as np
import psycopg
import pytest
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.management import CommandError, call_command
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.utils import ProgrammingError
from django.test import override_settings

from agents import data_keys
from agents.key_rotation import data_keys_rotate
from agents.models import Agent
from agents.selectors import agent_export_rows, agents_near, get_agent
from agents.services import agent_adjust_energy, agent_create, agents_update_states
from agents.types import AgentStateUpdate
from backups.exceptions import PARTITION_LOCK_HELD
from backups.partition_selectors import PartitionedTable
from backups.partitions import (
    DIRECT_ALIAS,
    NEEDS_DIRECT_CONNECTION,
    PARTITION_LOCK_KEY,
    partitions_maintain,
)
from coalitions.selectors import coalition_members, coalitions_near, is_coalition_member
from coalitions.services import coalition_add_member, coalition_create, coalition_set_status
from freeagentics.progress import Progress
from tests import factories
from tests.agents import test_selectors as agent_selector_tests
from tests.agents import test_services as agent_service_tests
from tests.coalitions import test_services as coalition_service_tests
from tests.pgbouncer_server import PgBouncer

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

POOL_SIZE = 2
THREADS = 6
ROUNDS = 15
# More runs of one statement than psycopg's default prepare_threshold (5).
REPEATS = 12
TOKYO = "Asia/Tokyo"


def _reuse(module, label: str) -> None:
    """Collect a service test module's tests here too, so they run through the pooler."""
    for name, test in vars(module).items():
        if name.startswith("test_") and callable(test):
            globals()[f"test_{label}_{name.removeprefix('test_')}"] = test


_reuse(agent_service_tests, "agents_services")
_reuse(agent_selector_tests, "agents_selectors")
_reuse(coalition_service_tests, "coalitions_services")


def _drop_connections(alias: str) -> None:
    connections[alias].close()
    connections[alias].close_pool()


@pytest.fixture(scope="module", autouse=True)
def bouncer(django_db_setup):
    """PgBouncer (transaction mode, 2 server connections) in front of the test database,
    which pytest-django created on the server itself: CREATE DATABASE cannot go through
    a pooler, and PgBouncer maps every database name to the same name on the server.
    Django's default alias points at it and DATABASES["direct"] at the server."""
    config = connections[DEFAULT_DB_ALIAS].settings_dict
    original = copy.deepcopy(config)
    server = (config["HOST"] or "127.0.0.1", int(config["PORT"] or 5432))
    with PgBouncer(*server, pool_size=POOL_SIZE) as pgbouncer:
        _drop_connections(DEFAULT_DB_ALIAS)
        # What DATABASE_PGBOUNCER=1 sets.
        config.update(HOST="127.0.0.1", PORT=str(pgbouncer.port), DISABLE_SERVER_SIDE_CURSORS=True)
        config["OPTIONS"]["prepare_threshold"] = None
        direct = copy.deepcopy(original)
        direct["TEST"]["MIRROR"] = DEFAULT_DB_ALIAS
        connections.settings[DIRECT_ALIAS] = direct
        pgbouncer_setting = override_settings(DATABASE_PGBOUNCER=True)
        pgbouncer_setting.enable()
        try:
            yield pgbouncer
        finally:
            pgbouncer_setting.disable()
            for alias in (DEFAULT_DB_ALIAS, DIRECT_ALIAS):
                _drop_connections(alias)
            with contextlib.suppress(AttributeError):  # never used in this thread
                del connections[DIRECT_ALIAS]
            del connections.settings[DIRECT_ALIAS]
            config.clear()
            config.update(original)


@pytest.fixture
def one_server_connection(bouncer):
    """All but one of the pool's server connections held in open transactions: every
    other client takes turns on the last one, as clients do under load."""
    holders = [bouncer.connect(connection.settings_dict["NAME"]) for _ in range(POOL_SIZE - 1)]
    for holder in holders:
        holder.execute("SELECT 1")
    yield
    for holder in holders:
        holder.rollback()
        holder.close()


@pytest.fixture
def raw_client(bouncer):
    """A psycopg client of the pooler (prepare_threshold None), beside Django's."""
    clients = []

    def connect(**kwargs) -> psycopg.Connection:
        kwargs.setdefault("autocommit", True)
        client = bouncer.connect(connection.settings_dict["NAME"], **kwargs)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


@pytest.fixture
def without_direct():
    """No DATABASES["direct"]: DATABASE_PGBOUNCER on and DATABASE_DIRECT_URL unset."""
    # This thread's wrapper goes too (connections["direct"] then raises), and comes back
    # as it was: the test case's teardown unwraps its blocked methods.
    wrapper = connections[DIRECT_ALIAS]
    del connections[DIRECT_ALIAS]
    saved = connections.settings.pop(DIRECT_ALIAS)
    yield
    connections.settings[DIRECT_ALIAS] = saved
    connections[DIRECT_ALIAS] = wrapper


def backend_pid(alias: str = DEFAULT_DB_ALIAS) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def in_threads(work, count: int = THREADS) -> list:
    """work(index) in `count` threads at once, each on its own Django connection; the
    exceptions they raised."""
    errors = []
    start = threading.Barrier(count)

    def run(index):
        try:
            start.wait()
            work(index)
        except Exception as e:
            errors.append(e)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def beliefs(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(8))


# --- the services from several clients ------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_services_and_selectors_from_six_threads_share_two_server_connections(bouncer, tenant):
    agents = [
        agent_create(tenant=tenant, spec=factories.agent_spec(name=f"a{i}", beliefs=beliefs(i)))
        for i in range(THREADS * 4)
    ]
    coalition = coalition_create(tenant=tenant, name="Traders", business_model="retail")
    coalition_set_status(tenant=tenant, coalition_id=coalition.id, status="active")
    pids = [set() for _ in range(THREADS)]

    def work(index):
        mine = agents[index * 4 : index * 4 + 4]
        for run in range(ROUNDS):
            pids[index].add(backend_pid())
            agents_update_states(
                tenant=tenant,
                updates=[
                    AgentStateUpdate(a.id, beliefs=beliefs(run), energy_level=run) for a in mine
                ],
            )
            agent_adjust_energy(tenant=tenant, agent_id=mine[0].id, delta=1)
            assert get_agent(tenant=tenant, agent_id=mine[1].id).energy_level == run
            assert len(agents_near(tenant=tenant, cell=factories.BERLIN_CELL, radius=1)) == len(
                agents
            )
            if run == 0:
                coalition_add_member(tenant=tenant, coalition_id=coalition.id, agent_id=mine[2].id)
            assert is_coalition_member(
                tenant=tenant, coalition_id=coalition.id, agent_id=mine[2].id
            )
            coalitions_near(tenant=tenant, cell=factories.BERLIN_CELL, business_model="retail")
            assert mine[2].id in {
                m.agent_id for m in coalition_members(tenant=tenant, coalition_id=coalition.id)
            }

    errors = in_threads(work)

    assert errors == []
    servers = bouncer.admin("SHOW SERVERS")
    assert 1 <= len(servers) <= POOL_SIZE
    # Six clients ran on two server sessions, and clients moved between them.
    assert len(set().union(*pids)) <= POOL_SIZE
    assert any(len(seen) > 1 for seen in pids)
    energy = dict(Agent.objects.filter(tenant=tenant).values_list("id", "energy_level"))
    assert [energy[agents[i * 4].id] for i in range(THREADS)] == [ROUNDS] * THREADS
    assert (
        len(coalitions_near(tenant=tenant, cell=factories.BERLIN_CELL, business_model="retail"))
        == 1
    )


@pytest.mark.django_db(transaction=True)
def test_data_keys_rotate_through_the_pooler_while_writers_write(bouncer, tenant):
    agents = [
        agent_create(tenant=tenant, spec=factories.agent_spec(name=f"k{i}")) for i in range(4)
    ]

    def work(index):
        for run in range(ROUNDS):
            if index == 0 and run % 5 == 0:
                data_keys_rotate([tenant.id])
            else:
                agents_update_states(
                    tenant=tenant,
                    updates=[AgentStateUpdate(agents[index % 4].id, beliefs=beliefs(run))],
                )

    errors = in_threads(work, count=4)

    assert errors == []
    data_keys.forget_cached_keys()
    for agent in agents:
        assert get_agent(tenant=tenant, agent_id=agent.id).beliefs.shape == (8,)


# --- session state: what is safe through the pooler ----------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_key_store_bounds_its_lock_waits_in_the_transaction_only(
    one_server_connection, raw_client
):
    # Before: `-c lock_timeout` in the startup packet, which PgBouncer 1.18 refuses.
    other = raw_client()
    with data_keys.key_connection() as conn:
        inside = conn.execute("SHOW lock_timeout").fetchone()[0]
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]

    assert inside == f"{data_keys.KEY_LOCK_TIMEOUT_MS // 1000}s"
    # The next client on that server connection does not inherit it.
    assert other.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
    assert other.execute("SHOW lock_timeout").fetchone()[0] == "0"


@pytest.mark.django_db(transaction=True)
def test_each_client_keeps_its_own_time_zone_on_a_shared_server_connection(
    one_server_connection, raw_client
):
    """Django sets TimeZone on connect (set_config, a session setting); PgBouncer tracks
    TimeZone per client (ParameterStatus) and sets it again on the server connection
    whenever another client's differs."""
    tokyo = raw_client()
    tokyo.execute("SELECT set_config('TimeZone', %s, false)", [TOKYO])
    seen = Counter()
    for _ in range(REPEATS):
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('TimeZone'), now()::text, pg_backend_pid()")
            django_zone, django_now, django_pid = cursor.fetchone()
        tokyo_zone, tokyo_now, tokyo_pid = tokyo.execute(
            "SELECT current_setting('TimeZone'), now()::text, pg_backend_pid()"
        ).fetchone()
        seen[
            (django_zone, django_now[-3:], tokyo_zone, tokyo_now[-3:], django_pid == tokyo_pid)
        ] += 1

    assert seen == {("UTC", "+00", TOKYO, "+09", True): REPEATS}


@pytest.mark.django_db(transaction=True)
def test_statements_run_many_times_are_never_prepared(one_server_connection, raw_client, tenant):
    agent = agent_create(tenant=tenant, spec=factories.agent_spec())
    other = raw_client()
    connection.ensure_connection()
    assert connection.connection.prepare_threshold is None

    for _ in range(REPEATS):
        data_keys.forget_cached_keys()
        assert agents_near(tenant=tenant, cell=factories.BERLIN_CELL)[0].id == agent.id
        assert other.execute("SELECT %s::int", [1]).fetchone() == (1,)

    assert other.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)


@pytest.mark.django_db(transaction=True)
def test_psycopgs_default_prepare_threshold_breaks_on_the_sixth_run(
    one_server_connection, raw_client
):
    """The hazard prepare_threshold=None avoids: after 5 runs psycopg prepares a query
    as _pg3_0 on the server connection it happens to have, which another client gets."""
    first, second = raw_client(prepare_threshold=5), raw_client(prepare_threshold=5)
    for _ in range(6):
        first.execute("SELECT %s::int", [1])

    with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
        for _ in range(6):
            second.execute("SELECT %s::text", ["a"])


@pytest.mark.django_db(transaction=True)
def test_iterator_reads_every_row_without_a_server_side_cursor(raw_client, tenant):
    Agent.objects.bulk_create(
        Agent(tenant=tenant, name=f"r{i}", agent_type="explorer") for i in range(1200)
    )
    other = raw_client(autocommit=False)
    rows = agent_export_rows(Agent.objects.filter(tenant=tenant))
    first = next(rows)
    # Takes the server connection the first chunk was read on, as another client would.
    other.execute("SELECT 1")

    assert len([first, *rows]) == 1200
    other.rollback()


@pytest.mark.django_db(transaction=True)
def test_a_server_side_cursor_through_the_pooler_is_lost_between_fetches(raw_client, tenant):
    """Why DATABASE_PGBOUNCER sets DISABLE_SERVER_SIDE_CURSORS: outside a transaction
    iterator() declares a WITH HOLD cursor on one server connection, and its next fetch
    may run on another."""
    Agent.objects.bulk_create(
        Agent(tenant=tenant, name=f"r{i}", agent_type="explorer") for i in range(300)
    )
    other = raw_client(autocommit=False)
    connection.settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = False
    try:
        rows = Agent.objects.filter(tenant=tenant).values_list("id", flat=True).iterator(100)
        next(rows)
        # PgBouncer hands out the most recently used server connection: the cursor's.
        other.execute("SELECT 1")
        # Django's ProgrammingError from the FETCH, or psycopg's from closing the cursor.
        with pytest.raises(
            (ProgrammingError, psycopg.errors.InvalidCursorName), match=r"cursor .* does not exist"
        ):
            list(rows)
    finally:
        connection.settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = True
        other.rollback()


# --- the maintenance lock -------------------------------------------------------------------


def test_a_session_advisory_lock_through_the_pooler_excludes_no_one(
    one_server_connection, raw_client
):
    """Why maintenance takes its lock on the direct connection: through the pooler a
    session lock stays on the server connection, which the next client gets, lock and all."""
    first, second = raw_client(), raw_client()
    try:
        assert first.execute("SELECT pg_try_advisory_lock(%s)", [PARTITION_LOCK_KEY]).fetchone()[0]
        assert second.execute("SELECT pg_try_advisory_lock(%s)", [PARTITION_LOCK_KEY]).fetchone()[0]
    finally:
        first.execute("SELECT pg_advisory_unlock_all()")


@pytest.fixture
def scratch_table(django_db_blocker):
    """A monthly-partitioned table of this test's own, for maintenance to work on."""
    spec = PartitionedTable(f"bouncer_log_{uuid.uuid4().hex[:8]}", "recorded_at")
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE {spec.table} (id bigint, recorded_at timestamptz NOT NULL) "
            "PARTITION BY RANGE (recorded_at)"
        )
    yield spec
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE {spec.table} CASCADE")


def _lock_holders(bouncer) -> list[int]:
    unsigned = PARTITION_LOCK_KEY & (2**64 - 1)
    with psycopg.connect(
        host="127.0.0.1",
        port=bouncer.target_port,
        dbname=connection.settings_dict["NAME"],
        user=bouncer.user,
        autocommit=True,
    ) as server:
        rows = server.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = %s AND objid = %s AND objsubid = 1",
            [unsigned >> 32, unsigned & 0xFFFFFFFF],
        ).fetchall()
    return [pid for (pid,) in rows]


class _Spy(Progress):
    def __init__(self, on_note):
        super().__init__(verbosity=0)
        self.on_note = on_note

    def note(self, message: str) -> None:
        self.on_note()


@pytest.mark.django_db(transaction=True, databases=[DEFAULT_DB_ALIAS, DIRECT_ALIAS])
def test_maintenance_holds_its_lock_on_the_direct_connection(bouncer, scratch_table):
    seen = []

    def during_the_run():
        if seen:
            return
        competing = []
        seen.append((_lock_holders(bouncer), backend_pid(DIRECT_ALIAS)))
        seen.append({server["remote_pid"] for server in bouncer.admin("SHOW SERVERS")})

        def compete(_):
            try:
                partitions_maintain(tables=(scratch_table,), archive=False, drop=False)
            except ValidationError as e:
                competing.extend(e.messages)

        assert in_threads(compete, count=1) == []
        seen.append(competing)

    report = partitions_maintain(
        tables=(scratch_table,), archive=False, drop=False, progress=_Spy(during_the_run)
    )

    (holders, direct_pid), pooled_pids, competing = seen
    assert holders == [direct_pid]
    assert direct_pid not in pooled_pids
    assert competing == [PARTITION_LOCK_HELD]
    assert report.count("create") >= 2
    assert _lock_holders(bouncer) == []


@pytest.mark.django_db(transaction=True)
def test_maintenance_behind_the_pooler_without_a_direct_url_refuses_in_one_line(
    without_direct, scratch_table
):
    with pytest.raises(ImproperlyConfigured, match="DATABASE_DIRECT_URL"):
        partitions_maintain(tables=(scratch_table,), archive=False, drop=False)
    with pytest.raises(CommandError) as excinfo:
        call_command("maintain_partitions", "--no-archive")

    assert str(excinfo.value) == NEEDS_DIRECT_CONNECTION
    assert "\n" not in NEEDS_DIRECT_CONNECTION
    # A dry run only reads: it needs no session of its own.
    assert partitions_maintain(tables=(scratch_table,), dry_run=True).plan.changes


# --- backups past the pooler ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True, databases=[DEFAULT_DB_ALIAS, DIRECT_ALIAS])
def test_backup_and_its_drill_run_past_the_pooler_with_database_direct(settings, tmp_path, tenant):
    settings.STORAGES = {
        **settings.STORAGES,
        "backups": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": tmp_path / "backups"},
        },
    }
    settings.BACKUP_TEMP_DIR = str(tmp_path)
    settings.BACKUP_REDIS_RDB = False
    agent = agent_create(tenant=tenant, spec=factories.agent_spec(beliefs=beliefs(1)))
    out = StringIO()

    call_command("backup", "--database", DIRECT_ALIAS, stdout=out, verbosity=0)
    name = out.getvalue().strip().splitlines()[-1]
    call_command("verify_backup", name, "--database", DIRECT_ALIAS, stdout=out, verbosity=0)

    assert f"{name} restores and checks out" in out.getvalue()
    assert get_agent(tenant=tenant, agent_id=agent.id).beliefs.shape == (8,)
