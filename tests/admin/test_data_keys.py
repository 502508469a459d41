"""The tenant page lists the tenant's data keys, never key material, never another's."""

import base64

import numpy as np
import pytest

from agents import data_keys
from agents.key_rotation import beliefs_reencrypt, data_keys_rotate
from agents.models import TenantDataKey
from tests import factories

pytestmark = [pytest.mark.django_db, pytest.mark.reliability("tenant walls")]


def test_tenant_page_shows_its_keys_states_and_remaining_rows(editor_a, world_a, world_b):
    factories.make_agent(world_a.tenant, belief_state=np.ones(3))
    factories.make_agent(world_b.tenant, belief_state=np.ones(3))
    old = data_keys.active_key(world_a.tenant.id).id
    data_keys_rotate([world_a.tenant.id])
    beliefs_reencrypt(tenant_ids=[world_a.tenant.id])
    new = data_keys.active_key(world_a.tenant.id).id
    theirs = data_keys.active_key(world_b.tenant.id).id

    page = editor_a.get(f"/admin/agents/tenant/{world_a.tenant.pk}/change/")
    assert page.status_code == 200
    body = page.content.decode()
    rows = body.split('class="field-key_id"')[1:]
    shown = {int(row.split("<p>", 1)[1].split("</p>", 1)[0]) for row in rows}
    assert shown == {old, new} and theirs not in shown
    assert "retired" in body and "active" in body
    for key in TenantDataKey.objects.all():
        assert base64.b64encode(bytes(key.wrapped_key)).decode()[:24] not in body
        assert bytes(key.wrapped_key)[:24].decode() not in body
