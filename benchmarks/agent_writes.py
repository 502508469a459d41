"""Agent state updates: naive ORM loop vs the batched service vs a raw psycopg floor.

    .venv/bin/python benchmarks/agent_writes.py [--updates 20000] [--batch 1000] [--rounds 3]

Every variant writes 64-element float64 beliefs (encrypted) and energy, and appends
an agent_history row per update; (a) and (b) also refresh the Redis cache. (b) is the
service as the services issue defines it (history and cache refresh; METRICS_RECORD
and REALTIME_PUBLISH off); (b+) is the whole production path, which also writes the
metrics outbox in the transaction and publishes to websocket clients after commit.
Targets: (b) >= 5,000 updates/s; (b)/(a) >= 5; (b)/(c) >= 0.6.
"""

import argparse
import uuid

from common import interleaved, median, report, setup


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=20_000)
    parser.add_argument(
        "--naive-updates",
        type=int,
        default=2_000,
        help="The naive loop is slow; its rate is measured on fewer updates.",
    )
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    setup()

    import numpy as np
    import psycopg
    from django.core.cache import cache as django_cache
    from django.db import connection, transaction
    from django.test import override_settings

    from agents.encryption import encrypt_array
    from agents.models import Agent, AgentHistory, Tenant
    from agents.services import AgentSpec, agents_bulk_load, agents_update_states
    from agents.types import AgentStateUpdate
    from realtime.publisher import publisher

    tenant, _ = Tenant.objects.get_or_create(slug="bench-writes", defaults={"name": "Bench writes"})
    Agent.objects.filter(tenant=tenant).delete()
    rng = np.random.default_rng(0)
    agents_bulk_load(
        tenant=tenant,
        specs=(
            AgentSpec(name=f"w{i}", agent_type="worker", beliefs=rng.dirichlet(np.ones(64)))
            for i in range(args.updates)
        ),
    )
    ids = list(Agent.objects.filter(tenant=tenant).values_list("id", flat=True))
    beliefs = [rng.dirichlet(np.ones(64)) for _ in range(256)]

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

    def batched_full():
        done = batched()
        # Publishing runs on a background thread; its work belongs to this variant's time,
        # not to whichever variant runs next.
        publisher.flush(timeout=60)
        return done

    def batched_core():
        with override_settings(METRICS_RECORD=False, REALTIME_PUBLISH=False):
            return batched()

    def batched():
        for start in range(0, len(ids), args.batch):
            chunk = ids[start : start + args.batch]
            agents_update_states(
                tenant=tenant,
                updates=[
                    AgentStateUpdate(agent_id, beliefs=beliefs[n % 256], energy_level=n % 100)
                    for n, agent_id in enumerate(chunk, start)
                ],
            )
        return len(ids)

    # The floor is plain psycopg on its own connection, binding binary parameters on the
    # server: the fastest way this repo knows to send the same data.
    settings_db = connection.settings_dict
    raw = psycopg.connect(
        host=settings_db["HOST"],
        port=settings_db["PORT"],
        dbname=settings_db["NAME"],
        user=settings_db["USER"],
        password=settings_db["PASSWORD"],
    )

    def floor():
        for start in range(0, len(ids), args.batch):
            chunk = ids[start : start + args.batch]
            tokens = [
                encrypt_array(beliefs[n % 256], tenant_id=tenant.id)
                for n in range(start, start + len(chunk))
            ]
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
        return len(ids)

    connection.ensure_connection()
    print(
        f"{len(ids)} agents, {args.updates} updates per round for (b) and (c), "
        f"{args.naive_updates} for (a); batches of {args.batch}; {args.rounds} rounds interleaved"
    )
    rates = interleaved(
        {
            "(a) naive ORM save() loop": naive,
            "(b) batched service": batched_core,
            "(b+) with metrics outbox and publishing": batched_full,
            "(c) raw psycopg floor": floor,
        },
        args.rounds,
    )
    m = {name: median(values) for name, values in rates.items()}
    a, b, b_full, c = m.values()
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
            ("(b)/(c)", f"{b / c:.2f} (target >= 0.6)"),
            ("(b+)/(c)", f"{b_full / c:.2f} (the full path, for reference)"),
            ("(b+)/(b)", f"{b_full / b:.2f} (cost of metrics and publishing)"),
        ],
    )
    raw.close()
    Agent.objects.filter(tenant=tenant).delete()
    with connection.cursor() as cur:
        cur.execute("DELETE FROM agent_history WHERE agent_id = ANY(%s::uuid[])", [ids])


if __name__ == "__main__":
    main()
