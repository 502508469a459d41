"""Shared set-up for benchmarks: a dedicated database, Django, and robust timing.

The machine is shared and noisy, so every benchmark interleaves the variants it
compares, repeats rounds, and reports medians and ratios from the same run.
"""

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "freeagentics.settings")
os.environ.setdefault("DEBUG", "0")
os.environ.setdefault("SECRET_KEY", "benchmark")
os.environ.setdefault(
    "FREEAGENTICS_ENCRYPTION_KEYS", "j0BikImprDHDLmqRY3Lwqh54e7y_J3kuTUJqAnpvd1M="
)
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/freeagentics_bench")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/8")


def setup(*, database: bool = True) -> None:
    """Configure Django; with database=True create and migrate the benchmark database."""
    import django

    if database:
        _ensure_database(os.environ["DATABASE_URL"])
    django.setup()
    if database:
        from django.core.management import call_command

        call_command("migrate", verbosity=0)


def _ensure_database(url: str) -> None:
    import psycopg
    from psycopg import sql

    base, _, name = url.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def interleaved(variants: dict[str, Callable[[], int]], rounds: int) -> dict[str, list[float]]:
    """Run each variant once per round, alternating, and return per-round rates
    (units per second). Each callable returns the number of units it did."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            units = run()
            rates[name].append(units / (time.perf_counter() - start))
    return rates


def median(values) -> float:
    return statistics.median(values)


def percentile(values, p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n## {title}")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
