from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection
from django.db.backends.postgresql.base import ServerBindingCursor


@contextmanager
def server_binding_cursor() -> Iterator:
    """A Django cursor (query logging, execute wrappers) that binds parameters on the
    server. With %b placeholders, array parameters of thousands of UUIDs and tokens
    travel in binary: measured ~10x cheaper than Django's default client-side quoting.
    """
    connection.ensure_connection()
    raw = ServerBindingCursor(connection.connection)
    cursor = (
        connection.make_debug_cursor(raw)
        if connection.queries_logged
        else connection.make_cursor(raw)
    )
    try:
        yield cursor
    finally:
        cursor.close()
