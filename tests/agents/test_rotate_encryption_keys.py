from io import StringIO

import numpy as np
import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import override_settings

from agents import key_rotation
from agents.exceptions import BeliefStateDecryptionError
from agents.models import Agent, AgentHistory
from tests import factories

pytestmark = pytest.mark.django_db

OLD = Fernet.generate_key().decode()
NEW = Fernet.generate_key().decode()


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


def test_rotation_re_encrypts_everything_so_the_old_key_can_go(tenant):
    agents = make_world(tenant)
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[NEW, OLD]):
        output = rotate("--batch-size", "2")
    assert "10 scanned, 10 rotated (agents 5, agent_history 5)" in output
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[NEW]):
        for agent in agents:
            assert np.array_equal(Agent.objects.get(pk=agent.pk).belief_state, agent.belief_state)
        assert all(
            np.array_equal(h.belief_state, h.agent.belief_state)
            for h in AgentHistory.objects.select_related("agent")
        )
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[OLD]):
        with pytest.raises(BeliefStateDecryptionError):
            Agent.objects.get(pk=agents[0].pk)


def test_second_run_finds_nothing_to_do(tenant):
    make_world(tenant)
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[NEW, OLD]):
        rotate()
        assert "0 rotated" in rotate()
        assert "10 already under the primary key" in rotate()


def test_dry_run_counts_and_changes_nothing(tenant):
    agents = make_world(tenant)
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[NEW, OLD]):
        assert "10 would rotate" in rotate("--dry-run")
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[OLD]):
        assert np.array_equal(Agent.objects.get(pk=agents[0].pk).belief_state, np.zeros(4))


def test_interrupted_run_keeps_finished_batches_and_resumes(tenant, monkeypatch):
    make_world(tenant, n=6)
    batches = []

    def interrupt_second_batch(table, column, after, batch_size, dry_run):
        if len(batches) == 1:
            raise KeyboardInterrupt
        result = original(table, column, after, batch_size, dry_run)
        batches.append(result)
        return result

    original = key_rotation._rotate_batch
    monkeypatch.setattr(key_rotation, "_rotate_batch", interrupt_second_batch)
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[NEW, OLD]):
        with pytest.raises(CommandError, match="Interrupted after 2 rows"):
            rotate("--batch-size", "2")
        monkeypatch.setattr(key_rotation, "_rotate_batch", original)
        output = rotate("--batch-size", "2")
    assert "12 scanned, 10 rotated" in output
    assert "2 already under the primary key" in output


def test_unreadable_row_stops_with_a_clear_error(tenant):
    agent = make_world(tenant, n=1)[0]
    with connection.cursor() as c:
        c.execute("UPDATE agents SET belief_state = 'garbage' WHERE id = %s", [agent.pk])
    with (
        override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[NEW, OLD]),
        pytest.raises(CommandError, match=f"agents.belief_state row {agent.pk}"),
    ):
        rotate()


def test_batch_size_must_be_positive():
    with pytest.raises(CommandError, match="--batch-size must be at least 1"):
        rotate("--batch-size", "0")
