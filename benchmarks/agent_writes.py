"""Agent state updates: naive ORM loop vs the batched service vs a raw psycopg floor;
the batched service with several writer processes; belief statistics per update frame.

    .venv/bin/python benchmarks/agent_writes.py [--updates 20000] [--batch 1000] [--rounds 3]
    .venv/bin/python benchmarks/agent_writes.py --scenario scaling [--writers 1,2,4] [--seconds 20]
    .venv/bin/python benchmarks/agent_writes.py --scenario summary

writes (the default). Every variant writes 64-element float64 beliefs (encrypted) and
energy, and appends an agent_history row per update; (a) and (b) also refresh the Redis
cache. (b) is the service as the services issue defines it (history and cache refresh;
METRICS_RECORD and REALTIME_PUBLISH off); (b+) is the whole production path, which also
writes the metrics outbox in the transaction and publishes to websocket clients after
commit; (c) is the floor. (b), (b+) and (c) take turns every --block batches, the order
rotating, so bursts of load from the machine's other users hit all three alike; (a) runs
once per round. Targets: (b) >= 5,000 updates/s; (b)/(a) >= 5; (b)/(c) >= 0.8;
(b+)/(c) >= 0.7.

scaling. The batched service (b) in 1, 2 and 4 writer processes at once, each on its own
agents, for --seconds; the CPU each process took meanwhile (the writers, their PostgreSQL
backends, PostgreSQL's own processes, redis-server, everything else on the machine).

summary. agents.beliefs.belief_summary, which the real-time hub runs for every update
frame sent to a reader of beliefs, against the numpy-methods version it replaced
(tests/agents/test_beliefs.py keeps it as the reference), on 8- to 64-element arrays.
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import ROOT, interleaved, median, report, setup


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", choices=("writes", "scaling", "summary"), default="writes")
    parser.add_argument("--updates", type=int, default=20_000)
    parser.add_argument(
        "--naive-updates",
        type=int,
        default=2_000,
        help="The naive loop is slow; its rate is measured on fewer updates.",
    )
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--block", type=int, default=4, help="writes: batches per turn.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writers", default="1,2,4", help="scaling: writer process counts.")
    parser.add_argument("--seconds", type=float, default=20.0, help="scaling: per measurement.")
    parser.add_argument(
        "--agents-per-writer", type=int, default=5_000, help="scaling: each writer's agents."
    )
    # A writer process of the scaling scenario (started by it, not by hand).
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _writer_child(args)
    {"writes": writes, "scaling": scaling, "summary": summary}[args.scenario](args)


def _agents(count: int, slug: str):
    """A tenant with `count` agents (64-element beliefs); returns (tenant, ids, beliefs)."""
    import numpy as np

    from agents.models import Agent, Tenant
    from agents.services import AgentSpec, agents_bulk_load

    tenant, _ = Tenant.objects.get_or_create(slug=slug, defaults={"name": slug})
    _forget(tenant)
    rng = np.random.default_rng(0)
    agents_bulk_load(
        tenant=tenant,
        specs=(
            AgentSpec(name=f"w{i}", agent_type="worker", beliefs=rng.dirichlet(np.ones(64)))
            for i in range(count)
        ),
    )
    ids = list(Agent.objects.filter(tenant=tenant).order_by("name").values_list("id", flat=True))
    return tenant, ids, [rng.dirichlet(np.ones(64)) for _ in range(256)]


def _forget(tenant) -> None:
    from django.db import connection

    from agents.models import Agent

    ids = list(Agent.objects.filter(tenant=tenant).values_list("id", flat=True))
    Agent.objects.filter(tenant=tenant).delete()
    with connection.cursor() as cur:
        cur.execute("DELETE FROM agent_history WHERE agent_id = ANY(%s::uuid[])", [ids])


def _updates(chunk, start, beliefs):
    from agents.types import AgentStateUpdate

    return [
        AgentStateUpdate(agent_id, beliefs=beliefs[n % 256], energy_level=n % 100)
        for n, agent_id in enumerate(chunk, start)
    ]


def writes(args):
    setup()

    import psycopg
    from django.core.cache import cache as django_cache
    from django.db import connection, transaction
    from django.test import override_settings

    from agents import data_keys
    from agents.encryption import encode_array, encrypt_array
    from agents.models import Agent, AgentHistory
    from agents.services import agents_update_states
    from realtime.publisher import publisher

    tenant, ids, beliefs = _agents(args.updates, "bench-writes")
    batches = [(start, ids[start : start + args.batch]) for start in range(0, len(ids), args.batch)]

    def naive():
        for n, agent_id in enumerate(ids[: args.naive_updates]):
            with transaction.atomic():
                agent = Agent.objects.get(pk=agent_id)
                agent.belief_state = beliefs[n % 256]
                agent.energy_level = n % 100
                agent.save()
                AgentHistory.objects.create(
                    agent_id=agent.id, belief_state=agent.belief_state, energy_level=n % 100
                )
                token = encrypt_array(agent.belief_state, tenant_id=tenant.id)
                transaction.on_commit(
                    lambda a=agent_id, t=token: django_cache.set(f"agent:beliefs:{a}", t, 300)
                )
        return args.naive_updates

    def batched_core(block):
        with override_settings(METRICS_RECORD=False, REALTIME_PUBLISH=False):
            for start, chunk in block:
                agents_update_states(tenant=tenant, updates=_updates(chunk, start, beliefs))

    def batched_full(block):
        for start, chunk in block:
            agents_update_states(tenant=tenant, updates=_updates(chunk, start, beliefs))
        # Publishing runs on a background thread; its work belongs to this variant's
        # time, not to whichever variant runs next.
        publisher.flush(timeout=60)

    # The floor is plain psycopg on its own connection, binding binary parameters on the
    # server: the fastest way this repo knows to send the same data. Its tokens are what
    # agents.encryption makes (the FAE1 envelope around a Fernet token), encrypted as
    # the service does since issue 16: one read of the random source for a batch's IVs.
    settings_db = connection.settings_dict
    raw = psycopg.connect(
        host=settings_db["HOST"],
        port=settings_db["PORT"],
        dbname=settings_db["NAME"],
        user=settings_db["USER"],
        password=settings_db["PASSWORD"],
    )

    def floor_tokens(arrays):
        key = data_keys.active_key(tenant.id)
        header = b"FAE1" + struct.pack(">I", key.id)
        ivs, now = os.urandom(16 * len(arrays)), int(time.time())
        encrypt = key.fernet._encrypt_from_parts
        return [
            header + encrypt(encode_array(array), now, ivs[16 * i : 16 * i + 16])
            for i, array in enumerate(arrays)
        ]

    def floor(block):
        for start, chunk in block:
            tokens = floor_tokens([beliefs[n % 256] for n in range(start, start + len(chunk))])
            energies = [n % 100 for n in range(start, start + len(chunk))]
            with raw.transaction(), raw.cursor() as cur:
                cur.execute(
                    "UPDATE agents AS a SET belief_state = v.b, energy_level = v.e, "
                    "last_active_at = now() FROM unnest(%b::uuid[], %b::bytea[], %b::int[]) "
                    "AS v(id, b, e) WHERE a.id = v.id",
                    [chunk, tokens, energies],
                )
                with cur.copy(
                    "COPY agent_history (id, agent_id, recorded_at, belief_state, energy_level) "
                    "FROM STDIN"
                ) as copy:
                    for agent_id, token, energy in zip(chunk, tokens, energies, strict=True):
                        copy.write_row((uuid.uuid4(), agent_id, "now", token, energy))

    connection.ensure_connection()
    print(
        f"{len(ids)} agents, {args.updates} updates per round for (b), (b+) and (c), "
        f"{args.naive_updates} for (a); batches of {args.batch}, turns of {args.block} "
        f"batches; {args.rounds} rounds"
    )
    turns = {
        "(b) batched service": batched_core,
        "(b+) with metrics outbox and publishing": batched_full,
        "(c) raw psycopg floor": floor,
    }
    names = list(turns)
    rates: dict[str, list[float]] = {"(a) naive ORM save() loop": [], **{n: [] for n in names}}
    for _ in range(args.rounds):
        rates["(a) naive ORM save() loop"] += interleaved({"a": naive}, 1)["a"]
        spent = dict.fromkeys(names, 0.0)
        for k, start in enumerate(range(0, len(batches), args.block)):
            block = batches[start : start + args.block]
            for name in names[k % 3 :] + names[: k % 3]:
                began = time.perf_counter()
                turns[name](block)
                spent[name] += time.perf_counter() - began
        for name in names:
            rates[name].append(len(ids) / spent[name])
    m = {name: median(values) for name, values in rates.items()}
    a, b, b_full, c = m.values()

    def per_round(x, y):
        return median([p / q for p, q in zip(rates[names[x]], rates[names[y]], strict=True)])

    report(
        "agent state updates per second (medians)",
        [
            (
                name,
                f"{rate:,.0f} updates/s  (rounds: {', '.join(f'{r:,.0f}' for r in rates[name])})",
            )
            for name, rate in m.items()
        ]
        + [
            ("(b) target", f"{b:,.0f} >= 5,000: {'met' if b >= 5000 else 'MISSED'}"),
            ("(b)/(a)", f"{b / a:.1f} (target >= 5)"),
            ("(b)/(c)", f"{b / c:.2f} (per round {per_round(0, 2):.2f}; target >= 0.8)"),
            ("(b+)/(c)", f"{b_full / c:.2f} (per round {per_round(1, 2):.2f}; target >= 0.7)"),
            ("(b+)/(b)", f"{b_full / b:.2f} (cost of metrics and publishing)"),
        ],
    )
    raw.close()
    _forget(tenant)


# Scaling -------------------------------------------------------------------------------


def scaling(args):
    import psutil

    setup()
    from django.conf import settings
    from django.db import connection

    counts = [int(n) for n in args.writers.split(",")]
    tenant, ids, _ = _agents(args.agents_per_writer * max(counts), "bench-writes-scaling")
    database = connection.settings_dict["NAME"]
    redis_port = int(settings.CACHES["default"]["LOCATION"].rsplit(":", 1)[1].split("/")[0])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"tenant": str(tenant.id), "ids": [str(i) for i in ids]}, f)
        ids_file = f.name
    print(
        f"batched service (b), batches of {args.batch}, {args.agents_per_writer} agents per "
        f"writer, {args.seconds:.0f} s per measurement, {args.rounds} round(s); "
        f"{psutil.cpu_count()} cores"
    )
    results: dict[int, list[dict]] = {n: [] for n in counts}
    try:
        for _ in range(args.rounds):
            for writers in counts:
                results[writers].append(
                    _measure_writers(args, writers, ids_file, database, redis_port)
                )
    finally:
        os.unlink(ids_file)
        _forget(tenant)
    one = median([r["rate"] for r in results[counts[0]]])
    rows = []
    for writers in counts:
        runs = results[writers]
        rate = median([r["rate"] for r in runs])
        cpu = {k: median([r["cpu"][k] for r in runs]) for k in runs[0]["cpu"]}
        per_writer = ", ".join(f"{c:.2f}" for c in runs[len(runs) // 2]["per_writer"])
        rows.append(
            (
                f"{writers} writer(s)",
                f"{rate:,.0f} updates/s ({rate / writers:,.0f} each, x{rate / one:.2f}); "
                "rounds: " + ", ".join(f"{r['rate']:,.0f}" for r in runs),
            )
        )
        rows.append(
            (
                "  CPU, cores",
                f"writers {cpu['writers']:.2f} ({per_writer}), their PostgreSQL backends "
                f"{cpu['backends']:.2f}, PostgreSQL's own processes {cpu['postgres']:.2f}, "
                f"redis-server {cpu['redis']:.2f}, everything else {cpu['other']:.2f}; "
                f"machine busy {cpu['busy']:.2f} of {psutil.cpu_count()}",
            )
        )
    report("writer processes, batched service (medians of rounds)", rows)


def _measure_writers(args, writers, ids_file, database, redis_port) -> dict:
    import psutil

    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                f"{ids_file}:{i}",
                "--batch",
                str(args.batch),
                "--seconds",
                str(args.seconds),
                "--agents-per-writer",
                str(args.agents_per_writer),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i in range(writers)
    ]
    try:
        ready = [json.loads(p.stdout.readline()) for p in procs]
        backends = {pid for r in ready for pid in r["backends"]}
        processes = _processes(database, redis_port, [p.pid for p in procs], backends)
        before = _cpu(processes)
        machine_before = psutil.cpu_times()
        began = time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        done = [json.loads(p.stdout.readline()) for p in procs]
        elapsed = time.perf_counter() - began
        after = _cpu(processes)
        machine_after = psutil.cpu_times()
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)
    spent = {pid: (after.get(pid, 0.0) - before.get(pid, 0.0)) / elapsed for pid in before}
    cpu = {
        kind: sum(spent.get(pid, 0.0) for pid in pids)
        for kind, pids in processes.items()
        if kind != "all"
    }
    idle = (machine_after.idle - machine_before.idle) + (
        machine_after.iowait - machine_before.iowait
    )
    cpu["busy"] = psutil.cpu_count() - idle / elapsed
    cpu["other"] = cpu["busy"] - sum(cpu[k] for k in ("writers", "backends", "postgres", "redis"))
    return {
        "rate": sum(d["updates"] for d in done) / elapsed,
        "cpu": cpu,
        "per_writer": [spent.get(p.pid, 0.0) for p in procs],
    }


def _processes(database, redis_port, writer_pids, backend_pids) -> dict[str, list[int]]:
    """The processes whose CPU is counted, by kind: the writers, their PostgreSQL backends,
    the server's own processes (postmaster, checkpointer, WAL writer, autovacuum...) and
    redis-server on our port. Other sessions of the server (other people's) are not ours."""
    import psutil
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SHOW data_directory")
        postmaster = int(Path(cur.fetchone()[0], "postmaster.pid").read_text().split()[0])
    kinds = {"writers": list(writer_pids), "backends": [], "postgres": [postmaster], "redis": []}
    for child in psutil.Process(postmaster).children():
        cmdline = " ".join(child.cmdline())
        if child.pid in backend_pids:
            kinds["backends"].append(child.pid)
        elif not _is_session(cmdline):
            kinds["postgres"].append(child.pid)
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        if proc.info["name"] == "redis-server" and f":{redis_port}" in " ".join(
            proc.info["cmdline"] or []
        ):
            kinds["redis"].append(proc.info["pid"])
    return kinds


def _is_session(cmdline: str) -> bool:
    # A backend serving a client names its client's address; a parallel worker serves
    # one. The server's own processes (checkpointer, walwriter, autovacuum...) do not.
    return "(" in cmdline or "[local]" in cmdline or "parallel worker" in cmdline


def _cpu(processes) -> dict[int, float]:
    import psutil

    seconds = {}
    for pids in processes.values():
        for pid in pids:
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.NoSuchProcess:
                continue
            seconds[pid] = times.user + times.system
    return seconds


def _writer_child(args) -> None:
    ids_file, index = args.child.rsplit(":", 1)
    setup(database=False)
    import numpy as np
    from django.conf import settings
    from django.db import connection

    from agents.models import Tenant
    from agents.services import agents_update_states

    settings.METRICS_RECORD = False
    settings.REALTIME_PUBLISH = False
    data = json.loads(Path(ids_file).read_text())
    tenant = Tenant.objects.get(id=data["tenant"])
    per = args.agents_per_writer
    mine = [uuid.UUID(i) for i in data["ids"][int(index) * per : (int(index) + 1) * per]]
    rng = np.random.default_rng(int(index))
    beliefs = [rng.dirichlet(np.ones(64)) for _ in range(256)]
    batches = [(s, mine[s : s + args.batch]) for s in range(0, len(mine), args.batch)]
    # Warm up (connections, data key, caches), then wait for the others.
    agents_update_states(tenant=tenant, updates=_updates(batches[0][1], 0, beliefs))
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        backends = [cur.fetchone()[0]]
    print(json.dumps({"backends": backends}), flush=True)
    sys.stdin.readline()
    updates, began, k = 0, time.perf_counter(), 0
    while time.perf_counter() - began < args.seconds:
        start, chunk = batches[k % len(batches)]
        agents_update_states(tenant=tenant, updates=_updates(chunk, start, beliefs))
        updates += len(chunk)
        k += 1
    print(json.dumps({"updates": updates, "elapsed": time.perf_counter() - began}), flush=True)
    sys.stdin.readline()


# Belief statistics -----------------------------------------------------------------------


def summary(args):
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from agents.beliefs import belief_summary
    from tests.agents.test_beliefs import reference_summary

    calls = 20_000
    rng = np.random.default_rng(0)
    rows = []
    for size in (8, 16, 64):
        arrays = [rng.dirichlet(np.ones(size)) for _ in range(64)]
        assert all(repr(belief_summary(a)) == repr(reference_summary(a)) for a in arrays)

        def run(function, arrays=arrays):
            def go():
                for i in range(calls):
                    function(arrays[i % 64])
                return calls

            return go

        rates = interleaved(
            {"before": run(reference_summary), "after": run(belief_summary)}, args.rounds * 3
        )
        before, after = (1e6 / median(rates[k]) for k in ("before", "after"))
        rows.append(
            (
                f"{size}-element float64",
                f"before {before:.1f} us, after {after:.1f} us per call: x{before / after:.1f}",
            )
        )
    report(
        f"belief_summary per update frame (medians of {args.rounds * 3} rounds of {calls:,} calls)",
        rows,
    )


if __name__ == "__main__":
    main()
