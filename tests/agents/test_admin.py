import base64

import numpy as np
import pytest
from django.db import connection

from coalitions.models import CoalitionMember
from tests import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def superuser_client(client, django_user_model):
    """A client logged in as a superuser."""
    user = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(user)
    return client


def test_agent_page_shows_a_belief_summary_and_never_ciphertext(superuser_client, tenant):
    agent = factories.make_agent(tenant, belief_state=np.array([0.5, 0.25, 0.25]))
    with connection.cursor() as c:
        c.execute("SELECT belief_state FROM agents WHERE id = %s", [agent.pk])
        token = bytes(c.fetchone()[0])
    page = superuser_client.get(f"/admin/agents/agent/{agent.pk}/change/")
    assert page.status_code == 200
    body = page.content.decode()
    assert "Shape</strong>: 3" in body
    assert "float64" in body
    assert "1.0397 nats" in body  # entropy of (1/2, 1/4, 1/4)
    assert "0.5000" in body
    # Neither the token's bytes nor the encodings a page could show them in.
    for shown in (token.hex(), base64.b64encode(token).decode(), token[8:24].hex()):
        assert shown[:20] not in body


def test_agent_list_search_and_filters(superuser_client, tenant):
    factories.make_agent(tenant, name="needle")
    factories.make_agent(tenant, name="hay", status="suspended")
    page = superuser_client.get("/admin/agents/agent/?q=needle")
    assert page.status_code == 200
    assert "needle" in page.content.decode()
    assert ">hay<" not in page.content.decode()
    page = superuser_client.get("/admin/agents/agent/?status__exact=suspended")
    assert ">hay<" in page.content.decode()


def test_coalition_page_shows_members_inline(superuser_client, tenant):
    coalition = factories.make_coalition(tenant)
    agent = factories.make_agent(tenant, name="member-one")
    CoalitionMember.objects.create(coalition=coalition, agent=agent, role="founder")
    page = superuser_client.get(f"/admin/coalitions/coalition/{coalition.pk}/change/")
    assert page.status_code == 200
    assert "founder" in page.content.decode()
    listing = superuser_client.get("/admin/coalitions/coalition/")
    assert listing.status_code == 200
    assert coalition.name in listing.content.decode()


def test_tenant_admin_lists_tenants(superuser_client, tenant):
    page = superuser_client.get("/admin/agents/tenant/")
    assert page.status_code == 200
    assert tenant.name in page.content.decode()
