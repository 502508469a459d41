import re

import h3
import pytest

from tests import factories

pytestmark = pytest.mark.django_db


def _overview(client, tenant):
    return client.get(f"/admin/agents/tenant/{tenant.pk}/overview/")


def test_the_overview_draws_agent_density_per_cell(editor_a, world_a, world_b):
    tenant = world_a.tenant
    neighbour = sorted(h3.grid_ring(factories.BERLIN_CELL, 1))[0]
    for _ in range(3):
        factories.make_agent(tenant, location_h3=neighbour, agent_type="trader")
    factories.make_agent(tenant, location_h3=None)
    page = _overview(editor_a, tenant)
    assert page.status_code == 200
    body = page.content.decode()
    svg = re.search(r'<svg[^>]*id="tenant-density".*?</svg>', body, re.S).group(0)
    counts = dict(re.findall(r'data-cell="([0-9a-f]+)" data-count="(\d+)"', svg))
    # World A's two agents share BERLIN_CELL; B's agents there are not counted.
    assert counts == {factories.BERLIN_CELL: "2", neighbour: "3"}
    opacities = dict(re.findall(r'data-cell="([0-9a-f]+)"[^>]*fill-opacity="([\d.]+)"', svg))
    assert float(opacities[neighbour]) > float(opacities[factories.BERLIN_CELL])
    assert "5 of 6 agents have a location, in 2 cells" in body
    assert "(the darkest, 3)" in body


def test_the_overview_counts_agents_by_status_and_type_and_coalitions_by_status(
    editor_a, world_a, world_b
):
    page = _overview(editor_a, world_a.tenant)
    assert page.context["agents_by_status"] == [("active", 1), ("inactive", 1)]
    assert page.context["agents_by_type"] == [("alpha-type", 1), ("explorer", 1)]
    assert page.context["coalitions_by_status"] == [("forming", 1)]
    body = page.content.decode()
    assert '<table id="agents-by-status">' in body
    assert ">alpha-type</a></td>" in body
    assert "bravo" not in body


def test_the_overview_counts_link_to_the_matching_lists(editor_a, world_a):
    body = editor_a.get(f"/admin/agents/tenant/{world_a.tenant.pk}/overview/").content.decode()
    links = re.findall(r'<a href="(/admin/(?:agents/agent|coalitions/coalition)/\?[^"]+)">', body)
    assert len(links) == 5
    listed = {
        str(obj)
        for link in links
        for obj in editor_a.get(link.replace("&amp;", "&")).context["cl"].result_list
    }
    assert listed == {"alpha-agent", "alpha-idle", "alpha-coalition"}


def test_a_tenant_without_located_agents_gets_a_message_not_a_picture(editor_a, world_a):
    world_a.tenant.agents.update(location_h3=None)
    body = _overview(editor_a, world_a.tenant).content.decode()
    assert 'id="tenant-density-empty"' in body


def test_the_tenant_list_links_to_the_overview(editor_a, world_a):
    body = editor_a.get("/admin/agents/tenant/").content.decode()
    assert f'href="/admin/agents/tenant/{world_a.tenant.pk}/overview/"' in body
