"""Line protocol for the two measurements of ADR-012 section 3, built without a client
library: the outbox stores finished lines, so flushing is only SELECT, POST, DELETE.

Every line carries a nanosecond timestamp fixed when it is built. That timestamp,
with the measurement and tags, is the point's identity in InfluxDB: re-sending a line
overwrites the same point instead of adding a second one.
"""

import datetime
import math
import uuid
from collections import defaultdict
from collections.abc import Sequence

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


def belief_stats(arrays: Sequence[np.ndarray]) -> list[tuple[float, float, float] | None]:
    """(entropy, max, variance) per array, None for an empty one. Arrays of equal size
    are stacked and computed together: one numpy call per batch instead of per agent.
    The entropy matches agents.beliefs.belief_entropy (normalised, nats)."""
    results: list[tuple[float, float, float] | None] = [None] * len(arrays)
    groups: dict[int, list[int]] = defaultdict(list)
    flats = []
    for index, array in enumerate(arrays):
        flat = np.asarray(array, dtype=np.float64).ravel()
        flats.append(flat)
        if flat.size:
            groups[flat.size].append(index)
    for indices in groups.values():
        matrix = np.stack([flats[i] for i in indices])
        positive = np.where(matrix > 0, matrix, 0.0)
        totals = positive.sum(axis=1)
        p = positive / np.where(totals > 0, totals, 1.0)[:, None]
        logs = np.log(p, out=np.zeros_like(p), where=p > 0)
        entropies = np.where(totals > 0, -(p * logs).sum(axis=1), 0.0)
        maxima = matrix.max(axis=1)
        variances = matrix.var(axis=1)
        for i, entropy, maximum, variance in zip(
            indices, entropies.tolist(), maxima.tolist(), variances.tolist(), strict=True
        ):
            results[i] = (entropy, maximum, variance)
    return results


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
    fields = []
    if free_energy is not None and (value := float_field(free_energy)) is not None:
        fields.append(f"free_energy={value}")
    if stats is not None and (text := stats_fields(stats)):
        fields.append(text)
    if energy_level is not None:
        fields.append(f"energy_level={int(energy_level)}i")
    if dimensions is not None and (text := dimension_fields(dimensions)):
        fields.append(text)
    if not fields:
        return None
    return (
        f"{AGENT_MEASUREMENT},agent_id={tag(agent_id)},tenant_id={tag(tenant_id)} "
        f"{','.join(fields)} {time_ns}"
    )


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
