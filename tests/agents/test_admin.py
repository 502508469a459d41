import base64
import csv
import io
import re
import warnings

import h3
import numpy as np
import pytest
from asgiref.sync import async_to_sync
from django.contrib.admin.models import LogEntry
from django.core.exceptions import ValidationError
from django.db import connection
from django.test import AsyncClient
from django.utils import formats, timezone

from agents import admin as agent_admin
from agents import cache, data_keys
from agents.admin_scoping import OPERATOR_EDITOR, OPERATOR_READ_ONLY
from agents.key_rotation import beliefs_reencrypt, data_keys_rotate
from agents.models import Agent, AgentHistory, ApiToken, Tenant, TenantDataKey
from agents.services import agent_update_state
from agents.types import AgentStateUpdate
from agents.validators import CELL_INVALID
from metrics import charts
from realtime.services import api_token_authenticate
from tests import factories
from tests.backoffice import logged_in, record_metrics

pytestmark = pytest.mark.django_db

# The agent admin.


URL = "/admin/agents/agent/"


def _change_form(agent, **changes) -> dict:
    form = {
        "status": agent.status,
        "energy_level": agent.energy_level,
        "location_h3": agent.location_h3 or "",
        "personality_traits": "null",
    }
    form.update(changes)
    return form


def _svg(body: str, svg_id: str) -> str:
    match = re.search(rf'<svg[^>]*id="{svg_id}".*?</svg>', body, re.S)
    assert match, f"no svg#{svg_id} on the page"
    return match.group(0)


def test_the_page_shows_beliefs_energy_status_and_location(editor_a, world_a):
    agent = world_a.agent
    body = editor_a.get(f"{URL}{agent.pk}/change/").content.decode()
    assert "Entropy</strong>: 2.0794 nats" in body  # uniform over 8 states: ln 8
    assert 'name="energy_level" value="100"' in body
    assert '<option value="active" selected>' in body
    assert f'value="{agent.location_h3}"' in body


def test_the_neighbourhood_picture_marks_own_active_agents_only(editor_a, world_a, world_b):
    agent = world_a.agent
    ring = sorted(h3.grid_ring(agent.location_h3, 2))
    near = factories.make_agent(world_a.tenant, name="near-one", location_h3=ring[0])
    factories.make_agent(world_a.tenant, name="near-asleep", location_h3=ring[1], status="inactive")
    far = h3.grid_ring(agent.location_h3, 5).pop()
    factories.make_agent(world_a.tenant, name="far-away", location_h3=far)

    svg = _svg(editor_a.get(f"{URL}{agent.pk}/change/").content.decode(), "agent-neighbourhood")

    cells = re.findall(r'<polygon class="hex-cell[^"]*" data-cell="([0-9a-f]+)"', svg)
    assert sorted(cells) == sorted(h3.grid_disk(agent.location_h3, 3))
    assert re.search(rf'class="hex-cell hex-centre" data-cell="{agent.location_h3}"', svg)
    assert 'id="agent-marker-self"' in svg
    titles = re.findall(r'<circle[^>]*class="agent-marker[^"]*"[^>]*><title>([^<]*)</title>', svg)
    assert sorted(titles) == ["alpha-agent (this agent, active)", "near-one (active)"]
    # Density shading counts the same agents: the centre cell holds this agent only.
    assert re.search(rf'data-cell="{near.location_h3}" data-count="1"', svg)
    # Tenant B's agent sits in the very same cell and is neither drawn nor counted.
    assert world_b.agent.location_h3 == agent.location_h3
    assert re.search(rf'data-cell="{agent.location_h3}" data-count="1"', svg)
    assert "bravo" not in svg


def test_names_in_pictures_are_escaped(editor_a, world_a):
    factories.make_agent(world_a.tenant, name="<script>alert(1)</script>")
    body = editor_a.get(f"{URL}{world_a.agent.pk}/change/").content.decode()
    assert "<script>alert(1)" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt; (active)" in body


def test_an_agent_without_a_location_says_so(editor_a, world_a):
    agent = factories.make_agent(world_a.tenant, location_h3=None)
    body = editor_a.get(f"{URL}{agent.pk}/change/").content.decode()
    assert "No location yet." in body
    assert 'id="agent-neighbourhood"' not in body


def test_the_latest_states_come_from_history(editor_a, world_a):
    agent = world_a.agent
    for energy in (90, 80, 70):
        agent_update_state(
            tenant=world_a.tenant, update=AgentStateUpdate(agent_id=agent.pk, energy_level=energy)
        )
    body = editor_a.get(f"{URL}{agent.pk}/change/").content.decode()
    table = re.search(r'<table class="agent-history">.*?</table>', body, re.S).group(0)
    energies = re.findall(r"<tr><td>[^<]+</td><td>(\d+)</td>", table)
    assert energies == ["70", "80", "90"]


def test_saving_goes_through_the_service(editor_a, world_a, django_capture_on_commit_callbacks):
    agent = world_a.agent
    with django_capture_on_commit_callbacks(execute=True):
        response = editor_a.post(
            f"{URL}{agent.pk}/change/", _change_form(agent, energy_level=42, status="suspended")
        )
    assert response.status_code == 302
    agent.refresh_from_db()
    assert (agent.energy_level, agent.status) == (42, "suspended")
    # Only agent_update_state writes history and refreshes the cache.
    assert list(AgentHistory.objects.filter(agent_id=agent.pk).values_list("energy_level")) == [
        (42,)
    ]
    state, _ = cache.unpack_agent(agent.pk, cache.agent_load(agent.pk), world_a.tenant.id)
    assert (state.energy_level, state.status) == (42, "suspended")


def test_an_unchanged_save_writes_no_history(editor_a, world_a):
    agent = world_a.agent
    assert editor_a.post(f"{URL}{agent.pk}/change/", _change_form(agent)).status_code == 302
    assert not AgentHistory.objects.filter(agent_id=agent.pk).exists()


def test_a_service_refusal_is_a_form_error_and_writes_nothing(editor_a, world_a):
    agent = world_a.agent
    response = editor_a.post(
        f"{URL}{agent.pk}/change/", _change_form(agent, location_h3="zzz", energy_level=5)
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert errors["location_h3"] == [CELL_INVALID.format(field="location_h3", value="zzz")]
    agent.refresh_from_db()
    assert (agent.location_h3, agent.energy_level) == (factories.BERLIN_CELL, 100)
    assert not AgentHistory.objects.filter(agent_id=agent.pk).exists()


def test_name_and_type_are_fixed_after_creation(editor_a, world_a):
    agent = world_a.agent
    editor_a.post(f"{URL}{agent.pk}/change/", _change_form(agent, name="renamed"))
    agent.refresh_from_db()
    assert agent.name == "alpha-agent"


def test_adding_an_agent_uses_the_operators_tenant(editor_a, world_a):
    response = editor_a.post(
        f"{URL}add/",
        {
            "name": "fresh",
            "agent_type": "scout",
            "status": "inactive",
            "energy_level": 60,
            "location_h3": factories.BERLIN_CELL,
            "personality_traits": '{"openness": 0.5}',
        },
    )
    assert response.status_code == 302
    agent = Agent.objects.get(name="fresh")
    assert response["Location"] == URL
    assert (agent.tenant, agent.status, agent.energy_level) == (world_a.tenant, "inactive", 60)
    assert agent.personality_traits == {"openness": 0.5}


def test_deleting_goes_through_the_service(editor_a, world_a, django_capture_on_commit_callbacks):
    agent = world_a.idle_agent
    with django_capture_on_commit_callbacks(execute=True):
        response = editor_a.post(f"{URL}{agent.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Agent.objects.filter(pk=agent.pk).exists()
    # agent_delete leaves a tombstone, so no reader can cache the deleted agent again.
    tombstone = cache.agent_load(agent.pk)
    assert tombstone is not None
    assert cache.unpack_agent(agent.pk, tombstone, world_a.tenant.id) is None


def test_bulk_suspend_and_activate_write_history_for_changed_agents_only(editor_a, world_a):
    ids = [str(world_a.agent.pk), str(world_a.idle_agent.pk)]
    response = editor_a.post(
        URL, {"action": "suspend_agents", "_selected_action": ids}, follow=True
    )
    assert "2 agent(s) suspended." in response.content.decode()
    editor_a.post(URL, {"action": "activate_agents", "_selected_action": ids[:1]})
    assert dict(Agent.objects.values_list("name", "status")) == {
        "alpha-agent": "active",
        "alpha-idle": "suspended",
    }
    editor_a.post(URL, {"action": "activate_agents", "_selected_action": ids[:1]})
    history = AgentHistory.objects.filter(agent_id=world_a.agent.pk).count()
    assert history == 2  # suspended, then activated; the second activate changed nothing


def test_read_only_operators_view_and_export_but_change_nothing(make_operator, world_a):
    client = logged_in(make_operator(world_a.tenant, OPERATOR_READ_ONLY))
    agent = world_a.agent
    page = client.get(f"{URL}{agent.pk}/change/")
    assert page.status_code == 200
    assert 'name="energy_level"' not in page.content.decode()
    assert (
        client.post(f"{URL}{agent.pk}/change/", _change_form(agent, energy_level=1)).status_code
        == 403
    )
    assert client.get(f"{URL}add/").status_code == 403
    assert client.get(f"{URL}{agent.pk}/delete/").status_code == 403
    actions = [
        value for value, _ in client.get(URL).context["action_form"].fields["action"].choices
    ]
    assert actions == ["", "export_csv"]
    client.post(URL, {"action": "suspend_agents", "_selected_action": [str(agent.pk)]})
    agent.refresh_from_db()
    assert (agent.energy_level, agent.status) == (100, "active")


def test_csv_export_has_summaries_not_ciphertext(editor_a, world_a):
    agent = world_a.agent
    Agent.objects.filter(pk=agent.pk).update(name="=HYPERLINK(1)")
    evil = Agent.objects.get(pk=agent.pk)
    evil.belief_state = np.array([0.5, 0.5])
    evil.save(update_fields=["belief_state"])
    with connection.cursor() as c:
        c.execute("SELECT belief_state FROM agents WHERE id = %s", [agent.pk])
        # The Fernet part of FAE1 | key id | token (the key id's bytes need not be text).
        token = bytes(c.fetchone()[0])[8:].decode()

    response = editor_a.post(URL, {"action": "export_csv", "_selected_action": [str(agent.pk)]})
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="agents.csv"'
    body = b"".join(response.streaming_content).decode()
    assert token[:20] not in body
    [row] = list(csv.DictReader(io.StringIO(body)))
    assert row["name"] == "'=HYPERLINK(1)"  # a spreadsheet shows it, never runs it
    assert (row["belief_size"], row["belief_entropy"]) == ("2", "0.693147")
    assert (row["tenant"], row["status"], row["energy_level"]) == (
        world_a.tenant.slug,
        "active",
        "100",
    )


def test_without_influxdb_the_chart_area_says_metrics_are_not_configured(
    editor_a, world_a, settings
):
    settings.INFLUXDB_URL = ""
    body = editor_a.get(f"{URL}{world_a.agent.pk}/change/").content.decode()
    assert (
        f'<p class="metrics-chart-message metrics-chart-not-configured">{charts.NOT_CONFIGURED}'
        in body
    )


def test_the_chart_draws_the_agents_own_metrics_from_influxdb(
    editor_a, world_a, world_b, influx_metrics
):
    record_metrics(world_a.agent, hours=6)
    record_metrics(world_b.agent, hours=2)
    body = editor_a.get(f"{URL}{world_a.agent.pk}/change/").content.decode()
    chart = re.search(r'<div class="metrics-chart">.*?</div>', body, re.S).group(0)
    lines = re.findall(r'<polyline[^>]*points="([^"]+)"', chart)
    # Free energy and belief entropy, one point per hour for this agent's six hours.
    assert [len(points.split()) for points in lines] == [6, 6]
    assert "6 of the last 24 hours have data" in chart


def test_bulk_status_changes_are_in_each_agents_history(editor_a, world_a):
    agent = world_a.agent
    editor_a.post(URL, {"action": "suspend_agents", "_selected_action": [str(agent.pk)]})
    history = editor_a.get(f"{URL}{agent.pk}/history/").content.decode()
    assert "Status set to suspended." in history


def test_a_refused_delete_is_reported_and_deletes_nothing(editor_a, world_a, monkeypatch):
    # A concurrent delete is the real-world cause; the service's refusal is what matters.
    def refuse(*, tenant, agent_id):
        raise ValidationError({"agent_id": "agent_id: gone meanwhile."})

    monkeypatch.setattr(agent_admin, "agent_delete", refuse)
    agent = world_a.idle_agent
    response = editor_a.post(f"{URL}{agent.pk}/delete/", {"post": "yes"}, follow=True)
    assert response.redirect_chain[-1][0] == URL
    assert [str(m) for m in response.context["messages"]] == ["agent_id: gone meanwhile."]
    assert Agent.objects.filter(pk=agent.pk).exists()


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


# Tenants: the tenant page, its data keys and the overview.


def test_tenant_admin_lists_tenants(superuser_client, tenant):
    page = superuser_client.get("/admin/agents/tenant/")
    assert page.status_code == 200
    assert tenant.name in page.content.decode()


def test_the_tenant_id_is_shown_read_only_and_a_new_tenant_gets_one(superuser_client, world_a):
    tenant = world_a.tenant
    page = superuser_client.get(f"/admin/agents/tenant/{tenant.pk}/change/")
    assert "id" not in page.context["adminform"].form.fields
    assert str(tenant.pk) in page.content.decode()
    add = superuser_client.get("/admin/agents/tenant/add/")
    assert "id" not in add.context["adminform"].form.fields
    assert "Id:" not in add.content.decode()
    response = superuser_client.post(
        "/admin/agents/tenant/add/", {"name": "Fresh", "slug": "fresh", **_no_keys()}
    )
    assert response.status_code == 302
    assert Tenant.objects.get(slug="fresh").pk is not None


def _no_keys() -> dict:
    # The data keys inline's management form, empty.
    return {
        f"data_keys-{k}": v
        for k, v in {"TOTAL_FORMS": 0, "INITIAL_FORMS": 0, "MAX_NUM_FORMS": 0}.items()
    }


@pytest.mark.reliability("tenant walls")
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


# Dates and the CSV export under ASGI.


ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d")


def test_latest_states_use_the_admins_date_format(superuser_client, world_a):
    agent = world_a.agent
    state = agent_update_state(
        tenant=world_a.tenant, update=AgentStateUpdate(agent_id=agent.pk, energy_level=42)
    )
    page = superuser_client.get(f"/admin/agents/agent/{agent.pk}/change/").content.decode()
    history = page[page.index('class="agent-history"') :]
    assert not ISO_TIME.search(history)
    shown = formats.date_format(timezone.localtime(state.updated_at), "DATETIME_FORMAT")
    assert shown in history


def test_an_export_served_over_asgi_streams_an_async_iterator(make_operator, world_a):
    """Under ASGI Django serves a synchronous iterator only by reading it whole first,
    with the warning "StreamingHttpResponse must consume synchronous iterators"."""
    user = make_operator(world_a.tenant, OPERATOR_EDITOR, "asgi-exporter")
    selected = [str(world_a.agent.pk), str(world_a.idle_agent.pk)]

    async def export():
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.post(
            "/admin/agents/agent/", {"action": "export_csv", "_selected_action": selected}
        )
        # As django.core.handlers.asgi sends a streaming response.
        body = b"".join([part async for part in response])
        return response, body

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        response, body = async_to_sync(export)()
    assert response.status_code == 200 and response.is_async
    lines = body.decode().splitlines()
    assert len(lines) == 3 and "alpha-agent" in body.decode()

    # Under WSGI (the sync test client) the same export is a plain iterator.
    wsgi = logged_in(user).post(
        "/admin/agents/agent/", {"action": "export_csv", "_selected_action": selected}
    )
    assert not wsgi.is_async
    assert b"".join(wsgi.streaming_content) == body


# API tokens.


TOKENS_URL = "/admin/agents/apitoken/"


def test_a_new_token_is_made_by_the_service_and_shown_once(editor_a, world_a):
    response = editor_a.post(f"{TOKENS_URL}add/", {"name": "ingest", "can_read_beliefs": "on"})
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    plaintext = response.context["plaintext"]
    assert '<code id="api-token-plaintext"' in response.content.decode()
    assert plaintext in response.content.decode()

    # The plaintext authenticates (so only its hash was stored), for tenant A.
    token = api_token_authenticate(plaintext)
    assert (token.name, token.tenant, token.can_read_beliefs) == ("ingest", world_a.tenant, True)
    assert token.created_by.username == "editor-a"
    assert plaintext not in str(ApiToken.objects.filter(pk=token.pk).values().get())

    # Nothing shows it again: not the token's page, the list, the history or a message.
    for url in (
        f"{TOKENS_URL}{token.pk}/change/",
        TOKENS_URL,
        f"{TOKENS_URL}{token.pk}/history/",
        "/admin/",
    ):
        assert plaintext not in editor_a.get(url).content.decode()
    assert not any(plaintext in entry.change_message for entry in LogEntry.objects.all())


def test_a_refused_name_is_a_form_error(editor_a, world_a):
    response = editor_a.post(f"{TOKENS_URL}add/", {"name": "   "})
    assert response.status_code == 200
    assert "plaintext" not in response.context
    assert response.context["adminform"].form.errors
    assert not ApiToken.objects.filter(tenant=world_a.tenant).exclude(pk=world_a.token.pk).exists()


def test_revoking_is_an_action_and_tokens_are_never_edited_or_deleted(editor_a, world_a):
    token = world_a.token
    page = editor_a.get(f"{TOKENS_URL}{token.pk}/change/").content.decode()
    assert 'name="name"' not in page
    assert editor_a.get(f"{TOKENS_URL}{token.pk}/delete/").status_code == 403
    response = editor_a.post(
        TOKENS_URL, {"action": "revoke_tokens", "_selected_action": [str(token.pk)]}, follow=True
    )
    assert [str(m) for m in response.context["messages"]] == ["1 token(s) revoked."]
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert not token.is_active
