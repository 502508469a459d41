"""Every public coalition service, every parameter, hostile values: a ValidationError
naming the field, and nothing written (no rows, outbox points, cache entries or
after-commit callbacks)."""

import math
import uuid
from decimal import Decimal
from operator import attrgetter

import pytest
from django.core.exceptions import ValidationError

from agents.validators import JSON_OBJECT
from coalitions.models import Coalition, CoalitionMember
from coalitions.selectors import is_coalition_member
from coalitions.services import (
    coalition_add_member,
    coalition_create,
    coalition_member_update,
    coalition_remove_member,
    coalition_set_status,
    coalition_update,
)
from tests import factories
from tests.agents import bad_values as bad

pytestmark = pytest.mark.django_db

MONEY = [
    ("nan", math.nan),
    ("nan-str", "NaN"),
    ("inf", math.inf),
    ("negative", -1),
    ("huge", 10**30),
    ("bool", True),
    ("garbage", "abc"),
    ("nul", "1\x00"),
    ("list", [1]),
    ("dict", {"a": 1}),
    ("long-str", "1" * 100_000),
]
SCORES = [
    ("nan", math.nan),
    ("inf-str", "inf"),
    ("above", 1000),
    ("bool", False),
    ("list", [1]),
    ("exp", "1e400"),
    ("none", None),
]
BUSINESS_MODELS = [("unknown", "piracy"), ("none", None), ("int", 5), ("list", ["retail"])]


class World:
    """A coalition with one member and one agent that is not a member."""

    def __init__(self, tenant):
        self.tenant = tenant
        self.coalition = factories.make_coalition(tenant, business_config={"hours": 8})
        self.member = factories.make_agent(tenant)
        self.outsider = factories.make_agent(tenant)
        coalition_add_member(tenant=tenant, coalition_id=self.coalition.pk, agent_id=self.member.pk)


def _case(service, **defaults):
    """make(**fields) -> call(world): calls `service` in the world's tenant with `fields`,
    and `defaults` for the fields a case leaves out (a value, or a function of the world)."""

    def make(**fields):
        def call(w):
            for name, default in defaults.items():
                fields.setdefault(name, default(w) if callable(default) else default)
            return service(tenant=w.tenant, **fields)

        return call

    return make


_coalition = attrgetter("coalition.pk")
_create = _case(coalition_create, name="Bakery", business_model="retail")
_update = _case(coalition_update, coalition_id=_coalition)
_add = _case(coalition_add_member, coalition_id=_coalition, agent_id=attrgetter("outsider.pk"))
_member_update = _case(
    coalition_member_update, coalition_id=_coalition, agent_id=attrgetter("member.pk")
)
_remove = _case(coalition_remove_member, coalition_id=_coalition, agent_id=attrgetter("member.pk"))
_status = _case(coalition_set_status, coalition_id=_coalition, status="active")


def _cases():
    table = {
        "coalition_create": (
            _create,
            {
                "name": bad.texts(255),
                "business_model": BUSINESS_MODELS,
                "initial_capital": MONEY,
                "formation_criteria": bad.JSONS,
                "business_config": bad.JSONS,
            },
        ),
        "coalition_update": (
            _update,
            {
                "coalition_id": bad.UUIDS,
                "name": bad.texts(255),
                "business_model": BUSINESS_MODELS,
                "current_capital": MONEY,
                "total_revenue": MONEY,
                "formation_criteria": bad.JSONS,
                "business_config": bad.JSONS,
            },
        ),
        "coalition_add_member": (
            _add,
            {
                "coalition_id": bad.UUIDS,
                "agent_id": bad.UUIDS,
                "role": bad.texts(50),
                "contribution_score": SCORES,
            },
        ),
        "coalition_member_update": (
            _member_update,
            {
                "coalition_id": bad.UUIDS,
                "agent_id": bad.UUIDS,
                "role": bad.texts(50),
                "contribution_score": SCORES,
            },
        ),
        "coalition_remove_member": (
            _remove,
            {"coalition_id": bad.UUIDS, "agent_id": bad.UUIDS},
        ),
        "coalition_set_status": (
            _status,
            {
                "coalition_id": bad.UUIDS,
                "status": [("unknown", "zombie"), ("none", None), ("int", 5), ("list", [])],
            },
        ),
    }
    for service, (make, fields) in table.items():
        for field, values in fields.items():
            for label, value in values:
                yield pytest.param(make(**{field: value}), field, id=f"{service}-{field}-{label}")


def rows():
    """The rows a coalition service could write: coalitions and members."""
    return (
        list(Coalition.objects.order_by("pk").values()),
        list(CoalitionMember.objects.order_by("pk").values()),
    )


@pytest.mark.reliability("service bad input")
@pytest.mark.parametrize(("call", "field"), list(_cases()))
def test_bad_input_is_a_validation_error_naming_the_field_and_writes_nothing(
    tenant, call, field, django_capture_on_commit_callbacks
):
    world = World(tenant)
    # A cached membership set, as a live system would have; it must survive.
    assert is_coalition_member(
        tenant=tenant, coalition_id=world.coalition.pk, agent_id=world.member.pk
    )
    with bad.refused(field, rows, django_capture_on_commit_callbacks) as exc:
        call(world)
    assert all(message.startswith(f"{field}: ") for message in exc.value.message_dict[field])


@pytest.mark.reliability("service bad input")
@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ({"radius": 2}, True),
        ({}, True),
        (None, True),
        ("radius", False),
        ([1, 2], False),
        (5, False),
        (True, False),
    ],
)
@pytest.mark.parametrize("field", ["formation_criteria", "business_config"])
def test_create_and_update_agree_on_configuration_values(tenant, field, value, accepted):
    coalition = factories.make_coalition(tenant)
    outcomes = []
    for call in (
        lambda: coalition_create(
            tenant=tenant, name="x", business_model="retail", **{field: value}
        ),
        lambda: coalition_update(tenant=tenant, coalition_id=coalition.pk, **{field: value}),
    ):
        try:
            saved = call()
        except ValidationError as e:
            assert e.message_dict == {
                field: [JSON_OBJECT.format(field=field, kind=type(value).__name__)]
            }
            outcomes.append(False)
        else:
            saved.refresh_from_db()
            assert getattr(saved, field) == value
            outcomes.append(True)
    assert outcomes == [accepted, accepted]


@pytest.mark.reliability("service bad input")
def test_ids_as_strings_are_accepted(tenant):
    world = World(tenant)
    cid, outsider = str(world.coalition.pk), str(world.outsider.pk)
    member = coalition_add_member(tenant=tenant, coalition_id=cid, agent_id=outsider, role="r")
    assert member.agent_id == world.outsider.pk
    coalition_member_update(
        tenant=tenant, coalition_id=cid, agent_id=outsider, contribution_score="1.5"
    )
    assert CoalitionMember.objects.get(pk=member.pk).contribution_score == Decimal("1.50")
    coalition_remove_member(tenant=tenant, coalition_id=cid, agent_id=outsider)
    assert coalition_set_status(tenant=tenant, coalition_id=cid, status="active").status == "active"
    assert coalition_update(tenant=tenant, coalition_id=cid, name="n").pk == uuid.UUID(cid)
