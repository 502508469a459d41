"""Records every SQL statement's time: a wrapper on each database connection Django
opens, installed once per connection object (Django reuses the wrapper across
reconnects, so a second install would time each statement twice)."""

import time

from django.db import connections
from django.db.backends.signals import connection_created

from freeagentics.telemetry import DB_QUERY_SECONDS, NOOP


def _recorder(alias: str):
    observe = DB_QUERY_SECONDS.labels(alias).observe

    def record(execute, sql, params, many, context):
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            observe(time.perf_counter() - start)

    record.freeagentics_timer = True
    return record


def _install_on(connection) -> None:
    if not any(getattr(w, "freeagentics_timer", False) for w in connection.execute_wrappers):
        # First in the list: a caller's `with connection.execute_wrapper(...)` pops the
        # last one on leaving, which must stay its own.
        connection.execute_wrappers.insert(0, _recorder(connection.alias))


def _on_connection_created(sender, connection, **kwargs):
    _install_on(connection)


def install() -> None:
    if DB_QUERY_SECONDS is NOOP:
        return
    connection_created.connect(_on_connection_created, dispatch_uid="monitoring")
    # Connections opened before the app was ready (checks, migrations) get it too.
    for connection in connections.all(initialized_only=True):
        _install_on(connection)
