"""Issue 17, items 6-11, checked on the pages' HTML (test_screenshots.py checks the same
pages in a browser): the tenant id, history times, JSON fields, the outbox headline and
the CSV export under ASGI."""

import re
import warnings
from pathlib import Path

import django
import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient, AsyncRequestFactory, RequestFactory
from django.utils import formats, timezone

from agents.admin_scoping import OPERATOR_EDITOR, OPERATOR_READ_ONLY
from agents.models import Tenant
from agents.services import agent_update_state
from agents.types import AgentStateUpdate
from coalitions.models import Coalition
from freeagentics.urls import serve_static
from tests.admin.conftest import logged_in
from tests.admin.test_coalition_admin import _inline

pytestmark = pytest.mark.django_db

ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d")
CONFIG = {"pricing": {"base": 10, "surge": 1.5}, "currency": "EUR"}


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


def test_empty_json_fields_render_empty_and_saving_them_stores_what_was_stored(
    make_operator, world_a
):
    coalition = world_a.coalition
    Coalition.objects.filter(pk=coalition.pk).update(
        formation_criteria=None, business_config=CONFIG
    )
    editor = logged_in(make_operator(world_a.tenant, OPERATOR_EDITOR, "json-editor"))
    url = f"/admin/coalitions/coalition/{coalition.pk}/change/"
    form = editor.get(url).context["adminform"].form
    assert form["formation_criteria"].value() in (None, "")
    assert 'name="formation_criteria"' in str(form["formation_criteria"])
    assert ">\nnull</textarea>" not in str(form["formation_criteria"])
    assert form.fields["business_config"].prepare_value(CONFIG).startswith('{\n  "pricing"')

    # What the browser sends back for the form as rendered: an empty box, the object
    # indented. Nothing changed, so nothing is written.
    data = _inline(coalition)
    data["formation_criteria"] = ""
    data["business_config"] = form.fields["business_config"].prepare_value(CONFIG)
    assert editor.post(url, data).status_code == 302
    coalition.refresh_from_db()
    assert (coalition.formation_criteria, coalition.business_config) == (None, CONFIG)

    # Emptying a field stores NULL, as typing `null` did before.
    data["business_config"] = ""
    assert editor.post(url, data).status_code == 302
    coalition.refresh_from_db()
    assert (coalition.formation_criteria, coalition.business_config) == (None, None)


def test_read_only_json_is_indented_and_empty_is_a_dash(make_operator, world_a):
    coalition = world_a.coalition
    Coalition.objects.filter(pk=coalition.pk).update(
        formation_criteria=None, business_config=CONFIG
    )
    reader = logged_in(make_operator(world_a.tenant, OPERATOR_READ_ONLY, "json-reader"))
    page = reader.get(f"/admin/coalitions/coalition/{coalition.pk}/change/").content.decode()
    assert '<pre class="json-value">{\n  &quot;pricing&quot;: {' in page
    assert "null" not in page


@pytest.mark.reliability("metrics outages")
def test_the_outbox_page_says_not_configured_without_influxdb(superuser_client, settings):
    settings.INFLUXDB_URL = ""
    page = superuser_client.get("/admin/metrics/outboxpoint/").content.decode()
    assert "Metrics outbox: not configured (INFLUXDB_URL is unset)" in page
    assert "flowing" not in page


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


def test_static_files_served_over_asgi_stream_an_async_iterator(settings):
    """The dev stack (uvicorn, DEBUG) serves the admin's CSS through Django: each page
    load used to send a FileResponse's synchronous iterator through the ASGI handler."""
    settings.DEBUG = True  # staticfiles' view refuses to serve otherwise
    request = AsyncRequestFactory().get("/static/admin/css/base.css")

    async def body(response):
        return b"".join([part async for part in response])

    response = serve_static(request, "admin/css/base.css")
    assert response.status_code == 200 and response.is_async
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        served = async_to_sync(body)(response)
    response.close()
    expected = (
        Path(django.__file__).parent / "contrib/admin/static/admin/css/base.css"
    ).read_bytes()
    assert served == expected

    # A WSGI request keeps the plain FileResponse.
    wsgi = serve_static(RequestFactory().get("/static/admin/css/base.css"), "admin/css/base.css")
    assert not wsgi.is_async
    assert b"".join(wsgi.streaming_content) == expected
    wsgi.close()
