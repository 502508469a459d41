"""freeagentics.replicas: reads from streaming replicas, never stale for the caller's own
writes. Against a real primary with two hot standbys (tests/replication.py): "default" is
pointed at the primary for the test, replica1 and replica2 at the standbys, and real
services, selectors, the admin and a websocket consumer run through the router. Which
server ran each statement is recorded on every connection, in every thread."""

import contextlib
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from channels.layers import channel_layers
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore
from django.core.management import call_command
from django.db import connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created
from django.test import AsyncClient, Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agents import cache
from agents.models import Agent, Tenant
from agents.selectors import agent_history, agent_tenants, agents_near, get_agent
from agents.services import agents_update_states
from agents.types import AgentStateUpdate
from freeagentics import replicas
from tests import factories
from tests.postgres_cluster import PostgresCluster, free_port
from tests.realtime.helpers import communicator, db, next_json

pytest_plugins = ["tests.replication"]

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "fa_replicas"
ALIASES = ("replica1", "replica2")
PAUSED, STREAMING = ALIASES
MIDDLEWARE = "freeagentics.replicas.ReadPositionMiddleware"
SESSION_MIDDLEWARE = "django.contrib.sessions.middleware.SessionMiddleware"
# The router's own questions, which are not reads it routed.
OWN_QUERIES = {replicas.STATUS_SQL, replicas.POSITION_SQL}


# --- Without replicas: nothing changes ----------------------------------------------------


@pytest.mark.django_db
def test_without_replicas_there_is_no_router_middleware_app_or_hook(settings):
    assert settings.DATABASE_REPLICAS == []
    assert settings.DATABASE_ROUTERS == [] and router.routers == []
    assert MIDDLEWARE not in settings.MIDDLEWARE
    assert "freeagentics.replicas.ReplicasConfig" not in settings.INSTALLED_APPS
    with replicas.caller():
        factories.make_tenant()
        assert replicas.read_position() == 0
    assert not any(
        getattr(w, "freeagentics_replicas", False) for w in connections["default"].execute_wrappers
    )
    assert not any(r[0][0] == "freeagentics_replicas" for r in connection_created.receivers)


COMPLETE = {
    "DEBUG": "0",
    "SECRET_KEY": "s",
    "DATABASE_URL": "postgres://u:p@db.example:6543/name",
    "REDIS_URL": "redis://cache.example:6379/0",
    "FREEAGENTICS_ENCRYPTION_KEYS": "j0BikImprDHDLmqRY3Lwqh54e7y_J3kuTUJqAnpvd1M=",
}
_SHOW = """
import json, django
django.setup()
from django.conf import settings as s
from django.db import connections, router
from django.db.backends.signals import connection_created
print(json.dumps({
    "replicas": s.DATABASE_REPLICAS,
    "routers": [type(r).__name__ for r in router.routers],
    "apps": [a for a in s.INSTALLED_APPS if "replicas" in a],
    "after_session": s.MIDDLEWARE[s.MIDDLEWARE.index(SESSIONS) + 1],
    "replica1": {k: s.DATABASES.get("replica1", {}).get(k) for k in ("HOST", "OPTIONS", "TEST")},
    "hook": any(r[0][0] == "freeagentics_replicas" for r in connection_created.receivers),
}))
""".replace("SESSIONS", repr(SESSION_MIDDLEWARE))


def configured(env: dict) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in COMPLETE and "REPLICA" not in k}
    env = {**clean, **COMPLETE, "DJANGO_SETTINGS_MODULE": "freeagentics.settings", **env}
    done = subprocess.run(
        [sys.executable, "-c", _SHOW], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_settings_without_replica_urls_install_nothing():
    shown = configured({})
    assert (shown["replicas"], shown["routers"], shown["apps"]) == ([], [], [])
    assert shown["after_session"] == "django.middleware.common.CommonMiddleware"
    assert shown["hook"] is False


def test_settings_with_replica_urls_install_router_app_middleware_and_hook():
    shown = configured(
        {"DATABASE_REPLICA_URLS": "postgres://u@r1.example:5432/name,postgres://u@r2.example/name"}
    )
    assert shown["replicas"] == ["replica1", "replica2"]
    assert shown["routers"] == ["ReplicaRouter"]
    assert shown["apps"] == ["freeagentics.replicas.ReplicasConfig"]
    assert shown["after_session"] == MIDDLEWARE
    assert shown["hook"] is True
    replica1 = shown["replica1"]
    assert replica1["HOST"] == "r1.example" and replica1["TEST"]["MIRROR"] == "default"
    # A replica that does not answer is skipped within 2 s.
    assert replica1["OPTIONS"]["connect_timeout"] == "2"
    assert replica1["OPTIONS"]["pool"]["timeout"] == 2


# --- Units ----------------------------------------------------------------------------------


def test_positions_parse_as_pg_lsn_compares():
    assert replicas.parse_lsn("16/B374D848") == (0x16 << 32) + 0xB374D848
    assert replicas.parse_lsn("0/1") < replicas.parse_lsn("0/10") < replicas.parse_lsn("1/0")
    assert replicas.format_lsn(replicas.parse_lsn("16/B374D848")) == "16/B374D848"


@pytest.mark.parametrize(
    ("sql", "writes"),
    [
        ("SELECT 1", False),
        ("\n   select * from agents FOR UPDATE", False),
        ("(SELECT 1) UNION (SELECT 2)", False),
        ("SAVEPOINT s1", False),
        ("RELEASE SAVEPOINT s1", False),
        ("SET LOCAL synchronous_commit = off", False),
        ("WITH RECURSIVE t AS (SELECT 1) SELECT * FROM t", False),
        ("INSERT INTO agents VALUES (1)", True),
        ("  update agents SET energy_level = 1", True),
        ("DELETE FROM agents", True),
        ("WITH v AS (SELECT 1) UPDATE agents SET energy_level = 2", True),
        ("CREATE TABLE t (x int)", True),
        ("TRUNCATE agent_history", True),
        ("EXPLAIN ANALYZE DELETE FROM agents", True),
    ],
)
def test_statements_that_may_write_are_noted(sql, writes):
    assert replicas._writes(sql) is writes


def test_a_read_position_only_grows_and_a_caller_starts_afresh():
    with replicas.caller(100):
        replicas.read_after(50)
        assert replicas.read_position() == 100
        replicas.read_after(200)
        with replicas.caller():
            assert replicas.read_position() == 0
        assert replicas.read_position() == 200


# --- Noting writes (on the test database; nothing routed) ----------------------------------


@pytest.fixture
def write_hook(settings, transactional_db):
    """The write hook on "default", as with replicas configured (none is asked)."""
    settings.DATABASE_REPLICAS = ["replica1"]
    replicas.install()
    try:
        with replicas.caller():
            yield connections["default"]
    finally:
        replicas.uninstall()


class Boom(Exception):
    pass


def position_queries(queries) -> int:
    return [q["sql"] for q in queries.captured_queries].count(replicas.POSITION_SQL)


def test_a_commit_that_wrote_records_the_primarys_position_once(write_hook):
    with CaptureQueriesContext(write_hook) as queries:
        with transaction.atomic():
            factories.make_tenant()
            factories.make_tenant()
            assert replicas.read_position() == 0
    assert replicas.read_position() > 0
    assert position_queries(queries) == 1


def test_reads_and_rolled_back_writes_record_nothing(write_hook):
    with CaptureQueriesContext(write_hook) as queries:
        Tenant.objects.count()
        with pytest.raises(Boom), transaction.atomic():
            factories.make_tenant()
            raise Boom
    assert replicas.read_position() == 0
    assert position_queries(queries) == 0


def test_an_autocommit_write_records_at_once(write_hook):
    tenant = factories.make_tenant()
    with replicas.caller():
        Tenant.objects.filter(pk=tenant.pk).update(name="renamed")
        assert replicas.read_position() > 0


def test_a_savepoint_rolled_back_does_not_lose_the_next_write(write_hook):
    with transaction.atomic():
        with contextlib.suppress(Boom), transaction.atomic():
            factories.make_tenant()
            raise Boom
        factories.make_tenant()
    assert replicas.read_position() > 0


def test_the_position_is_known_to_the_other_commit_hooks(write_hook):
    seen = []
    with transaction.atomic():
        transaction.on_commit(lambda: seen.append(replicas.read_position()))
        factories.make_tenant()
    assert seen[0] == replicas.read_position() > 0


def test_manual_transactions_send_the_callers_reads_to_the_primary(write_hook):
    write_hook.set_autocommit(False)
    try:
        Tenant.objects.filter(name="nobody").update(name="still nobody")
        write_hook.commit()
    finally:
        write_hook.set_autocommit(True)
    assert replicas.read_position() == replicas.UNKNOWN_POSITION


# --- Against a primary and two standbys -----------------------------------------------------


@pytest.fixture
def anyio_backend():
    """Async tests run on asyncio, the loop uvicorn and Channels use."""
    return "asyncio"


@pytest.fixture
def fresh_channel_layer():
    """A channel layer of this test's event loop."""
    channel_layers.backends = {}
    yield
    channel_layers.backends = {}


@contextlib.contextmanager
def default_on(server: PostgresCluster, name: str):
    """Django's "default" on `name` of `server` for the block, in every thread (the
    settings dict is shared), its pool rebuilt for it."""
    connection = connections["default"]
    keys = ("NAME", "HOST", "PORT", "USER", "PASSWORD")
    saved = {key: connection.settings_dict[key] for key in keys}
    connection.close()
    connection.close_pool()
    connection.settings_dict.update(
        NAME=name, HOST="127.0.0.1", PORT=str(server.port), USER="postgres", PASSWORD=""
    )
    try:
        yield connection
    finally:
        connection.close()
        connection.close_pool()
        connection.settings_dict.update(saved)


@contextlib.contextmanager
def allowed(aliases: set[str], blocker):
    """Django's test case refuses connections to settings aliases it was not told of when
    the test began, in every thread; these are added later, on purpose."""
    guarded = BaseDatabaseWrapper.ensure_connection
    # What pytest-django's blocker and the test case both wrap.
    real = blocker._real_ensure_connection

    def ensure_connection(self, *args, **kwargs):
        if self.alias in aliases:
            return real(self, *args, **kwargs)
        return guarded(self, *args, **kwargs)

    BaseDatabaseWrapper.ensure_connection = ensure_connection
    try:
        yield aliases
    finally:
        BaseDatabaseWrapper.ensure_connection = guarded


def add_alias(alias: str, config: dict) -> None:
    # In the handler's settings, so that every thread can open it (a websocket consumer's
    # database calls run in asgiref's thread); Django's test case, told only of
    # "default" when the test began, does not guard it.
    connections.settings[alias] = connections.configure_settings(
        {"default": connections["default"].settings_dict, alias: config}
    )[alias]


def drop_alias(alias: str) -> None:
    with contextlib.suppress(Exception):
        connections[alias].close()
    with contextlib.suppress(AttributeError):
        del connections[alias]
    connections.settings.pop(alias, None)


def wait_for_probes(timeout: float = 10.0) -> None:
    """Until no background probe runs (each uses the aliases it was given)."""
    deadline = time.monotonic() + timeout
    while replicas._probing and time.monotonic() < deadline:
        time.sleep(0.01)


class Served:
    """Which alias ran each statement, on every connection of every thread."""

    def __init__(self):
        self.statements: list[tuple[str, str]] = []
        self.active = True

    def _wrapper(self, alias: str):
        def record(execute, sql, params, many, context):
            if self.active and sql not in OWN_QUERIES:
                self.statements.append((alias, sql))
            return execute(sql, params, many, context)

        record.served_by = self
        return record

    def _install_on(self, connection) -> None:
        # An earlier test's recorder may linger on another thread's connection.
        wrappers = [w for w in connection.execute_wrappers if not hasattr(w, "served_by")]
        connection.execute_wrappers[:] = [self._wrapper(connection.alias), *wrappers]

    def _created(self, sender, connection, **kwargs):
        self._install_on(connection)

    def install(self) -> None:
        connection_created.connect(self._created, dispatch_uid="tests.served")
        for connection in connections.all(initialized_only=True):
            self._install_on(connection)

    def uninstall(self) -> None:
        self.active = False
        connection_created.disconnect(dispatch_uid="tests.served")
        for connection in connections.all(initialized_only=True):
            connection.execute_wrappers[:] = [
                w for w in connection.execute_wrappers if not hasattr(w, "served_by")
            ]

    def mark(self) -> int:
        return len(self.statements)

    def since(self, mark: int) -> list[str]:
        """The aliases that ran the statements since `mark`, in order."""
        return [alias for alias, _ in self.statements[mark:]]


@dataclass
class Routing:
    primary: PostgresCluster
    standbys: dict[str, PostgresCluster]
    served: Served

    def catch_up(self) -> None:
        """Both standbys have replayed everything so far, and the router may ask again."""
        for standby in self.standbys.values():
            standby.wait_until_replayed()
        time.sleep(2 * replicas.RECHECK_SECONDS)

    def pause(self, alias: str = PAUSED) -> PostgresCluster:
        standby = self.standbys[alias]
        standby.pause_replay()
        return standby


@pytest.fixture(scope="session")
def routing_database(replicated_cluster_session, django_db_setup, django_db_blocker):
    """The project's tables, migrated once, in a database of the replicated primary."""
    primary = replicated_cluster_session.primary
    primary.create_database(DATABASE)
    with django_db_blocker.unblock(), default_on(primary, DATABASE):
        call_command("migrate", verbosity=0)
    return DATABASE


def _empty_routing_database() -> None:
    call_command("flush", interactive=False, verbosity=0)
    with connections["default"].cursor() as cursor:
        cursor.execute("TRUNCATE agent_history")


@pytest.fixture
def routed(replicated_cluster, routing_database, transactional_db, settings, django_db_blocker):
    """Django's "default" on the primary, replica1 and replica2 on the standbys, the router
    and its write hook installed, every statement's server recorded; the test runs as a
    caller of its own. Emptied afterwards, as transactional tests are."""
    servers = dict(zip(ALIASES, replicated_cluster.standbys, strict=True))
    served = Served()
    with (
        default_on(replicated_cluster.primary, routing_database),
        allowed({*ALIASES, "replica3"}, django_db_blocker),
    ):
        for alias, server in servers.items():
            add_alias(alias, server.django_settings(routing_database))
        settings.DATABASE_REPLICAS = list(ALIASES)
        settings.DATABASE_ROUTERS = ["freeagentics.replicas.ReplicaRouter"]
        # Only the paused standby's lag tests set a tight bound.
        settings.DATABASE_REPLICA_MAX_LAG = 600.0
        replicas.install()
        served.install()
        replicas.check_replicas()
        try:
            with replicas.caller():
                yield Routing(replicated_cluster.primary, servers, served)
        finally:
            served.uninstall()
            replicas.uninstall()
            settings.DATABASE_ROUTERS = []
            settings.DATABASE_REPLICAS = []
            for server in servers.values():
                server.resume_replay()
            _empty_routing_database()
            wait_for_probes()
            for alias in ALIASES:
                drop_alias(alias)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_writes_go_to_the_primary_and_reads_to_the_replicas_in_turn(routed):
    tenant = factories.make_tenant()
    agent = factories.make_agent(tenant)
    mark = routed.served.mark()
    agents_update_states(tenant=tenant, updates=[AgentStateUpdate(agent.id, energy_level=7)])
    assert set(routed.served.since(mark)) == {"default"}
    assert replicas.read_position() > 0
    routed.catch_up()

    mark = routed.served.mark()
    for _ in range(4):
        assert Agent.objects.get(pk=agent.pk).energy_level == 7
    assert agent_tenants([agent.id]) == {agent.id: tenant.id}
    aliases = routed.served.since(mark)
    assert set(aliases) == set(ALIASES)

    mark = routed.served.mark()
    with transaction.atomic():
        Agent.objects.get(pk=agent.pk)
        Tenant.objects.count()
    session = SessionStore()
    session["x"] = 1
    session.save()
    SessionStore(session_key=session.session_key).load()
    assert set(routed.served.since(mark)) == {"default"}


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_raw_sql_selectors_read_replicas_and_only_the_primary_fills_the_cache(routed):
    tenant = factories.make_tenant()
    agent = factories.make_agent(tenant)
    routed.catch_up()
    cache.agents_forget([agent.id])

    with replicas.caller():
        mark = routed.served.mark()
        assert [a.id for a in agents_near(tenant=tenant, cell=agent.location_h3)] == [agent.id]
        assert get_agent(tenant=tenant, agent_id=agent.id).id == agent.id
        assert set(routed.served.since(mark)) <= set(ALIASES)
        # A replica's row may be older than a write whose cache entry expired.
        assert cache.agent_load(agent.id) is None

    with replicas.primary():
        get_agent(tenant=tenant, agent_id=agent.id)
    assert cache.agent_load(agent.id) is not None


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_writer_never_reads_from_a_paused_standby_even_once_the_other_caught_up(routed):
    """GitLab's issue 413203: its load balancer stopped sticking to the primary as soon as
    one replica had caught up, and the next reads went to one still behind."""
    tenant = factories.make_tenant()
    agent = factories.make_agent(tenant, energy_level=100)
    routed.catch_up()
    routed.pause()
    streaming = routed.standbys[STREAMING]
    since = timezone.now() - datetime.timedelta(days=1)
    until = timezone.now() + datetime.timedelta(days=1)

    for energy in range(40):
        agents_update_states(
            tenant=tenant, updates=[AgentStateUpdate(agent.id, energy_level=energy)]
        )
        caught_up = energy % 2 == 1
        if caught_up:
            streaming.wait_until_replayed()
            time.sleep(2 * replicas.RECHECK_SECONDS)
        mark = routed.served.mark()
        for _ in range(3):
            assert Agent.objects.get(pk=agent.pk).energy_level == energy
        history = agent_history(tenant=tenant, agent_id=agent.id, since=since, until=until)
        assert len(history) == energy + 1
        aliases = routed.served.since(mark)
        assert PAUSED not in aliases, f"round {energy}: read from the paused standby"
        if caught_up:
            assert set(aliases) == {STREAMING}, f"round {energy}: {aliases}"

    # A caller without writes of its own may read from the paused standby, within the lag
    # allowed: what the writer was spared.
    with replicas.caller():
        mark = routed.served.mark()
        seen = {Agent.objects.get(pk=agent.pk).energy_level for _ in range(6)}
        assert PAUSED in routed.served.since(mark)
        assert 100 in seen  # the energy before the pause


def _write_continuously(primary: PostgresCluster, stop: threading.Event) -> None:
    with primary.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS ticks (at timestamptz)")
        while not stop.is_set():
            conn.execute("INSERT INTO ticks VALUES (now())")
            stop.wait(0.02)


@contextlib.contextmanager
def writing_continuously(primary: PostgresCluster):
    stop = threading.Event()
    writer = threading.Thread(target=_write_continuously, args=(primary, stop), daemon=True)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join(10)


def reads_without_a_position(routing: Routing, count: int = 30) -> list[str]:
    with replicas.caller():
        mark = routing.served.mark()
        for _ in range(count):
            Tenant.objects.exists()
            time.sleep(0.01)
        return routing.served.since(mark)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_standby_lagging_past_the_maximum_gets_no_reads_until_it_catches_up(routed, settings):
    settings.DATABASE_REPLICA_MAX_LAG = 0.5
    settings.DATABASE_REPLICA_CHECK_SECONDS = 0.1
    factories.make_tenant()
    routed.catch_up()
    with writing_continuously(routed.primary):
        paused = routed.pause()
        time.sleep(1.0)

        lagging = reads_without_a_position(routed)
        status = replicas.replica_status(PAUSED)
        assert status.lag > 0.5, status
        assert PAUSED not in lagging and STREAMING in lagging

        paused.resume_replay()
        paused.wait_until_replayed()
        time.sleep(0.2)
        assert PAUSED in reads_without_a_position(routed)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_replica_that_stops_answering_is_skipped_logged_once_and_used_again(
    routed, settings, monkeypatch, caplog
):
    monkeypatch.setattr(replicas, "DOWN_SECONDS", 0.2)
    settings.DATABASE_REPLICA_CHECK_SECONDS = 0.05
    # A third replica that never answers, and replica2 going away for a while.
    add_alias("replica3", {**routed.standbys[PAUSED].django_settings(DATABASE), "PORT": "1"})
    settings.DATABASE_REPLICAS = [*ALIASES, "replica3"]
    factories.make_tenant()
    routed.catch_up()
    replica2 = connections[STREAMING].settings_dict
    port = replica2["PORT"]
    try:
        connections[STREAMING].close()
        replica2["PORT"] = str(free_port())
        time.sleep(0.1)
        with caplog.at_level("INFO", logger="freeagentics.replicas"):
            reads = reads_without_a_position(routed, 60)
            assert set(reads) <= {"default", "replica1"} and "replica1" in reads
            replica2["PORT"] = port
            time.sleep(0.5)
            assert STREAMING in reads_without_a_position(routed)
    finally:
        replica2["PORT"] = port
        settings.DATABASE_REPLICAS = list(ALIASES)
        wait_for_probes()
        drop_alias("replica3")
    skipped = [r.getMessage() for r in caplog.records if "it gets no reads" in r.getMessage()]
    assert len([m for m in skipped if "replica3" in m]) == 1, skipped
    assert len([m for m in skipped if STREAMING in m]) == 1, skipped
    assert any(f"Replica {STREAMING} answers again" in r.getMessage() for r in caplog.records)
    assert "replica3" not in routed.served.since(0)


ADMIN = "/admin/agents/tenant/"


def _tenant_form(name: str) -> dict:
    form = {"name": name, "slug": name.lower()}
    # The data keys inline's management form, empty.
    form.update({f"data_keys-{k}": 0 for k in ("TOTAL_FORMS", "INITIAL_FORMS", "MAX_NUM_FORMS")})
    return form


@pytest.fixture
def position_middleware(settings):
    """The middleware where settings put it when replicas are configured."""
    middleware = list(settings.MIDDLEWARE)
    middleware.insert(middleware.index(SESSION_MIDDLEWARE) + 1, MIDDLEWARE)
    settings.MIDDLEWARE = middleware


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_an_admin_session_carries_its_position_from_the_post_to_the_next_pages(
    routed, position_middleware
):
    writer, other = Client(), Client()
    writer.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    other.force_login(User.objects.create_superuser("other", "other@example.com", "pw"))
    routed.catch_up()
    routed.pause()

    response = writer.post(f"{ADMIN}add/", _tenant_form("Fresh"))
    assert response.status_code == 302
    assert writer.session[replicas.SESSION_KEY] > 0
    routed.standbys[STREAMING].wait_until_replayed()
    for _ in range(6):
        with replicas.caller():  # as the next request in a new thread
            mark = routed.served.mark()
            page = writer.get(ADMIN)
            assert page.status_code == 200 and "Fresh" in page.content.decode()
            aliases = routed.served.since(mark)
            assert PAUSED not in aliases, aliases
    assert STREAMING in aliases

    # Another admin, who wrote nothing, is served by either standby.
    with replicas.caller():
        mark = routed.served.mark()
        for _ in range(3):
            assert other.get(ADMIN).status_code == 200
        assert PAUSED in routed.served.since(mark)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_session_position_also_works_through_the_asgi_handler(routed, position_middleware):
    user = User.objects.create_superuser("root", "root@example.com", "pw")
    routed.catch_up()
    routed.pause()

    async def post_then_get() -> tuple[int, list[str], str]:
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.post(f"{ADMIN}add/", _tenant_form("Async"))
        with replicas.caller():
            mark = routed.served.mark()
            page = await client.get(ADMIN)
        return response.status_code, routed.served.since(mark), page.content.decode()

    status, aliases, body = async_to_sync(post_then_get)()
    assert status == 302 and "Async" in body
    assert PAUSED not in aliases and aliases


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_a_websocket_connection_carries_its_sessions_position(
    routed, position_middleware, fresh_channel_layer
):
    def admin_writes():
        client = Client()
        client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
        routed.catch_up()
        routed.pause()
        assert client.post(f"{ADMIN}add/", _tenant_form("Live")).status_code == 302
        tenant = Tenant.objects.get(slug="live")
        agent_form = {
            "tenant": str(tenant.pk),
            "name": "fresh",
            "agent_type": "scout",
            "status": "active",
            "energy_level": 50,
            "location_h3": factories.BERLIN_CELL,
            "personality_traits": '{"openness": 0.5}',
        }
        assert client.post("/admin/agents/agent/add/", agent_form).status_code == 302
        routed.standbys[STREAMING].wait_until_replayed()
        cookie = client.cookies[django_settings.SESSION_COOKIE_NAME].value
        return tenant, Agent.objects.get(name="fresh"), cookie

    # In asgiref's database thread, as a server's admin request would run.
    tenant, agent, cookie = await db(admin_writes)
    mark = routed.served.mark()
    headers = [(b"cookie", f"{django_settings.SESSION_COOKIE_NAME}={cookie}".encode())]
    # The test client's context is not the connection's: it starts in an empty one.
    async with communicator(f"/ws/agents/?tenant={tenant.slug}", headers=headers) as comm:
        for n in range(6):
            await comm.send_json_to({"action": "subscribe", "agent_ids": [str(agent.id)], "id": n})
            reply = await next_json(comm)
            assert reply["type"] == "subscribed", reply
    aliases = routed.served.since(mark)
    assert PAUSED not in aliases, aliases
    assert STREAMING in aliases


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_a_token_connection_reads_past_its_own_write_and_checks_revocation_on_the_primary(
    routed, fresh_channel_layer
):
    from realtime.services import api_token_create

    def setup():
        tenant = factories.make_tenant()
        agent = factories.make_agent(tenant)
        token = api_token_create(tenant=tenant, name="t")
        routed.catch_up()
        routed.pause()
        return agent, token[1]

    agent, raw = await db(setup)
    mark = routed.served.mark()
    headers = [(b"authorization", f"Bearer {raw}".encode())]
    async with communicator("/ws/agents/", headers=headers) as comm:
        for n in range(4):
            await comm.send_json_to({"action": "subscribe", "agent_ids": [str(agent.id)], "id": n})
            assert (await next_json(comm))["type"] == "subscribed"
    statements = routed.served.statements[mark:]
    # The token's first use is a write (last_used_at); every read after it avoids the
    # standby that has not replayed it.
    first_write = next(i for i, (_, sql) in enumerate(statements) if sql.startswith("UPDATE"))
    assert statements[first_write][0] == "default"
    assert PAUSED not in [alias for alias, _ in statements[first_write:]]
    revocation_check = [alias for alias, sql in statements if '"api_tokens"."id" IN' in sql]
    assert revocation_check == ["default"]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_write_past_djangos_cursor_counts_once_announced(routed):
    tenant = factories.make_tenant()
    routed.catch_up()
    routed.pause()
    before = replicas.read_position()
    with transaction.atomic(), connections["default"].cursor() as cursor:
        # On psycopg's own cursor, as agents_bulk_load's COPY goes: no wrapper sees it.
        cursor.cursor.execute("UPDATE tenants SET name = 'renamed' WHERE id = %s", [tenant.pk])
        replicas.wrote()
    assert replicas.read_position() > before
    routed.standbys[STREAMING].wait_until_replayed()
    mark = routed.served.mark()
    for _ in range(4):
        assert Tenant.objects.get(pk=tenant.pk).name == "renamed"
    assert PAUSED not in routed.served.since(mark)
