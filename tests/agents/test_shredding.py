"""Crypto-shredding: after shred_tenant, nothing the tenant wrote opens anywhere, and
other tenants are untouched."""

from io import StringIO

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django_redis import get_redis_connection

from agents import cache, data_keys
from agents.encryption import decrypt_array
from agents.exceptions import TenantShreddedError
from agents.models import Agent, AgentHistory, Tenant
from agents.selectors import get_agent
from agents.services import agents_update_states
from agents.types import AgentStateUpdate
from tests import factories

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.reliability("tenant walls")]


def world(tenant, n=3):
    agents = [factories.make_agent(tenant, belief_state=np.full(4, i + 1.0)) for i in range(n)]
    agents_update_states(
        tenant=tenant,
        updates=[AgentStateUpdate(agent_id=a.id, beliefs=np.full(4, 9.0)) for a in agents],
    )
    for a in agents:
        get_agent(tenant=tenant, agent_id=a.id)  # cached, ciphertext in Redis
    return agents


def raw_tokens(agent_ids):
    with connection.cursor() as c:
        c.execute(
            "SELECT belief_state FROM agents WHERE id = ANY(%s) UNION ALL "
            "SELECT belief_state FROM agent_history WHERE agent_id = ANY(%s)",
            [agent_ids, agent_ids],
        )
        return [bytes(r[0]) for r in c.fetchall()]


def shred(*args):
    out = StringIO()
    call_command("shred_tenant", *args, stdout=out)
    return out.getvalue()


def test_shredded_beliefs_open_nowhere_and_other_tenants_are_untouched(tenant, other_tenant):
    mine, theirs = world(tenant), world(other_tenant)
    ids = [a.id for a in mine]
    copies = raw_tokens(ids)  # what an older backup or a stolen disk would hold
    assert len(copies) == 6
    redis = get_redis_connection("default")
    assert all(redis.get(cache.beliefs_key(i)) for i in ids)

    output = shred(tenant.slug, "--yes-destroy-every-belief")
    assert "1 data key(s) destroyed; 3 agents, 0 coalitions and 3 history rows deleted" in output

    for token in copies:
        with pytest.raises(TenantShreddedError, match="shredded"):
            decrypt_array(token)
    assert not Tenant.objects.filter(pk=tenant.pk).exists()
    assert not Agent.objects.filter(pk__in=ids).exists()
    assert not AgentHistory.objects.filter(agent_id__in=ids).exists()
    assert not any(redis.get(cache.beliefs_key(i)) for i in ids)
    with pytest.raises(TenantShreddedError):
        data_keys.active_key(tenant.id)  # no new key for a shredded tenant
    # In another process, with nothing cached: still nothing opens.
    data_keys.forget_cached_keys()
    with pytest.raises(TenantShreddedError):
        decrypt_array(copies[0])
    for agent in theirs:
        assert np.array_equal(
            get_agent(tenant=other_tenant, agent_id=agent.id).beliefs, np.full(4, 9.0)
        )


def test_shredding_needs_the_explicit_flag_and_a_real_tenant(tenant):
    world(tenant, n=1)
    with pytest.raises(CommandError, match="pass --yes-destroy-every-belief"):
        shred(tenant.slug)
    assert Tenant.objects.filter(pk=tenant.pk).exists()
    assert data_keys.active_key(tenant.id)
    with pytest.raises(CommandError, match="No tenant with slug nobody"):
        shred("nobody", "--yes-destroy-every-belief")
