import uuid

from django.contrib.postgres.functions import RandomUUID
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from agents.fields import DatabaseNow as Now
from agents.models import Agent, Tenant


class CoalitionStatus(models.TextChoices):
    FORMING = "forming"
    ACTIVE = "active"
    PROFITABLE = "profitable"
    DISSOLVED = "dissolved"


class BusinessModel(models.TextChoices):
    RETAIL = "retail"
    DELIVERY = "delivery"
    MANUFACTURING = "manufacturing"
    AGRICULTURE = "agriculture"
    CONSULTING = "consulting"
    MARKETPLACE = "marketplace"


class Coalition(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, db_default=RandomUUID())
    name = models.CharField(max_length=255)
    business_model = models.CharField(max_length=100, choices=BusinessModel)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="coalitions")
    created_at = models.DateTimeField(db_default=Now(), editable=False)
    updated_at = models.DateTimeField(db_default=Now(), editable=False)

    formation_criteria = models.JSONField(null=True, blank=True)
    business_config = models.JSONField(null=True, blank=True)

    initial_capital = models.DecimalField(max_digits=15, decimal_places=2, default=0, db_default=0)
    current_capital = models.DecimalField(max_digits=15, decimal_places=2, default=0, db_default=0)
    total_revenue = models.DecimalField(max_digits=15, decimal_places=2, default=0, db_default=0)

    status = models.CharField(
        max_length=20,
        choices=CoalitionStatus,
        default=CoalitionStatus.FORMING,
        db_default="forming",
    )
    dissolved_at = models.DateTimeField(null=True, blank=True)

    members = models.ManyToManyField(Agent, through="CoalitionMember", related_name="coalitions")

    class Meta:
        db_table = "coalitions"
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=CoalitionStatus.values),
                name="valid_status",
                violation_error_message=(
                    "status must be one of: forming, active, profitable, dissolved."
                ),
            ),
        ]

    def __str__(self):
        return self.name


class CoalitionMember(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, db_default=RandomUUID())
    # The database itself cascades (see migration 0002): a raw DELETE removes members too.
    coalition = models.ForeignKey(
        Coalition, on_delete=models.CASCADE, related_name="memberships", db_index=False
    )
    agent = models.ForeignKey(
        Agent, on_delete=models.CASCADE, related_name="memberships", db_index=False
    )
    joined_at = models.DateTimeField(db_default=Now(), editable=False)
    role = models.CharField(max_length=50, default="member", db_default="member")
    contribution_score = models.DecimalField(
        max_digits=5,
        decimal_places=2,
        default=0,
        db_default=0,
        validators=[MinValueValidator(-999.99), MaxValueValidator(999.99)],
    )

    class Meta:
        db_table = "coalition_members"
        constraints = [
            models.UniqueConstraint(
                fields=["coalition", "agent"],
                name="coalition_members_coalition_agent_key",
            ),
        ]
        indexes = [
            models.Index(fields=["agent"], name="idx_coalition_members_agent"),
            models.Index(
                "coalition",
                models.F("contribution_score").desc(),
                name="idx_coalition_members_performance",
            ),
        ]

    def __str__(self):
        return f"{self.agent} in {self.coalition}"
