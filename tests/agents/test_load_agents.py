import json
from io import StringIO

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from agents.models import Agent
from tests import factories

pytestmark = pytest.mark.django_db


def write(tmp_path, records):
    path = tmp_path / "agents.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def load(path, tenant, *extra):
    out, err = StringIO(), StringIO()
    call_command("load_agents", str(path), "--tenant", tenant.slug, *extra, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_loads_in_batches_with_progress(tmp_path, tenant):
    records = [
        {
            "name": f"a{i}",
            "agent_type": "t",
            "beliefs": [0.5, 0.5],
            "location_h3": factories.BERLIN_CELL,
            "personality_traits": {"x": i},
        }
        for i in range(7)
    ]
    out, err = load(write(tmp_path, records), tenant, "--batch-size", "3")
    assert "7 agents loaded" in out
    assert "loading agents" in err
    assert "7 agents/7 agents" in err
    agent = Agent.objects.get(name="a3")
    assert np.array_equal(agent.belief_state, [0.5, 0.5])
    assert agent.personality_traits == {"x": 3}


def test_invalid_record_names_line_or_agent_and_loads_nothing(tmp_path, tenant):
    records = [
        {"name": "ok", "agent_type": "t"},
        {"name": "bad", "agent_type": "t", "energy_level": 300},
    ]
    with pytest.raises(
        CommandError, match=r"agent 1: energy_level: must be an integer in 0\.\.100"
    ):
        load(write(tmp_path, records), tenant, "--batch-size", "1")
    assert not Agent.objects.exists()
    path = tmp_path / "broken.jsonl"
    path.write_text('{"name": "ok", "agent_type": "t"}\n{not json\n')
    with pytest.raises(CommandError, match=r"broken.jsonl:2: "):
        load(path, tenant)
    path.write_text('{"name": "ok", "agent_type": "t", "colour": "red"}\n')
    with pytest.raises(CommandError, match=r":1: unknown fields \['colour'\]"):
        load(path, tenant)
    assert not Agent.objects.exists()


def test_unknown_tenant_and_missing_file(tmp_path, tenant):
    with pytest.raises(CommandError, match="No tenant with slug 'nope'"):
        call_command("load_agents", str(tmp_path / "x.jsonl"), "--tenant", "nope")
    with pytest.raises(CommandError, match="is not a readable file"):
        load(tmp_path / "missing.jsonl", tenant)
