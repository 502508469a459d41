"""Writes to coalitions and their members. Every function takes the tenant."""

import uuid
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from agents.models import Agent, Tenant
from agents.types import UNSET, Unset
from agents.validators import brief, validate_json_object, validate_text, validate_uuid
from coalitions import cache
from coalitions.models import Coalition, CoalitionMember, CoalitionStatus
from coalitions.signals import coalition_status_changed, member_joined, member_left
from coalitions.validators import validate_business_model

STATUS_UNKNOWN = "status: {value!r} is not one of {allowed}."
TRANSITION_NOT_ALLOWED = (
    "status: cannot go from {current} to {target}; allowed: forming -> active -> profitable, "
    "and any status -> dissolved."
)
COALITION_NOT_FOUND = "coalition_id: coalition {coalition_id} does not exist in tenant {tenant}."
AGENT_NOT_FOUND = "agent_id: agent {agent_id} does not exist in tenant {tenant}."
ALREADY_MEMBER = "agent_id: agent {agent_id} is already a member of this coalition."
NOT_MEMBER = "agent_id: agent {agent_id} is not a member of this coalition."
DISSOLVED = "status: coalition {coalition_id} is dissolved and cannot change members."
SCORE_RANGE = "contribution_score: must be a number in -999.99..999.99, got {value!r}."
DISSOLVED_FROZEN = "status: coalition {coalition_id} is dissolved and cannot be changed."
MONEY_INVALID = "{field}: must be a non-negative amount with at most 13 digits before the point."

ALLOWED_TRANSITIONS = {
    CoalitionStatus.FORMING: {CoalitionStatus.ACTIVE, CoalitionStatus.DISSOLVED},
    CoalitionStatus.ACTIVE: {CoalitionStatus.PROFITABLE, CoalitionStatus.DISSOLVED},
    CoalitionStatus.PROFITABLE: {CoalitionStatus.DISSOLVED},
    CoalitionStatus.DISSOLVED: set(),
}


def _invalidate_members_on_commit(coalition_id) -> None:
    transaction.on_commit(lambda: cache.membership_invalidate([coalition_id]))


def _locked_coalition(tenant: Tenant, coalition_id: uuid.UUID) -> Coalition:
    try:
        return Coalition.objects.select_for_update().get(pk=coalition_id, tenant=tenant)
    except Coalition.DoesNotExist:
        raise ValidationError(
            {
                "coalition_id": COALITION_NOT_FOUND.format(
                    coalition_id=coalition_id, tenant=tenant.slug
                )
            }
        ) from None


def _save_changes(row, changes: dict) -> None:
    """Set the changed fields and save only those; no query when nothing changed."""
    for field, value in changes.items():
        setattr(row, field, value)
    if changes:
        row.save(update_fields=list(changes))


def _decimal(value) -> Decimal:
    """Numbers and their string forms; bools and other types are refused (str(True) and
    str([1]) would otherwise reach Decimal, and Decimal(1e400) is infinite)."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise InvalidOperation
    if isinstance(value, str) and len(value) > 64:
        raise InvalidOperation
    return Decimal(value) if isinstance(value, Decimal) else Decimal(str(value))


def _money(field: str, value) -> Decimal:
    try:
        amount = _decimal(value)
    except InvalidOperation:
        raise ValidationError({field: MONEY_INVALID.format(field=field)}) from None
    if not amount.is_finite() or amount < 0 or amount >= Decimal("1e13"):
        raise ValidationError({field: MONEY_INVALID.format(field=field)})
    return amount.quantize(Decimal("0.01"))


def _score(value) -> Decimal:
    try:
        score = _decimal(value)
    except InvalidOperation:
        raise ValidationError(
            {"contribution_score": SCORE_RANGE.format(value=brief(value))}
        ) from None
    if not score.is_finite() or not Decimal("-999.99") <= score <= Decimal("999.99"):
        raise ValidationError({"contribution_score": SCORE_RANGE.format(value=brief(value))})
    return score.quantize(Decimal("0.01"))


def coalition_create(
    *,
    tenant: Tenant,
    name: str,
    business_model: str,
    initial_capital=0,
    formation_criteria: dict | None = None,
    business_config: dict | None = None,
) -> Coalition:
    """Create a coalition in status forming. Raises ValidationError naming the field;
    formation_criteria and business_config follow the same rules as in coalition_update."""
    validate_text(name, "name", 255)
    validate_business_model(business_model)
    capital = _money("initial_capital", initial_capital)
    validate_json_object(formation_criteria, "formation_criteria")
    validate_json_object(business_config, "business_config")
    return Coalition.objects.create(
        tenant=tenant,
        name=name,
        business_model=business_model,
        initial_capital=capital,
        current_capital=capital,
        formation_criteria=formation_criteria,
        business_config=business_config,
    )


def coalition_add_member(
    *,
    tenant: Tenant,
    coalition_id: uuid.UUID,
    agent_id: uuid.UUID,
    role: str = "member",
    contribution_score=0,
) -> CoalitionMember:
    """Add an agent of the same tenant to a coalition that is not dissolved."""
    coalition_id = validate_uuid(coalition_id, "coalition_id")
    agent_id = validate_uuid(agent_id, "agent_id")
    validate_text(role, "role", 50)
    score = _score(contribution_score)
    with transaction.atomic():
        coalition = _locked_coalition(tenant, coalition_id)
        if coalition.status == CoalitionStatus.DISSOLVED:
            raise ValidationError({"status": DISSOLVED.format(coalition_id=coalition_id)})
        if not Agent.objects.filter(pk=agent_id, tenant=tenant).exists():
            raise ValidationError(
                {"agent_id": AGENT_NOT_FOUND.format(agent_id=agent_id, tenant=tenant.slug)}
            )
        try:
            with transaction.atomic():
                member = CoalitionMember.objects.create(
                    coalition=coalition, agent_id=agent_id, role=role, contribution_score=score
                )
        except IntegrityError:
            raise ValidationError({"agent_id": ALREADY_MEMBER.format(agent_id=agent_id)}) from None
        _invalidate_members_on_commit(coalition.id)
        member_joined.send(sender=Coalition, member=member, coalition=coalition)
    return member


def coalition_update(
    *,
    tenant: Tenant,
    coalition_id: uuid.UUID,
    name: str | Unset = UNSET,
    business_model: str | Unset = UNSET,
    current_capital=UNSET,
    total_revenue=UNSET,
    formation_criteria: dict | Unset | None = UNSET,
    business_config: dict | Unset | None = UNSET,
) -> Coalition:
    """Change the given fields of a coalition that is not dissolved (status has its own
    service, coalition_set_status). Raises ValidationError naming the field."""
    coalition_id = validate_uuid(coalition_id, "coalition_id")
    changes = {}
    if name is not UNSET:
        changes["name"] = validate_text(name, "name", 255)
    if business_model is not UNSET:
        validate_business_model(business_model)
        changes["business_model"] = business_model
    if current_capital is not UNSET:
        changes["current_capital"] = _money("current_capital", current_capital)
    if total_revenue is not UNSET:
        changes["total_revenue"] = _money("total_revenue", total_revenue)
    for field, value in (
        ("formation_criteria", formation_criteria),
        ("business_config", business_config),
    ):
        if value is not UNSET:
            changes[field] = validate_json_object(value, field)
    with transaction.atomic():
        coalition = _locked_coalition(tenant, coalition_id)
        if coalition.status == CoalitionStatus.DISSOLVED:
            raise ValidationError({"status": DISSOLVED_FROZEN.format(coalition_id=coalition_id)})
        _save_changes(coalition, changes)
    return coalition


def coalition_member_update(
    *,
    tenant: Tenant,
    coalition_id: uuid.UUID,
    agent_id: uuid.UUID,
    role: str | Unset = UNSET,
    contribution_score=UNSET,
) -> CoalitionMember:
    """Change a member's role and/or contribution score."""
    coalition_id = validate_uuid(coalition_id, "coalition_id")
    agent_id = validate_uuid(agent_id, "agent_id")
    changes = {}
    if role is not UNSET:
        changes["role"] = validate_text(role, "role", 50)
    if contribution_score is not UNSET:
        changes["contribution_score"] = _score(contribution_score)
    with transaction.atomic():
        coalition = _locked_coalition(tenant, coalition_id)
        member = CoalitionMember.objects.filter(coalition=coalition, agent_id=agent_id).first()
        if member is None:
            raise ValidationError({"agent_id": NOT_MEMBER.format(agent_id=agent_id)})
        _save_changes(member, changes)
    return member


def coalition_remove_member(
    *, tenant: Tenant, coalition_id: uuid.UUID, agent_id: uuid.UUID
) -> None:
    """Remove an agent from a coalition; raises ValidationError if it is not a member."""
    coalition_id = validate_uuid(coalition_id, "coalition_id")
    agent_id = validate_uuid(agent_id, "agent_id")
    with transaction.atomic():
        coalition = _locked_coalition(tenant, coalition_id)
        deleted, _ = CoalitionMember.objects.filter(coalition=coalition, agent_id=agent_id).delete()
        if not deleted:
            raise ValidationError({"agent_id": NOT_MEMBER.format(agent_id=agent_id)})
        _invalidate_members_on_commit(coalition.id)
        member_left.send(sender=Coalition, coalition=coalition, agent_id=agent_id)


def coalition_set_status(*, tenant: Tenant, coalition_id: uuid.UUID, status: str) -> Coalition:
    """Move a coalition along forming -> active -> profitable, or to dissolved from any
    status (which sets dissolved_at). Other moves raise ValidationError."""
    coalition_id = validate_uuid(coalition_id, "coalition_id")
    if not isinstance(status, str) or status not in CoalitionStatus.values:
        raise ValidationError(
            {
                "status": STATUS_UNKNOWN.format(
                    value=brief(status), allowed=", ".join(CoalitionStatus.values)
                )
            }
        )
    with transaction.atomic():
        coalition = _locked_coalition(tenant, coalition_id)
        if status not in ALLOWED_TRANSITIONS[CoalitionStatus(coalition.status)]:
            raise ValidationError(
                {"status": TRANSITION_NOT_ALLOWED.format(current=coalition.status, target=status)}
            )
        coalition.status = status
        fields = ["status"]
        if status == CoalitionStatus.DISSOLVED:
            coalition.dissolved_at = timezone.now()
            fields.append("dissolved_at")
        coalition.save(update_fields=fields)
        coalition_status_changed.send(sender=Coalition, coalition=coalition)
    return coalition


def coalition_members_sync(
    *,
    tenant: Tenant,
    coalition_id: uuid.UUID,
    update: Iterable[dict] = (),
    remove: Iterable = (),
    add: Iterable[dict] = (),
) -> list[CoalitionMember]:
    """Apply a members form in one transaction, all or none: `update` dicts of
    coalition_member_update's arguments (agent_id, role, contribution_score), then the
    `remove`d agent ids, then `add` dicts of coalition_add_member's (removals first, so an
    agent removed and added again in one save works). Returns the new members."""
    with transaction.atomic():
        for edits in update:
            coalition_member_update(tenant=tenant, coalition_id=coalition_id, **edits)
        for agent_id in remove:
            coalition_remove_member(tenant=tenant, coalition_id=coalition_id, agent_id=agent_id)
        return [
            coalition_add_member(tenant=tenant, coalition_id=coalition_id, **member)
            for member in add
        ]
