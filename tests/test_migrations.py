from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection


@pytest.mark.django_db
def test_models_and_migrations_agree():
    call_command("makemigrations", "--check", "--dry-run", stdout=StringIO())


@pytest.mark.django_db(transaction=True)
def test_migrating_to_zero_and_back():
    for app in ("coalitions", "agents"):
        call_command("migrate", app, "zero", stdout=StringIO())
    tables = connection.introspection.table_names()
    assert not {"agents", "coalitions", "coalition_members", "agent_history"} & set(tables)
    call_command("migrate", stdout=StringIO())
    tables = connection.introspection.table_names()
    assert {"tenants", "agents", "coalitions", "coalition_members", "agent_history"} <= set(tables)
