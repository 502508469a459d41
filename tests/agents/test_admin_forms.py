"""The services' hostile inputs through the admin forms, as a logged-in operator: every
one is a form error on a re-rendered page (HTTP 200), never a 500, and writes nothing."""

import json

import pytest
from django_redis import get_redis_connection

from agents.models import Agent, AgentHistory
from coalitions.models import Coalition, CoalitionMember
from coalitions.selectors import is_coalition_member
from metrics.models import OutboxPoint
from tests import factories
from tests.backoffice import coalition_form

pytestmark = pytest.mark.django_db

AGENTS = "/admin/agents/agent/"
COALITIONS = "/admin/coalitions/coalition/"
CELL = factories.BERLIN_CELL

TEXT = [
    ("nul", "scout\x00"),
    ("too-long", "x" * 300),
    ("empty", ""),
]
JSON = [
    ("nan", "NaN"),
    ("nan-inside", '{"a": NaN}'),
    ("infinity", '{"a": [1, -Infinity]}'),
    ("overflow", '{"a": 1e400}'),
    ("nul", '{"a": "x\\u0000"}'),
    ("nul-key", '{"\\u0000": 1}'),
    ("surrogate", '{"a": "\\ud800"}'),
    ("huge-int", '{"a": 100000000000000000000000000000}'),
    ("deep", '{"a": ' * 100 + "1" + "}" * 100),
    ("too-deep-to-parse", "[" * 100_000 + "]" * 100_000),
    ("broken", '{"a": '),
    ("list", "[1, 2]"),
    ("string", '"text"'),
]
CELLS = [
    ("garbage", "zzz"),
    ("too-long", "0" + CELL),
    ("hex-prefix", "0x" + CELL[:13]),
    ("nul", CELL[:14] + "\x00"),
]
ENERGY = [("nan", "NaN"), ("overflow", "1e400"), ("above", "101"), ("huge", "9" * 30)]
MONEY = [("nan", "NaN"), ("infinity", "Infinity"), ("negative", "-1"), ("huge", "1e20")]
SCORES = [("nan", "NaN"), ("above", "1000"), ("overflow", "1e400")]


def _agent_add(world):
    return AGENTS + "add/", {
        "name": "fresh",
        "agent_type": "scout",
        "status": "active",
        "energy_level": "60",
        "location_h3": CELL,
        "personality_traits": "null",
    }


def _agent_change(world):
    agent = world.agent
    return f"{AGENTS}{agent.pk}/change/", {
        "status": agent.status,
        "energy_level": agent.energy_level,
        "location_h3": agent.location_h3,
        "personality_traits": "null",
    }


def _coalition_add(world):
    return COALITIONS + "add/", {
        "name": "New Venture",
        "business_model": "delivery",
        "initial_capital": "250.00",
        "formation_criteria": "null",
        "business_config": "null",
        "memberships-TOTAL_FORMS": 1,
        "memberships-INITIAL_FORMS": 0,
        "memberships-0-agent": world.idle_agent.pk,
        "memberships-0-role": "founder",
        "memberships-0-contribution_score": "1",
    }


def _coalition_change(world):
    coalition = world.coalition
    return f"{COALITIONS}{coalition.pk}/change/", coalition_form(
        coalition, rows=[coalition.memberships.get()], new=[(world.idle_agent, "newcomer", "2")]
    )


FORMS = {
    "agent-add": (
        _agent_add,
        {
            "name": TEXT,
            "agent_type": TEXT,
            "status": [("unknown", "zombie")],
            "energy_level": ENERGY,
            "location_h3": CELLS,
            "personality_traits": JSON,
        },
    ),
    "agent-change": (
        _agent_change,
        {
            "status": [("unknown", "zombie")],
            "energy_level": ENERGY,
            "location_h3": CELLS,
            "personality_traits": JSON,
        },
    ),
    "coalition-add": (
        _coalition_add,
        {
            "name": TEXT,
            "business_model": [("unknown", "piracy")],
            "initial_capital": MONEY,
            "formation_criteria": [*JSON[:-2]],
            "business_config": [*JSON[:-2]],
            "memberships-0-role": TEXT,
            "memberships-0-contribution_score": SCORES,
            "memberships-0-agent": [("garbage", "not-a-uuid"), ("int", "5")],
        },
    ),
    "coalition-change": (
        _coalition_change,
        {
            "name": TEXT,
            "business_model": [("unknown", "piracy")],
            "current_capital": MONEY,
            "total_revenue": MONEY,
            "formation_criteria": [*JSON[:-2]],
            "business_config": [*JSON[:-2]],
            "memberships-0-role": TEXT,
            "memberships-0-contribution_score": SCORES,
            "memberships-1-role": TEXT,
            "memberships-1-contribution_score": SCORES,
            "memberships-1-agent": [("garbage", "not-a-uuid")],
        },
    ),
}


def _cases():
    for form, (make, fields) in FORMS.items():
        for field, values in fields.items():
            for label, value in values:
                yield pytest.param(make, field, value, id=f"{form}-{field}-{label}")


def snapshot():
    return (
        list(
            Agent.objects.order_by("pk").values_list("pk", "status", "energy_level", "location_h3")
        ),
        list(Agent.objects.order_by("pk").values_list("personality_traits", flat=True)),
        list(Coalition.objects.order_by("pk").values()),
        list(CoalitionMember.objects.order_by("pk").values()),
        AgentHistory.objects.count(),
        OutboxPoint.objects.count(),
        sorted(get_redis_connection("default").keys("*")),
    )


def _errors(response) -> dict:
    """Field errors of the main form and of every inline form, by field name
    (inline fields as memberships-<i>-<name>)."""
    errors = dict(response.context["adminform"].form.errors)
    for inline in response.context["inline_admin_formsets"]:
        for form in inline.formset.forms:
            for field, messages in form.errors.items():
                errors[form.add_prefix(field)] = messages
    return errors


@pytest.mark.reliability("service bad input")
@pytest.mark.parametrize(("make", "field", "value"), list(_cases()))
def test_bad_input_is_a_form_error_never_a_500_and_writes_nothing(
    editor_a, world_a, make, field, value
):
    assert is_coalition_member(
        tenant=world_a.tenant, coalition_id=world_a.coalition.pk, agent_id=world_a.agent.pk
    )
    url, data = make(world_a)
    data[field] = value
    before = snapshot()
    response = editor_a.post(url, data)
    assert response.status_code == 200
    errors = _errors(response)
    assert field in errors, errors
    assert snapshot() == before


@pytest.mark.reliability("service bad input")
def test_upper_case_cells_are_saved_lower_case(editor_a, world_a):
    url, data = _agent_add(world_a)
    data["location_h3"] = CELL.upper()
    assert editor_a.post(url, data).status_code == 302
    assert Agent.objects.get(name="fresh").location_h3 == CELL
    url, data = _agent_change(world_a)
    data["location_h3"] = h3_other = "891f1d4894fffff".upper()
    assert editor_a.post(url, data).status_code == 302
    world_a.agent.refresh_from_db()
    assert world_a.agent.location_h3 == h3_other.lower()


@pytest.mark.reliability("service bad input")
def test_valid_json_still_saves(editor_a, world_a):
    url, data = _agent_change(world_a)
    data["personality_traits"] = json.dumps({"bold": 0.5, "tags": ["a", None, True]})
    assert editor_a.post(url, data).status_code == 302
    world_a.agent.refresh_from_db()
    assert world_a.agent.personality_traits == {"bold": 0.5, "tags": ["a", None, True]}
