import uuid

import django.contrib.postgres.functions
import django.core.validators
import django.db.models.deletion
from django.db import migrations, models

import agents.fields


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="AgentHistory",
            fields=[
                (
                    "id",
                    models.UUIDField(
                        db_default=django.contrib.postgres.functions.RandomUUID(),
                        default=uuid.uuid4,
                        primary_key=True,
                        serialize=False,
                    ),
                ),
                (
                    "recorded_at",
                    models.DateTimeField(db_default=agents.fields.DatabaseNow()),
                ),
                ("belief_state", agents.fields.EncryptedArrayField(null=True)),
                ("energy_level", models.IntegerField(null=True)),
            ],
            options={
                "db_table": "agent_history",
                "ordering": ["-recorded_at"],
                "managed": False,
            },
        ),
        migrations.CreateModel(
            name="Tenant",
            fields=[
                (
                    "id",
                    models.UUIDField(
                        db_default=django.contrib.postgres.functions.RandomUUID(),
                        default=uuid.uuid4,
                        primary_key=True,
                        serialize=False,
                    ),
                ),
                ("name", models.CharField(max_length=255)),
                ("slug", models.SlugField(max_length=100, unique=True)),
                (
                    "created_at",
                    models.DateTimeField(db_default=agents.fields.DatabaseNow(), editable=False),
                ),
            ],
            options={
                "db_table": "tenants",
                "ordering": ["name"],
            },
        ),
        migrations.CreateModel(
            name="Agent",
            fields=[
                (
                    "id",
                    models.UUIDField(
                        db_default=django.contrib.postgres.functions.RandomUUID(),
                        default=uuid.uuid4,
                        primary_key=True,
                        serialize=False,
                    ),
                ),
                ("name", models.CharField(max_length=255)),
                ("agent_type", models.CharField(max_length=50)),
                (
                    "created_at",
                    models.DateTimeField(db_default=agents.fields.DatabaseNow(), editable=False),
                ),
                (
                    "updated_at",
                    models.DateTimeField(db_default=agents.fields.DatabaseNow(), editable=False),
                ),
                (
                    "belief_state",
                    agents.fields.EncryptedArrayField(blank=True, null=True),
                ),
                ("personality_traits", models.JSONField(blank=True, null=True)),
                (
                    "energy_level",
                    models.IntegerField(
                        db_default=100,
                        default=100,
                        validators=[
                            django.core.validators.MinValueValidator(0),
                            django.core.validators.MaxValueValidator(100),
                        ],
                    ),
                ),
                ("location_h3", models.CharField(blank=True, max_length=15, null=True)),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("active", "Active"),
                            ("inactive", "Inactive"),
                            ("suspended", "Suspended"),
                        ],
                        db_default="active",
                        default="active",
                        max_length=20,
                    ),
                ),
                (
                    "last_active_at",
                    models.DateTimeField(db_default=agents.fields.DatabaseNow()),
                ),
                (
                    "tenant",
                    models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="agents",
                        to="agents.tenant",
                    ),
                ),
            ],
            options={
                "db_table": "agents",
                "ordering": ["name"],
                "indexes": [
                    models.Index(fields=["tenant", "agent_type"], name="idx_agents_tenant_type"),
                    models.Index(fields=["location_h3"], name="idx_agents_location"),
                    models.Index(fields=["last_active_at"], name="idx_agents_last_active"),
                ],
                "constraints": [
                    models.CheckConstraint(
                        condition=models.Q(("energy_level__gte", 0), ("energy_level__lte", 100)),
                        name="valid_energy",
                        violation_error_message="energy_level must be between 0 and 100.",
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("status__in", ["active", "inactive", "suspended"])),
                        name="valid_status",
                        violation_error_message="status must be one of: active, inactive, suspended.",
                    ),
                ],
            },
        ),
    ]
