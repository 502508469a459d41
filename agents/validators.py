"""Input rules for the services. Each error names the field and the rule it broke.

Every value is checked in Python before anything reaches PostgreSQL, so a bad input is a
ValidationError, never a DataError, TypeError or UnicodeEncodeError from the driver.
"""

import math
import uuid

import h3
import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError

from agents.models import AgentStatus

CELL_INVALID = "{field}: {value!r} is not a valid H3 cell."
CELL_NOT_CANONICAL = "{field}: {value!r} is not a canonical H3 cell; write it as {canonical!r}."
CELL_RESOLUTION = "{field}: resolution {resolution} is outside the allowed range {low}..{high}."
RADIUS_RANGE = "radius: must be an integer in 0..{high}, got {value!r}."
ENERGY_RANGE = "energy_level: must be an integer in 0..100, got {value!r}."
BELIEFS_TYPE = "beliefs: must be a numpy array of numbers, got {kind}."
BELIEFS_EMPTY = "beliefs: must not be empty."
BELIEFS_TOO_LARGE = "beliefs: at most {limit} elements are allowed, got {size}."
BELIEFS_NOT_FINITE = "beliefs: every element must be finite (no NaN or infinity)."
STATUS_UNKNOWN = "status: {value!r} is not one of {allowed}."
PERSONALITY_TYPE = "personality_traits: must be a JSON object, got {kind}."
TEXT_REQUIRED = "{field}: must be a non-empty string of at most {limit} characters."
TEXT_CHARACTERS = "{field}: must not contain NUL characters or unpaired surrogates."
UUID_INVALID = "{field}: must be a UUID, got {value!r}."
NUMBER_INVALID = "{field}: must be a finite number or None, got {value!r}."
JSON_OBJECT = "{field}: must be a JSON object or null, got {kind}."
JSON_TYPE = "{field}: {path} holds a {kind}, which JSON cannot store."
JSON_KEY = "{field}: {path} has a {kind} key; JSON object keys are strings."
JSON_NOT_FINITE = "{field}: {path} is {value}; JSON numbers must be finite."
JSON_INT_RANGE = "{field}: {path} is an integer outside -2**63..2**63-1."
JSON_TEXT = "{field}: {path} contains a NUL character or an unpaired surrogate."
JSON_TOO_DEEP = "{field}: nested deeper than {limit} levels."
JSON_TOO_LARGE = "{field}: at most {limit} values are allowed, got more."

MAX_RADIUS = 10
# Deep enough for any configuration; shallow enough that nothing downstream recurses out.
JSON_MAX_DEPTH = 32
# Values (scalars, keys and containers) in one JSON document.
JSON_MAX_VALUES = 10_000
_INT64 = 2**63


class _Shortened:
    """Stands in for a long value in a message, so a 10 MB input is not echoed back."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return self.text

    __str__ = __repr__


def brief(value, limit: int = 80):
    text = repr(value)
    return value if len(text) <= limit else _Shortened(text[: limit - 3] + "...")


def _error(template: str, key: str, **params) -> ValidationError:
    if "value" in params:
        params["value"] = brief(params["value"])
    return ValidationError({key: template.format(**params)})


def _storable(text: str) -> bool:
    """PostgreSQL text and jsonb refuse NUL; UTF-8 cannot encode lone surrogates."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_text(value, field: str, limit: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise _error(TEXT_REQUIRED, field, field=field, limit=limit)
    if not _storable(value):
        raise _error(TEXT_CHARACTERS, field, field=field)
    return value


def validate_uuid(value, field: str) -> uuid.UUID:
    """A UUID, or its string form (converted). Integers are refused: UUID(int=...) would
    turn any number into some id."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str) and len(value) <= 64:
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise _error(UUID_INVALID, field, field=field, value=value)


def validate_optional_number(value, field: str) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.integer | np.floating)
        or not math.isfinite(value)
    ):
        raise _error(NUMBER_INVALID, field, field=field, value=value)
    return value


def validate_cell(value, field: str = "location_h3") -> str:
    """A valid H3 cell in its canonical lower-case form. Upper-case is normalised (h3
    accepts it); other spellings h3 accepts (leading zeros, "0x", spaces) are refused,
    since the column and every lookup use the canonical string."""
    if not isinstance(value, str) or len(value) > 32 or not h3.is_valid_cell(value):
        raise _error(CELL_INVALID, field, field=field, value=value)
    canonical = h3.int_to_str(h3.str_to_int(value))
    if value != canonical:
        if value.lower() != canonical:
            raise _error(CELL_NOT_CANONICAL, field, field=field, value=value, canonical=canonical)
        value = canonical
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
    if not isinstance(value, str) or value not in AgentStatus.values:
        raise _error(STATUS_UNKNOWN, "status", value=value, allowed=", ".join(AgentStatus.values))
    return value


def validate_json_object(value, field: str, *, nullable: bool = True) -> dict | None:
    """A JSON object PostgreSQL's jsonb stores exactly as given: str keys; values that are
    objects, lists, strings, finite numbers, booleans or null; bounded depth and size."""
    if value is None and nullable:
        return None
    if not isinstance(value, dict):
        template = JSON_OBJECT if nullable else PERSONALITY_TYPE
        raise _error(template, field, field=field, kind=type(value).__name__)
    budget = [JSON_MAX_VALUES]
    _check_json(value, field, "$", 1, budget)
    return value


def _check_json(value, field: str, path: str, depth: int, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise _error(JSON_TOO_LARGE, field, field=field, limit=JSON_MAX_VALUES)
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        if not _storable(value):
            raise _error(JSON_TEXT, field, field=field, path=path)
        return
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise _error(JSON_INT_RANGE, field, field=field, path=path)
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _error(JSON_NOT_FINITE, field, field=field, path=path, value=value)
        return
    if isinstance(value, dict | list | tuple):
        if depth > JSON_MAX_DEPTH:
            raise _error(JSON_TOO_DEEP, field, field=field, limit=JSON_MAX_DEPTH)
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise _error(JSON_KEY, field, field=field, path=path, kind=type(key).__name__)
                if not _storable(key):
                    raise _error(JSON_TEXT, field, field=field, path=f"{path} key {key!r}")
                _check_json(item, field, f"{path}.{key}", depth + 1, budget)
        else:
            for index, item in enumerate(value):
                _check_json(item, field, f"{path}[{index}]", depth + 1, budget)
        return
    raise _error(JSON_TYPE, field, field=field, path=path, kind=type(value).__name__)


def validate_personality(value) -> dict:
    return validate_json_object(value, "personality_traits", nullable=False)
