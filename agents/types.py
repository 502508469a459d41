import datetime
import json
import uuid
from dataclasses import dataclass, field

import numpy as np
from django.utils import timezone

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)


def micros(moment: datetime.datetime) -> int:
    """Exact integer microseconds since the epoch (float timestamps can be off by one)."""
    return (moment - EPOCH) // _MICROSECOND


def from_micros(value: int) -> datetime.datetime:
    return EPOCH + datetime.timedelta(microseconds=value)


class Unset:
    """Marks a field an update leaves as it is (None cannot: it could be a value)."""

    def __repr__(self):
        return "UNSET"


UNSET = Unset()


# Not frozen, like AgentState: callers build thousands per batch.
@dataclass(slots=True)
class AgentStateUpdate:
    agent_id: uuid.UUID
    beliefs: np.ndarray | Unset = UNSET
    energy_level: int | Unset = UNSET
    location_h3: str | Unset = UNSET
    status: str | Unset = UNSET
    personality_traits: dict | Unset = UNSET
    # Variational free energy the simulation computed with these beliefs; goes to metrics.
    free_energy: float | None = None


# Not frozen: a frozen dataclass's __init__ costs ~6x more, and selectors build
# hundreds of these per query. Treat instances as read-only all the same.
@dataclass(slots=True)
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
        return micros(self.updated_at)


# The columns, in order, that state_from_row maps; SQL that builds AgentStates selects these.
AGENT_COLUMNS = (
    "id",
    "tenant_id",
    "name",
    "agent_type",
    "energy_level",
    "location_h3",
    "status",
    "personality_traits",
    "last_active_at",
    "updated_at",
)


_TIMESTAMPS = {"last_active_at", "updated_at"}


def agent_select_list(prefix: str = "") -> str:
    """AGENT_COLUMNS as a SQL select list, timestamps as integer microseconds since the
    epoch: Django's timestamptz loader costs ~25 us a value, from_micros under 1 us,
    and batched updates return thousands of rows."""
    return ", ".join(
        f"(extract(epoch FROM {prefix}{c}) * 1000000)::bigint" if c in _TIMESTAMPS else prefix + c
        for c in AGENT_COLUMNS
    )


def state_from_row(row, beliefs: np.ndarray | None = None) -> AgentState:
    """An AgentState from a row whose first columns are agent_select_list()."""
    traits = row[7]
    # Raw cursors get jsonb as text: Django registers a text loader so JSONField can parse.
    if isinstance(traits, str):
        traits = json.loads(traits)
    return AgentState(*row[:7], traits, from_micros(row[8]), from_micros(row[9]), beliefs=beliefs)


def iso_timestamp(value: datetime.datetime | None) -> str:
    """A timestamp as exports write it: local time, ISO 8601 to the second; "" for None."""
    return "" if value is None else timezone.localtime(value).isoformat(timespec="seconds")
