"""Demo data for the development stack: one city of agents and coalitions, and an admin login.

Everything here is deterministic for a given seed, so `seed_demo` can run on every start
of `scripts/run.sh` and leave the same rows behind.
"""

from dataclasses import dataclass
from decimal import Decimal

import h3
import numpy as np
from django.core.exceptions import ValidationError
from django.core.validators import validate_slug
from django.db import transaction

from agents.models import Agent, AgentStatus, Tenant
from agents.services import AgentSpec
from coalitions.models import BusinessModel, Coalition, CoalitionMember, CoalitionStatus

# Berlin, Alexanderplatz; resolution 9 cells are ~0.1 km², so a ring of radius 6 covers
# a few square kilometres of one city centre.
CITY_LAT, CITY_LNG = 52.52, 13.405
H3_RESOLUTION = 9
CITY_RADIUS = 6
CITY_CENTRE_CELL = h3.latlng_to_cell(CITY_LAT, CITY_LNG, H3_RESOLUTION)

BELIEF_STATES = 8
AGENT_TYPES = ("explorer", "trader", "builder", "coordinator", "scout")
STATUS_WEIGHTS = {
    AgentStatus.ACTIVE: 0.8,
    AgentStatus.INACTIVE: 0.15,
    AgentStatus.SUSPENDED: 0.05,
}
TRAITS = ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")
COALITIONS = (
    ("Mitte Couriers", BusinessModel.DELIVERY, CoalitionStatus.ACTIVE),
    ("Kreuzberg Market Collective", BusinessModel.MARKETPLACE, CoalitionStatus.PROFITABLE),
    ("Prenzlauer Berg Bakers", BusinessModel.RETAIL, CoalitionStatus.ACTIVE),
    ("Friedrichshain Repair Works", BusinessModel.MANUFACTURING, CoalitionStatus.FORMING),
    ("Tempelhof Urban Farms", BusinessModel.AGRICULTURE, CoalitionStatus.ACTIVE),
    ("Spree Advisory Circle", BusinessModel.CONSULTING, CoalitionStatus.FORMING),
)
# One coalition per this many agents (up to len(COALITIONS)), so small demos stay sensible.
AGENTS_PER_COALITION = 10
MAX_AGENTS = 100_000

AGENTS_OUT_OF_RANGE = "agents must be between 1 and {max}, got {value}."


@dataclass(frozen=True)
class DemoCoalitionSpec:
    name: str
    business_model: str
    status: str
    initial_capital: Decimal
    # (agent name, role, contribution score)
    members: tuple[tuple[str, str, Decimal], ...]


@dataclass(frozen=True)
class DemoPlan:
    agents: tuple[AgentSpec, ...]
    coalitions: tuple[DemoCoalitionSpec, ...]


@dataclass(frozen=True)
class DemoCounts:
    """Totals for the demo tenant after a load, and how many of each the load created."""

    tenant: Tenant
    tenant_created: bool
    agents: int
    agents_created: int
    coalitions: int
    coalitions_created: int
    members: int
    members_created: int


def demo_plan(*, agents: int = 200, seed: int = 42) -> DemoPlan:
    """The rows demo_load writes, computed without touching the database.

    Agent i gets the same values for any `agents` > i, because each agent draws the same
    number of values from one generator in order.
    """
    if not 1 <= agents <= MAX_AGENTS:
        raise ValidationError(AGENTS_OUT_OF_RANGE.format(max=MAX_AGENTS, value=agents))
    rng = np.random.default_rng(seed)
    cells = sorted(h3.grid_disk(CITY_CENTRE_CELL, CITY_RADIUS))
    statuses = list(STATUS_WEIGHTS)
    weights = np.array(list(STATUS_WEIGHTS.values()))
    specs = []
    for i in range(agents):
        belief = rng.dirichlet(np.ones(BELIEF_STATES))
        energy = int(rng.integers(5, 101))
        draws = rng.random(len(TRAITS))
        traits = {trait: round(float(v), 3) for trait, v in zip(TRAITS, draws, strict=True)}
        status = statuses[int(rng.choice(len(statuses), p=weights))]
        cell = cells[int(rng.integers(len(cells)))]
        agent_type = AGENT_TYPES[int(rng.integers(len(AGENT_TYPES)))]
        specs.append(
            AgentSpec(
                name=f"demo-agent-{i + 1:04d}",
                agent_type=agent_type,
                beliefs=belief,
                energy_level=energy,
                personality_traits=traits,
                status=status,
                location_h3=cell,
            )
        )

    # A second generator, so coalition picks never shift the agents' values.
    crng = np.random.default_rng([seed, 1])
    coalitions = []
    for name, business_model, status in COALITIONS[: agents // AGENTS_PER_COALITION]:
        size = int(crng.integers(3, 9))
        picks = crng.choice(agents, size=size, replace=False)
        members = tuple(
            (
                specs[int(index)].name,
                "leader" if position == 0 else "member",
                Decimal(f"{crng.uniform(0, 100):.2f}"),
            )
            for position, index in enumerate(picks)
        )
        coalitions.append(
            DemoCoalitionSpec(
                name=name,
                business_model=business_model,
                status=status,
                initial_capital=Decimal(int(crng.integers(5, 50)) * 1000),
                members=members,
            )
        )
    return DemoPlan(agents=tuple(specs), coalitions=tuple(coalitions))


def _missing(model, tenant: Tenant, specs, row) -> list:
    """row(spec) for each spec whose name has no `model` row in the tenant yet."""
    existing = set(
        model.objects.filter(tenant=tenant, name__in=[spec.name for spec in specs]).values_list(
            "name", flat=True
        )
    )
    return [row(spec) for spec in specs if spec.name not in existing]


def demo_load(*, tenant_slug: str = "demo-city", agents: int = 200, seed: int = 42) -> DemoCounts:
    """Create (or complete) the demo tenant: agents spread over Berlin, and coalitions.

    Idempotent: rows are matched by name within the tenant, and only missing ones are
    inserted, so loading twice with the same arguments changes nothing.
    Raises ValidationError for a bad slug or agent count.
    """
    validate_slug(tenant_slug)
    plan = demo_plan(agents=agents, seed=seed)
    with transaction.atomic():
        tenant, tenant_created = Tenant.objects.get_or_create(
            slug=tenant_slug, defaults={"name": tenant_slug.replace("-", " ").title()}
        )
        # Agent names are not unique in the schema; the row lock makes two concurrent
        # loads (two run.sh on one database) wait for each other instead of duplicating.
        tenant = Tenant.objects.select_for_update().get(pk=tenant.pk)

        new_agents = _missing(
            Agent, tenant, plan.agents, lambda spec: Agent(tenant=tenant, **spec.model_fields())
        )
        Agent.objects.bulk_create(new_agents, batch_size=500)

        new_coalitions = _missing(
            Coalition,
            tenant,
            plan.coalitions,
            lambda spec: Coalition(
                tenant=tenant,
                name=spec.name,
                business_model=spec.business_model,
                status=spec.status,
                initial_capital=spec.initial_capital,
                current_capital=spec.initial_capital,
                formation_criteria={"city": "Berlin", "h3_resolution": H3_RESOLUTION},
            ),
        )
        Coalition.objects.bulk_create(new_coalitions)

        agent_ids = dict(Agent.objects.filter(tenant=tenant).values_list("name", "id"))
        coalition_ids = dict(Coalition.objects.filter(tenant=tenant).values_list("name", "id"))
        members_before = CoalitionMember.objects.filter(coalition__tenant=tenant).count()
        CoalitionMember.objects.bulk_create(
            [
                CoalitionMember(
                    coalition_id=coalition_ids[spec.name],
                    agent_id=agent_ids[agent_name],
                    role=role,
                    contribution_score=score,
                )
                for spec in plan.coalitions
                for agent_name, role, score in spec.members
            ],
            # The (coalition, agent) unique constraint is what makes a rerun a no-op.
            ignore_conflicts=True,
        )
        members = CoalitionMember.objects.filter(coalition__tenant=tenant).count()
        return DemoCounts(
            tenant=tenant,
            tenant_created=tenant_created,
            agents=len(agent_ids),
            agents_created=len(new_agents),
            coalitions=len(coalition_ids),
            coalitions_created=len(new_coalitions),
            members=members,
            members_created=members - members_before,
        )
