"""Key rotation at scale: master keys in O(tenants), data keys online beside a writer.

    .venv/bin/python benchmarks/key_rotation.py [--rows 100000,1000000] [--tenants 10]
        [--agents 2000] [--writer-rate 2000] [--batch-size 2000] [--master-only]

For each history size in --rows (rows spread over 12 monthly partitions):
- master-key rotation time (target: flat in the row count, in seconds);
- data-key re-encryption of every row, in rows/s, alone and beside a writer committing
  agents_update_states batches at --writer-rate updates/s (target >= 10,000 rows/s);
- the writer's batch latency (median, p99) while re-encryption runs, against the same
  writer with nothing else running, measured in the same run.
"""

import argparse
import datetime
import threading
import time
import uuid

from common import median, percentile, report, setup

MONTHS = 12
WRITER_BATCH = 100


def fill(rows: int, tenants: int, agents: int) -> list:
    """Fresh tenants, agents and `rows` history rows with envelope tokens, by COPY."""
    import numpy as np
    from django.db import connection

    from agents.encryption import encrypt_array
    from agents.models import Tenant

    with connection.cursor() as c:
        c.execute("TRUNCATE agent_history, agents, tenants, tenant_data_keys CASCADE")
    owners = [Tenant.objects.create(name=f"T{i}", slug=f"t{i}") for i in range(tenants)]
    ids = [(uuid.uuid4(), owners[i % tenants].id) for i in range(agents)]
    beliefs = [np.random.default_rng(i).dirichlet(np.ones(16)) for i in range(64)]
    tokens = {t.id: [encrypt_array(b, tenant_id=t.id) for b in beliefs] for t in owners}
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    step = datetime.timedelta(days=MONTHS * 30) / max(rows, 1)
    with connection.cursor() as c:
        for m in range(MONTHS + 1):
            lo = (start + datetime.timedelta(days=31 * m)).replace(day=1)
            hi = (lo + datetime.timedelta(days=32)).replace(day=1)
            c.execute(
                f"CREATE TABLE IF NOT EXISTS agent_history_{lo:%Y_%m} PARTITION OF "
                f"agent_history FOR VALUES FROM ('{lo}') TO ('{hi}')"
            )
        with c.cursor.copy(
            "COPY agents (id, tenant_id, name, agent_type, belief_state, energy_level) FROM STDIN"
        ) as copy:
            for n, (agent_id, tenant_id) in enumerate(ids):
                copy.write_row((agent_id, tenant_id, f"a{n}", "t", tokens[tenant_id][n % 64], 50))
        with c.cursor.copy(
            "COPY agent_history (agent_id, recorded_at, belief_state, energy_level) FROM STDIN"
        ) as copy:
            for n in range(rows):
                agent_id, tenant_id = ids[n % agents]
                copy.write_row((agent_id, start + step * n, tokens[tenant_id][n % 64], 50))
        c.execute("ANALYZE")
    return owners


class Writer(threading.Thread):
    """Commits WRITER_BATCH-update batches at `rate` updates/s; records each latency."""

    def __init__(self, tenant, agent_ids, rate: float):
        super().__init__(daemon=True)
        self.tenant, self.agent_ids, self.rate = tenant, agent_ids, rate
        self.latencies: list[float] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        import numpy as np
        from django.db import connection

        from agents.services import agents_update_states
        from agents.types import AgentStateUpdate

        rng = np.random.default_rng(1)
        interval = WRITER_BATCH / self.rate
        next_at = time.perf_counter()
        try:
            while not self.stop.is_set():
                chosen = rng.choice(len(self.agent_ids), WRITER_BATCH, replace=False)
                updates = [
                    AgentStateUpdate(agent_id=self.agent_ids[i], beliefs=rng.dirichlet(np.ones(16)))
                    for i in chosen
                ]
                began = time.perf_counter()
                agents_update_states(tenant=self.tenant, updates=updates)
                self.latencies.append((time.perf_counter() - began) * 1000)
                next_at += interval
                time.sleep(max(0.0, next_at - time.perf_counter()))
        except BaseException as e:  # reported by main()
            self.error = e
        finally:
            connection.close()


def writer_alone(tenant, agent_ids, rate: float, seconds: float) -> list[float]:
    writer = Writer(tenant, agent_ids, rate)
    writer.start()
    time.sleep(seconds)
    writer.stop.set()
    writer.join()
    return writer.latencies


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="100000,1000000")
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--writer-rate", type=float, default=2000)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument(
        "--master-only",
        action="store_true",
        help="Measure master-key rotation only (for sizes where re-encrypting takes hours).",
    )
    args = parser.parse_args()
    if args.agents // args.tenants < WRITER_BATCH:
        parser.error(f"--agents / --tenants must be at least {WRITER_BATCH} (a writer batch)")
    setup()

    from agents.key_rotation import beliefs_reencrypt, data_keys_rotate, master_keys_rotate
    from agents.models import Agent

    print(
        f"tenants={args.tenants} agents={args.agents} writer={args.writer_rate:,.0f} updates/s "
        f"in batches of {WRITER_BATCH}; re-encryption batches of {args.batch_size}"
    )
    for rows in (int(r) for r in args.rows.split(",")):
        filled = time.perf_counter()
        owners = fill(rows, args.tenants, args.agents)
        filled = time.perf_counter() - filled
        tenant = owners[0]
        agent_ids = list(Agent.objects.filter(tenant=tenant).values_list("id", flat=True))

        master = []
        for _ in range(5):
            began = time.perf_counter()
            keys = master_keys_rotate()
            master.append(time.perf_counter() - began)
        master_row = (
            "master-key rotation",
            f"median {median(master) * 1000:.1f} ms for {keys} data keys",
        )
        if args.master_only:
            report(f"{rows:,} history rows (filled in {filled:.0f} s)", [master_row])
            continue

        data_keys_rotate([t.id for t in owners])
        began = time.perf_counter()
        alone = beliefs_reencrypt(batch_size=args.batch_size)
        alone_s = time.perf_counter() - began

        data_keys_rotate([t.id for t in owners])
        writer = Writer(tenant, agent_ids, args.writer_rate)
        writer.start()
        began = time.perf_counter()
        beside = beliefs_reencrypt(batch_size=args.batch_size)
        beside_s = time.perf_counter() - began
        writer.stop.set()
        writer.join()
        if writer.error:
            raise SystemExit(f"the writer failed: {writer.error!r}")
        during = writer.latencies
        baseline = writer_alone(tenant, agent_ids, args.writer_rate, max(beside_s, 5.0))

        report(
            f"{rows:,} history rows + {args.agents:,} agents (filled in {filled:.0f} s)",
            [
                master_row,
                (
                    "re-encrypt alone",
                    f"{alone.scanned / alone_s:,.0f} rows/s "
                    f"({alone.reencrypted:,} rows, {alone_s:.1f} s)",
                ),
                (
                    "re-encrypt beside the writer",
                    f"{beside.scanned / beside_s:,.0f} rows/s ({beside.reencrypted:,} rows, "
                    f"{beside_s:.1f} s; {beside.skipped_locked} skipped for a writer's lock)",
                ),
                (
                    "writer batch ms during rotation",
                    f"median {median(during):.1f}, p99 {percentile(during, 99):.1f} "
                    f"({len(during)} batches)",
                ),
                (
                    "writer batch ms alone (baseline)",
                    f"median {median(baseline):.1f}, p99 {percentile(baseline, 99):.1f} "
                    f"({len(baseline)} batches)",
                ),
                (
                    "p99 ratio during/alone",
                    f"{percentile(during, 99) / percentile(baseline, 99):.2f}",
                ),
            ],
        )


if __name__ == "__main__":
    main()
