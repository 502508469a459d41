"""What the Prometheus instruments cost the write path, counted rather than raced.

On/off races (benchmarks/monitoring_overhead.py) on this shared 2-core machine swing by
more than the 5% they are meant to detect. This counts every instrument call that one
`agents_update_states` batch makes (histogram observations, counter increments, label
look-ups, the SQL hook's timer included), times each kind of call in a tight loop, and
sets their sum beside the batch's own time: an upper bound on the overhead that noise
cannot move, since a call costs the same whoever else shares the cores.

    .venv/bin/python benchmarks/instrument_cost.py [--batch 1000] [--batches 10]
"""

import argparse
import os
import time

os.environ["PROMETHEUS_METRICS_ENABLED"] = "1"

from common import median, report, setup
from prometheus_client.metrics import Counter, Histogram, MetricWrapperBase

CALLS = [(Histogram, "observe"), (Counter, "inc"), (MetricWrapperBase, "labels")]
counts: dict[str, int] = {}
originals = {}


def _count(cls, name: str) -> None:
    original = getattr(cls, name)
    originals[name] = original

    def counted(self, *args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return original(self, *args, **kwargs)

    setattr(cls, name, counted)


def _per_call_us(call, repeat: int = 100_000) -> float:
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            call()
        rounds.append((time.perf_counter() - start) / repeat * 1e6)
    return median(rounds)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()

    # Before Django starts: the SQL hook binds its histogram's observe when a connection
    # opens, and must bind the counted one.
    for cls, name in CALLS:
        _count(cls, name)
    setup()

    import numpy as np

    from agents.models import Agent, Tenant
    from agents.services import AgentSpec, agents_bulk_load, agents_update_states
    from agents.types import AgentStateUpdate
    from freeagentics import telemetry
    from realtime.publisher import publisher

    tenant, _ = Tenant.objects.get_or_create(slug="bench-instruments", defaults={"name": "B"})
    Agent.objects.filter(tenant=tenant).delete()
    rng = np.random.default_rng(0)
    agents_bulk_load(
        tenant=tenant,
        specs=(
            AgentSpec(name=f"i{i}", agent_type="worker", beliefs=rng.dirichlet(np.ones(64)))
            for i in range(args.batch)
        ),
    )
    ids = list(Agent.objects.filter(tenant=tenant).values_list("id", flat=True))
    beliefs = [rng.dirichlet(np.ones(64)) for _ in range(256)]

    def batch():
        agents_update_states(
            tenant=tenant,
            updates=[
                AgentStateUpdate(agent_id, beliefs=beliefs[n % 256], energy_level=n % 100)
                for n, agent_id in enumerate(ids)
            ],
        )
        publisher.flush(timeout=60)

    batch()  # warm: data keys, connections, the cache's scripts
    counts.clear()
    times = []
    for _ in range(args.batches):
        start = time.perf_counter()
        batch()
        times.append(time.perf_counter() - start)
    per_batch = {name: counts.get(name, 0) / args.batches for _, name in CALLS}

    histogram = telemetry.DB_QUERY_SECONDS.labels("default")
    counter = telemetry.CACHE_REQUESTS.labels("belief", "hit")
    cost_us = {
        "observe": _per_call_us(lambda: originals["observe"](histogram, 0.001)),
        "inc": _per_call_us(lambda: originals["inc"](counter)),
        "labels": _per_call_us(
            lambda: originals["labels"](telemetry.REDIS_COMMAND_SECONDS, "agents_store")
        ),
    }
    # Each timed block also reads the clock twice.
    cost_us["observe"] += 2 * _per_call_us(time.perf_counter)
    overhead_us = sum(per_batch[name] * cost_us[name] for name in per_batch)
    batch_us = median(times) * 1e6

    rows = [
        (f"{name} per batch", f"{per_batch[name]:.1f} calls x {cost_us[name]:.2f} us")
        for name in per_batch
    ]
    rows += [
        ("instrument work per batch", f"{overhead_us:.1f} us"),
        (f"batch of {args.batch} updates (median)", f"{batch_us / 1000:.1f} ms"),
        ("overhead (upper bound)", f"{overhead_us / batch_us:.4%}  (target <= 5%)"),
    ]
    report("Prometheus instruments on the write path, counted", rows)


if __name__ == "__main__":
    main()
