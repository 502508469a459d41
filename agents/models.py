import uuid

from django.contrib.postgres.functions import RandomUUID
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from agents.fields import DatabaseNow as Now
from agents.fields import EncryptedArrayField


class Tenant(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, db_default=RandomUUID())
    name = models.CharField(max_length=255)
    slug = models.SlugField(max_length=100, unique=True)
    created_at = models.DateTimeField(db_default=Now(), editable=False)

    class Meta:
        db_table = "tenants"
        ordering = ["name"]

    def __str__(self):
        return self.name


class AgentStatus(models.TextChoices):
    ACTIVE = "active"
    INACTIVE = "inactive"
    SUSPENDED = "suspended"


class Agent(models.Model):
    # default= lets Python know the id before INSERT (bulk paths); db_default keeps
    # gen_random_uuid() for rows written outside Django.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, db_default=RandomUUID())
    name = models.CharField(max_length=255)
    agent_type = models.CharField(max_length=50)
    # db_index=False: idx_agents_tenant_type leads with tenant_id and serves tenant lookups.
    tenant = models.ForeignKey(
        Tenant, on_delete=models.CASCADE, related_name="agents", db_index=False
    )
    created_at = models.DateTimeField(db_default=Now(), editable=False)
    # Moved by a database trigger on every UPDATE, queryset and bulk updates included.
    updated_at = models.DateTimeField(db_default=Now(), editable=False)

    belief_state = EncryptedArrayField(null=True, blank=True)
    personality_traits = models.JSONField(null=True, blank=True)
    energy_level = models.IntegerField(
        default=100,
        db_default=100,
        validators=[MinValueValidator(0), MaxValueValidator(100)],
    )
    # NULL, not "", means "nowhere yet", as in ADR-012.
    location_h3 = models.CharField(max_length=15, null=True, blank=True)  # noqa: DJ001

    status = models.CharField(
        max_length=20,
        choices=AgentStatus,
        default=AgentStatus.ACTIVE,
        db_default="active",
    )
    last_active_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "agents"
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(energy_level__gte=0) & Q(energy_level__lte=100),
                name="valid_energy",
                violation_error_message="energy_level must be between 0 and 100.",
            ),
            models.CheckConstraint(
                condition=Q(status__in=AgentStatus.values),
                name="valid_status",
                violation_error_message="status must be one of: active, inactive, suspended.",
            ),
        ]
        indexes = [
            models.Index(fields=["tenant", "agent_type"], name="idx_agents_tenant_type"),
            models.Index(fields=["location_h3"], name="idx_agents_location"),
            models.Index(fields=["last_active_at"], name="idx_agents_last_active"),
            models.Index(
                fields=["tenant", "status", "last_active_at"],
                name="idx_agents_composite",
                condition=Q(status="active"),
            ),
        ]

    def __str__(self):
        return self.name


class AgentHistory(models.Model):
    """One row per agent state update, in a table partitioned by month of recorded_at.

    The table is made by raw SQL in the migrations (Django cannot declare
    partitioning); its primary key is (id, recorded_at) because PostgreSQL requires
    the partition key in every unique constraint.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, db_default=RandomUUID())
    agent = models.ForeignKey(
        Agent, on_delete=models.DO_NOTHING, db_constraint=False, related_name="history"
    )
    recorded_at = models.DateTimeField(db_default=Now())
    belief_state = EncryptedArrayField(null=True, tenant_attribute="agent.tenant_id")
    energy_level = models.IntegerField(null=True)

    class Meta:
        db_table = "agent_history"
        managed = False
        ordering = ["-recorded_at"]

    def __str__(self):
        return f"{self.agent_id} at {self.recorded_at:%Y-%m-%d %H:%M:%S}"


class ApiToken(models.Model):
    """A per-tenant credential for programmatic clients (websockets). Only a SHA-256
    of the token is stored: tokens are 256-bit random, so a fast hash is enough and
    lookups stay O(1)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, db_default=RandomUUID())
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    # The first characters of the token, shown in the admin so operators can tell tokens apart.
    prefix = models.CharField(max_length=16, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    # Full belief arrays are streamed only to tokens allowed to read them.
    can_read_beliefs = models.BooleanField(default=False)
    created_by = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(db_default=Now(), editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "api_tokens"
        ordering = ["-created_at"]
        verbose_name = "API token"

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class OperatorMembership(models.Model):
    """Ties a back-office operator (a non-superuser staff user) to one tenant."""

    user = models.OneToOneField(
        "auth.User", on_delete=models.CASCADE, related_name="operator_membership"
    )
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="operators")
    created_at = models.DateTimeField(db_default=Now(), editable=False)

    class Meta:
        db_table = "operator_memberships"

    def __str__(self):
        return f"{self.user} @ {self.tenant}"


class TenantDataKey(models.Model):
    """A tenant's data key, wrapped by the master keys (agents.data_keys).

    One active key per tenant (retired_at is NULL); retired keys still open what they
    encrypted until re-encryption moves it. A destroyed key (crypto-shredding) keeps
    its row, without key material, so reads say the tenant was shredded."""

    id = models.AutoField(primary_key=True)
    # No foreign key: a key may be created on its own connection before the tenant's
    # row commits, and must outlive the tenant to tell what happened to its data.
    tenant = models.ForeignKey(
        Tenant, on_delete=models.DO_NOTHING, db_constraint=False, related_name="data_keys"
    )
    wrapped_key = models.BinaryField(null=True, editable=False)
    created_at = models.DateTimeField(db_default=Now(), editable=False)
    retired_at = models.DateTimeField(null=True, editable=False)
    destroyed_at = models.DateTimeField(null=True, editable=False)
    # Rows the last re-encryption pass left under this key, and when it counted.
    rows_remaining = models.BigIntegerField(null=True, editable=False)
    counted_at = models.DateTimeField(null=True, editable=False)

    class Meta:
        db_table = "tenant_data_keys"
        ordering = ["tenant", "-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant"],
                condition=models.Q(retired_at__isnull=True),
                name="tenant_data_keys_one_active",
            ),
        ]

    def __str__(self):
        return f"data key {self.id}"

    @property
    def state(self) -> str:
        if self.destroyed_at:
            return "destroyed"
        return "retired" if self.retired_at else "active"
