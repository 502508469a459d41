"""The two back-office operator roles, as auth groups.

Both see only their own tenant (agents.admin_scoping); the groups decide what they may do
there. Editors change coalition members by adding and removing them, and retire
coalitions and tokens by dissolving and revoking, so they get no delete on those.
"""

from django.contrib.auth.management import create_permissions
from django.db import migrations

READ_ONLY = "Operator (read-only)"
EDITOR = "Operator (editor)"

_VIEW = [
    ("agents", "view_tenant"),
    ("agents", "view_agent"),
    ("agents", "view_apitoken"),
    ("coalitions", "view_coalition"),
    ("coalitions", "view_coalitionmember"),
]
ROLES = {
    READ_ONLY: _VIEW,
    EDITOR: [
        *_VIEW,
        ("agents", "add_agent"),
        ("agents", "change_agent"),
        ("agents", "delete_agent"),
        ("agents", "add_apitoken"),
        ("agents", "change_apitoken"),
        ("coalitions", "add_coalition"),
        ("coalitions", "change_coalition"),
        ("coalitions", "add_coalitionmember"),
        ("coalitions", "delete_coalitionmember"),
    ],
}


def _ensure_permissions(apps):
    # Permissions are normally created after all migrations (post_migrate); a fresh
    # database has none yet when this runs.
    for label in ("agents", "coalitions"):
        config = apps.get_app_config(label)
        stub = getattr(config, "models_module", None) is None
        if stub:
            config.models_module = True
        try:
            create_permissions(config, apps=apps, verbosity=0)
        finally:
            if stub:
                config.models_module = None


def create_operator_groups(apps, schema_editor):
    """Create or update the groups to exactly ROLES; safe to run again."""
    _ensure_permissions(apps)
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, wanted in ROLES.items():
        group, _ = Group.objects.get_or_create(name=name)
        permissions = [
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
            for app_label, codename in wanted
        ]
        group.permissions.set(permissions)


def remove_operator_groups(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=ROLES).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0004_api_tokens_and_operators"),
        ("coalitions", "0003_idx_coalition_members_performance"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_operator_groups, remove_operator_groups)]
