"""Editors may now change a member's role and contribution score (through
coalition_member_update), so their group gains coalitions.change_coalitionmember."""

from importlib import import_module

from django.db import migrations

# Permissions may not exist yet on a fresh database; 0005 knows how to make them.
operator_groups = import_module("agents.migrations.0005_operator_groups")

EDITOR = "Operator (editor)"
PERMISSION = ("coalitions", "change_coalitionmember")


def grant(apps, schema_editor):
    operator_groups._ensure_permissions(apps)
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    app_label, codename = PERMISSION
    permission = Permission.objects.get(content_type__app_label=app_label, codename=codename)
    for group in Group.objects.filter(name=EDITOR):
        group.permissions.add(permission)


def revoke(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    app_label, codename = PERMISSION
    for group in Group.objects.filter(name=EDITOR):
        group.permissions.remove(
            *Permission.objects.filter(content_type__app_label=app_label, codename=codename)
        )


class Migration(migrations.Migration):
    dependencies = [("agents", "0006_api_token_verbose_name")]

    operations = [migrations.RunPython(grant, revoke)]
