"""The permission matrix: an operator of tenant A never lists, views, changes, deletes,
searches, autocompletes, filters, acts on or exports tenant B's objects, whether through
the pages or a hand-made URL. Each refusal has a positive twin on A's own object, so a
page that shows nothing at all would fail."""

import csv
import io
import json
from io import StringIO

import pytest
from django.contrib.auth.models import Group
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command

from agents.admin_scoping import OPERATOR_EDITOR, OPERATOR_READ_ONLY, tenant_path_for
from agents.models import Agent, ApiToken, OperatorMembership, Tenant
from coalitions.models import Coalition, CoalitionMember
from tests.backoffice import logged_in

pytestmark = [pytest.mark.django_db, pytest.mark.reliability("tenant walls")]

# (admin URL prefix, how to get the object and its label from a TenantWorld)
MODELS = {
    "agent": ("/admin/agents/agent/", lambda w: (w.agent, w.agent.name)),
    "coalition": ("/admin/coalitions/coalition/", lambda w: (w.coalition, w.coalition.name)),
    "apitoken": ("/admin/agents/apitoken/", lambda w: (w.token, w.token.name)),
    "tenant": ("/admin/agents/tenant/", lambda w: (w.tenant, w.tenant.name)),
}


def _listed(response) -> set[str]:
    """What a changelist shows: its rows, not the search box echoing the query."""
    assert response.status_code == 200
    return {str(obj) for obj in response.context["cl"].result_list}


def _csv(response) -> list[dict]:
    body = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(body)))


@pytest.mark.parametrize("model", MODELS)
def test_the_list_shows_own_tenant_objects_only(editor_a, world_a, world_b, model):
    prefix, pick = MODELS[model]
    listed = _listed(editor_a.get(prefix))
    assert any(label.startswith(pick(world_a)[1]) for label in listed)
    assert not any(label.startswith(pick(world_b)[1]) for label in listed)


# Coalitions are dissolved and tokens revoked, never deleted, and tenants belong to
# superusers: their own delete pages are refused too, but with 403.
OWN_DELETE_REFUSED = {"coalition", "apitoken", "tenant"}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("view", ["change/", "delete/", "history/"])
def test_another_tenants_object_url_is_404_and_own_is_not(editor_a, world_a, world_b, model, view):
    prefix, pick = MODELS[model]
    own, _ = pick(world_a)
    other, other_label = pick(world_b)
    expected = 403 if view == "delete/" and model in OWN_DELETE_REFUSED else 200
    assert editor_a.get(f"{prefix}{own.pk}/{view}").status_code == expected
    page = editor_a.get(f"{prefix}{other.pk}/{view}")
    assert page.status_code == 404
    assert other_label not in page.content.decode()


def test_posting_to_another_tenants_change_and_delete_urls_changes_nothing(
    editor_a, world_a, world_b
):
    agent = world_b.agent
    form = {"status": "suspended", "energy_level": 1, "location_h3": agent.location_h3}
    assert editor_a.post(f"/admin/agents/agent/{agent.pk}/change/", form).status_code == 404
    posted = editor_a.post(f"/admin/agents/agent/{agent.pk}/delete/", {"post": "yes"})
    assert posted.status_code == 404
    agent.refresh_from_db()
    assert (agent.status, agent.energy_level) == ("active", 100)
    # The same requests on A's agent do take effect, so the 404s above are the scoping.
    own = world_a.agent
    form["location_h3"] = own.location_h3
    assert editor_a.post(f"/admin/agents/agent/{own.pk}/change/", form).status_code == 302
    own.refresh_from_db()
    assert (own.status, own.energy_level) == ("suspended", 1)


def test_another_tenants_coalition_status_url_is_404(editor_a, world_a, world_b):
    url = "/admin/coalitions/coalition/{}/status/"
    assert (
        editor_a.post(url.format(world_b.coalition.pk), {"status": "dissolved"}).status_code == 404
    )
    assert Coalition.objects.get(pk=world_b.coalition.pk).status == "forming"
    assert (
        editor_a.post(url.format(world_a.coalition.pk), {"status": "dissolved"}).status_code == 302
    )
    assert Coalition.objects.get(pk=world_a.coalition.pk).status == "dissolved"


def test_the_tenant_overview_of_another_tenant_is_404(editor_a, world_a, world_b):
    assert editor_a.get(f"/admin/agents/tenant/{world_a.tenant.pk}/overview/").status_code == 200
    assert editor_a.get(f"/admin/agents/tenant/{world_b.tenant.pk}/overview/").status_code == 404


@pytest.mark.parametrize(
    ("prefix", "term"),
    [
        ("/admin/agents/agent/", "agent"),
        ("/admin/coalitions/coalition/", "coalition"),
        ("/admin/agents/apitoken/", "token"),
    ],
)
def test_search_never_finds_another_tenants_objects(editor_a, world_a, world_b, prefix, term):
    # Both tenants' objects have the term in their names.
    listed = _listed(editor_a.get(prefix, {"q": term}))
    assert any(label.startswith(f"alpha-{term}") for label in listed)
    assert not any(label.startswith(f"bravo-{term}") for label in listed)
    assert _listed(editor_a.get(prefix, {"q": f"bravo-{term}"})) == set()


def test_search_by_exact_id_of_another_tenants_agent_finds_nothing(editor_a, world_a, world_b):
    assert _listed(editor_a.get("/admin/agents/agent/", {"q": str(world_a.agent.pk)})) == {
        "alpha-agent"
    }
    assert _listed(editor_a.get("/admin/agents/agent/", {"q": str(world_b.agent.pk)})) == set()


@pytest.mark.parametrize(
    ("source", "field", "mine", "theirs"),
    [
        ("coalitions.coalitionmember", "agent", "alpha-agent", "bravo-agent"),
        ("agents.agent", "tenant", "Acme", "Other"),
        ("coalitions.coalition", "tenant", "Acme", "Other"),
    ],
)
def test_autocomplete_never_offers_another_tenants_objects(
    editor_a, world_a, world_b, source, field, mine, theirs
):
    app_label, model_name = source.split(".")
    response = editor_a.get(
        "/admin/autocomplete/",
        {"app_label": app_label, "model_name": model_name, "field_name": field, "term": ""},
    )
    assert response.status_code == 200
    labels = [r["text"] for r in json.loads(response.content)["results"]]
    assert any(label.startswith(mine) for label in labels)
    assert not any(label.startswith(theirs) for label in labels)


def test_autocomplete_of_users_is_refused_to_operators(editor_a):
    response = editor_a.get(
        "/admin/autocomplete/",
        {
            "app_label": "agents",
            "model_name": "operatormembership",
            "field_name": "user",
            "term": "",
        },
    )
    assert response.status_code == 403


def test_filters_offer_only_own_values_and_no_tenant_filter(editor_a, world_a, world_b):
    body = editor_a.get("/admin/agents/agent/").content.decode()
    assert "alpha-type" in body
    assert "bravo-type" not in body
    assert "tenant__id__exact" not in body
    assert world_b.tenant.name not in body
    # Hand-made filters narrow the operator's own rows only.
    by_tenant = editor_a.get("/admin/agents/agent/", {"tenant__id__exact": world_b.tenant.pk})
    assert _listed(by_tenant) == set()
    assert _listed(editor_a.get("/admin/agents/agent/", {"agent_type": "bravo-type"})) == set()
    assert _listed(editor_a.get("/admin/agents/agent/", {"agent_type": "alpha-type"})) == {
        "alpha-agent"
    }


def test_forms_never_offer_a_tenant_to_operators(editor_a, superuser_client, world_a, world_b):
    for url in ("/admin/agents/agent/add/", "/admin/coalitions/coalition/add/"):
        operator_form = editor_a.get(url).content.decode()
        assert 'name="tenant"' not in operator_form
        assert world_b.tenant.name not in operator_form
        assert 'name="tenant"' in superuser_client.get(url).content.decode()


def test_a_new_object_goes_to_the_operators_tenant_whatever_the_post_says(
    editor_a, world_a, world_b
):
    response = editor_a.post(
        "/admin/agents/agent/add/",
        {
            "tenant": world_b.tenant.pk,
            "name": "smuggled",
            "agent_type": "scout",
            "status": "active",
            "energy_level": 50,
            "location_h3": world_a.agent.location_h3,
        },
    )
    assert response.status_code == 302
    assert Agent.objects.get(name="smuggled").tenant == world_a.tenant


def test_the_members_inline_refuses_another_tenants_agent(editor_a, world_a, world_b):
    coalition = world_a.coalition
    member = coalition.memberships.get()
    response = editor_a.post(
        f"/admin/coalitions/coalition/{coalition.pk}/change/",
        {
            "memberships-TOTAL_FORMS": 2,
            "memberships-INITIAL_FORMS": 1,
            "memberships-0-id": member.pk,
            "memberships-0-coalition": coalition.pk,
            "memberships-1-coalition": coalition.pk,
            "memberships-1-agent": world_b.agent.pk,
            "memberships-1-role": "mole",
            "memberships-1-contribution_score": 1,
        },
    )
    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    assert not CoalitionMember.objects.filter(agent=world_b.agent, coalition=coalition).exists()


def _action(client, url, action, ids, **extra):
    return client.post(url, {"action": action, "_selected_action": [str(i) for i in ids], **extra})


def test_bulk_actions_skip_another_tenants_ids(editor_a, world_a, world_b):
    ids = [world_a.agent.pk, world_b.agent.pk]
    response = _action(editor_a, "/admin/agents/agent/", "suspend_agents", ids)
    assert response.status_code == 302
    assert Agent.objects.get(pk=world_a.agent.pk).status == "suspended"
    assert Agent.objects.get(pk=world_b.agent.pk).status == "active"

    ids = [world_a.coalition.pk, world_b.coalition.pk]
    _action(editor_a, "/admin/coalitions/coalition/", "dissolve", ids)
    assert Coalition.objects.get(pk=world_a.coalition.pk).status == "dissolved"
    assert Coalition.objects.get(pk=world_b.coalition.pk).status == "forming"


def test_select_across_acts_on_own_tenant_only(editor_a, world_a, world_b):
    _action(editor_a, "/admin/agents/agent/", "suspend_agents", [world_a.agent.pk], select_across=1)
    statuses = dict(Agent.objects.values_list("name", "status"))
    assert statuses["alpha-agent"] == statuses["alpha-idle"] == "suspended"
    assert statuses["bravo-agent"] == "active"
    assert statuses["bravo-idle"] == "inactive"


def test_bulk_delete_skips_another_tenants_ids(editor_a, world_a, world_b):
    ids = [world_a.idle_agent.pk, world_b.idle_agent.pk]
    response = _action(editor_a, "/admin/agents/agent/", "delete_selected", ids, post="yes")
    assert response.status_code == 302
    assert not Agent.objects.filter(pk=world_a.idle_agent.pk).exists()
    assert Agent.objects.filter(pk=world_b.idle_agent.pk).exists()


@pytest.mark.parametrize(
    ("url", "ids"),
    [
        ("/admin/agents/agent/", lambda a, b: [a.agent.pk, b.agent.pk]),
        ("/admin/coalitions/coalition/", lambda a, b: [a.coalition.pk, b.coalition.pk]),
    ],
)
def test_csv_export_contains_own_rows_only(editor_a, world_a, world_b, url, ids):
    response = _action(editor_a, url, "export_csv", ids(world_a, world_b))
    assert response.status_code == 200
    rows = _csv(response)
    assert [row["tenant"] for row in rows] == [world_a.tenant.slug]
    everything = _action(editor_a, url, "export_csv", ids(world_a, world_b), select_across=1)
    assert {row["tenant"] for row in _csv(everything)} == {world_a.tenant.slug}


def test_superusers_see_every_tenant(superuser_client, world_a, world_b):
    for url in ("/admin/agents/agent/", "/admin/coalitions/coalition/", "/admin/agents/tenant/"):
        body = superuser_client.get(url).content.decode()
        assert "alpha" in body.lower() or world_a.tenant.name in body
        assert world_b.tenant.name in body
    page = superuser_client.get(f"/admin/agents/agent/{world_b.agent.pk}/change/")
    assert page.status_code == 200


def test_staff_without_a_membership_see_nothing(make_operator, world_a):
    client = logged_in(make_operator(None, OPERATOR_EDITOR))
    index = client.get("/admin/").content.decode()
    assert "/admin/agents/agent/" not in index
    assert client.get("/admin/agents/agent/").status_code == 403
    assert client.get(f"/admin/agents/agent/{world_a.agent.pk}/change/").status_code == 404


def test_two_operators_side_by_side_each_see_their_own_world(make_operator, world_a, world_b):
    a = logged_in(make_operator(world_a.tenant))
    b = logged_in(make_operator(world_b.tenant))
    for client, mine, theirs in ((a, world_a, world_b), (b, world_b, world_a)):
        for url in ("/admin/agents/agent/", "/admin/coalitions/coalition/"):
            body = client.get(url).content.decode()
            assert mine.agent.name in body or mine.coalition.name in body
            assert theirs.agent.name not in body
            assert theirs.coalition.name not in body
        index = client.get("/admin/agents/tenant/").content.decode()
        assert mine.tenant.name in index
        assert theirs.tenant.name not in index


def test_operators_cannot_reach_memberships_or_users(editor_a, world_a):
    assert editor_a.get("/admin/agents/operatormembership/").status_code == 403
    assert editor_a.get("/admin/auth/user/").status_code == 403
    assert editor_a.get("/admin/auth/group/").status_code == 403


def test_api_tokens_of_another_tenant_cannot_be_revoked(editor_a, world_a, world_b):
    ids = [world_a.token.pk, world_b.token.pk]
    _action(editor_a, "/admin/agents/apitoken/", "revoke_tokens", ids)
    assert ApiToken.objects.get(pk=world_a.token.pk).revoked_at is not None
    assert ApiToken.objects.get(pk=world_b.token.pk).revoked_at is None


def test_tenants_cannot_be_added_or_deleted_by_operators(editor_a, world_a):
    assert editor_a.get("/admin/agents/tenant/add/").status_code == 403
    assert editor_a.get(f"/admin/agents/tenant/{world_a.tenant.pk}/delete/").status_code == 403
    assert Tenant.objects.filter(pk=world_a.tenant.pk).exists()


# Which relation each model is scoped through.


def test_tenant_owned_models_scope_through_their_tenant_key():
    assert tenant_path_for(Tenant) == "pk"
    for model in (Agent, Coalition, ApiToken, OperatorMembership):
        assert tenant_path_for(model) == "tenant"


def test_a_model_without_a_tenant_key_is_refused_loudly():
    # Scoping such a relation needs an explicit path; guessing could leak rows.
    with pytest.raises(ImproperlyConfigured, match=r"coalitions\.CoalitionMember has no"):
        tenant_path_for(CoalitionMember)


# The operator groups the migrations make.


VIEW = {
    "agents.view_tenant",
    "agents.view_agent",
    "agents.view_apitoken",
    "coalitions.view_coalition",
    "coalitions.view_coalitionmember",
}


def _permissions(name: str) -> set[str]:
    group = Group.objects.get(name=name)
    return {f"{p.content_type.app_label}.{p.codename}" for p in group.permissions.all()}


@pytest.mark.django_db(transaction=True)
def test_the_migration_makes_both_operator_groups_and_its_reverse_removes_them():
    call_command("migrate", "agents", "0004", stdout=StringIO())
    assert not Group.objects.filter(name__in=[OPERATOR_READ_ONLY, OPERATOR_EDITOR]).exists()
    call_command("migrate", "agents", stdout=StringIO())
    assert _permissions(OPERATOR_READ_ONLY) == VIEW
    assert _permissions(OPERATOR_EDITOR) == VIEW | {
        "agents.add_agent",
        "agents.change_agent",
        "agents.delete_agent",
        "agents.add_apitoken",
        "agents.change_apitoken",
        "coalitions.add_coalition",
        "coalitions.change_coalition",
        "coalitions.add_coalitionmember",
        "coalitions.change_coalitionmember",
        "coalitions.delete_coalitionmember",
    }


@pytest.mark.django_db
def test_operator_groups_grant_nothing_outside_agents_and_coalitions(operator_groups):
    for group in operator_groups.values():
        labels = set(group.permissions.values_list("content_type__app_label", flat=True))
        assert labels <= {"agents", "coalitions"}
        assert not group.permissions.filter(content_type__model="operatormembership").exists()
