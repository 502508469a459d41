"""Refusing maintenance on a hot standby.

A standby takes reads but refuses every write, so maintenance pointed at one fails half
way: the metrics flusher would send a batch to InfluxDB and then fail to delete it (and
send it again next time), partition maintenance and key rotation would fail on their
first write. The commands that write ask first, and stop with one line saying why.
With a multi-host DATABASE_URL and ?target_session_attrs=read-write libpq never lands
on a standby; this is for a URL that names one server, or lacks that option.
"""

from collections.abc import Iterable

from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS, connections
from django.utils.connection import ConnectionDoesNotExist

STANDBY_REFUSED = (
    "{what} refuses to run against a standby (pg_is_in_recovery() is true): point "
    "{variable} at the primary, or list every server in it with "
    "?target_session_attrs=read-write."
)
# The variable settings make each alias from, for the message.
_VARIABLES = {DEFAULT_DB_ALIAS: "DATABASE_URL", "direct": "DATABASE_DIRECT_URL"}


def in_recovery(using: str = DEFAULT_DB_ALIAS) -> bool:
    """Whether the server behind `using` is a standby (replaying WAL, read-only)."""
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_is_in_recovery()")
        return cursor.fetchone()[0]


def refuse_standby(what: str, *, using: Iterable[str] = (DEFAULT_DB_ALIAS,)) -> None:
    """Raise CommandError (STANDBY_REFUSED, naming `what` and the variable to change)
    when any of the aliases `using` is on a standby; aliases not configured (no
    DATABASE_DIRECT_URL, say) are skipped."""
    for alias in using:
        try:
            standby = in_recovery(alias)
        except ConnectionDoesNotExist:
            continue
        if standby:
            variable = _VARIABLES.get(alias, f'DATABASES["{alias}"]')
            raise CommandError(STANDBY_REFUSED.format(what=what, variable=variable))
