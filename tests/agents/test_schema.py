"""The schema, read from PostgreSQL's catalog (not from the models), matches ADR-012."""

import pytest
from django.db import IntegrityError, connection, transaction

from agents.models import Agent
from coalitions.models import CoalitionMember
from tests import factories

pytestmark = pytest.mark.django_db


def columns(table):
    with connection.cursor() as c:
        c.execute(
            """
            SELECT column_name, data_type, character_maximum_length,
                   numeric_precision, numeric_scale, column_default
            FROM information_schema.columns WHERE table_name = %s
            """,
            [table],
        )
        return {row[0]: row[1:] for row in c.fetchall()}


def constraints(table):
    with connection.cursor() as c:
        c.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = %s::regclass",
            [table],
        )
        return dict(c.fetchall())


def indexes(table):
    with connection.cursor() as c:
        c.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", [table])
        return dict(c.fetchall())


TS = "timestamp with time zone"


def test_agents_columns_types_and_defaults():
    cols = columns("agents")
    assert cols["id"] == ("uuid", None, None, None, "gen_random_uuid()")
    assert cols["name"][:2] == ("character varying", 255)
    assert cols["agent_type"][:2] == ("character varying", 50)
    assert cols["tenant_id"][0] == "uuid"
    for name in ("created_at", "updated_at", "last_active_at"):
        assert cols[name] == (TS, None, None, None, "now()"), name
    assert cols["belief_state"][0] == "bytea"
    assert cols["personality_traits"][0] == "jsonb"
    assert cols["energy_level"][0] == "integer"
    assert cols["energy_level"][4] == "100"
    assert cols["location_h3"][:2] == ("character varying", 15)
    assert cols["status"][:2] == ("character varying", 20)
    assert cols["status"][4].startswith("'active'")


def test_coalitions_and_members_columns():
    cols = columns("coalitions")
    assert cols["id"][4] == "gen_random_uuid()"
    assert cols["business_model"][:2] == ("character varying", 100)
    for money in ("initial_capital", "current_capital", "total_revenue"):
        assert cols[money][0] == "numeric"
        assert cols[money][2:4] == (15, 2), money
        assert cols[money][4] == "0"
    assert cols["formation_criteria"][0] == "jsonb"
    assert cols["business_config"][0] == "jsonb"
    assert cols["status"][4].startswith("'forming'")
    assert cols["dissolved_at"][0] == TS
    assert cols["dissolved_at"][4] is None
    members = columns("coalition_members")
    assert members["contribution_score"][0] == "numeric"
    assert members["contribution_score"][2:4] == (5, 2)
    assert members["joined_at"] == (TS, None, None, None, "now()")
    assert members["role"][4].startswith("'member'")
    tenants = columns("tenants")
    assert set(tenants) == {"id", "name", "slug", "created_at"}
    assert tenants["id"][4] == "gen_random_uuid()"


def test_named_check_constraints():
    agents = constraints("agents")
    assert agents["valid_energy"] == "CHECK (((energy_level >= 0) AND (energy_level <= 100)))"
    assert "'active'" in agents["valid_status"]
    assert "'suspended'" in agents["valid_status"]
    coalitions = constraints("coalitions")
    for status in ("forming", "active", "profitable", "dissolved"):
        assert f"'{status}'" in coalitions["valid_status"]


def test_members_unique_and_cascading_foreign_keys():
    cons = constraints("coalition_members")
    assert cons["coalition_members_coalition_agent_key"] == "UNIQUE (coalition_id, agent_id)"
    assert (
        "REFERENCES coalitions(id) ON DELETE CASCADE" in cons["coalition_members_coalition_id_fkey"]
    )
    assert "REFERENCES agents(id) ON DELETE CASCADE" in cons["coalition_members_agent_id_fkey"]
    assert (
        "REFERENCES tenants(id)" in constraints("agents")["agents_tenant_id_eb0d49a0_fk_tenants_id"]
    )


def test_adr_indexes():
    agents = indexes("agents")
    assert agents["idx_agents_tenant_type"].endswith("USING btree (tenant_id, agent_type)")
    assert agents["idx_agents_location"].endswith("USING btree (location_h3)")
    assert agents["idx_agents_last_active"].endswith("USING btree (last_active_at)")
    assert agents["idx_agents_composite"].endswith(
        "USING btree (tenant_id, status, last_active_at) WHERE ((status)::text = 'active'::text)"
    )
    members = indexes("coalition_members")
    assert members["idx_coalition_members_agent"].endswith("USING btree (agent_id)")
    assert members["idx_coalition_members_performance"].endswith(
        "USING btree (coalition_id, contribution_score DESC)"
    )


def test_agent_history_is_range_partitioned_with_default_and_current_months():
    with connection.cursor() as c:
        c.execute("SELECT pg_get_partkeydef('agent_history'::regclass)")
        assert c.fetchone()[0] == "RANGE (recorded_at)"
        c.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'agent_history'::regclass"
        )
        bounds = dict(c.fetchall())
    assert bounds["agent_history_default"] == "DEFAULT"
    assert len([name for name in bounds if name != "agent_history_default"]) >= 2


def test_raw_delete_of_coalition_cascades_to_members(tenant):
    coalition = factories.make_coalition(tenant)
    agent = factories.make_agent(tenant)
    CoalitionMember.objects.create(coalition=coalition, agent=agent)
    with connection.cursor() as c:
        c.execute("DELETE FROM coalitions WHERE id = %s", [coalition.id])
        c.execute("SET CONSTRAINTS ALL IMMEDIATE")
    assert not CoalitionMember.objects.filter(agent=agent).exists()


def test_members_unique_per_coalition_and_agent(tenant):
    coalition = factories.make_coalition(tenant)
    agent = factories.make_agent(tenant)
    CoalitionMember.objects.create(coalition=coalition, agent=agent)
    with pytest.raises(IntegrityError), transaction.atomic():
        CoalitionMember.objects.create(coalition=coalition, agent=agent)


def _updated_at(agent):
    return Agent.objects.values_list("updated_at", flat=True).get(pk=agent.pk)


def test_updated_at_moves_on_save_queryset_update_and_bulk_update(tenant):
    agent = factories.make_agent(tenant)
    first = _updated_at(agent)
    agent.energy_level = 50
    agent.save(update_fields=["energy_level"])
    second = _updated_at(agent)
    assert second > first
    Agent.objects.filter(pk=agent.pk).update(energy_level=40)
    third = _updated_at(agent)
    assert third > second
    agent.energy_level = 30
    Agent.objects.bulk_update([agent], ["energy_level"])
    assert _updated_at(agent) > third


def test_coalition_updated_at_moves(tenant):
    coalition = factories.make_coalition(tenant)
    before = type(coalition).objects.values_list("updated_at", flat=True).get(pk=coalition.pk)
    type(coalition).objects.filter(pk=coalition.pk).update(name="renamed")
    after = type(coalition).objects.values_list("updated_at", flat=True).get(pk=coalition.pk)
    assert after > before
