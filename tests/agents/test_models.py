import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction

from agents.models import Agent
from coalitions.models import Coalition
from tests import factories

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("energy", [101, -1])
def test_database_rejects_energy_out_of_range(tenant, energy):
    agent = factories.make_agent(tenant)
    with pytest.raises(IntegrityError, match="valid_energy"), transaction.atomic():
        with connection.cursor() as c:
            c.execute("UPDATE agents SET energy_level = %s WHERE id = %s", [energy, agent.pk])


def test_database_rejects_unknown_agent_status(tenant):
    agent = factories.make_agent(tenant)
    with pytest.raises(IntegrityError, match="valid_status"), transaction.atomic():
        with connection.cursor() as c:
            c.execute("UPDATE agents SET status = 'zombie' WHERE id = %s", [agent.pk])


def test_database_rejects_unknown_coalition_status(tenant):
    coalition = factories.make_coalition(tenant)
    with pytest.raises(IntegrityError, match="valid_status"), transaction.atomic():
        with connection.cursor() as c:
            c.execute("UPDATE coalitions SET status = 'zombie' WHERE id = %s", [coalition.pk])


@pytest.mark.parametrize("energy", [101, -1])
def test_model_validation_names_energy_field(tenant, energy):
    agent = Agent(tenant=tenant, name="a", agent_type="t", energy_level=energy)
    with pytest.raises(ValidationError) as exc:
        agent.full_clean()
    assert "energy_level" in exc.value.message_dict


def test_model_validation_names_status_field(tenant):
    agent = Agent(tenant=tenant, name="a", agent_type="t", status="zombie")
    with pytest.raises(ValidationError) as exc:
        agent.full_clean()
    assert "status" in exc.value.message_dict
    coalition = Coalition(tenant=tenant, name="c", business_model="retail", status="zombie")
    with pytest.raises(ValidationError) as exc:
        coalition.full_clean()
    assert "status" in exc.value.message_dict


def test_database_defaults_fill_unspecified_columns(tenant):
    with connection.cursor() as c:
        c.execute(
            "INSERT INTO agents (name, agent_type, tenant_id) VALUES ('raw', 't', %s) "
            "RETURNING id, energy_level, status, created_at",
            [tenant.pk],
        )
        pk, energy, status, created_at = c.fetchone()
    assert pk is not None
    assert (energy, status) == (100, "active")
    assert created_at is not None
