"""The influxdb-client write path (INFLUXDB_API=v2, /api/v2/write) against a real
VictoriaMetrics, read back through its export API."""

import time

import numpy as np
import pytest

from agents.services import agents_update_states
from agents.types import AgentStateUpdate
from coalitions.services import coalition_add_member
from metrics import points
from metrics.models import OutboxPoint
from metrics.services import outbox_flush
from tests import factories

pytestmark = pytest.mark.django_db


def _export(victoria, match: str, expected: int) -> list[dict]:
    # VictoriaMetrics makes new samples searchable about a second after it ingests them.
    deadline = time.monotonic() + 30
    while True:
        series = victoria.export(match)
        if sum(len(s["values"]) for s in series) >= expected or time.monotonic() > deadline:
            return series
        time.sleep(0.2)


def test_agent_points_written_through_influxdb_client_are_all_there(tenant, victoria, influx_v2):
    agents = [factories.make_agent(tenant) for _ in range(5)]
    rng = np.random.default_rng(3)
    written = []
    for round_ in range(3):
        written += agents_update_states(
            tenant=tenant,
            updates=[
                AgentStateUpdate(
                    a.id, beliefs=rng.dirichlet(np.ones(8)), free_energy=round_ + i / 10
                )
                for i, a in enumerate(agents)
            ],
        )
    assert outbox_flush().sent == 15
    assert OutboxPoint.objects.count() == 0
    series = _export(
        victoria, f'{{__name__="agent_beliefs_free_energy",tenant_id="{tenant.id}"}}', 15
    )
    exported = {
        (s["metric"]["agent_id"], t): v
        for s in series
        for t, v in zip(s["timestamps"], s["values"], strict=True)
    }
    # VictoriaMetrics keeps milliseconds.
    expected = {
        (str(state.id), points.timestamp_ns(state.updated_at) // 1_000_000): round_ + i / 10
        for round_ in range(3)
        for i, state in enumerate(written[round_ * 5 : round_ * 5 + 5])
    }
    assert exported == pytest.approx(expected)


def test_coalition_points_written_through_influxdb_client(tenant, victoria, influx_v2):
    coalition = factories.make_coalition(tenant, total_revenue=120)
    for _ in range(3):
        agent = factories.make_agent(tenant)
        coalition_add_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)
    assert outbox_flush().sent == 3
    series = _export(
        victoria,
        f'{{__name__="coalition_performance_revenue_per_member",coalition_id="{coalition.id}"}}',
        3,
    )
    assert [v for s in series for v in s["values"]] == [120.0, 60.0, 40.0]
