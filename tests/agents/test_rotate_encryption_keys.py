"""Master-key rotation rewraps data keys; data-key rotation and the legacy conversion
re-encrypt beliefs online (tests/agents/test_rotation_under_load.py runs them beside writers)."""

from io import StringIO

import numpy as np
import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import override_settings

from agents import data_keys, key_rotation
from agents.encryption import encode_array, token_key_id
from agents.exceptions import BeliefStateDecryptionError
from agents.models import Agent, AgentHistory, TenantDataKey
from tests import factories

pytestmark = pytest.mark.django_db

OLD = Fernet.generate_key().decode()
NEW = Fernet.generate_key().decode()


@pytest.fixture(autouse=True)
def _old_master_key(settings):
    settings.FREEAGENTICS_ENCRYPTION_KEYS = [OLD]


def make_world(tenant, n=5):
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[OLD]):
        agents = [factories.make_agent(tenant, belief_state=np.full(4, float(i))) for i in range(n)]
        for agent in agents:
            AgentHistory.objects.create(
                agent=agent, belief_state=agent.belief_state, energy_level=agent.energy_level
            )
    return agents


def rotate(*args):
    out = StringIO()
    call_command("rotate_encryption_keys", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def stored_tokens(table="agents"):
    with connection.cursor() as c:
        c.execute(f"SELECT belief_state FROM {table} WHERE belief_state IS NOT NULL")
        return [bytes(row[0]) for row in c.fetchall()]


def readable_with(keys, agents):
    data_keys.forget_cached_keys()
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=keys):
        for agent in agents:
            loaded = Agent.objects.get(pk=agent.pk).belief_state
            assert np.array_equal(loaded, agent.belief_state)
        for row in AgentHistory.objects.select_related("agent"):
            assert np.array_equal(row.belief_state, row.agent.belief_state)


def test_master_rotation_rewraps_data_keys_and_rewrites_no_belief(tenant, other_tenant):
    agents = make_world(tenant) + make_world(other_tenant)
    before = stored_tokens() + stored_tokens("agent_history")
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[NEW, OLD]):
        output = rotate()
    assert "2 data key(s) rewrapped" in output
    assert stored_tokens() + stored_tokens("agent_history") == before
    readable_with([NEW], agents)
    with pytest.raises(BeliefStateDecryptionError, match="cannot be unwrapped"):
        readable_with([OLD], agents)


def test_master_rotation_refuses_a_key_no_master_key_opens(tenant):
    make_world(tenant)
    with (
        override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[NEW]),
        pytest.raises(CommandError, match=r"Data key \d+ cannot be unwrapped"),
    ):
        rotate()


def test_data_key_rotation_moves_every_row_to_the_new_key(tenant, other_tenant):
    agents = make_world(tenant)
    others = make_world(other_tenant)
    old_key = data_keys.active_key(tenant.id).id
    other_key = data_keys.active_key(other_tenant.id).id
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[OLD]):
        output = rotate("--data-keys", "--tenant", tenant.slug, "--batch-size", "2")
    assert "1 tenant(s) got a new data key" in output
    assert "10 re-encrypted (agent_history 5, agents 5)" in output
    new_key = data_keys.active_key(tenant.id).id
    assert new_key != old_key
    ids = {token_key_id(t) for t in stored_tokens() + stored_tokens("agent_history")}
    assert ids == {new_key, other_key}  # the other tenant's rows were left alone
    keys = {k.id: k for k in TenantDataKey.objects.filter(tenant=tenant)}
    assert keys[old_key].state == "retired" and keys[old_key].rows_remaining == 0
    assert keys[new_key].state == "active" and keys[new_key].rows_remaining == 10
    readable_with([OLD], agents + others)


def test_second_run_finds_nothing_to_do(tenant):
    make_world(tenant)
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[OLD]):
        rotate("--data-keys")
        output = rotate("--reencrypt")
    assert "0 re-encrypted" in output
    assert "10 already under their tenant's active key" in output


def test_dry_run_counts_and_changes_nothing(tenant):
    make_world(tenant)
    before = stored_tokens() + stored_tokens("agent_history")
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[OLD]):
        data_keys.active_key(tenant.id)
        key_rotation.data_keys_rotate([tenant.id])
        assert "10 would re-encrypt" in rotate("--reencrypt", "--dry-run")
    assert stored_tokens() + stored_tokens("agent_history") == before


def test_legacy_tokens_keep_reading_and_convert_once(tenant):
    agents = make_world(tenant, n=3)
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[OLD]), connection.cursor() as c:
        # Tokens as the application wrote them before envelope encryption.
        legacy = Fernet(OLD)
        for agent in agents:
            token = legacy.encrypt(encode_array(agent.belief_state))
            c.execute("UPDATE agents SET belief_state = %s WHERE id = %s", [token, agent.pk])
            c.execute(
                "UPDATE agent_history SET belief_state = %s WHERE agent_id = %s", [token, agent.pk]
            )
        readable_with([OLD], agents)
        assert "6 re-encrypted" in rotate("--reencrypt")
    assert all(token_key_id(t) for t in stored_tokens() + stored_tokens("agent_history"))
    readable_with([OLD], agents)


def test_interrupted_run_keeps_finished_batches_and_resumes(tenant, monkeypatch):
    make_world(tenant, n=6)
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[OLD]):
        key_rotation.data_keys_rotate([tenant.id])
    batches = []
    original = key_rotation._Rekeyer.new_token

    def interrupt_on_the_fifth_row(self, token, row_tenant, where):
        if len(batches) == 4:
            raise KeyboardInterrupt
        batches.append(token)
        return original(self, token, row_tenant, where)

    monkeypatch.setattr(key_rotation._Rekeyer, "new_token", interrupt_on_the_fifth_row)
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[OLD]):
        with pytest.raises(CommandError, match="Interrupted after 4 rows"):
            rotate("--reencrypt", "--batch-size", "2")
        monkeypatch.setattr(key_rotation._Rekeyer, "new_token", original)
        output = rotate("--reencrypt", "--batch-size", "2")
    assert "12 scanned, 8 re-encrypted" in output
    assert "4 already under their tenant's active key" in output


def test_unreadable_row_stops_with_a_clear_error(tenant):
    agent = make_world(tenant, n=1)[0]
    with connection.cursor() as c:
        c.execute("UPDATE agents SET belief_state = 'garbage' WHERE id = %s", [agent.pk])
    with (
        override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[OLD]),
        pytest.raises(CommandError, match="no key in FREEAGENTICS_ENCRYPTION_KEYS opens it"),
    ):
        rotate("--reencrypt")


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(CommandError, match="--batch-size must be at least 1"):
        rotate("--batch-size", "0")
    with pytest.raises(CommandError, match="--tenant needs --data-keys or --reencrypt"):
        rotate("--tenant", "x")


def test_unknown_tenant_is_named(db):
    with pytest.raises(CommandError, match="No tenant with slug nobody"):
        rotate("--reencrypt", "--tenant", "nobody")
