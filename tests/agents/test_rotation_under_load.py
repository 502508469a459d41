"""Key rotation beside writers committing agents_update_states batches: no deadlock, no
failed write, and afterwards every belief opens under the new keys alone."""

import random
import threading
import time

import numpy as np
import pytest
from cryptography.fernet import Fernet
from django.db import connection, connections
from django.test import override_settings

from agents import data_keys
from agents.encryption import decrypt_array, token_key_id
from agents.key_rotation import beliefs_reencrypt, data_keys_rotate, master_keys_rotate
from agents.services import AgentSpec, agents_bulk_load, agents_update_states
from agents.types import AgentStateUpdate

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.reliability("maintenance under load"),
]

OLD = Fernet.generate_key().decode()
NEW = Fernet.generate_key().decode()
AGENTS = 300
BATCH = 50


@pytest.fixture(autouse=True)
def _old_master_key(settings):
    settings.FREEAGENTICS_ENCRYPTION_KEYS = [OLD]


def load_agents(tenant) -> list:
    specs = (
        AgentSpec(name=f"a{i}", agent_type="t", beliefs=np.full(8, i / AGENTS))
        for i in range(AGENTS)
    )
    agents_bulk_load(tenant=tenant, specs=specs)
    with connection.cursor() as c:
        c.execute("SELECT id FROM agents WHERE tenant_id = %s", [tenant.id])
        return [row[0] for row in c.fetchall()]


class Writers:
    """Threads committing batches of updates in random order (the order that deadlocked
    the old rotation), each on its own database connection."""

    def __init__(self, tenant, ids, count=2):
        self.tenant, self.ids = tenant, ids
        self.stop = threading.Event()
        self.errors, self.batches = [], 0
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(count)]

    def _run(self, n):
        rng = random.Random(n)
        try:
            while not self.stop.is_set():
                chosen = rng.sample(self.ids, BATCH)
                updates = [
                    AgentStateUpdate(
                        agent_id=a,
                        beliefs=np.array([rng.random() for _ in range(8)]),
                        energy_level=rng.randrange(100),
                    )
                    for a in chosen
                ]
                agents_update_states(tenant=self.tenant, updates=updates)
                self.batches += 1
        except Exception as e:  # reported by the test's assertion
            self.errors.append(e)
        finally:
            connections.close_all()

    def __enter__(self):
        for t in self.threads:
            t.start()
        while self.batches < 4 and not self.errors:  # writing before rotation starts
            time.sleep(0.01)
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads)

    def __exit__(self, *exc):
        self.finish()


def all_tokens():
    with connection.cursor() as c:
        c.execute(
            "SELECT belief_state FROM agents WHERE belief_state IS NOT NULL UNION ALL "
            "SELECT belief_state FROM agent_history WHERE belief_state IS NOT NULL"
        )
        return [bytes(row[0]) for row in c.fetchall()]


def test_data_key_and_master_rotation_beside_writers(tenant):
    ids = load_agents(tenant)
    old_key = data_keys.active_key(tenant.id).id
    with Writers(tenant, ids) as writers:
        data_keys_rotate([tenant.id])
        counts = beliefs_reencrypt(batch_size=100)
        with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[NEW, OLD]):
            assert master_keys_rotate() >= 2
            batches_during = writers.batches
            time.sleep(0.2)  # writers keep committing after the master rotation too
            # Stopped under the master keys production would then have: the data keys
            # are wrapped by NEW now, and OLD alone no longer opens them.
            writers.finish()
    assert writers.errors == []
    assert writers.batches > batches_during
    assert counts.reencrypted > 0
    # A writer may have held the old key for up to ENCRYPTION_ACTIVE_KEY_SECONDS after
    # the rotation; a second pass (the documented resume) leaves nothing behind.
    with override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[NEW]):
        time.sleep(0.1)
        beliefs_reencrypt(batch_size=100)
        new_key = data_keys.active_key(tenant.id).id
        tokens = all_tokens()
        assert {token_key_id(t) for t in tokens} == {new_key} != {old_key}
        data_keys.forget_cached_keys()
        for token in tokens:
            decrypt_array(token, tenant_id=tenant.id)


def test_dry_run_under_load_changes_nothing_and_waits_for_no_lock(tenant):
    ids = load_agents(tenant)
    data_keys_rotate([tenant.id])
    before = sorted(all_tokens())
    locked = threading.Event()
    release = threading.Event()

    def hold_every_row():
        # A writer that holds every agent row (and a history row) for the whole dry run.
        with connections["default"].cursor() as c:
            c.execute("BEGIN")
            c.execute("SELECT id FROM agents FOR UPDATE")
            c.execute("SELECT id FROM agent_history FOR UPDATE")
            locked.set()
            release.wait(60)
            c.execute("ROLLBACK")
        connections.close_all()

    holder = threading.Thread(target=hold_every_row)
    holder.start()
    try:
        assert locked.wait(30)
        done = {}

        def dry_run():
            try:
                done["counts"] = beliefs_reencrypt(dry_run=True)
            finally:
                connections.close_all()

        dry = threading.Thread(target=dry_run)
        dry.start()
        dry.join(30)
        assert not dry.is_alive(), "the dry run waited for a row lock"
    finally:
        release.set()
        holder.join(30)
    assert done["counts"].reencrypted == len(before)
    assert sorted(all_tokens()) == before
    assert len(ids) == AGENTS
