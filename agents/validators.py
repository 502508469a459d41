"""Input rules for agent state. Each error names the field and the rule it broke."""

import h3
import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError

from agents.models import AgentStatus

CELL_INVALID = "{field}: {value!r} is not a valid H3 cell."
CELL_RESOLUTION = "{field}: resolution {resolution} is outside the allowed range {low}..{high}."
RADIUS_RANGE = "radius: must be an integer in 0..{high}, got {value!r}."
ENERGY_RANGE = "energy_level: must be an integer in 0..100, got {value!r}."
BELIEFS_TYPE = "beliefs: must be a numpy array of numbers, got {kind}."
BELIEFS_EMPTY = "beliefs: must not be empty."
BELIEFS_TOO_LARGE = "beliefs: at most {limit} elements are allowed, got {size}."
BELIEFS_NOT_FINITE = "beliefs: every element must be finite (no NaN or infinity)."
STATUS_UNKNOWN = "status: {value!r} is not one of {allowed}."
PERSONALITY_TYPE = "personality_traits: must be a JSON object, got {kind}."

MAX_RADIUS = 10


def _error(template: str, key: str, **params) -> ValidationError:
    return ValidationError({key: template.format(**params)})


def validate_cell(value, field: str = "location_h3") -> str:
    if not isinstance(value, str) or not h3.is_valid_cell(value):
        raise _error(CELL_INVALID, field, field=field, value=value)
    resolution = h3.get_resolution(value)
    low, high = settings.H3_MIN_RESOLUTION, settings.H3_MAX_RESOLUTION
    if not low <= resolution <= high:
        raise _error(CELL_RESOLUTION, field, field=field, resolution=resolution, low=low, high=high)
    return value


def validate_radius(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RADIUS:
        raise _error(RADIUS_RANGE, "radius", high=MAX_RADIUS, value=value)
    return value


def validate_energy(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value <= 100:
        raise _error(ENERGY_RANGE, "energy_level", value=value)
    return int(value)


def validate_beliefs(value) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        kind = f"dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
        raise _error(BELIEFS_TYPE, "beliefs", kind=kind)
    if value.size == 0:
        raise _error(BELIEFS_EMPTY, "beliefs")
    limit = settings.BELIEF_MAX_ELEMENTS
    if value.size > limit:
        raise _error(BELIEFS_TOO_LARGE, "beliefs", limit=limit, size=value.size)
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise _error(BELIEFS_NOT_FINITE, "beliefs")
    return value


def validate_status(value) -> str:
    if value not in AgentStatus.values:
        raise _error(STATUS_UNKNOWN, "status", value=value, allowed=", ".join(AgentStatus.values))
    return value


def validate_personality(value) -> dict:
    if not isinstance(value, dict):
        raise _error(PERSONALITY_TYPE, "personality_traits", kind=type(value).__name__)
    return value
