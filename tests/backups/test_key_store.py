"""Data keys live in the key store beside the backups, not in them, so shredding a
tenant reaches its beliefs in every older backup, while other tenants restore intact."""

import numpy as np
import pytest
from django.db import connection

from agents.encryption import decrypt_array
from agents.exceptions import TenantShreddedError
from agents.models import Agent, Tenant
from agents.selectors import get_agent
from agents.shredding import tenant_shred
from backups import keystore, storage
from tests import factories
from tests.backups.test_backup_restore import make_backup, manifest_of, run

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.reliability("restore faults")]


def stored_key_rows() -> int:
    with connection.cursor() as c:
        c.execute("SELECT count(*) FROM tenant_data_keys")
        return c.fetchone()[0]


def test_dumps_hold_no_data_key_and_the_key_store_is_sealed(backup_dir, sample_data, backup_key):
    name = make_backup("--no-redis")
    manifest = manifest_of(backup_dir, name)
    assert manifest["postgres"]["tables"][keystore.TABLE] == 0
    assert manifest["postgres"]["key_store"] == {"tenants": 1, "keys": 1}
    tenant = sample_data["tenant"]
    sealed = backup_dir / storage.KEYS_DIR / f"{tenant.id}.json.age"
    assert sealed.read_bytes().startswith(b"age-encryption.org/v1")
    assert b"wrapped_key" not in sealed.read_bytes()


def test_after_a_shred_an_older_backup_restores_everyone_else(
    backup_dir, backup_key, tenant, other_tenant
):
    mine = [factories.make_agent(tenant, belief_state=np.full(3, 1.0)) for _ in range(2)]
    theirs = [factories.make_agent(other_tenant, belief_state=np.full(3, 2.0)) for _ in range(2)]
    older = make_backup("--no-redis")
    with connection.cursor() as c:
        c.execute("SELECT belief_state FROM agents WHERE tenant_id = %s", [tenant.id])
        copies = [bytes(r[0]) for r in c.fetchall()]

    tenant_shred(tenant=tenant)
    assert not (backup_dir / storage.KEYS_DIR / f"{tenant.id}.json.age").exists()
    assert (backup_dir / storage.KEYS_DIR / f"{tenant.id}.shredded.json").exists()

    drill = run("verify_backup", older)
    assert "2 of shredded tenants (unreadable by design)" in drill
    assert "1 shredded tenant(s)" in drill

    output = run("restore", older, "--yes")
    assert "1 shredded tenant(s)" in output and "run shred_tenant again" in output
    # The shredded tenant's rows came back with the old backup; its beliefs did not.
    assert Tenant.objects.filter(pk=tenant.pk).exists()
    for agent in mine:
        with pytest.raises(TenantShreddedError):
            Agent.objects.get(pk=agent.pk)
    for token in copies:
        with pytest.raises(TenantShreddedError):
            decrypt_array(token)
    for agent in theirs:
        assert np.array_equal(
            get_agent(tenant=other_tenant, agent_id=agent.id).beliefs, np.full(3, 2.0)
        )
    # New keys never collide with restored ones.
    fresh = factories.make_tenant("Fresh")
    factories.make_agent(fresh, belief_state=np.ones(2))
    assert stored_key_rows() >= 3
