"""freeagentics.standby: the maintenance commands that write refuse a standby, in one
line, before they touch anything. On a primary the check passes: every other test of
those commands runs them past it, on the test database."""

import pytest
from django.core.management import CommandError, call_command

from freeagentics.standby import STANDBY_REFUSED, in_recovery
from tests.default_database import database_config, default_database

pytest_plugins = ["tests.replication"]
pytestmark = pytest.mark.slow


@pytest.fixture
def on_standby(replicated_cluster, django_db_blocker):
    """Django's default on the session's first standby (its postgres database)."""
    standby = replicated_cluster.standbys[0]
    with django_db_blocker.unblock(), default_database(database_config(standby.url())):
        yield standby


def test_in_recovery_tells_a_standby_from_a_primary(replicated_cluster, django_db_blocker):
    primary, standby = replicated_cluster.primary, replicated_cluster.standbys[0]
    with django_db_blocker.unblock():
        with default_database(database_config(primary.url())):
            assert in_recovery() is False
        with default_database(database_config(standby.url())):
            assert in_recovery() is True


@pytest.mark.parametrize(
    "command, args",
    [
        ("maintain_partitions", []),
        ("maintain_partitions", ["--dry-run"]),
        ("flush_metrics", []),
        ("flush_metrics", ["--follow"]),
        ("rotate_encryption_keys", []),
        ("rotate_encryption_keys", ["--data-keys"]),
        ("rotate_encryption_keys", ["--reencrypt", "--dry-run"]),
    ],
)
def test_maintenance_commands_refuse_a_standby_in_one_line(on_standby, command, args):
    with pytest.raises(CommandError) as refused:
        call_command(command, *args)

    message = str(refused.value)
    assert message == STANDBY_REFUSED.format(what=command, variable="DATABASE_URL")
    assert "\n" not in message
    assert "pg_is_in_recovery() is true" in message


def test_partition_maintenance_refuses_a_direct_connection_to_a_standby(
    replicated_cluster, django_db_blocker
):
    # Its advisory lock and pg_dump use DATABASES["direct"] (DATABASE_DIRECT_URL) when set.
    primary, standby = replicated_cluster.primary, replicated_cluster.standbys[0]
    with django_db_blocker.unblock(), default_database(database_config(primary.url())):
        with standby.django_alias("direct", "postgres"):
            with pytest.raises(CommandError) as refused:
                call_command("maintain_partitions")

    assert str(refused.value) == STANDBY_REFUSED.format(
        what="maintain_partitions", variable="DATABASE_DIRECT_URL"
    )
