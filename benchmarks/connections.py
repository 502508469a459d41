"""600 clients through PgBouncer, and the same clients straight to PostgreSQL.

    .venv/bin/python benchmarks/connections.py [--clients 600] [--processes 6] [--seconds 20]
        [--think 3.0] [--pool-size 20] [--max-connections 100]
        [--modes pgbouncer direct direct-raised]

The script starts its own PostgreSQL 15 (tests/postgres_cluster.py, max_connections
--max-connections) and loads 10 tenants of 2,000 agents and 200 coalitions each. A client
is a thread with its own Django connection (DATABASE_POOL_MAX_SIZE=0: no pool, so 600
clients hold 600 connections); --processes processes share them. Each client waits an
exponential think time (mean --think seconds), then runs one operation of the mix:
get_agent 35%, agents_near 20%, coalitions_near 15%, coalition reads 15% (members,
membership), agents_update_states of 20 agents 15%. All clients start together and run
for --seconds. The modes, one after another on the same data:

  pgbouncer      PgBouncer 1.18 (tests/pgbouncer_server.py) in transaction mode,
                 default_pool_size --pool-size, max_client_conn --clients + 400;
                 DATABASE_PGBOUNCER=1
  direct         the same clients straight to PostgreSQL (max_connections --max-connections)
  direct-raised  max_connections raised to clients + 30 (restart): what 600 backends cost

Reported per mode: p50/p95/p99 per operation (successful operations), errors by type,
throughput, and the CPU of PgBouncer and of PostgreSQL (postmaster and backends, reaped
ones included) and of the clients over the run. Targets (pgbouncer): reads p95 < 100 ms,
0 errors. Uses Redis DB 13 (flushed per mode) and removes its server at the end.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/13")
os.environ["DATABASE_POOL_MAX_SIZE"] = "0"
os.environ["REALTIME_PUBLISH"] = "0"

from common import ROOT, percentile, report

DB_NAME = "freeagentics_bench_connections"
TENANTS = 10
AGENTS_PER_TENANT = 2_000
COALITIONS_PER_TENANT = 200
MEMBERS = 4
BUSINESS_MODELS = ("retail", "delivery")
BATCH = 20
BELIEFS = 16
# Operations and their share of the mix.
MIX = {
    "get_agent": 35,
    "agents_near": 20,
    "coalitions_near": 15,
    "coalition_read": 15,
    "agents_update_states": 15,
}
READS = ("get_agent", "agents_near", "coalitions_near", "coalition_read")
CENTRE = (52.52, 13.405)
RADIUS_CELLS = 25  # grid_disk(centre, 25): 1,951 resolution-9 cells, ~1 agent each per tenant
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_SECONDS = 0.5
# PgBouncer's SHOW STATS totals (times in microseconds), compared before and after a run.
POOL_STATS = (
    "total_xact_count",
    "total_query_count",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
)


# --- clients (the worker processes) -----------------------------------------------------------


def _error_kind(error: Exception) -> str:
    text = str(error)
    for known in ("too many clients already", "query_wait_timeout", "connection is closed"):
        if known in text:
            return f"{type(error).__name__}: {known}"
    line = next((s for s in text.splitlines() if "FATAL" in s or "ERROR" in s), text)
    return f"{type(error).__name__}: {re.sub(r'[0-9]+', 'N', line.strip())[:90]}"


def worker(plan_path: str, threads: int, first: int, think: float) -> None:
    """Run `threads` clients; print READY, wait for GO on stdin, run, print RESULT."""
    from common import setup

    setup(database=False)
    import numpy as np
    from django.db import InterfaceError, OperationalError, connection, connections

    from agents.models import Tenant
    from agents.selectors import agents_near, get_agent
    from agents.services import agents_update_states
    from agents.types import AgentStateUpdate
    from coalitions.selectors import coalition_members, coalitions_near, is_coalition_member

    plan = json.loads(Path(plan_path).read_text())
    tenants = []
    for t in plan["tenants"]:
        data = {
            "agents": [uuid.UUID(a) for a in t["agents"]],
            "members": [(uuid.UUID(c), uuid.UUID(a)) for c, a in t["members"]],
        }
        tenants.append((Tenant(id=uuid.UUID(t["id"]), name=t["slug"], slug=t["slug"]), data))
    cells = plan["cells"]
    latencies = defaultdict(list)
    errors = defaultdict(Counter)
    connect_errors = Counter()
    lock = threading.Lock()
    ready = threading.Barrier(threads + 1)
    go = threading.Event()
    window = {}

    def operation(name, rng, tenant, data):
        if name == "get_agent":
            get_agent(tenant=tenant, agent_id=rng.choice(data["agents"]))
        elif name == "agents_near":
            agents_near(tenant=tenant, cell=rng.choice(cells), radius=2)
        elif name == "coalitions_near":
            coalitions_near(
                tenant=tenant, cell=rng.choice(cells), business_model=rng.choice(BUSINESS_MODELS)
            )
        elif name == "coalition_read":
            coalition_id, agent_id = rng.choice(data["members"])
            if rng.random() < 0.5:
                list(coalition_members(tenant=tenant, coalition_id=coalition_id))
            else:
                is_coalition_member(tenant=tenant, coalition_id=coalition_id, agent_id=agent_id)
        else:
            np_rng = np.random.default_rng(rng.getrandbits(32))
            agents_update_states(
                tenant=tenant,
                updates=[
                    AgentStateUpdate(
                        agent_id,
                        beliefs=np_rng.dirichlet(np.ones(BELIEFS)),
                        energy_level=int(np_rng.integers(0, 101)),
                    )
                    for agent_id in rng.sample(data["agents"], BATCH)
                ],
            )

    def client(number):
        rng = random.Random(number)
        tenant, data = tenants[number % len(tenants)]
        names, weights = list(MIX), list(MIX.values())
        mine = defaultdict(list)
        my_errors = defaultdict(Counter)
        try:
            connection.ensure_connection()
        except Exception as e:
            with lock:
                connect_errors[_error_kind(e)] += 1
        ready.wait()
        go.wait()
        end = window["end"]
        next_at = time.monotonic() + rng.expovariate(1 / think)
        while True:
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            if time.monotonic() >= end:
                break
            name = rng.choices(names, weights)[0]
            start = time.perf_counter()
            try:
                operation(name, rng, tenant, data)
                mine[name].append((time.perf_counter() - start) * 1000)
            except Exception as e:
                my_errors[name][_error_kind(e)] += 1
                if isinstance(e, OperationalError | InterfaceError):
                    # As Django does at the end of a request: a broken connection is
                    # dropped, and the next operation connects again.
                    connection.close()
            next_at = time.monotonic() + rng.expovariate(1 / think)
        connections.close_all()
        with lock:
            for name, values in mine.items():
                latencies[name].extend(values)
            for name, counts in my_errors.items():
                errors[name].update(counts)

    pool = [threading.Thread(target=client, args=(first + i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    ready.wait()
    print(f"READY {threads - sum(connect_errors.values())}", flush=True)
    seconds = float(sys.stdin.readline().split()[1])
    cpu_start = _own_cpu()
    window["end"] = time.monotonic() + seconds
    go.set()
    for thread in pool:
        thread.join()
    result = {
        "latencies": latencies,
        "errors": {name: dict(counts) for name, counts in errors.items()},
        "connect_errors": dict(connect_errors),
        "cpu_seconds": _own_cpu() - cpu_start,
    }
    print("RESULT " + json.dumps(result), flush=True)


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


# --- CPU of the servers ------------------------------------------------------------------------


def _ticks(pid: int) -> tuple[int, int, int]:
    """(ppid, own utime + stime, reaped children's cutime + cstime) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def process_cpu(pid: int) -> float:
    return _ticks(pid)[1] / CLK_TCK


def tree_cpu(root: int) -> float:
    """CPU seconds of `root`, its live children and the children it has reaped: the
    postmaster and every backend, including those that ended (refused connections)."""
    _, own, reaped = _ticks(root)
    live = 0
    for stat in Path("/proc").glob("[0-9]*"):
        try:
            ppid, child, _ = _ticks(int(stat.name))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if ppid == root:
            live += child
    return (own + reaped + live) / CLK_TCK


# --- the run -----------------------------------------------------------------------------------


def load(plan_path: Path) -> int:
    """Migrate and load the benchmark data; write the plan the clients read."""
    from common import setup

    setup()
    import h3
    import numpy as np
    from django.db import connection, connections

    from agents.models import Agent, Tenant
    from agents.services import AgentSpec, agents_bulk_load
    from coalitions.models import Coalition, CoalitionMember

    cells = list(h3.grid_disk(h3.latlng_to_cell(*CENTRE, 9), RADIUS_CELLS))
    rng = np.random.default_rng(0)
    plan = {"cells": cells, "tenants": []}
    for number in range(TENANTS):
        tenant = Tenant.objects.create(name=f"Bench conn {number}", slug=f"bench-conn-{number}")
        agents_bulk_load(
            tenant=tenant,
            specs=(
                AgentSpec(
                    name=f"c{number}-{i}",
                    agent_type="trader",
                    beliefs=rng.dirichlet(np.ones(BELIEFS)),
                    location_h3=cells[i % len(cells)],
                )
                for i in range(AGENTS_PER_TENANT)
            ),
        )
        ids = [str(i) for i in Agent.objects.filter(tenant=tenant).values_list("id", flat=True)]
        coalitions = Coalition.objects.bulk_create(
            Coalition(
                tenant=tenant,
                name=f"k{number}-{i}",
                business_model=BUSINESS_MODELS[i % 2],
                status="active" if i % 5 < 3 else "forming",
            )
            for i in range(COALITIONS_PER_TENANT)
        )
        by_cell = {}
        for agent_id, cell in Agent.objects.filter(tenant=tenant).values_list("id", "location_h3"):
            by_cell.setdefault(cell, []).append(agent_id)
        members = []
        for coalition in coalitions:
            around = h3.grid_disk(cells[int(rng.integers(len(cells)))], 1)
            nearby = [a for cell in around for a in by_cell.get(cell, [])][:MEMBERS]
            members += [CoalitionMember(coalition=coalition, agent_id=a) for a in nearby]
        CoalitionMember.objects.bulk_create(members)
        plan["tenants"].append(
            {
                "id": str(tenant.id),
                "slug": tenant.slug,
                "agents": ids,
                "members": [[str(m.coalition_id), str(m.agent_id)] for m in members],
            }
        )
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    connections.close_all()
    plan_path.write_text(json.dumps(plan))
    return sum(len(t["agents"]) for t in plan["tenants"])


def _line_of(worker: subprocess.Popen, prefix: str) -> str:
    """The rest of the worker's next output line that starts with prefix."""
    for line in worker.stdout:
        if line.startswith(prefix):
            return line.removeprefix(prefix)
    raise RuntimeError(f"a client process exited ({worker.wait()}) before {prefix.strip()}")


def run_mode(args, plan_path: Path, cluster, bouncer) -> dict:
    import psycopg
    import redis

    redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()
    env = {**os.environ, "DATABASE_URL": cluster.url(DB_NAME), "DATABASE_PGBOUNCER": "0"}
    if bouncer is not None:
        env |= {"DATABASE_URL": bouncer.url(DB_NAME), "DATABASE_PGBOUNCER": "1"}
    monitor = psycopg.connect(cluster.url(DB_NAME), autocommit=True)
    per_process = args.clients // args.processes
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                str(plan_path),
                str(per_process),
                str(number * per_process),
                str(args.think),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for number in range(args.processes)
    ]
    started = time.monotonic()
    connected = sum(int(_line_of(w, "READY ")) for w in workers)
    ramp = time.monotonic() - started
    peaks = Counter()

    def sample():
        backends, locked = monitor.execute(
            "SELECT count(*), count(*) FILTER (WHERE wait_event_type = 'Lock') "
            "FROM pg_stat_activity WHERE backend_type = 'client backend'"
        ).fetchone()
        peaks["backends"] = max(peaks["backends"], backends)
        peaks["lock_waits"] = max(peaks["lock_waits"], locked)
        if bouncer is not None:
            for pool in bouncer.admin("SHOW POOLS"):
                if pool["database"] == DB_NAME:
                    peaks["cl_waiting"] = max(peaks["cl_waiting"], pool["cl_waiting"])
                    wait = pool["maxwait"] * 1000 + pool["maxwait_us"] / 1000
                    peaks["maxwait_ms"] = max(peaks["maxwait_ms"], wait)
                    peaks["sv_active"] = max(peaks["sv_active"], pool["sv_active"])

    def pool_stats() -> dict:
        if bouncer is None:
            return {}
        row = next(r for r in bouncer.admin("SHOW STATS") if r["database"] == DB_NAME)
        return {name: int(row[name]) for name in POOL_STATS}

    postmaster = cluster.postmaster_pid()
    stats_before = pool_stats()
    cpu_before = {
        "postgres": tree_cpu(postmaster),
        "pgbouncer": process_cpu(bouncer.process.pid) if bouncer else 0.0,
    }
    began = time.monotonic()
    for w in workers:
        w.stdin.write(f"GO {args.seconds}\n")
        w.stdin.flush()
    while time.monotonic() - began < args.seconds:
        sample()
        time.sleep(SAMPLE_SECONDS)
    cpu_after = {
        "postgres": tree_cpu(postmaster),
        "pgbouncer": process_cpu(bouncer.process.pid) if bouncer else 0.0,
    }
    wall = time.monotonic() - began
    stats = {name: value - stats_before[name] for name, value in pool_stats().items()}
    results = []
    for w in workers:
        results.append(json.loads(_line_of(w, "RESULT ")))
        w.wait()
    monitor.close()
    latencies, errors, connect_errors = defaultdict(list), defaultdict(Counter), Counter()
    for result in results:
        for name, values in result["latencies"].items():
            latencies[name].extend(values)
        for name, counts in result["errors"].items():
            errors[name].update(counts)
        connect_errors.update(result["connect_errors"])
    return {
        "connected": connected,
        "ramp": ramp,
        "latencies": latencies,
        "errors": errors,
        "connect_errors": connect_errors,
        "cpu": {name: (cpu_after[name] - cpu_before[name]) / wall for name in cpu_before},
        "clients_cpu": sum(r["cpu_seconds"] for r in results) / wall,
        "wall": wall,
        "peaks": peaks,
        "pool_stats": stats,
    }


def raised_connections(args) -> int:
    return max(args.max_connections, args.clients + 30)


def _ms(values, p) -> str:
    return f"{percentile(values, p):.1f}" if values else "-"


def summarise(modes: dict, args) -> None:
    width = 30
    title = {
        "pgbouncer": f"pgbouncer (pool {args.pool_size})",
        "direct": f"direct (max_conn {args.max_connections})",
        "direct-raised": f"direct (max_conn {raised_connections(args)})",
    }

    def row(label, cell):
        return label, "".join(f"{cell(m):<{width}}" for m in modes.values())

    rows = [("", "".join(f"{title[name]:<{width}}" for name in modes))]
    rows.append(row("clients connected at start", lambda m: f"{m['connected']} of {args.clients}"))
    rows.append(row("start-up (processes, connects)", lambda m: f"{m['ramp']:.1f} s"))
    for name in MIX:
        rows.append(
            row(
                f"{name} p50/p95/p99 ms",
                lambda m, n=name: "/".join(_ms(m["latencies"][n], p) for p in (50, 95, 99)),
            )
        )
    rows.append(
        row(
            "all reads p50/p95/p99 ms",
            lambda m: "/".join(
                _ms([v for n in READS for v in m["latencies"][n]], p) for p in (50, 95, 99)
            ),
        )
    )
    rows.append(
        row(
            "operations ok, per second",
            lambda m: f"{sum(map(len, m['latencies'].values())) / m['wall']:,.0f}/s",
        )
    )
    rows.append(
        row(
            "operations failed", lambda m: f"{sum(sum(c.values()) for c in m['errors'].values()):,}"
        )
    )
    rows.append(row("CPU pgbouncer (of 1 core)", lambda m: f"{m['cpu']['pgbouncer']:.0%}"))
    rows.append(row("CPU postgres (of 1 core)", lambda m: f"{m['cpu']['postgres']:.0%}"))
    rows.append(row("CPU clients (of 1 core)", lambda m: f"{m['clients_cpu']:.0%}"))
    rows.append(row("peak PostgreSQL backends", lambda m: str(m["peaks"]["backends"])))
    rows.append(row("peak backends waiting on a lock", lambda m: str(m["peaks"]["lock_waits"])))
    if "pgbouncer" in modes:
        peaks = modes["pgbouncer"]["peaks"]
        rows.append(
            (
                "pgbouncer peaks",
                f"{peaks['sv_active']} servers active, {peaks['cl_waiting']} clients waiting, "
                f"longest wait {peaks['maxwait_ms']:.0f} ms",
            )
        )
        bouncer = modes["pgbouncer"]
        stats = bouncer["pool_stats"]
        queries, xacts = max(stats["total_query_count"], 1), max(stats["total_xact_count"], 1)
        rows.append(
            (
                "pgbouncer SHOW STATS",
                f"{stats['total_xact_count']:,} transactions, {stats['total_query_count']:,} "
                f"queries: {stats['total_query_time'] / queries / 1000:.2f} ms per query and "
                f"{stats['total_xact_time'] / xacts / 1000:.2f} ms per transaction (BEGIN to "
                f"COMMIT), {stats['total_wait_time'] / xacts / 1000:.2f} ms waiting for a server",
            )
        )
        reads_p95 = percentile([v for n in READS for v in bouncer["latencies"][n]], 95)
        failed = sum(sum(c.values()) for c in bouncer["errors"].values())
        failed += sum(bouncer["connect_errors"].values())
        rows.append(
            (
                "targets (pgbouncer)",
                f"reads p95 {reads_p95:.1f} ms < 100: {'met' if reads_p95 < 100 else 'MISSED'}; "
                f"{failed} errors: {'met' if failed == 0 else 'MISSED'}",
            )
        )
    report(
        f"{args.clients} clients ({args.processes} processes x {args.clients // args.processes} "
        f"threads), {args.seconds:g} s, think time {args.think:g} s",
        rows,
    )
    for name, mode in modes.items():
        kinds = Counter(mode["connect_errors"])
        for counts in mode["errors"].values():
            kinds.update(counts)
        if kinds:
            print(f"\n  errors, {title[name]}:")
            for kind, count in kinds.most_common():
                print(f"    {count:>7,}  {kind}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=600)
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--think", type=float, default=3.0, help="Mean think time, seconds.")
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--max-connections", type=int, default=100)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["pgbouncer", "direct", "direct-raised"],
        choices=["pgbouncer", "direct", "direct-raised"],
    )
    args = parser.parse_args()
    if args.clients % args.processes:
        parser.error("--clients must be a multiple of --processes")

    from tests.pgbouncer_server import PgBouncer
    from tests.postgres_cluster import PostgresCluster

    started = time.monotonic()
    with (
        PostgresCluster(max_connections=args.max_connections) as cluster,
        tempfile.TemporaryDirectory() as tmp,
    ):
        os.environ["DATABASE_URL"] = cluster.url(DB_NAME)
        plan = Path(tmp) / "plan.json"
        agents = load(plan)
        print(
            f"PostgreSQL 15 on port {cluster.port}: {TENANTS} tenants, {agents:,} agents, "
            f"{TENANTS * COALITIONS_PER_TENANT:,} coalitions (loaded in "
            f"{time.monotonic() - started:.0f} s)",
            flush=True,
        )
        modes = {}
        for mode in args.modes:
            if mode == "direct-raised":
                cluster.configure(max_connections=raised_connections(args))
                cluster.restart()
            if mode == "pgbouncer":
                with PgBouncer(
                    "127.0.0.1",
                    cluster.port,
                    pool_mode="transaction",
                    pool_size=args.pool_size,
                    max_client_conn=args.clients + 400,
                ) as bouncer:
                    modes[mode] = run_mode(args, plan, cluster, bouncer)
            else:
                modes[mode] = run_mode(args, plan, cluster, None)
            print(f"{mode}: done", flush=True)
    summarise(modes, args)
    print(f"\n  whole run: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
    else:
        main()
