import datetime
import uuid

import numpy as np
import pytest

from agents.beliefs import belief_entropy, belief_stats
from metrics import points

AGENT = uuid.UUID("00000000-0000-0000-0000-0000000000a1")
TENANT = uuid.UUID("00000000-0000-0000-0000-0000000000b2")


def test_timestamp_is_exact_nanoseconds_of_a_microsecond_datetime():
    moment = datetime.datetime(2026, 3, 1, 12, 30, 45, 123457, tzinfo=datetime.UTC)
    assert points.timestamp_ns(moment) == 1772368245123457000


def test_belief_stats_match_the_admin_summary_for_mixed_sizes():
    rng = np.random.default_rng(1)
    arrays = [
        rng.dirichlet(np.ones(8)),
        rng.random(64),
        np.zeros(4),
        rng.random((3, 5)),
        np.array([0.0, 1.0]),
        np.array([]),
        rng.dirichlet(np.ones(8)),
    ]
    stats = belief_stats(arrays)
    assert stats[5] is None
    for array, result in zip(arrays, stats, strict=True):
        if array.size == 0:
            continue
        entropy, maximum, variance = result
        assert entropy == pytest.approx(belief_entropy(array), abs=1e-12)
        assert maximum == array.max()
        assert variance == pytest.approx(array.var(), abs=1e-15)


def test_agent_line_has_tags_fields_and_timestamp():
    line = points.agent_line(
        agent_id=AGENT,
        tenant_id=TENANT,
        time_ns=1_700_000_000_000_000_123,
        free_energy=1.25,
        stats=(0.5, 0.75, 1e-05),
        energy_level=42,
    )
    assert line == (
        f"agent_beliefs,agent_id={AGENT},tenant_id={TENANT} free_energy=1.25,"
        "belief_entropy=0.5,max_belief=0.75,belief_variance=1e-05,energy_level=42i "
        "1700000000000000123"
    )


def test_non_finite_free_energy_is_left_out_not_written():
    line = points.agent_line(
        agent_id=AGENT, tenant_id=TENANT, time_ns=1, free_energy=float("nan"), energy_level=3
    )
    assert "free_energy" not in line
    assert (
        points.agent_line(agent_id=AGENT, tenant_id=TENANT, time_ns=1, free_energy=np.inf) is None
    )


def test_dimensions_become_belief_fields_only_when_passed():
    without = points.agent_line(agent_id=AGENT, tenant_id=TENANT, time_ns=1, stats=(1.0, 1.0, 0.0))
    assert "belief_0" not in without
    with_dims = points.agent_line(
        agent_id=AGENT, tenant_id=TENANT, time_ns=1, dimensions=np.array([0.25, 0.75])
    )
    assert "belief_0=0.25,belief_1=0.75 " in with_dims


def test_tag_values_are_escaped():
    assert points.tag("a b,c=d") == r"a\ b\,c\=d"
    with pytest.raises(ValueError):
        points.tag("two\nlines")


@pytest.mark.parametrize(
    ("members", "revenue", "per_member"), [(4, 100, "25.0"), (0, 100, "0.0"), (3, 0, "0.0")]
)
def test_coalition_line_revenue_per_member_is_zero_without_members(members, revenue, per_member):
    line = points.coalition_line(
        coalition_id=AGENT,
        tenant_id=TENANT,
        time_ns=7,
        member_count=members,
        revenue=revenue,
        efficiency=0.5,
    )
    assert line.startswith(f"coalition_performance,coalition_id={AGENT},tenant_id={TENANT} ")
    assert f"member_count={members}i," in line
    assert f"revenue_per_member={per_member} 7" in line
    assert "efficiency=0.5" in line
