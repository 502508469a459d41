from io import StringIO

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command

from agents.admin_scoping import OPERATOR_EDITOR, OPERATOR_READ_ONLY

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
