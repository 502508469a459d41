"""Hostile values for the services' adversarial tests, by kind, each with a short id, and
the check that a service refused one and wrote nothing."""

import contextlib
import math

import numpy as np
import pytest
from django.core.exceptions import ValidationError
from django_redis import get_redis_connection

from metrics.models import OutboxPoint
from tests.factories import BERLIN_CELL


def _written(rows) -> tuple:
    return rows(), OutboxPoint.objects.count(), sorted(get_redis_connection("default").keys("*"))


@contextlib.contextmanager
def refused(field: str, rows, capture_on_commit_callbacks):
    """The block must raise a ValidationError naming `field` and no other, and write
    nothing: no after-commit callback, outbox point or cache key, and rows() (the rows the
    service could change) as they were. Yields pytest's ExceptionInfo."""
    before = _written(rows)
    with capture_on_commit_callbacks() as callbacks, pytest.raises(ValidationError) as exc:
        yield exc
    assert list(exc.value.message_dict) == [field]
    assert callbacks == []
    assert _written(rows) == before


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def texts(limit: int) -> list[tuple[str, object]]:
    return [
        ("empty", ""),
        ("nul", "scout\x00"),
        ("surrogate", "scout\ud800"),
        ("too-long", "x" * (limit + 1)),
        ("int", 5),
        ("none", None),
        ("bytes", b"scout"),
    ]


UUIDS = [
    ("garbage", "not-a-uuid"),
    ("int", 5),
    ("none", None),
    ("bytes", b"\x00" * 16),
    ("huge-str", "0" * 100_000),
]

CELLS = [
    ("garbage", "zzz"),
    ("truncated", BERLIN_CELL[:14]),
    ("leading-zero", "0" + BERLIN_CELL),
    ("hex-prefix", "0x" + BERLIN_CELL),
    ("space", " " + BERLIN_CELL),
    ("nul", BERLIN_CELL + "\x00"),
    ("surrogate", "\ud800" * 15),
    ("int", 0x891F1D48947FFFF),
    ("huge", "8" * 100_000),
]

ENERGIES = [
    ("nan", math.nan),
    ("inf", math.inf),
    ("float", 50.0),
    ("bool", True),
    ("str", "50"),
    ("huge", 10**30),
    ("negative", -1),
    ("above", 101),
]

# For JSON object fields: each value is refused whether or not the field is nullable.
JSONS = [
    ("nan", {"a": math.nan}),
    ("inf", {"a": [1, -math.inf]}),
    ("set", {"a": {1, 2}}),
    ("bytes", {"a": b"x"}),
    ("numpy-int", {"a": np.int64(1)}),
    ("object", {"a": object()}),
    ("int-key", {1: "one"}),
    ("nul-string", {"a": "x\x00"}),
    ("nul-key", {"a\x00": 1}),
    ("surrogate", {"a": "\ud800"}),
    ("huge-int", {"a": 10**30}),
    ("deep", nested(200)),
    ("very-deep", nested(5000)),
    ("huge", {f"k{i}": i for i in range(20_000)}),
    ("list", [1, 2]),
    ("string", '{"a": 1}'),
]
