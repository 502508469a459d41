import pytest

from monitoring import selectors
from tests.postgres_cluster import PostgresCluster

STATEMENTS_DB = "monitoring_statements"


@pytest.fixture(autouse=True)
def fresh_figures(settings, tmp_path):
    """Each test reads its sources anew (reused figures would be another test's), with an
    empty backup storage of its own."""
    settings.MONITORING_FIGURES_CACHE_SECONDS = 0
    settings.STORAGES = {
        **settings.STORAGES,
        "backups": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": tmp_path / "backups", "file_permissions_mode": 0o600},
        },
    }
    settings.BACKUP_TEMP_DIR = str(tmp_path)
    selectors.forget_figures()
    yield tmp_path / "backups"
    selectors.forget_figures()


@pytest.fixture(scope="session")
def statements_cluster():
    """A PostgreSQL of its own preloading pg_stat_statements, with a database that has it:
    the shared test server may not preload it, and preloading needs a restart."""
    with PostgresCluster(shared_preload_libraries="pg_stat_statements") as cluster:
        cluster.create_database(STATEMENTS_DB)
        cluster.execute("CREATE EXTENSION pg_stat_statements", dbname=STATEMENTS_DB)
        yield cluster


@pytest.fixture
def statements_alias(statements_cluster):
    """A database alias on statements_cluster's database, for the test, whose statistics
    start empty: the cluster serves the whole session."""
    statements_cluster.execute("SELECT pg_stat_statements_reset()", dbname=STATEMENTS_DB)
    with statements_cluster.django_alias("statements", STATEMENTS_DB) as alias:
        yield alias
