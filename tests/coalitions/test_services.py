import uuid

import h3
import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_redis import get_redis_connection

from coalitions import cache
from coalitions.models import CoalitionMember
from coalitions.selectors import coalitions_near, is_coalition_member
from coalitions.services import (
    TRANSITION_NOT_ALLOWED,
    coalition_add_member,
    coalition_create,
    coalition_remove_member,
    coalition_set_status,
)
from tests import factories

pytestmark = pytest.mark.django_db

CENTRE = factories.BERLIN_CELL


def new_coalition(tenant, **kwargs):
    kwargs.setdefault("name", "Bakery")
    kwargs.setdefault("business_model", "retail")
    return coalition_create(tenant=tenant, **kwargs)


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        (["active"], True),
        (["active", "profitable"], True),
        (["dissolved"], True),
        (["active", "dissolved"], True),
        (["active", "profitable", "dissolved"], True),
        (["profitable"], False),
        (["active", "forming"], False),
        (["active", "profitable", "active"], False),
        (["dissolved", "active"], False),
        (["dissolved", "dissolved"], False),
    ],
)
def test_status_transitions(tenant, path, allowed):
    coalition = new_coalition(tenant)
    *steps, last = path
    for step in steps:
        coalition_set_status(tenant=tenant, coalition_id=coalition.id, status=step)
    if allowed:
        result = coalition_set_status(tenant=tenant, coalition_id=coalition.id, status=last)
        assert result.status == last
        assert (result.dissolved_at is not None) == (last == "dissolved")
    else:
        current = steps[-1] if steps else "forming"
        with pytest.raises(ValidationError) as exc:
            coalition_set_status(tenant=tenant, coalition_id=coalition.id, status=last)
        assert exc.value.message_dict["status"] == [
            TRANSITION_NOT_ALLOWED.format(current=current, target=last)
        ]


def test_unknown_status_and_business_model_are_named(tenant):
    with pytest.raises(ValidationError) as exc:
        new_coalition(tenant, business_model="piracy")
    assert "'piracy' is not one of" in exc.value.message_dict["business_model"][0]
    coalition = new_coalition(tenant)
    with pytest.raises(ValidationError) as exc:
        coalition_set_status(tenant=tenant, coalition_id=coalition.id, status="zombie")
    assert "'zombie' is not one of" in exc.value.message_dict["status"][0]


def test_other_tenant_cannot_touch_coalition(tenant, other_tenant):
    coalition = new_coalition(tenant)
    agent = factories.make_agent(other_tenant)
    with pytest.raises(ValidationError, match="does not exist in tenant"):
        coalition_set_status(tenant=other_tenant, coalition_id=coalition.id, status="active")
    with pytest.raises(ValidationError, match=r"agent .* does not exist in tenant"):
        coalition_add_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)


def test_members_are_added_with_role_and_score_and_removed(tenant):
    coalition = new_coalition(tenant)
    agent = factories.make_agent(tenant)
    member = coalition_add_member(
        tenant=tenant,
        coalition_id=coalition.id,
        agent_id=agent.id,
        role="founder",
        contribution_score="12.346",
    )
    assert (member.role, str(member.contribution_score)) == ("founder", "12.35")
    with pytest.raises(ValidationError, match="already a member"):
        coalition_add_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)
    coalition_remove_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)
    assert not CoalitionMember.objects.exists()
    with pytest.raises(ValidationError, match="not a member"):
        coalition_remove_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)


@pytest.mark.parametrize("score", ["1000", "nan", "abc", -1000])
def test_contribution_score_is_bounded(tenant, score):
    coalition = new_coalition(tenant)
    agent = factories.make_agent(tenant)
    with pytest.raises(ValidationError) as exc:
        coalition_add_member(
            tenant=tenant, coalition_id=coalition.id, agent_id=agent.id, contribution_score=score
        )
    assert "contribution_score" in exc.value.message_dict


def test_dissolved_coalition_takes_no_members(tenant):
    coalition = new_coalition(tenant)
    coalition_set_status(tenant=tenant, coalition_id=coalition.id, status="dissolved")
    with pytest.raises(ValidationError, match="is dissolved"):
        coalition_add_member(
            tenant=tenant, coalition_id=coalition.id, agent_id=factories.make_agent(tenant).id
        )


def test_membership_is_answered_from_a_redis_set_and_invalidated_on_commit(
    tenant, other_tenant, django_capture_on_commit_callbacks
):
    coalition = new_coalition(tenant)
    inside, outside = factories.make_agent(tenant), factories.make_agent(tenant)
    with django_capture_on_commit_callbacks(execute=True):
        coalition_add_member(tenant=tenant, coalition_id=coalition.id, agent_id=inside.id)
    assert is_coalition_member(tenant=tenant, coalition_id=coalition.id, agent_id=inside.id)
    redis = get_redis_connection("default")
    key = cache.members_key(coalition.id)
    assert redis.sismember(key, str(inside.id))
    assert 0 < redis.ttl(key) <= 600
    with CaptureQueriesContext(connection) as queries:
        assert not is_coalition_member(
            tenant=tenant, coalition_id=coalition.id, agent_id=outside.id
        )
    assert len(queries) == 0
    assert not is_coalition_member(
        tenant=other_tenant, coalition_id=coalition.id, agent_id=inside.id
    )
    with django_capture_on_commit_callbacks(execute=True):
        coalition_remove_member(tenant=tenant, coalition_id=coalition.id, agent_id=inside.id)
    assert not redis.exists(key)
    assert not is_coalition_member(tenant=tenant, coalition_id=coalition.id, agent_id=inside.id)


def test_stale_reader_cannot_fill_membership_after_a_write(
    tenant, django_capture_on_commit_callbacks
):
    coalition = new_coalition(tenant)
    agent = factories.make_agent(tenant)
    _, generation = cache.membership_lookup(coalition.id, agent.id, tenant.id)
    with django_capture_on_commit_callbacks(execute=True):
        coalition_add_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)
    cache.membership_fill(coalition.id, tenant.id, [], generation)  # read before the write
    assert not get_redis_connection("default").exists(cache.members_key(coalition.id))
    assert is_coalition_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)


def test_membership_works_with_redis_down(tenant, redis_down):
    coalition = new_coalition(tenant)
    agent = factories.make_agent(tenant)
    coalition_add_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)
    assert is_coalition_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)


def test_coalitions_near_in_one_query(tenant, other_tenant):
    far = next(iter(h3.grid_ring(CENTRE, 5)))
    near_cell = next(iter(h3.grid_ring(CENTRE, 2)))

    def coalition_with(cells, status="active", business_model="retail", owner=tenant):
        coalition = new_coalition(owner, business_model=business_model)
        for cell in cells:
            agent = factories.make_agent(owner, location_h3=cell)
            coalition_add_member(tenant=owner, coalition_id=coalition.id, agent_id=agent.id)
        for step in {"active": ["active"], "forming": []}[status]:
            coalition_set_status(tenant=owner, coalition_id=coalition.id, status=step)
        return coalition

    match = coalition_with([CENTRE, near_cell, far])
    coalition_with([CENTRE, far])  # only one member nearby
    coalition_with([CENTRE, near_cell], status="forming")
    coalition_with([CENTRE, near_cell], business_model="delivery")
    coalition_with([CENTRE, near_cell], owner=other_tenant)
    with CaptureQueriesContext(connection) as queries:
        found = coalitions_near(tenant=tenant, cell=CENTRE, business_model="retail")
    assert [c.id for c in found] == [match.id]
    assert len(queries) == 1
    with pytest.raises(ValidationError, match="business_model"):
        coalitions_near(tenant=tenant, cell=CENTRE, business_model="piracy")


def test_unknown_coalition_id_is_a_validation_error(tenant):
    with pytest.raises(ValidationError, match="coalition_id"):
        coalition_set_status(tenant=tenant, coalition_id=uuid.uuid4(), status="active")
    with pytest.raises(ValidationError, match="coalition_id"):
        coalition_set_status(tenant=tenant, coalition_id="not-a-uuid", status="active")


def test_deleting_an_agent_invalidates_its_coalitions_membership_sets(
    tenant, django_capture_on_commit_callbacks
):
    from agents.services import agent_delete

    coalition = new_coalition(tenant)
    agent = factories.make_agent(tenant)
    coalition_add_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)
    assert is_coalition_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)
    with django_capture_on_commit_callbacks(execute=True):
        agent_delete(tenant=tenant, agent_id=agent.id)
    assert not is_coalition_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)


def test_coalition_update_changes_given_fields_only(tenant):
    from coalitions.services import coalition_update

    coalition = new_coalition(tenant, initial_capital="100")
    updated = coalition_update(
        tenant=tenant,
        coalition_id=coalition.id,
        name="Bigger bakery",
        total_revenue="12.5",
        business_config={"hours": 8},
    )
    assert (updated.name, str(updated.total_revenue)) == ("Bigger bakery", "12.50")
    assert str(updated.current_capital) == "100.00"
    assert updated.business_config == {"hours": 8}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": ""}, "name"),
        ({"business_model": "piracy"}, "business_model"),
        ({"current_capital": "-1"}, "current_capital"),
        ({"total_revenue": "1e14"}, "total_revenue"),
        ({"business_config": [1]}, "business_config"),
    ],
)
def test_coalition_update_names_the_invalid_field(tenant, fields, field):
    from coalitions.services import coalition_update

    coalition = new_coalition(tenant)
    with pytest.raises(ValidationError) as exc:
        coalition_update(tenant=tenant, coalition_id=coalition.id, **fields)
    assert field in exc.value.message_dict


def test_dissolved_coalition_cannot_be_updated(tenant, other_tenant):
    from coalitions.services import coalition_update

    coalition = new_coalition(tenant)
    with pytest.raises(ValidationError, match="does not exist in tenant"):
        coalition_update(tenant=other_tenant, coalition_id=coalition.id, name="x")
    coalition_set_status(tenant=tenant, coalition_id=coalition.id, status="dissolved")
    with pytest.raises(ValidationError, match="is dissolved and cannot be changed"):
        coalition_update(tenant=tenant, coalition_id=coalition.id, name="x")


def test_member_role_and_score_can_change(tenant):
    from coalitions.services import coalition_member_update

    coalition = new_coalition(tenant)
    agent = factories.make_agent(tenant)
    coalition_add_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)
    member = coalition_member_update(
        tenant=tenant,
        coalition_id=coalition.id,
        agent_id=agent.id,
        role="lead",
        contribution_score=50,
    )
    assert (member.role, str(member.contribution_score)) == ("lead", "50.00")
    with pytest.raises(ValidationError, match="contribution_score"):
        coalition_member_update(
            tenant=tenant, coalition_id=coalition.id, agent_id=agent.id, contribution_score=5000
        )
    with pytest.raises(ValidationError, match="not a member"):
        coalition_member_update(
            tenant=tenant, coalition_id=coalition.id, agent_id=uuid.uuid4(), role="x"
        )


def test_members_sync_applies_a_whole_form_or_nothing(tenant):
    from coalitions.services import coalition_members_sync

    coalition = factories.make_coalition(tenant)
    kept, leaving, joining = (factories.make_agent(tenant) for _ in range(3))
    CoalitionMember.objects.create(coalition=coalition, agent=kept, role="a")
    CoalitionMember.objects.create(coalition=coalition, agent=leaving, role="b")
    added = coalition_members_sync(
        tenant=tenant,
        coalition_id=coalition.pk,
        update=[{"agent_id": kept.pk, "role": "lead"}],
        remove=[leaving.pk],
        add=[{"agent_id": joining.pk, "role": "new", "contribution_score": 1}],
    )
    assert [m.agent_id for m in added] == [joining.pk]
    roles = dict(coalition.memberships.values_list("agent_id", "role"))
    assert roles == {kept.pk: "lead", joining.pk: "new"}
    # One refused part (a second add of a member) and nothing of the form is written.
    with pytest.raises(ValidationError):
        coalition_members_sync(
            tenant=tenant,
            coalition_id=coalition.pk,
            update=[{"agent_id": kept.pk, "role": "changed"}],
            add=[{"agent_id": joining.pk, "role": "again", "contribution_score": 0}],
        )
    assert dict(coalition.memberships.values_list("agent_id", "role")) == roles
