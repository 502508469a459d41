import datetime
import uuid
from dataclasses import dataclass, field

import numpy as np


class Unset:
    """Marks a field an update leaves as it is (None cannot: it could be a value)."""

    def __repr__(self):
        return "UNSET"


UNSET = Unset()


@dataclass(frozen=True, slots=True)
class AgentStateUpdate:
    agent_id: uuid.UUID
    beliefs: np.ndarray | Unset = UNSET
    energy_level: int | Unset = UNSET
    location_h3: str | Unset = UNSET
    status: str | Unset = UNSET
    personality_traits: dict | Unset = UNSET
    # Variational free energy the simulation computed with these beliefs; goes to metrics.
    free_energy: float | None = None


@dataclass(frozen=True, slots=True)
class AgentState:
    """An agent as services return it and selectors read it; beliefs decrypted or None."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    agent_type: str
    energy_level: int
    location_h3: str | None
    status: str
    personality_traits: dict | None
    last_active_at: datetime.datetime
    updated_at: datetime.datetime
    beliefs: np.ndarray | None = field(default=None, compare=False)

    @property
    def version(self) -> int:
        """Monotonic per agent: updated_at in microseconds (see agents.cache)."""
        return int(self.updated_at.timestamp() * 1_000_000)
