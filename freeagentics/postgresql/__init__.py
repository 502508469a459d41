"""Django's PostgreSQL backend with a pool that, finding one dead connection, sweeps out
the others at once (base.py). DATABASES' ENGINE: "freeagentics.postgresql"."""
