"""Django's PostgreSQL backend, whose pool sweeps out every dead connection at the first.

After a failover or a restart every idle connection in the pool is dead. With
CONN_HEALTH_CHECKS Django's pool checks a connection before handing it out, but
psycopg_pool waits between one failed check and the next (0 s, 1 s, 2 s, 4 s...), all
inside the one request that met them: measured, with six idle connections the first
request after a failover waited the whole pool timeout and failed. Here the first
failed check checks the whole pool (ConnectionPool.check(): an empty query per idle
connection, which a dead one fails at once), so the request waits only for a new
connection. The rest is Django's backend and its pool, unchanged.
"""

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql import base
from psycopg_pool import ConnectionPool


class DatabaseWrapper(base.DatabaseWrapper):
    @property
    def pool(self):
        options = self.settings_dict["OPTIONS"].get("pool")
        sweeps = options and self.settings_dict["CONN_HEALTH_CHECKS"]
        if sweeps and self.alias != NO_DB_ALIAS and self.alias not in self._connection_pools:
            # Made here, as Django would make it but for `check`; Django's property then
            # finds it and hands it out.
            self._connection_pools.setdefault(self.alias, self._sweeping_pool(options))
        return super().pool

    def _sweeping_pool(self, options) -> ConnectionPool:
        if self.settings_dict.get("CONN_MAX_AGE", 0) != 0:
            raise ImproperlyConfigured("Pooling doesn't support persistent connections.")
        made = []

        def check(connection) -> None:
            try:
                ConnectionPool.check_connection(connection)
            except Exception:
                made[0].check()
                raise

        connect_kwargs = self.get_connection_params()
        # As Django's: autocommit while in the pool; Django sets it when handing one out.
        connect_kwargs["autocommit"] = True
        pool = ConnectionPool(
            kwargs=connect_kwargs,
            open=False,
            configure=self._configure_connection,
            check=check,
            **({} if options is True else options),
        )
        made.append(pool)
        return pool
