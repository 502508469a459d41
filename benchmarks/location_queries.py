"""H3 location queries at 100,000 and 1,000,000 agents, plus bulk-load memory.

    .venv/bin/python benchmarks/location_queries.py [--sizes 100000 1000000] [--queries 1000]

Each size lives in its own database (freeagentics_bench_loc_<size>), loaded once with
agents_bulk_load and reused on later runs (--reload forces a new load, which is also
when peak RSS of the load is measured, in a fresh process per size). Agents are spread
at a constant density (~10 per resolution-9 cell) around Berlin: a bigger simulation
covers a bigger area, as real ones do. Coalitions: one per cell, of up to 4 members of
that cell, 60% active.

Targets: agents_near(k=3) and coalitions_near p95 <= 10 ms at 1M agents, and
p95(1M) / p95(100k) <= 2.
"""

import argparse
import json
import os
import subprocess
import sys
import time

DENSITY = 10
CENTRE = (52.52, 13.405)


def disk_radius_for(cells: int) -> int:
    k = 0
    while 3 * k * (k + 1) + 1 < cells:
        k += 1
    return k


def worker(size: int, queries: int, reload: bool) -> dict:
    from common import peak_rss_mib, percentile, setup

    setup()
    import h3
    import numpy as np
    from django.db import connection

    from agents.models import Agent, Tenant
    from agents.selectors import agents_near
    from agents.services import AgentSpec, agents_bulk_load
    from coalitions.selectors import coalitions_near

    tenant, _ = Tenant.objects.get_or_create(slug="bench-loc", defaults={"name": "Bench loc"})
    cells = list(h3.grid_disk(h3.latlng_to_cell(*CENTRE, 9), disk_radius_for(size // DENSITY)))
    result = {"size": size, "cells": len(cells)}
    if reload or Agent.objects.filter(tenant=tenant).count() != size:
        with connection.cursor() as cur:
            cur.execute("TRUNCATE agents, coalitions, coalition_members, agent_history CASCADE")
        rng = np.random.default_rng(size)
        statuses = ["active"] * 9 + ["inactive"]
        rss_before = peak_rss_mib()
        started = time.perf_counter()
        agents_bulk_load(
            tenant=tenant,
            specs=(
                AgentSpec(
                    name=f"a{i}",
                    agent_type="trader",
                    beliefs=rng.dirichlet(np.ones(64)),
                    location_h3=cells[int(rng.integers(len(cells)))],
                    status=statuses[i % 10],
                )
                for i in range(size)
            ),
            batch_size=5000,
        )
        result["load_seconds"] = time.perf_counter() - started
        result["load_peak_rss_mib"] = peak_rss_mib()
        result["rss_before_load_mib"] = rss_before
        with connection.cursor() as cur:
            cur.execute(
                """
                WITH ranked AS (
                    SELECT id, location_h3,
                           row_number() OVER (PARTITION BY location_h3 ORDER BY random()) AS rn
                    FROM agents WHERE tenant_id = %s
                ), groups AS (
                    SELECT location_h3, array_agg(id) AS ids FROM ranked WHERE rn <= 4
                    GROUP BY location_h3
                ), made AS (
                    INSERT INTO coalitions (name, business_model, tenant_id, status)
                    SELECT 'c-' || location_h3,
                           (ARRAY['retail','delivery','manufacturing','agriculture',
                                  'consulting','marketplace'])[1 + floor(random() * 6)::int],
                           %s,
                           CASE WHEN random() < 0.6 THEN 'active' ELSE 'forming' END
                    FROM groups
                    RETURNING id, name
                )
                INSERT INTO coalition_members (coalition_id, agent_id, role)
                SELECT made.id, unnest(groups.ids), 'member'
                FROM made JOIN groups ON made.name = 'c-' || groups.location_h3
                """,
                [tenant.id, tenant.id],
            )
            cur.execute("VACUUM ANALYZE agents")
            cur.execute("VACUUM ANALYZE coalitions")
            cur.execute("VACUUM ANALYZE coalition_members")
    rng = np.random.default_rng(7)
    sample = [cells[int(i)] for i in rng.integers(len(cells), size=queries)]
    models = ["retail", "delivery", "manufacturing", "agriculture", "consulting", "marketplace"]
    for cell in sample[:50]:  # warm the buffer cache and the connection
        agents_near(tenant=tenant, cell=cell, radius=3)
    for name, run in (
        ("agents_near", lambda cell, n: agents_near(tenant=tenant, cell=cell, radius=3)),
        (
            "coalitions_near",
            lambda cell, n: coalitions_near(tenant=tenant, cell=cell, business_model=models[n % 6]),
        ),
    ):
        latencies, found = [], 0
        for n, cell in enumerate(sample):
            started = time.perf_counter()
            found += len(run(cell, n))
            latencies.append((time.perf_counter() - started) * 1000)
        result[name] = {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "mean_results": found / len(sample),
        }
    cell = sample[0]
    with connection.cursor() as cur:
        cur.execute(
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT id FROM agents "
            "WHERE location_h3 = ANY(%s::varchar[]) AND tenant_id = %s AND status = 'active'",
            [list(h3.grid_disk(cell, 3)), tenant.id],
        )
        result["agents_near_plan"] = [row[0] for row in cur.fetchall()]
        from coalitions.selectors import _NEAR_SQL

        cur.execute(
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + _NEAR_SQL,
            [list(h3.grid_disk(cell, 2)), tenant.id, tenant.id, "retail"],
        )
        result["coalitions_near_plan"] = [row[0] for row in cur.fetchall()]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2, help="Alternating query rounds.")
    parser.add_argument("--reload", action="store_true")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.queries, args.reload)))
        return

    results: dict[int, list[dict]] = {size: [] for size in args.sizes}
    for round_number in range(args.rounds):
        for size in args.sizes:
            env = {
                **os.environ,
                "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/freeagentics_bench_loc_{size}",
            }
            cmd = [sys.executable, __file__, "--worker", str(size), "--queries", str(args.queries)]
            if args.reload and round_number == 0:
                cmd.append("--reload")
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            results[size].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {round_number + 1}: {size:,} agents measured", flush=True)

    from common import median, report

    p95 = {}
    for size, runs in results.items():
        loads = [r for r in runs if "load_seconds" in r]
        rows = [("cells", f"{runs[0]['cells']:,} resolution-9 cells")]
        for load in loads:
            rows.append(
                (
                    "bulk load",
                    f"{load['load_seconds']:.1f} s ({size / load['load_seconds']:,.0f} agents/s), "
                    f"peak RSS {load['load_peak_rss_mib']:.0f} MiB "
                    f"(before load {load['rss_before_load_mib']:.0f} MiB)",
                )
            )
        for name in ("agents_near", "coalitions_near"):
            p = {q: median([r[name][q] for r in runs]) for q in ("p50", "p95", "p99")}
            p95[(size, name)] = p["p95"]
            rows.append(
                (
                    name,
                    f"p50 {p['p50']:.2f} ms, p95 {p['p95']:.2f} ms, p99 {p['p99']:.2f} ms, "
                    f"{runs[0][name]['mean_results']:.1f} results/query",
                )
            )
        report(f"{size:,} agents ({len(runs)} rounds, medians of per-round percentiles)", rows)
        print("  EXPLAIN agents_near:\n    " + "\n    ".join(runs[-1]["agents_near_plan"]))
        print("  EXPLAIN coalitions_near:\n    " + "\n    ".join(runs[-1]["coalitions_near_plan"]))
    if len(args.sizes) == 2:
        small, large = args.sizes
        report(
            "scaling",
            [
                (
                    f"{name} p95({large:,})/p95({small:,})",
                    f"{p95[(large, name)] / p95[(small, name)]:.2f} (target <= 2); "
                    f"p95 at {large:,}: {p95[(large, name)]:.2f} ms (target <= 10)",
                )
                for name in ("agents_near", "coalitions_near")
            ],
        )


if __name__ == "__main__":
    main()
