"""get_agent under Zipf(1.1) reads over 100,000 agents: hit rate and latency.

    .venv/bin/python benchmarks/cache.py [--agents 100000] [--windows 7] [--reads 100000]

The cache starts empty and one stream of Zipf(1.1) reads runs in windows of --reads
reads; each window reports its own hit rate, so the table shows the cache converging
(misses fill it, cache-aside). With a 300 s TTL, the window that ends after N reads is
the steady state of a service reading N / 300 agents per second (a key read less often
than once per TTL misses anyway). Baseline in the same run: reads of keys deleted first
(all misses). Targets: hit rate >= 95%, cached p99 <= 2 ms.
"""

import argparse
import time

from common import median, percentile, report, setup


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--windows", type=int, default=7)
    parser.add_argument("--reads", type=int, default=100_000, help="Reads per window.")
    parser.add_argument("--uncached", type=int, default=3_000)
    args = parser.parse_args()
    setup()

    import numpy as np
    from django_redis import get_redis_connection

    from agents import cache
    from agents.models import Agent, Tenant
    from agents.selectors import get_agent
    from agents.services import AgentSpec, agents_bulk_load

    tenant, _ = Tenant.objects.get_or_create(slug="bench-cache", defaults={"name": "Bench cache"})
    if Agent.objects.filter(tenant=tenant).count() != args.agents:
        Agent.objects.filter(tenant=tenant).delete()
        rng = np.random.default_rng(1)
        agents_bulk_load(
            tenant=tenant,
            specs=(
                AgentSpec(name=f"c{i}", agent_type="t", beliefs=rng.dirichlet(np.ones(64)))
                for i in range(args.agents)
            ),
        )
    ids = list(Agent.objects.filter(tenant=tenant).values_list("id", flat=True))
    rng = np.random.default_rng(2)
    rng.shuffle(ids)
    redis = get_redis_connection("default")

    def clear(keys):
        with redis.pipeline(transaction=False) as pipe:
            for agent_id in keys:
                pipe.delete(cache.beliefs_key(agent_id))
            pipe.execute()

    def zipf_stream(n):
        ranks = []
        while len(ranks) < n:
            draw = rng.zipf(1.1, size=n)
            ranks.extend(int(r) for r in draw if r <= len(ids))
        return [ids[r - 1] for r in ranks[:n]]

    clear(ids)
    windows = []
    for _ in range(args.windows):
        hits, misses = [], []
        cache.stats.clear()
        for agent_id in zipf_stream(args.reads):
            before = cache.stats["hits"]
            started = time.perf_counter()
            get_agent(tenant=tenant, agent_id=agent_id)
            elapsed = (time.perf_counter() - started) * 1000
            (hits if cache.stats["hits"] > before else misses).append(elapsed)
        windows.append((len(hits) / args.reads, hits, misses))

    sample = [ids[int(i)] for i in rng.integers(len(ids), size=args.uncached)]
    clear(sample)
    uncached = []
    for agent_id in sample:
        started = time.perf_counter()
        get_agent(tenant=tenant, agent_id=agent_id)
        uncached.append((time.perf_counter() - started) * 1000)

    def line(values):
        return (
            f"p50 {percentile(values, 50):.3f} ms, p95 {percentile(values, 95):.3f} ms, "
            f"p99 {percentile(values, 99):.3f} ms (n={len(values):,})"
        )

    rows = [
        (
            f"reads {n * args.reads:>9,}-{(n + 1) * args.reads:,}",
            f"hit rate {rate:.2%}  (steady state at {(n + 1) * args.reads / 300:,.0f} reads/s)",
        )
        for n, (rate, _, _) in enumerate(windows)
    ]
    rate, hits, misses = windows[-1]
    all_hits = [v for _, h, _ in windows for v in h]
    report(
        f"get_agent, Zipf(1.1) over {len(ids):,} agents, windows of {args.reads:,} reads",
        [
            *rows,
            ("last window hit rate", f"{rate:.2%} (target >= 95%)"),
            ("cached (all hits)", line(all_hits)),
            ("misses, last window", line(misses) if misses else "none"),
            ("baseline: uncached", line(uncached)),
            ("speed-up at the median", f"{median(uncached) / median(all_hits):.1f}x"),
            ("cached p99 target", f"{percentile(all_hits, 99):.3f} ms <= 2 ms"),
        ],
    )


if __name__ == "__main__":
    main()
