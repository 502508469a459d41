"""Metrics: cost of recording on the agent write path, and flush throughput to InfluxDB.

    .venv/bin/python benchmarks/metrics.py [--agents 10000] [--batch 1000] [--rounds 6]
        [--flush-points 200000] [--flush-chunk 25000] [--flush-rounds 3] [--backlog 1000000]

1. Agent write path, agents_update_states with 64-element beliefs and free_energy,
   with metrics recording on and off (METRICS_RECORD), alternating at every batch:
   with an empty outbox, with a backlog of --backlog points (InfluxDB down for hours),
   and right after the flusher drained that backlog (dead rows not yet vacuumed).
   Also the time spent in the recording hook itself. Target: with/without >= 0.8.
2. Flush throughput to a real InfluxDB 1.6.7 (v1 mode, /write), started here on a
   loopback port: outbox SELECT ... SKIP LOCKED, POST, DELETE, COMMIT per batch. Beside
   it, the floor: the same line protocol in the same batches POSTed straight over
   HTTP (http.client, one keep-alive connection). Target: >= 50,000 points/s.
3. The same flush through influxdb-client's /api/v2/write to VictoriaMetrics, for
   the v2 path's overhead.
4. `manage.py flush_metrics` itself, a process per chunk of --command-points, against
   the same lines POSTed over HTTP in the same batches: the flush as the command times
   it (-v 2), and the process's start-up (interpreter, Django, connections) apart.
   Target: >= 0.9 of the plain HTTP batches.

    .venv/bin/python benchmarks/metrics.py --only command    # sections 4 alone, ~3 minutes

Variants alternate at fine grain and figures are medians of rounds: the machine is
shared and noisy.
"""

import argparse
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Own database and Redis DB, so other benchmarks' data never mixes with these.
os.environ.setdefault(
    "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/freeagentics_bench_metrics"
)
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")

from common import ROOT, median, report, setup

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
    parser.add_argument("--flush-chunk", type=int, default=25_000)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--command-points", type=int, default=100_000)
    parser.add_argument("--command-rounds", type=int, default=5)
    parser.add_argument(
        "--only", choices=("command",), help="Run section 4 (the flush_metrics command) alone."
    )
    args = parser.parse_args()
    setup()
    if args.only == "command":
        return flush_command(args)

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

    # The agent services send a signal; metrics.receivers calls the recording hook.
    import metrics.receivers as receivers

    # Benchmark-only instrumentation: the time the agent write spends in the hook.
    recording: list[float] = []
    real_record = receivers.agent_metrics_record

    def timed_record(**kwargs):
        start = time.perf_counter()
        try:
            return real_record(**kwargs)
        finally:
            if settings.METRICS_RECORD:
                recording.append(time.perf_counter() - start)

    receivers.agent_metrics_record = timed_record

    def one_batch(start: int, record: bool) -> float:
        settings.METRICS_RECORD = record
        chunk = ids[start : start + args.batch]
        updates = [
            AgentStateUpdate(
                agent_id,
                beliefs=beliefs[n % 256],
                energy_level=n % 100,
                free_energy=float(n % 17) / 3,
            )
            for n, agent_id in enumerate(chunk, start)
        ]
        began = time.perf_counter()
        agents_update_states(tenant=tenant, updates=updates)
        return time.perf_counter() - began

    def write_path(label: str) -> dict:
        # Alternating with and without at every batch (first one, then the other first)
        # puts both under the same bursts of load from the machine's other users.
        rates: dict[str, list[float]] = {"with": [], "without": []}
        hook_ms = []
        for round_ in range(args.rounds):
            spent = {True: 0.0, False: 0.0}
            recording.clear()
            for k, start in enumerate(range(0, len(ids), args.batch)):
                for record in (True, False) if (k + round_) % 2 == 0 else (False, True):
                    spent[record] += one_batch(start, record)
            rates["with"].append(len(ids) / spent[True])
            rates["without"].append(len(ids) / spent[False])
            hook_ms.append(median(recording) * 1000)
        m = {name: median(values) for name, values in rates.items()}
        ratio = m["with"] / m["without"]
        batch_ms = args.batch / m["without"] * 1000
        report(
            f"agent writes, {label} (updates/s, medians of {args.rounds} rounds)",
            [
                (name, f"{rate:,.0f}  (rounds: {', '.join(f'{r:,.0f}' for r in rates[name])})")
                for name, rate in m.items()
            ]
            + [
                ("ratio with/without", f"{ratio:.3f} (target >= 0.8)"),
                (
                    "recording step",
                    f"{median(hook_ms):.1f} ms per {args.batch}-update batch "
                    f"({median(hook_ms) / batch_ms:.1%} of a batch without metrics, "
                    f"{batch_ms:.0f} ms)",
                ),
            ],
        )
        return {"label": label, **m, "ratio": ratio}

    def outbox_count() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM metrics_outbox")
            return cursor.fetchone()[0]

    results = []
    connection.ensure_connection()
    print(
        f"{len(ids)} agents, batches of {args.batch}, 64-element beliefs; "
        f"{args.rounds} rounds per comparison, with and without alternating at every batch"
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
        # InfluxDB compacting what it just took in would compete for the CPU; this
        # measures the outbox's dead rows, not that.
        influxd.stop()
        results.append(write_path("right after draining (dead rows not yet vacuumed)"))
        influxd.start()
        victoria.start()

        # Steady state: the series exist (as in production), every chunk adds new points.
        settings.INFLUXDB_DATABASE = influxd.create_database()
        clock = [time.time_ns() - 10**15]
        chunk = args.flush_chunk

        def fill_fresh(count: int) -> None:
            clock[0] += count * 1_000 + 1
            with connection.cursor() as cursor:
                cursor.execute("TRUNCATE metrics_outbox")
                cursor.execute(_BACKLOG_SQL, [clock[0], count])

        def fresh_bodies() -> list[bytes]:
            fill_fresh(chunk)
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

        # Each variant prepares a chunk untimed, then ships it timed.
        def flusher(workers: int, target: str):
            def run() -> float:
                fill_fresh(chunk)
                if target == "victoria":
                    settings.INFLUXDB_URL, settings.INFLUXDB_API = victoria.url, "v2"
                try:
                    start = time.perf_counter()
                    sent = outbox_flush(batch_size=args.flush_batch, workers=workers).sent
                    elapsed = time.perf_counter() - start
                finally:
                    settings.INFLUXDB_URL, settings.INFLUXDB_API = influxd.url, "v1"
                assert sent == chunk, sent
                return elapsed

            return run

        def influx_floor() -> float:
            bodies = fresh_bodies()
            path = f"/write?db={settings.INFLUXDB_DATABASE}&precision=ns"
            return post_all(influxd.port, path, bodies)

        def victoria_floor() -> float:
            return post_all(victoria.port, "/api/v2/write?bucket=b", fresh_bodies())

        fill_fresh(args.flush_points)
        outbox_flush(batch_size=args.flush_batch)  # creates the series: not timed
        variants = {
            "flusher, 1 worker -> InfluxDB 1.6.7 /write": flusher(1, "influxd"),
            "flusher, 2 workers -> InfluxDB 1.6.7 /write": flusher(2, "influxd"),
            "floor: same lines POSTed to InfluxDB /write": influx_floor,
            "flusher, 1 worker -> VictoriaMetrics /api/v2/write": flusher(1, "victoria"),
            "floor: same lines POSTed to VictoriaMetrics": victoria_floor,
        }
        names = list(variants)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.flush_rounds):
            spent = dict.fromkeys(variants, 0.0)
            # Chunk by chunk, the variants take turns, starting one further each time, so
            # a burst of load from the machine's other users hits all of them alike.
            for k in range(args.flush_points // chunk):
                for name in names[k % len(names) :] + names[: k % len(names)]:
                    spent[name] += variants[name]()
            for name in variants:
                rates[name].append(args.flush_points // chunk * chunk / spent[name])
        m = {name: median(values) for name, values in rates.items()}
        one, two, floor_rate, v2, v2_floor = m.values()
        report(
            f"flush throughput ({args.flush_points:,} points a round in chunks of {chunk:,}, "
            f"batches of {args.flush_batch:,}; points/s, medians of {args.flush_rounds} rounds)",
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
        expected = args.flush_points + 3 * args.flush_rounds * (args.flush_points // chunk * chunk)
        report("check", [("points stored in InfluxDB", f"{stored:,} of {expected:,}")])
    finally:
        influxd.stop()
        victoria.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        settings.METRICS_RECORD = True
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE metrics_outbox")
        Agent.objects.filter(tenant=tenant).delete()
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM agent_history WHERE agent_id = ANY(%s::uuid[])", [ids])
    flush_command(args)
    return results


def flush_command(args) -> None:
    """Section 4: `manage.py flush_metrics` processes against plain HTTP batches."""
    from django.db import connection

    from tests.metrics.conftest import InfluxDB

    workdir = Path(tempfile.mkdtemp(prefix="bench-flush-command-"))
    (workdir / "influxd").mkdir()
    influxd = InfluxDB(workdir / "influxd")
    influxd.start()
    clock = [time.time_ns() - 10**15]
    points = args.command_points

    def fill_fresh(count: int) -> None:
        clock[0] += count * 1_000 + 1
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE metrics_outbox")
            cursor.execute(_BACKLOG_SQL, [clock[0], count])

    try:
        database = influxd.create_database()
        env = {
            **os.environ,
            "INFLUXDB_URL": influxd.url,
            "INFLUXDB_API": "v1",
            "INFLUXDB_TOKEN": "",
            "INFLUXDB_DATABASE": database,
            "INFLUXDB_RETENTION_POLICY": "",
            "METRICS_OUTBOX_MAX_POINTS": "100000000",
        }

        def command(workers: int):
            def run() -> tuple[float, float]:
                fill_fresh(points)
                began = time.perf_counter()
                flags = ["-v", "2", "--batch-size", str(args.flush_batch)]
                flags += ["--workers", str(workers)]
                done = subprocess.run(
                    [sys.executable, "manage.py", "flush_metrics", *flags],
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                wall = time.perf_counter() - began
                assert f"{points} point(s) sent" in done.stdout, done.stdout
                flushed = float(re.search(r"Flushed in ([0-9.]+) s", done.stdout).group(1))
                return flushed, wall

            return run

        def floor() -> tuple[float, float]:
            fill_fresh(points)
            with connection.cursor() as cursor:
                cursor.execute("SELECT line FROM metrics_outbox ORDER BY id")
                lines = [row[0] for row in cursor.fetchall()]
                cursor.execute("TRUNCATE metrics_outbox")
            bodies = [
                "\n".join(lines[i : i + args.flush_batch]).encode()
                for i in range(0, len(lines), args.flush_batch)
            ]
            conn = http.client.HTTPConnection("127.0.0.1", influxd.port, timeout=60)
            began = time.perf_counter()
            for body in bodies:
                conn.request(
                    "POST",
                    f"/write?db={database}&precision=ns",
                    body=body,
                    headers={"Content-Type": "text/plain; charset=utf-8"},
                )
                response = conn.getresponse()
                response.read()
                assert response.status == 204, response.status
            elapsed = time.perf_counter() - began
            conn.close()
            return elapsed, elapsed

        command(1)()  # creates the series: not timed
        variants = {
            "flush_metrics, 1 worker": command(1),
            "flush_metrics --workers 2": command(2),
            "floor: same lines POSTed over HTTP": floor,
        }
        names = list(variants)
        flushed: dict[str, list[float]] = {name: [] for name in names}
        walls: dict[str, list[float]] = {name: [] for name in names}
        for k in range(args.command_rounds):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                inside, wall = variants[name]()
                flushed[name].append(points / inside)
                walls[name].append(wall - inside)
        floor_name = names[-1]
        rows = []
        for name in names[:-1]:
            ratios = [f / c for f, c in zip(flushed[name], flushed[floor_name], strict=True)]
            rows.append(
                (
                    name,
                    f"{median(flushed[name]):,.0f} points/s timed by the command "
                    f"(rounds: {', '.join(f'{r:,.0f}' for r in flushed[name])}); "
                    f"{median(ratios):.2f} of the floor, per round (target >= 0.9); "
                    f"start-up and exit {median(walls[name]):.2f} s a process",
                )
            )
        rows.append(
            (
                floor_name,
                f"{median(flushed[floor_name]):,.0f} points/s "
                f"(rounds: {', '.join(f'{r:,.0f}' for r in flushed[floor_name])})",
            )
        )
        report(
            f"flush_metrics command ({points:,} points a process, batches of "
            f"{args.flush_batch:,}; {args.command_rounds} rounds, the order rotating)",
            rows,
        )
    finally:
        influxd.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE metrics_outbox")


if __name__ == "__main__":
    main()
