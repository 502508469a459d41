"""Line protocol for the two measurements of ADR-012 section 3, built without a client
library: the outbox stores finished lines, so flushing is only SELECT, POST, DELETE.

Every line carries a nanosecond timestamp fixed when it is built. That timestamp,
with the measurement and tags, is the point's identity in InfluxDB: re-sending a line
overwrites the same point instead of adding a second one.
"""

import datetime
import math
import uuid

import numpy as np

from agents.types import micros

AGENT_MEASUREMENT = "agent_beliefs"
COALITION_MEASUREMENT = "coalition_performance"

_STAT_FIELDS = ("belief_entropy", "max_belief", "belief_variance")
_TAG_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\\": "\\\\"})


def timestamp_ns(moment: datetime.datetime) -> int:
    """Exact nanoseconds since the epoch (float seconds would round off microseconds)."""
    return micros(moment) * 1000


def tag(value) -> str:
    if type(value) is uuid.UUID:
        # The common case, and a UUID's text never needs escaping.
        return str(value)
    text = str(value)
    if "\n" in text:
        raise ValueError("line protocol tag values cannot contain newlines")
    return text.translate(_TAG_ESCAPES)


def float_field(value) -> str | None:
    """repr() of the float, or None for NaN and infinities, which line protocol lacks."""
    number = float(value)
    return repr(number) if math.isfinite(number) else None


def stats_fields(stats: tuple[float, float, float]) -> str:
    """belief_entropy, max_belief and belief_variance fields; non-finite ones left out."""
    entropy, maximum, variance = stats
    if math.isfinite(entropy) and math.isfinite(maximum) and math.isfinite(variance):
        return f"belief_entropy={entropy!r},max_belief={maximum!r},belief_variance={variance!r}"
    return ",".join(
        f"{name}={value}"
        for name, number in zip(_STAT_FIELDS, stats, strict=True)
        if (value := float_field(number)) is not None
    )


def dimension_fields(array: np.ndarray) -> str:
    """belief_<i> fields of the flattened array; non-finite ones left out."""
    return ",".join(
        f"belief_{i}={value}"
        for i, number in enumerate(np.asarray(array, dtype=np.float64).ravel().tolist())
        if (value := float_field(number)) is not None
    )


def agent_fields(
    *, free_energy=None, stats_text=None, energy_level=None, dimensions_text=None
) -> list[str]:
    """The field texts of an agent_beliefs line; NaN and infinities are left out."""
    fields = []
    if free_energy is not None and (value := float_field(free_energy)) is not None:
        fields.append("free_energy=" + value)
    if stats_text:
        fields.append(stats_text)
    if energy_level is not None:
        fields.append(f"energy_level={int(energy_level)}i")
    if dimensions_text:
        fields.append(dimensions_text)
    return fields


def agent_line_of(agent_tag: str, tenant_tag: str, fields: list[str], time_ns: int) -> str | None:
    """An agent_beliefs line from escaped tags and field texts; None without fields."""
    if not fields:
        return None
    series = f"{AGENT_MEASUREMENT},agent_id={agent_tag},tenant_id={tenant_tag}"
    return f"{series} {','.join(fields)} {time_ns}"


def agent_line(
    *,
    agent_id,
    tenant_id,
    time_ns: int,
    free_energy=None,
    stats: tuple[float, float, float] | None = None,
    energy_level: int | None = None,
    dimensions: np.ndarray | None = None,
) -> str | None:
    """One agent_beliefs line, or None when no field has a finite value."""
    fields = agent_fields(
        free_energy=free_energy,
        stats_text=None if stats is None else stats_fields(stats),
        energy_level=energy_level,
        dimensions_text=None if dimensions is None else dimension_fields(dimensions),
    )
    return agent_line_of(tag(agent_id), tag(tenant_id), fields, time_ns)


def coalition_line(
    *,
    coalition_id,
    tenant_id,
    time_ns: int,
    member_count: int,
    revenue,
    efficiency=None,
) -> str:
    revenue = float(revenue)
    per_member = revenue / member_count if member_count > 0 else 0.0
    fields = [f"member_count={int(member_count)}i"]
    for name, number in (
        ("revenue", revenue),
        ("efficiency", efficiency),
        ("revenue_per_member", per_member),
    ):
        if number is not None and (value := float_field(number)) is not None:
            fields.append(f"{name}={value}")
    return (
        f"{COALITION_MEASUREMENT},coalition_id={tag(coalition_id)},tenant_id={tag(tenant_id)} "
        f"{','.join(fields)} {time_ns}"
    )
