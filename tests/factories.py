import itertools

import numpy as np

from agents.models import Agent, Tenant
from agents.services import AgentSpec
from coalitions.models import Coalition

_seq = itertools.count(1)

# A real resolution-9 cell in Berlin, where the demo data lives too.
BERLIN_CELL = "891f1d48947ffff"


def make_tenant(name: str = "Acme") -> Tenant:
    n = next(_seq)
    return Tenant.objects.create(name=f"{name} {n}", slug=f"{name.lower()}-{n}")


def make_agent(tenant: Tenant, **fields) -> Agent:
    n = next(_seq)
    fields.setdefault("name", f"agent-{n}")
    fields.setdefault("agent_type", "explorer")
    fields.setdefault("location_h3", BERLIN_CELL)
    fields.setdefault("belief_state", np.full(8, 1 / 8))
    return Agent.objects.create(tenant=tenant, **fields)


def make_coalition(tenant: Tenant, **fields) -> Coalition:
    n = next(_seq)
    fields.setdefault("name", f"coalition-{n}")
    fields.setdefault("business_model", "retail")
    return Coalition.objects.create(tenant=tenant, **fields)


def agent_spec(**fields) -> AgentSpec:
    """A valid AgentSpec (a scout in Berlin with uniform beliefs), `fields` changed."""
    fields.setdefault("name", "scout")
    fields.setdefault("agent_type", "explorer")
    fields.setdefault("beliefs", np.full(4, 0.25))
    fields.setdefault("location_h3", BERLIN_CELL)
    return AgentSpec(**fields)
