import uuid

import django.contrib.postgres.functions
import django.core.validators
import django.db.models.deletion
from django.db import migrations, models

import agents.fields


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        ("agents", "0001_initial"),
    ]

    operations = [
        migrations.CreateModel(
            name="Coalition",
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
                (
                    "business_model",
                    models.CharField(
                        choices=[
                            ("retail", "Retail"),
                            ("delivery", "Delivery"),
                            ("manufacturing", "Manufacturing"),
                            ("agriculture", "Agriculture"),
                            ("consulting", "Consulting"),
                            ("marketplace", "Marketplace"),
                        ],
                        max_length=100,
                    ),
                ),
                (
                    "created_at",
                    models.DateTimeField(db_default=agents.fields.DatabaseNow(), editable=False),
                ),
                (
                    "updated_at",
                    models.DateTimeField(db_default=agents.fields.DatabaseNow(), editable=False),
                ),
                ("formation_criteria", models.JSONField(blank=True, null=True)),
                ("business_config", models.JSONField(blank=True, null=True)),
                (
                    "initial_capital",
                    models.DecimalField(db_default=0, decimal_places=2, default=0, max_digits=15),
                ),
                (
                    "current_capital",
                    models.DecimalField(db_default=0, decimal_places=2, default=0, max_digits=15),
                ),
                (
                    "total_revenue",
                    models.DecimalField(db_default=0, decimal_places=2, default=0, max_digits=15),
                ),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("forming", "Forming"),
                            ("active", "Active"),
                            ("profitable", "Profitable"),
                            ("dissolved", "Dissolved"),
                        ],
                        db_default="forming",
                        default="forming",
                        max_length=20,
                    ),
                ),
                ("dissolved_at", models.DateTimeField(blank=True, null=True)),
                (
                    "tenant",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="coalitions",
                        to="agents.tenant",
                    ),
                ),
            ],
            options={
                "db_table": "coalitions",
                "ordering": ["name"],
            },
        ),
        migrations.CreateModel(
            name="CoalitionMember",
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
                    "joined_at",
                    models.DateTimeField(db_default=agents.fields.DatabaseNow(), editable=False),
                ),
                (
                    "role",
                    models.CharField(db_default="member", default="member", max_length=50),
                ),
                (
                    "contribution_score",
                    models.DecimalField(
                        db_default=0,
                        decimal_places=2,
                        default=0,
                        max_digits=5,
                        validators=[
                            django.core.validators.MinValueValidator(-999.99),
                            django.core.validators.MaxValueValidator(999.99),
                        ],
                    ),
                ),
                (
                    "agent",
                    models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="memberships",
                        to="agents.agent",
                    ),
                ),
                (
                    "coalition",
                    models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="memberships",
                        to="coalitions.coalition",
                    ),
                ),
            ],
            options={
                "db_table": "coalition_members",
            },
        ),
        migrations.AddField(
            model_name="coalition",
            name="members",
            field=models.ManyToManyField(
                related_name="coalitions",
                through="coalitions.CoalitionMember",
                to="agents.agent",
            ),
        ),
        migrations.AddIndex(
            model_name="coalitionmember",
            index=models.Index(fields=["agent"], name="idx_coalition_members_agent"),
        ),
        migrations.AddConstraint(
            model_name="coalitionmember",
            constraint=models.UniqueConstraint(
                fields=("coalition", "agent"),
                name="coalition_members_coalition_agent_key",
            ),
        ),
        migrations.AddConstraint(
            model_name="coalition",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("status__in", ["forming", "active", "profitable", "dissolved"])
                ),
                name="valid_status",
                violation_error_message="status must be one of: forming, active, profitable, dissolved.",
            ),
        ),
    ]
