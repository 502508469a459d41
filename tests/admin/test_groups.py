import pytest
from django.contrib.auth.models import Group

from agents.admin_scoping import OPERATOR_EDITOR, OPERATOR_READ_ONLY

pytestmark = pytest.mark.django_db

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


def test_the_migration_made_both_operator_groups():
    # No fixture re-applies the migration here: these rows come from migrating the test
    # database (non-transactional tests run before any flush).
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
        "coalitions.delete_coalitionmember",
    }


def test_operator_groups_grant_nothing_outside_agents_and_coalitions(operator_groups):
    for group in operator_groups.values():
        labels = set(group.permissions.values_list("content_type__app_label", flat=True))
        assert labels <= {"agents", "coalitions"}
        assert not group.permissions.filter(content_type__model="operatormembership").exists()
