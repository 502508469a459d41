"""What freeagentics.replicas costs per read: ReplicaRouter's decision (cached replica
status) against a plain router that returns "default", side by side in the same run.

    .venv/bin/python benchmarks/replica_routing.py [--reads 20000] [--repeats 7]

Starts a primary with two streaming standbys of its own (tests/postgres_cluster.py),
configured as DATABASE_URL and DATABASE_REPLICA_URLS, so the statuses are real and the
periodic re-checks (DATABASE_REPLICA_CHECK_SECONDS, 0.5 s) happen as in service. Each
decision is timed alone (perf_counter_ns around django.db.router's db_for_read, the call
every QuerySet makes); variants interleave within each repeat, and the table shows the
median over repeats of each repeat's percentiles:

  plain router         returns "default": the floor (ConnectionRouter and the timer)
  no position          a caller that wrote nothing: round robin over both standbys
  caught up            a caller whose write both standbys have replayed
  one standby behind   the same, standby1 paused: skipped on its cached position, and
                       asked again at most every 5 ms (those reads pay one round trip)

Target: p95 <= 0.2 ms per read. The write side is shown too: a one-row UPDATE in
autocommit with the write hook (then one pg_current_wal_insert_lsn() query) and without.
"""

import argparse
import os
import time

import common
from common import median, percentile

DATABASE = "freeagentics_bench_replicas"


class PlainRouter:
    def db_for_read(self, model, **hints):
        return "default"


def timed_reads(route, model, reads: int) -> list[float]:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(reads):
        start = clock()
        route(model)
        samples.append((clock() - start) / 1000)
    return samples


def timed_writes(cursor, writes: int) -> list[float]:
    samples = []
    for n in range(writes):
        start = time.perf_counter()
        cursor.execute("UPDATE bench_ticks SET n = %s WHERE id = 1", [n])
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=20_000, help="Decisions per variant.")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--writes", type=int, default=500, help="UPDATEs per variant.")
    args = parser.parse_args()
    # After common, which puts the project on sys.path.
    from tests.postgres_cluster import PostgresCluster

    with PostgresCluster(replication=True) as primary:
        standbys = [primary.standby("standby1"), primary.standby("standby2")]
        primary.create_database(DATABASE)
        primary.execute(
            "CREATE TABLE bench_ticks (id int PRIMARY KEY, n int); "
            "INSERT INTO bench_ticks VALUES (1, 0)",
            dbname=DATABASE,
        )
        os.environ["DATABASE_URL"] = primary.url(DATABASE)
        os.environ["DATABASE_REPLICA_URLS"] = ",".join(s.url(DATABASE) for s in standbys)
        common.setup(database=False)
        run(primary, standbys, args)


def run(primary, standbys, args) -> None:
    from django.db import connection
    from django.db.utils import ConnectionRouter

    from agents.models import Agent
    from freeagentics import replicas

    plain = ConnectionRouter([PlainRouter()]).db_for_read
    routed = ConnectionRouter([replicas.ReplicaRouter()]).db_for_read
    paused = standbys[0]

    def write() -> int:
        with replicas.caller():
            with connection.cursor() as cursor:
                cursor.execute("UPDATE bench_ticks SET n = n + 1 WHERE id = 1")
            return replicas.read_position()

    def settle(*servers) -> None:
        for server in servers:
            server.wait_until_replayed()
        replicas.check_replicas()

    caught_up = write()
    settle(*standbys)

    # (router, the caller's position): set once around the timed loop, not timed.
    variants = {
        "plain router": (plain, 0),
        "no position": (routed, 0),
        "caught up": (routed, caught_up),
    }
    results: dict[str, list[dict]] = {name: [] for name in [*variants, "one standby behind"]}
    served: dict[str, set] = {name: set() for name in results}

    def measure(name, route, position) -> None:
        with replicas.caller(position):
            results[name].append(summary(timed_reads(route, Agent, args.reads)))
            served[name] |= {route(Agent) for _ in range(4)}

    for _ in range(args.repeats):
        for name, (route, position) in variants.items():
            measure(name, route, position)
        paused.pause_replay()
        behind = write()
        settle(standbys[1])
        measure("one standby behind", routed, behind)
        paused.resume_replay()
        settle(*standbys)

    writes = {"without hook": [], "with hook": []}
    with connection.cursor() as cursor:
        for _ in range(args.repeats):
            replicas.uninstall()
            writes["without hook"].append(summary(timed_writes(cursor, args.writes)))
            replicas.install()
            writes["with hook"].append(summary(timed_writes(cursor, args.writes)))

    print(
        f"\n## Router decision per read, medians of {args.repeats} repeats x "
        f"{args.reads:,} reads (microseconds)"
    )
    print(f"  {'variant':<20} {'p50':>7} {'p95':>7} {'p99':>7} {'mean':>7}  p95/plain  served by")
    floor = median(r["p95"] for r in results["plain router"])
    for name, rows in results.items():
        p50, p95, p99, mean = (median(r[k] for r in rows) for k in ("p50", "p95", "p99", "mean"))
        print(
            f"  {name:<20} {p50:7.2f} {p95:7.2f} {p99:7.2f} {mean:7.2f}  "
            f"{p95 / floor:9.1f}  {', '.join(sorted(served[name]))}"
        )
    worst = max(median(r["p95"] for r in rows) for rows in results.values())
    verdict = "met" if worst <= 200 else "NOT met"
    print(f"  target: p95 <= 200 us per read; worst p95 {worst:.2f} us: {verdict}")

    print(f"\n## One-row UPDATE in autocommit, medians of {args.repeats} x {args.writes} (ms)")
    print(f"  {'variant':<20} {'p50':>7} {'p95':>7}")
    for name, rows in writes.items():
        print(
            f"  {name:<20} {median(r['p50'] for r in rows):7.3f} "
            f"{median(r['p95'] for r in rows):7.3f}"
        )
    ratio = median(r["p50"] for r in writes["with hook"]) / median(
        r["p50"] for r in writes["without hook"]
    )
    print(f"  with/without p50: {ratio:.2f} (one position query per write transaction)")


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(samples, 50),
        "p95": percentile(samples, 95),
        "p99": percentile(samples, 99),
        "mean": sum(samples) / len(samples),
    }


if __name__ == "__main__":
    main()
