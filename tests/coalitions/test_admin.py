import re
from decimal import Decimal

import pytest

from agents.admin_scoping import OPERATOR_EDITOR, OPERATOR_READ_ONLY
from coalitions.admin import EDITABLE_FIELDS, MEMBER_AGENT_FIXED
from coalitions.models import Coalition, CoalitionMember
from coalitions.selectors import is_coalition_member
from coalitions.services import MONEY_INVALID, TRANSITION_NOT_ALLOWED
from tests import factories
from tests.backoffice import coalition_form, logged_in

pytestmark = pytest.mark.django_db

URL = "/admin/coalitions/coalition/"


def test_the_page_shows_members_roles_scores_capital_and_revenue(editor_a, world_a):
    coalition = world_a.coalition
    Coalition.objects.filter(pk=coalition.pk).update(
        initial_capital=Decimal("1000.00"),
        current_capital=Decimal("1234.50"),
        total_revenue=Decimal("777.25"),
    )
    CoalitionMember.objects.filter(coalition=coalition).update(contribution_score=Decimal("12.5"))
    page = editor_a.get(f"{URL}{coalition.pk}/change/")
    body = page.content.decode()
    for text in ("alpha-founder", "12.50", "1234.50", "777.25", "1000.00", "Capital and revenue"):
        assert text in body
    # Status is shown, never a form field: it changes through the service only.
    assert set(page.context["adminform"].form.fields) == set(EDITABLE_FIELDS)
    assert '<div class="readonly">Forming</div>' in body


def test_adding_and_removing_members_goes_through_the_services(
    editor_a, world_a, django_capture_on_commit_callbacks
):
    coalition, newcomer = world_a.coalition, world_a.idle_agent
    founder = coalition.memberships.get()
    # Fill the Redis membership set, so only a service's invalidation can change it.
    assert not is_coalition_member(
        tenant=world_a.tenant, coalition_id=coalition.pk, agent_id=newcomer.pk
    )
    with django_capture_on_commit_callbacks(execute=True):
        response = editor_a.post(
            f"{URL}{coalition.pk}/change/",
            coalition_form(coalition, rows=[founder], new=[(newcomer, "scout", "3.5")]),
        )
    assert response.status_code == 302
    member = CoalitionMember.objects.get(coalition=coalition, agent=newcomer)
    assert (member.role, member.contribution_score) == ("scout", Decimal("3.50"))
    assert is_coalition_member(
        tenant=world_a.tenant, coalition_id=coalition.pk, agent_id=newcomer.pk
    )

    with django_capture_on_commit_callbacks(execute=True):
        editor_a.post(
            f"{URL}{coalition.pk}/change/",
            coalition_form(coalition, rows=[founder, member], delete=[founder]),
        )
    assert list(coalition.memberships.values_list("agent__name", flat=True)) == ["alpha-idle"]
    assert not is_coalition_member(
        tenant=world_a.tenant, coalition_id=coalition.pk, agent_id=world_a.agent.pk
    )


def test_member_roles_and_scores_change_through_the_service(editor_a, world_a):
    coalition = world_a.coalition
    founder = coalition.memberships.get()
    data = coalition_form(coalition, rows=[founder])
    data["memberships-0-role"] = "usurper"
    data["memberships-0-contribution_score"] = "999"
    assert editor_a.post(f"{URL}{coalition.pk}/change/", data).status_code == 302
    founder.refresh_from_db()
    assert (founder.role, founder.contribution_score) == ("usurper", Decimal("999.00"))


def test_a_members_agent_cannot_be_swapped_in_place(editor_a, world_a):
    coalition = world_a.coalition
    founder = coalition.memberships.get()
    data = coalition_form(coalition, rows=[founder])
    data["memberships-0-agent"] = world_a.idle_agent.pk
    page = editor_a.post(f"{URL}{coalition.pk}/change/", data, follow=True)
    assert MEMBER_AGENT_FIXED in page.content.decode()
    founder.refresh_from_db()
    assert founder.agent_id == world_a.agent.pk


def test_capital_and_revenue_are_edited_through_the_service(editor_a, world_a):
    coalition = world_a.coalition
    data = coalition_form(coalition)
    data["total_revenue"] = "250.75"
    data["name"] = "Renamed"
    assert editor_a.post(f"{URL}{coalition.pk}/change/", data).status_code == 302
    coalition.refresh_from_db()
    assert (coalition.name, coalition.total_revenue) == ("Renamed", Decimal("250.75"))
    data = coalition_form(coalition)
    data["current_capital"] = "-5"
    page = editor_a.post(f"{URL}{coalition.pk}/change/", data, follow=True)
    assert "current_capital" in page.content.decode()
    coalition.refresh_from_db()
    assert coalition.current_capital == Decimal("0")


def test_a_dissolved_coalition_is_read_only(editor_a, world_a):
    coalition = world_a.coalition
    Coalition.objects.filter(pk=coalition.pk).update(status="dissolved")
    page = editor_a.get(f"{URL}{coalition.pk}/change/")
    assert page.context["adminform"].form.fields == {}


def test_status_actions_follow_the_service_rules(editor_a, world_a):
    coalition = world_a.coalition
    ids = [str(coalition.pk)]
    page = editor_a.post(URL, {"action": "mark_profitable", "_selected_action": ids}, follow=True)
    refused = TRANSITION_NOT_ALLOWED.format(current="forming", target="profitable")
    assert [str(m) for m in page.context["messages"]] == [f"{coalition.name}: {refused}"]
    coalition.refresh_from_db()
    assert coalition.status == "forming"

    page = editor_a.post(URL, {"action": "activate", "_selected_action": ids}, follow=True)
    assert [str(m) for m in page.context["messages"]] == ["1 coalition(s) activated."]
    editor_a.post(URL, {"action": "dissolve", "_selected_action": ids})
    coalition.refresh_from_db()
    assert coalition.status == "dissolved"
    assert coalition.dissolved_at is not None


def test_a_dissolved_coalition_takes_no_new_members(editor_a, world_a):
    coalition = world_a.coalition
    editor_a.post(URL, {"action": "dissolve", "_selected_action": [str(coalition.pk)]})
    page = editor_a.get(f"{URL}{coalition.pk}/change/")
    formset = page.context["inline_admin_formsets"][0]
    assert not formset.has_add_permission
    founder = coalition.memberships.get()
    editor_a.post(
        f"{URL}{coalition.pk}/change/",
        coalition_form(coalition, rows=[founder], new=[(world_a.idle_agent, "late", 0)]),
    )
    assert coalition.memberships.count() == 1


def test_adding_a_coalition_uses_the_service_and_the_operators_tenant(editor_a, world_a):
    response = editor_a.post(
        f"{URL}add/",
        {
            "name": "New Venture",
            "business_model": "delivery",
            "initial_capital": "250.00",
            "formation_criteria": "null",
            "business_config": '{"radius": 2}',
            "memberships-TOTAL_FORMS": 1,
            "memberships-INITIAL_FORMS": 0,
            "memberships-0-agent": world_a.agent.pk,
            "memberships-0-role": "founder",
            "memberships-0-contribution_score": "1",
        },
    )
    assert response.status_code == 302
    coalition = Coalition.objects.get(name="New Venture")
    assert coalition.tenant == world_a.tenant
    assert (coalition.status, coalition.current_capital) == ("forming", Decimal("250.00"))
    assert coalition.business_config == {"radius": 2}
    assert list(coalition.memberships.values_list("agent__name", "role")) == [
        ("alpha-agent", "founder")
    ]


def test_a_service_refusal_on_add_is_a_form_error_and_creates_nothing(editor_a, world_a):
    response = editor_a.post(
        f"{URL}add/",
        {
            "name": "Broke",
            "business_model": "retail",
            "initial_capital": "-5",
            "formation_criteria": "null",
            "business_config": "null",
            "memberships-TOTAL_FORMS": 0,
            "memberships-INITIAL_FORMS": 0,
        },
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert errors["initial_capital"] == [MONEY_INVALID.format(field="initial_capital")]
    assert not Coalition.objects.filter(name="Broke").exists()


def test_coalitions_are_dissolved_not_deleted(superuser_client, world_a):
    coalition = world_a.coalition
    assert superuser_client.get(f"{URL}{coalition.pk}/delete/").status_code == 403
    actions = superuser_client.get(URL).context["action_form"].fields["action"].choices
    assert "delete_selected" not in [value for value, _ in actions]


def test_superusers_can_only_add_the_coalitions_own_tenants_agents(
    superuser_client, world_a, world_b
):
    coalition = world_a.coalition
    founder = coalition.memberships.get()
    response = superuser_client.post(
        f"{URL}{coalition.pk}/change/",
        coalition_form(coalition, rows=[founder], new=[(world_b.agent, "spy", 0)]),
    )
    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    assert coalition.memberships.count() == 1


def test_the_change_list_counts_members(editor_a, world_a):
    factories.make_agent(world_a.tenant)
    page = editor_a.get(URL)
    [row] = page.context["cl"].result_list
    assert row._member_count == 1


def test_the_change_page_offers_the_allowed_status_moves_as_buttons(editor_a, world_a):
    coalition = world_a.coalition
    body = editor_a.get(f"{URL}{coalition.pk}/change/").content.decode()
    offered = re.findall(r'<input type="hidden" name="status" value="(\w+)">', body)
    assert offered == ["active", "dissolved"]

    status_url = f"{URL}{coalition.pk}/status/"
    assert editor_a.get(status_url).status_code == 405
    page = editor_a.post(status_url, {"status": "active"}, follow=True)
    assert [str(m) for m in page.context["messages"]] == [f"{coalition.name} is now active."]
    coalition.refresh_from_db()
    assert coalition.status == "active"
    history = editor_a.get(f"{URL}{coalition.pk}/history/").content.decode()
    assert "Status set to active." in history

    page = editor_a.post(status_url, {"status": "forming"}, follow=True)
    refused = TRANSITION_NOT_ALLOWED.format(current="active", target="forming")
    assert [str(m) for m in page.context["messages"]] == [refused]
    coalition.refresh_from_db()
    assert coalition.status == "active"


def test_read_only_operators_get_no_status_buttons(make_operator, world_a):
    client = logged_in(make_operator(world_a.tenant, OPERATOR_READ_ONLY))
    coalition = world_a.coalition
    body = client.get(f"{URL}{coalition.pk}/change/").content.decode()
    assert 'name="status"' not in body
    assert client.post(f"{URL}{coalition.pk}/status/", {"status": "active"}).status_code == 403
    coalition.refresh_from_db()
    assert coalition.status == "forming"


def test_coalition_page_shows_memberscoalition_form(superuser_client, tenant):
    coalition = factories.make_coalition(tenant)
    agent = factories.make_agent(tenant, name="member-one")
    CoalitionMember.objects.create(coalition=coalition, agent=agent, role="founder")
    page = superuser_client.get(f"/admin/coalitions/coalition/{coalition.pk}/change/")
    assert page.status_code == 200
    assert "founder" in page.content.decode()
    listing = superuser_client.get("/admin/coalitions/coalition/")
    assert listing.status_code == 200
    assert coalition.name in listing.content.decode()


CONFIG = {"pricing": {"base": 10, "surge": 1.5}, "currency": "EUR"}


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
    data = coalition_form(coalition)
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
