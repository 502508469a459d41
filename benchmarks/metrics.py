"""Metrics: cost of recording on the agent write path, and flush throughput to InfluxDB.

    .venv/bin/python benchmarks/metrics.py [--agents 10000] [--batch 1000] [--rounds 6]
        [--flush-points 200000] [--flush-rounds 3] [--backlog 1000000]

1. Agent write path, agents_update_states with 64-element beliefs and free_energy,
   with metrics recording on and off (METRICS_RECORD), interleaved: with an empty
   outbox, with a backlog of --backlog points (InfluxDB down for hours), and right
   after the flusher drained that backlog (dead rows not yet vacuumed).
   Target: with/without >= 0.8.
2. Flush throughput to a real InfluxDB 1.6.7 (v1 mode, /write), started here on a
   loopback port: outbox SELECT ... SKIP LOCKED, POST, DELETE, COMMIT per batch. Beside
   it, the floor: the same line protocol in the same batches POSTed straight over
   HTTP (http.client, one keep-alive connection). Target: >= 50,000 points/s.
3. The same flush through influxdb-client's /api/v2/write to VictoriaMetrics, for
   the v2 path's overhead.

Medians of interleaved rounds; the machine is shared and noisy.
"""

import argparse
import http.client
import os
import tempfile
import time
from pathlib import Path

# Own database and Redis DB, so other benchmarks' data never mixes with these.
os.environ.setdefault(
    "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/freeagentics_bench_metrics"
)
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")

from common import median, report, setup


def _abba(variants: dict, rounds: int) -> dict[str, list[float]]:
    """common.interleaved, with the order reversed every other round: updating the same
    rows twice in a row makes the second pass pay for the first one's dead tuples, which
    a fixed order would always charge to the same variant."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    items = list(variants.items())
    for round_ in range(rounds):
        for name, run in items if round_ % 2 == 0 else items[::-1]:
            start = time.perf_counter()
            units = run()
            rates[name].append(units / (time.perf_counter() - start))
    return rates


# Lines shaped like the agent service's: 2,000 agents in 8 tenants, distinct timestamps.
_BACKLOG_SQL = """
INSERT INTO metrics_outbox (line)
SELECT 'agent_beliefs,agent_id=' || md5((i %% 2000)::text)::uuid
    || ',tenant_id=' || md5((i %% 8)::text || 'tenant')::uuid
    || ' free_energy=' || round((i %% 17) / 3.0, 6) || ',belief_entropy=4.0123456789'
    || ',max_belief=0.0512345678,belief_variance=0.000212345678,energy_level=' || (i %% 100)
    || 'i ' || (%s::bigint + i * 1000)
FROM generate_series(1, %s) AS i
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--flush-points", type=int, default=200_000)
    parser.add_argument("--flush-rounds", type=int, default=3)
    parser.add_argument("--flush-batch", type=int, default=5_000)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    args = parser.parse_args()
    setup()

    import numpy as np
    from django.conf import settings
    from django.db import connection

    from agents.models import Agent, Tenant
    from agents.services import AgentSpec, agents_bulk_load, agents_update_states
    from agents.types import AgentStateUpdate
    from metrics.services import outbox_flush
    from tests.metrics.conftest import InfluxDB, VictoriaMetrics

    settings.METRICS_OUTBOX_MAX_POINTS = 100_000_000
    tenant, _ = Tenant.objects.get_or_create(
        slug="bench-metrics", defaults={"name": "Bench metrics"}
    )
    Agent.objects.filter(tenant=tenant).delete()
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE metrics_outbox, metrics_outbox_dropped, metrics_outbox_rejected")
    rng = np.random.default_rng(0)
    agents_bulk_load(
        tenant=tenant,
        specs=(
            AgentSpec(name=f"m{i}", agent_type="worker", beliefs=rng.dirichlet(np.ones(64)))
            for i in range(args.agents)
        ),
    )
    ids = list(Agent.objects.filter(tenant=tenant).values_list("id", flat=True))
    beliefs = [rng.dirichlet(np.ones(64)) for _ in range(256)]

    def updates_round():
        for start in range(0, len(ids), args.batch):
            chunk = ids[start : start + args.batch]
            agents_update_states(
                tenant=tenant,
                updates=[
                    AgentStateUpdate(
                        agent_id,
                        beliefs=beliefs[n % 256],
                        energy_level=n % 100,
                        free_energy=float(n % 17) / 3,
                    )
                    for n, agent_id in enumerate(chunk, start)
                ],
            )
        return len(ids)

    def with_metrics():
        settings.METRICS_RECORD = True
        return updates_round()

    def without_metrics():
        settings.METRICS_RECORD = False
        return updates_round()

    def write_path(label: str) -> dict:
        rates = _abba({"with": with_metrics, "without": without_metrics}, args.rounds)
        m = {name: median(values) for name, values in rates.items()}
        ratio = m["with"] / m["without"]
        report(
            f"agent writes, {label} (updates/s, medians of {args.rounds} rounds)",
            [
                (name, f"{rate:,.0f}  (rounds: {', '.join(f'{r:,.0f}' for r in rates[name])})")
                for name, rate in m.items()
            ]
            + [("ratio with/without", f"{ratio:.3f} (target >= 0.8)")],
        )
        return {"label": label, **m, "ratio": ratio}

    def outbox_count() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM metrics_outbox")
            return cursor.fetchone()[0]

    def fill_outbox(lines: list[str]) -> None:
        with (
            connection.cursor() as cursor,
            cursor.cursor.copy("COPY metrics_outbox (line) FROM STDIN") as copy,
        ):
            for line in lines:
                copy.write_row((line,))

    results = []
    connection.ensure_connection()
    print(
        f"{len(ids)} agents, batches of {args.batch}, 64-element beliefs; "
        f"{args.rounds} interleaved rounds per comparison"
    )
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE metrics_outbox")
    results.append(write_path("empty outbox"))

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE metrics_outbox")
        # Generated in PostgreSQL: a million lines would cost Python ~250 MB.
        cursor.execute(_BACKLOG_SQL, [time.time_ns() - args.backlog * 1_000, args.backlog])
        cursor.execute("VACUUM ANALYZE metrics_outbox")
    results.append(write_path(f"outbox backlog of {outbox_count():,} points (InfluxDB down)"))

    workdir = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    influxd = InfluxDB(workdir / "influxd")
    (workdir / "influxd").mkdir()
    victoria = VictoriaMetrics(workdir / "victoria")
    (workdir / "victoria").mkdir()
    influxd.start()
    victoria.start()
    try:
        settings.INFLUXDB_URL = influxd.url
        settings.INFLUXDB_API = "v1"
        settings.INFLUXDB_TOKEN = ""
        settings.INFLUXDB_RETENTION_POLICY = ""
        settings.INFLUXDB_DATABASE = influxd.create_database()
        started = time.perf_counter()
        drained = outbox_flush(batch_size=args.flush_batch).sent
        drain_rate = drained / (time.perf_counter() - started)
        report(
            "draining the backlog",
            [("flushed", f"{drained:,} points at {drain_rate:,.0f} points/s (one flusher)")],
        )
        results.append(write_path("right after draining (dead rows not yet vacuumed)"))

        # Steady state: the series exist (as in production), every round adds new points.
        settings.INFLUXDB_DATABASE = influxd.create_database()
        clock = [time.time_ns() - 10**15]

        def fill_fresh() -> None:
            clock[0] += args.flush_points * 1_000 + 1
            with connection.cursor() as cursor:
                cursor.execute("TRUNCATE metrics_outbox")
                cursor.execute(_BACKLOG_SQL, [clock[0], args.flush_points])

        def fresh_bodies() -> list[bytes]:
            fill_fresh()
            with connection.cursor() as cursor:
                cursor.execute("SELECT line FROM metrics_outbox ORDER BY id")
                lines = [row[0] for row in cursor.fetchall()]
                cursor.execute("TRUNCATE metrics_outbox")
            return [
                "\n".join(lines[i : i + args.flush_batch]).encode()
                for i in range(0, len(lines), args.flush_batch)
            ]

        def post_all(port: int, path: str, bodies: list[bytes]) -> float:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            start = time.perf_counter()
            for body in bodies:
                conn.request(
                    "POST", path, body=body, headers={"Content-Type": "text/plain; charset=utf-8"}
                )
                response = conn.getresponse()
                response.read()
                assert response.status == 204, response.status
            elapsed = time.perf_counter() - start
            conn.close()
            return elapsed

        def flusher(workers: int, target: str):
            def run():
                fill_fresh()
                if target == "victoria":
                    settings.INFLUXDB_URL, settings.INFLUXDB_API = victoria.url, "v2"
                try:
                    start = time.perf_counter()
                    sent = outbox_flush(batch_size=args.flush_batch, workers=workers).sent
                    return sent, time.perf_counter() - start
                finally:
                    settings.INFLUXDB_URL, settings.INFLUXDB_API = influxd.url, "v1"

            return run

        def influx_floor():
            bodies = fresh_bodies()
            path = f"/write?db={settings.INFLUXDB_DATABASE}&precision=ns"
            return args.flush_points, post_all(influxd.port, path, bodies)

        def victoria_floor():
            bodies = fresh_bodies()
            return args.flush_points, post_all(victoria.port, "/api/v2/write?bucket=b", bodies)

        fill_fresh()
        outbox_flush(batch_size=args.flush_batch)  # creates the series: not timed
        variants = {
            "flusher, 1 worker -> InfluxDB 1.6.7 /write": flusher(1, "influxd"),
            "flusher, 2 workers -> InfluxDB 1.6.7 /write": flusher(2, "influxd"),
            "floor: same lines POSTed to InfluxDB /write": influx_floor,
            "flusher, 1 worker -> VictoriaMetrics /api/v2/write": flusher(1, "victoria"),
            "floor: same lines POSTed to VictoriaMetrics": victoria_floor,
        }
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.flush_rounds):
            for name, run in variants.items():
                count, elapsed = run()
                assert count == args.flush_points, (name, count)
                rates[name].append(count / elapsed)
        m = {name: median(values) for name, values in rates.items()}
        one, two, floor_rate, v2, v2_floor = m.values()
        report(
            f"flush throughput ({args.flush_points:,} points a round, batches of "
            f"{args.flush_batch:,}; points/s, medians of {args.flush_rounds} rounds)",
            [
                (name, f"{rate:,.0f}  (rounds: {', '.join(f'{r:,.0f}' for r in rates[name])})")
                for name, rate in m.items()
            ]
            + [
                (
                    "best InfluxDB flusher target",
                    f"{max(one, two):,.0f} >= 50,000: "
                    f"{'met' if max(one, two) >= 50_000 else 'MISSED'}",
                ),
                ("InfluxDB flusher/floor, 1 worker", f"{one / floor_rate:.2f}"),
                ("InfluxDB flusher/floor, 2 workers", f"{two / floor_rate:.2f}"),
                ("VictoriaMetrics (influxdb-client) flusher/floor", f"{v2 / v2_floor:.2f}"),
            ],
        )
        stored = influxd.count(settings.INFLUXDB_DATABASE, "agent_beliefs", "energy_level")
        expected = args.flush_points * (1 + 3 * args.flush_rounds)
        report("check", [("points stored in InfluxDB", f"{stored:,} of {expected:,}")])
    finally:
        influxd.stop()
        victoria.stop()
        settings.METRICS_RECORD = True
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE metrics_outbox")
        Agent.objects.filter(tenant=tenant).delete()
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM agent_history WHERE agent_id = ANY(%s::uuid[])", [ids])
    return results


if __name__ == "__main__":
    main()
