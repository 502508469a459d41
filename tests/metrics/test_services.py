import logging
from decimal import Decimal
from io import StringIO

import numpy as np
import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from agents.beliefs import belief_stats
from agents.services import agent_adjust_energy, agents_update_states
from agents.types import AgentStateUpdate
from coalitions.services import coalition_add_member, coalition_remove_member
from metrics import points
from metrics.client import NOT_CONFIGURED
from metrics.models import DroppedPoints, OutboxPoint
from metrics.selectors import outbox_status
from metrics.services import (
    MEMBER_COUNT_NEGATIVE,
    agent_metrics_record,
    record_agent_belief_update,
    record_coalition_performance,
)
from tests import factories

pytestmark = pytest.mark.django_db


def _fields(line: str) -> dict:
    _, fields, _ = line.split(" ")
    return dict(pair.split("=", 1) for pair in fields.split(","))


def _update_all(tenant, agents, *, free_energy=1.5):
    rng = np.random.default_rng(7)
    return agents_update_states(
        tenant=tenant,
        updates=[
            AgentStateUpdate(a.id, beliefs=rng.dirichlet(np.ones(8)), free_energy=free_energy)
            for a in agents
        ],
    )


def test_agent_updates_queue_one_point_each_with_the_state_timestamp(tenant):
    agents = [factories.make_agent(tenant) for _ in range(3)]
    states = _update_all(tenant, agents)
    lines = list(OutboxPoint.objects.values_list("line", flat=True))
    assert len(lines) == 3
    by_agent = {line.split(",")[1].removeprefix("agent_id="): line for line in lines}
    for state in states:
        line = by_agent[str(state.id)]
        assert line.startswith(f"agent_beliefs,agent_id={state.id},tenant_id={tenant.id} ")
        assert line.endswith(f" {points.timestamp_ns(state.updated_at)}")
        fields = _fields(line)
        assert fields["free_energy"] == "1.5"
        assert float(fields["belief_entropy"]) == pytest.approx(belief_stats([state.beliefs])[0][0])
        assert fields["energy_level"] == f"{state.energy_level}i"


def test_outbox_never_holds_belief_values_by_default(tenant):
    agents = [factories.make_agent(tenant) for _ in range(2)]
    _update_all(tenant, agents)
    for line in OutboxPoint.objects.values_list("line", flat=True):
        assert not any(key.startswith("belief_") and key[7:].isdigit() for key in _fields(line))


def test_dimension_fields_are_written_when_the_operator_enables_them(tenant, settings):
    settings.METRICS_BELIEF_DIMENSIONS = True
    agent = factories.make_agent(tenant)
    agents_update_states(
        tenant=tenant, updates=[AgentStateUpdate(agent.id, beliefs=np.array([0.25, 0.75]))]
    )
    fields = _fields(OutboxPoint.objects.get().line)
    assert (fields["belief_0"], fields["belief_1"]) == ("0.25", "0.75")


def test_dimensions_beyond_the_maximum_are_skipped_with_a_warning(tenant, settings, caplog):
    settings.METRICS_BELIEF_DIMENSIONS = True
    settings.METRICS_BELIEF_DIMENSIONS_MAX = 4
    agent = factories.make_agent(tenant)
    with caplog.at_level(logging.WARNING, logger="metrics.services"):
        agents_update_states(
            tenant=tenant, updates=[AgentStateUpdate(agent.id, beliefs=np.full(5, 0.2))]
        )
    fields = _fields(OutboxPoint.objects.get().line)
    assert "belief_0" not in fields and "belief_entropy" in fields
    assert "METRICS_BELIEF_DIMENSIONS_MAX=4" in caplog.text


def test_a_rolled_back_update_leaves_no_point(tenant):
    agent = factories.make_agent(tenant)
    with pytest.raises(RuntimeError), transaction.atomic():
        _update_all(tenant, [agent])
        assert OutboxPoint.objects.count() == 1
        raise RuntimeError("the caller fails after the update")
    assert OutboxPoint.objects.count() == 0


def test_recording_adds_exactly_one_statement_per_batch(tenant, settings):
    agents = [factories.make_agent(tenant) for _ in range(50)]
    settings.METRICS_RECORD = False
    with CaptureQueriesContext(connection) as without:
        _update_all(tenant, agents)
    settings.METRICS_RECORD = True
    with CaptureQueriesContext(connection) as with_metrics:
        _update_all(tenant, agents)
    assert len(with_metrics) == len(without) + 1
    assert OutboxPoint.objects.count() == 50


def test_energy_adjustments_record_the_new_energy(tenant):
    agent = factories.make_agent(tenant, energy_level=40)
    state = agent_adjust_energy(tenant=tenant, agent_id=agent.id, delta=5)
    line = OutboxPoint.objects.get().line
    assert _fields(line) == {"energy_level": "45i"}
    assert line.endswith(f" {points.timestamp_ns(state.updated_at)}")


def test_a_point_that_cannot_be_built_never_fails_the_agent_write(tenant, caplog):
    agent = factories.make_agent(tenant)
    [state] = _update_all(tenant, [agent])
    broken = AgentStateUpdate(agent.id, free_energy="not a number")
    with caplog.at_level(logging.ERROR, logger="metrics.services"):
        agent_metrics_record(states=[state], updates=[broken])
    assert "not recorded" in caplog.text
    assert OutboxPoint.objects.count() == 1


def test_full_outbox_drops_new_points_counts_them_and_agents_keep_writing(tenant, settings, caplog):
    settings.METRICS_OUTBOX_MAX_POINTS = 3
    agents = [factories.make_agent(tenant) for _ in range(2)]
    with caplog.at_level(logging.ERROR, logger="metrics.services"):
        for energy in range(5):
            states = agents_update_states(
                tenant=tenant,
                updates=[AgentStateUpdate(a.id, energy_level=energy) for a in agents],
            )
            assert [s.energy_level for s in states] == [energy, energy]
    # Batches of two points: the backlog goes 0 -> 2 -> 4, then it is at the cap and the
    # last three batches are dropped whole.
    assert OutboxPoint.objects.count() == 4
    assert sum(DroppedPoints.objects.values_list("points", flat=True)) == 6
    status = outbox_status(exact=True)
    assert (status.pending, status.full, status.dropped_points) == (4, True, 6)
    # The first refused batch is logged at once; the rest wait for the summary.
    assert caplog.text.count("Metrics outbox is full") == 1


def test_collector_api_records_belief_update(tenant):
    agent = factories.make_agent(tenant)
    record_agent_belief_update(agent=agent, beliefs=np.array([0.5, 0.5]), free_energy=2.0)
    fields = _fields(OutboxPoint.objects.get().line)
    assert fields["free_energy"] == "2.0"
    assert float(fields["belief_entropy"]) == pytest.approx(np.log(2))
    assert (fields["max_belief"], fields["belief_variance"]) == ("0.5", "0.0")


def test_collector_api_records_coalition_performance(tenant):
    coalition = factories.make_coalition(tenant)
    record_coalition_performance(coalition=coalition, member_count=0, revenue=50, efficiency=0.8)
    fields = _fields(OutboxPoint.objects.get().line)
    assert fields == {
        "member_count": "0i",
        "revenue": "50.0",
        "efficiency": "0.8",
        "revenue_per_member": "0.0",
    }
    with pytest.raises(ValidationError) as error:
        record_coalition_performance(coalition=coalition, member_count=-1, revenue=1, efficiency=1)
    assert MEMBER_COUNT_NEGATIVE.format(value=-1) in error.value.messages


def test_membership_changes_record_coalition_performance(tenant):
    coalition = factories.make_coalition(tenant, total_revenue=Decimal("90.00"))
    agents = [factories.make_agent(tenant) for _ in range(3)]
    for agent in agents:
        coalition_add_member(tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)
    coalition_remove_member(tenant=tenant, coalition_id=coalition.id, agent_id=agents[0].id)
    lines = list(OutboxPoint.objects.order_by("id").values_list("line", flat=True))
    assert [_fields(line)["member_count"] for line in lines] == ["1i", "2i", "3i", "2i"]
    assert _fields(lines[2])["revenue_per_member"] == "30.0"
    assert all(f"coalition_id={coalition.id},tenant_id={tenant.id} " in line for line in lines)


def test_without_influxdb_url_agents_write_and_flush_says_why(tenant, influx_unset):
    agent = factories.make_agent(tenant)
    _update_all(tenant, [agent])
    with pytest.raises(CommandError) as error:
        call_command("flush_metrics", stdout=StringIO())
    assert NOT_CONFIGURED in str(error.value)
    assert "1 point(s) wait in the outbox, intact" in str(error.value)
    assert OutboxPoint.objects.count() == 1


def test_backlog_command_reports_pending_cap_and_configuration(tenant, influx_unset, settings):
    settings.METRICS_OUTBOX_MAX_POINTS = 10
    agents = [factories.make_agent(tenant) for _ in range(4)]
    _update_all(tenant, agents)
    out = StringIO()
    call_command("metrics_backlog", "--exact", stdout=out)
    text = out.getvalue()
    assert "pending: 4 point(s) (rows counted)" in text
    assert "cap: 10 (40.0% used)" in text
    assert "dropped (outbox full): 0 not acknowledged; 0 acknowledged" in text
    assert "INFLUXDB_URL is not set" in text
