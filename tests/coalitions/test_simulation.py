"""coalitions.simulation and `manage.py simulate`, committing into the real PostgreSQL:
each tick is one transaction of the services' writes."""

import signal
import subprocess
import sys
import threading
import time
from io import StringIO

import h3
import numpy as np
import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import connection, transaction

from agents.models import Agent, AgentStatus
from coalitions import simulation as simulation_module
from coalitions.demo import demo_load
from coalitions.models import CoalitionMember
from coalitions.simulation import (
    MAX_RATE,
    NO_AGENTS,
    TENANT_UNKNOWN,
    WAKE_ENERGY,
    Simulation,
    simulation_prepare,
)
from tests import factories
from tests.processes import stop_process
from tests.realtime.helpers import ROOT, server_env

# Committed ticks, as the command makes them: the simulation's picture advances on commit.
pytestmark = pytest.mark.django_db(transaction=True)

DEMO = "demo-city"


@pytest.fixture
def demo():
    """The demo tenant with 60 agents and its six coalitions."""
    return demo_load(tenant_slug=DEMO, agents=60).tenant


def _cells(tenant) -> dict:
    return dict(Agent.objects.filter(tenant=tenant).values_list("id", "location_h3"))


def _history_rows(tenant) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM agent_history h JOIN agents a ON a.id = h.agent_id "
            "WHERE a.tenant_id = %s",
            [tenant.id],
        )
        return cursor.fetchone()[0]


def _scores(tenant) -> dict:
    return {
        (m.coalition_id, m.agent_id): m.contribution_score
        for m in CoalitionMember.objects.filter(coalition__tenant=tenant)
    }


def test_moves_go_to_a_neighbouring_cell_and_the_database_follows(demo):
    sim = simulation_prepare(tenant_slug=DEMO, rate=200, seed=1)
    moved = 0
    for _ in range(10):
        before = _cells(demo)
        plan = sim.tick()
        after = _cells(demo)
        for update in plan.updates:
            old, new = before[update.agent_id], after[update.agent_id]
            if isinstance(update.location_h3, str):
                moved += 1
                assert new == update.location_h3
                assert new in h3.grid_disk(old, 1) and new != old
                assert h3.is_valid_cell(new) and h3.get_resolution(new) == h3.get_resolution(old)
            else:
                assert new == old
        # Agents the tick did not pick stay where they were.
        untouched = set(before) - {u.agent_id for u in plan.updates}
        assert all(before[a] == after[a] for a in untouched)
    assert moved > 50


def test_agents_stay_inside_the_area_they_started_in(demo):
    sim = simulation_prepare(tenant_slug=DEMO, rate=500, seed=2)
    (centre, radius), *_ = sim.area.disks.values()
    for _ in range(60):
        sim.tick()
    assert all(h3.grid_distance(centre, cell) <= radius for cell in _cells(demo).values())


def test_energy_stays_in_range_tired_agents_rest_and_rested_ones_move_again(tenant):
    agent = factories.make_agent(tenant, energy_level=1, status=AgentStatus.ACTIVE)
    sim = simulation_prepare(tenant_slug=tenant.slug, rate=1, seed=3)
    cell = agent.location_h3

    sim.tick()
    agent.refresh_from_db()
    # Out of energy after the move: it rests where it arrived.
    assert (agent.energy_level, agent.status) == (0, AgentStatus.INACTIVE)
    assert agent.location_h3 in h3.grid_ring(cell, 1)

    resting_cell, energies = agent.location_h3, []
    while agent.status == AgentStatus.INACTIVE:
        sim.tick()
        agent.refresh_from_db()
        energies.append(agent.energy_level)
        if agent.status == AgentStatus.INACTIVE:
            assert agent.location_h3 == resting_cell
        assert len(energies) <= WAKE_ENERGY
    assert energies == sorted(energies) and energies[-1] >= WAKE_ENERGY
    assert all(0 <= e <= 100 for e in energies)


def test_energy_stays_in_range_over_many_ticks(demo):
    sim = simulation_prepare(tenant_slug=DEMO, rate=1000, seed=4)
    for _ in range(40):
        for update in sim.tick().updates:
            assert 0 <= update.energy_level <= 100
    energies = list(Agent.objects.filter(tenant=demo).values_list("energy_level", flat=True))
    assert all(0 <= e <= 100 for e in energies)
    assert {AgentStatus.ACTIVE, AgentStatus.INACTIVE} <= set(
        Agent.objects.filter(tenant=demo).values_list("status", flat=True)
    )


def test_every_update_appends_a_history_row_with_new_beliefs(demo):
    agent = Agent.objects.filter(tenant=demo, status=AgentStatus.ACTIVE).order_by("id").first()
    beliefs_before = agent.belief_state
    rows_before = _history_rows(demo)
    sim = simulation_prepare(tenant_slug=DEMO, rate=600, seed=5)  # every agent, every tick
    # Suspended agents are an operator's decision: the simulation leaves them alone.
    moving = Agent.objects.filter(tenant=demo).exclude(status=AgentStatus.SUSPENDED).count()

    for _ in range(3):
        sim.tick()

    assert sim.batch_size == len(sim.walkers) == moving
    assert _history_rows(demo) == rows_before + 3 * moving
    agent.refresh_from_db()
    assert agent.belief_state.shape == beliefs_before.shape
    assert not np.allclose(agent.belief_state, beliefs_before)
    assert agent.belief_state.sum() == pytest.approx(1.0)


def test_coalition_scores_change_within_range(demo):
    before = _scores(demo)
    # One agent a second: a tick a second, and a coalition's scores drift every tick.
    sim = simulation_prepare(tenant_slug=DEMO, rate=1, seed=6)
    assert len(sim.coalitions) == 6
    assert sim.score_every == 1

    for _ in range(len(sim.coalitions)):
        plan = sim.tick()
        assert plan.scores

    after = _scores(demo)
    changed_coalitions = {key[0] for key in before if after[key] != before[key]}
    assert len(changed_coalitions) == 6
    assert all(abs(after[key] - before[key]) < 5 for key in before)


def test_scores_drift_about_once_a_second(demo):
    sim = simulation_prepare(tenant_slug=DEMO, rate=50, seed=14)
    assert (sim.interval, sim.score_every) == (pytest.approx(0.1), 10)

    plans = [sim.tick() for _ in range(21)]

    assert [i for i, plan in enumerate(plans) if plan.scores] == [0, 10, 20]
    assert len({plans[i].coalition_id for i in (0, 10, 20)}) == 3


def test_a_tick_a_service_refuses_writes_nothing(demo, monkeypatch):
    sim = simulation_prepare(tenant_slug=DEMO, rate=100, seed=7)
    cells, rows, scores = _cells(demo), _history_rows(demo), _scores(demo)
    picture = [(w.agent_id, w.cell, w.energy) for w in sim.walkers]

    def refuse(**kwargs):
        raise ValidationError("refused after the agents were written")

    # The agents' batch is written first, in the same transaction; the refusal undoes it.
    monkeypatch.setattr(simulation_module, "coalition_members_sync", refuse)
    with pytest.raises(ValidationError):
        sim.tick()

    assert (_cells(demo), _history_rows(demo), _scores(demo)) == (cells, rows, scores)
    assert [(w.agent_id, w.cell, w.energy) for w in sim.walkers] == picture
    assert sim.ticks == 0


def test_a_tick_inside_a_transaction_that_rolls_back_writes_nothing(demo):
    sim = simulation_prepare(tenant_slug=DEMO, rate=100, seed=8)
    cells, rows, scores = _cells(demo), _history_rows(demo), _scores(demo)
    picture = [(w.agent_id, w.cell, w.energy) for w in sim.walkers]

    with pytest.raises(RuntimeError), transaction.atomic():
        sim.tick()
        raise RuntimeError("rolled back")

    assert (_cells(demo), _history_rows(demo), _scores(demo)) == (cells, rows, scores)
    # The picture did not advance either, so the next tick moves from the real cells.
    assert [(w.agent_id, w.cell, w.energy) for w in sim.walkers] == picture


def test_the_same_seed_plans_the_same_ticks(demo):
    def first_plan(seed):
        plan = simulation_prepare(tenant_slug=DEMO, rate=100, seed=seed).plan_tick()
        return [
            (u.agent_id, u.location_h3, u.energy_level, u.status, u.beliefs.round(12).tolist())
            for u in plan.updates
        ], plan.scores

    assert first_plan(9) == first_plan(9)
    assert first_plan(9) != first_plan(10)


def test_a_run_stops_after_the_tick_in_flight(demo, monkeypatch):
    sim = simulation_prepare(tenant_slug=DEMO, rate=MAX_RATE, seed=11)
    stop = threading.Event()
    apply = sim.apply

    def apply_then_ask_to_stop(plan):
        stop.set()  # as Ctrl-C during the tick would
        apply(plan)

    monkeypatch.setattr(sim, "apply", apply_then_ask_to_stop)
    report = sim.run(stop=stop)

    assert (report.ticks, report.stopped) == (1, True)
    assert sim.ticks == 1


def test_a_run_re_reads_the_tenant_after_an_agent_is_deleted(demo):
    sim = simulation_prepare(tenant_slug=DEMO, rate=600, seed=12)
    moving = len(sim.walkers)
    Agent.objects.filter(pk=sim.walkers[0].agent_id).delete()

    report = sim.run(ticks=2)

    assert (report.ticks, report.refused) == (2, 1)
    assert len(sim.walkers) == moving - 1


def test_a_run_paces_ticks_to_the_rate(demo):
    sim = simulation_prepare(tenant_slug=DEMO, rate=100, seed=13)
    assert (sim.batch_size, sim.interval) == (10, pytest.approx(0.1))
    started = time.monotonic()
    report = sim.run(ticks=5)
    # Four waits of a tenth of a second between five ticks.
    assert time.monotonic() - started >= 0.39
    assert (report.ticks, report.updates) == (5, 50)


def test_prepare_refuses_an_unknown_tenant_and_a_tenant_without_agents(tenant):
    with pytest.raises(ValidationError) as unknown:
        simulation_prepare(tenant_slug="nowhere", rate=10)
    assert unknown.value.messages == [TENANT_UNKNOWN.format(slug="nowhere")]
    with pytest.raises(ValidationError) as empty:
        simulation_prepare(tenant_slug=tenant.slug, rate=10)
    assert empty.value.messages == [NO_AGENTS.format(slug=tenant.slug)]


@pytest.mark.parametrize("rate", [0, -1, MAX_RATE + 1, float("nan"), float("inf"), True, "50"])
def test_prepare_refuses_a_bad_rate(demo, rate):
    with pytest.raises(ValidationError, match="rate: must be"):
        simulation_prepare(tenant_slug=DEMO, rate=rate)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"ticks": 0}, "ticks: must be a positive integer"),
        ({"duration": 0}, "duration: must be a positive number"),
        ({"duration": float("nan")}, "duration: must be a positive number"),
    ],
)
def test_run_refuses_bad_bounds(demo, options, expected):
    sim = Simulation(tenant=demo, rate=10, seed=0)
    with pytest.raises(ValidationError, match=expected):
        sim.run(**options)


# The command ---------------------------------------------------------------------------


def test_the_command_runs_ticks_and_reports(demo):
    rows_before = _history_rows(demo)
    moving = Agent.objects.filter(tenant=demo).exclude(status=AgentStatus.SUSPENDED).count()
    out = StringIO()
    call_command(
        "simulate", "--tenant", DEMO, "--rate", "600", "--ticks", "3", "--seed", "1", stdout=out
    )
    text = out.getvalue()
    assert f"Simulating demo-city: {moving} agents, 6 coalitions" in text
    assert "seed 1" in text
    assert f"done: 3 ticks, {3 * moving} agent updates" in text
    assert _history_rows(demo) == rows_before + 3 * moving


def test_the_command_stops_after_its_duration(demo):
    out = StringIO()
    call_command("simulate", "--tenant", DEMO, "--rate", "20", "--duration", "0.5", stdout=out)
    assert "done: " in out.getvalue()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--tenant", "nowhere"], "no tenant with slug 'nowhere'; run `manage.py seed_demo`"),
        (["--rate", "0"], "rate: must be a number of updates per second"),
        (["--rate", "fast"], "argument --rate: invalid float value: 'fast'"),
        (["--rate", "1e9"], "rate: must be a number of updates per second"),
        (["--ticks", "0"], "ticks: must be a positive integer"),
    ],
)
def test_the_command_refuses_bad_input_in_one_line(demo, argv, expected):
    with pytest.raises(CommandError) as refused:
        call_command("simulate", *argv, stdout=StringIO())
    assert expected in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.slow
def test_ctrl_c_stops_the_command_after_the_current_tick(demo):
    rows_before = _history_rows(demo)
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "simulate", "--tenant", DEMO, "--rate", "50", "--seed", "3"],
        cwd=ROOT,
        env=server_env({"PYTHONUNBUFFERED": "1"}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The banner comes before the first tick; then let it tick for a while.
        assert proc.stdout.readline().startswith("Simulating demo-city")
        deadline = time.monotonic() + 30
        while _history_rows(demo) < rows_before + 100:
            assert time.monotonic() < deadline, "the simulation wrote nothing"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        stop_process(proc, 10)
    assert proc.returncode == 0, err
    assert "stopped: " in out
    ticks = int(out.split("stopped: ")[1].split(" ticks")[0])
    # Every tick it reports was written whole: five agents each, nothing half done.
    assert _history_rows(demo) == rows_before + 5 * ticks
