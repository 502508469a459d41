"""Django's "default" connection pointed at a server of the tests' own (a standby, a
multi-host list of a primary and its standby) for one block, in this thread.

A new connection object of the entry's ENGINE replaces the thread's, as
PostgresCluster.django_alias does for an alias of its own. The pool is per alias and per
process (DatabaseWrapper._connection_pools), so it is closed on the way in, for the block
to get one of the new server, and on the way out, for the tests that follow to get the
test database's again.
"""

import contextlib

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.utils import load_backend

from freeagentics.settings import database_from_url
from tests.postgres_cluster import SUPERUSER, PostgresCluster


def multi_host_url(*servers: PostgresCluster, dbname: str, **options: str) -> str:
    """postgres://postgres@127.0.0.1:<p1>,127.0.0.1:<p2>/dbname?options: a DATABASE_URL
    naming every server, tried by libpq in this order."""
    hosts = ",".join(f"127.0.0.1:{server.port}" for server in servers)
    query = "&".join(f"{name}={value}" for name, value in options.items())
    return f"postgres://{SUPERUSER}@{hosts}/{dbname}" + (f"?{query}" if query else "")


def database_config(url: str, **changes) -> dict:
    """The DATABASES entry settings make of `url` (the pool and health checks included),
    with Django's defaults filled in as for a configured alias; `changes` on top."""
    config = {**database_from_url(url), **changes}
    return connections.configure_settings({"default": config})["default"]


@contextlib.contextmanager
def default_database(config: dict):
    """connections["default"] on `config` (a database_config()) for the block."""
    saved = connections[DEFAULT_DB_ALIAS]
    _release(saved)
    connection = load_backend(config["ENGINE"]).DatabaseWrapper(config, DEFAULT_DB_ALIAS)
    connections[DEFAULT_DB_ALIAS] = connection
    try:
        yield connection
    finally:
        _release(connection)
        connections[DEFAULT_DB_ALIAS] = saved


def _release(connection) -> None:
    # A connection to a killed server cannot be returned cleanly; it is dropped anyway.
    with contextlib.suppress(Exception):
        connection.close()
    connection.connection = None
    connection.close_pool()
