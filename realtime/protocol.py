"""The real-time protocol: close codes, event and message types, group names, and the
JSON of an agent state as every frame carries it (README "Real-time updates")."""

import json

import h3

from agents.types import AgentState

# Close codes (README "Real-time updates" documents each).
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
# Standard codes: a frame over the size limit, and a server error.
CLOSE_TOO_BIG = 1009
CLOSE_SERVER_ERROR = 1011
# The channel layer's Redis is gone for now (a Sentinel failover): reconnect shortly.
CLOSE_TRY_AGAIN = 1013

EVENT_CREATED = "agent.created"
EVENT_UPDATED = "agent.updated"
EVENT_DELETED = "agent.deleted"

# Channel-layer message types (handler names on the receiving side).
BATCH = "realtime.batch"
FRAME = "realtime.frame"
TOKEN_REVOKED = "token.revoked"

_JSON = {"separators": (",", ":"), "ensure_ascii": False}
BELIEFS_LABEL = "agents.Agent.belief_state"


def tenant_group(tenant_id) -> str:
    return f"agents.{tenant_id}"


def agent_group(agent_id) -> str:
    """The agent's group. It lives in each process's Hub, not in Redis (module docstring)."""
    return f"agent.{agent_id}"


def token_group(token_id) -> str:
    return f"apitoken.{token_id}"


def dumps(value) -> str:
    return json.dumps(value, **_JSON)


def agent_data(state: AgentState) -> dict:
    """What a dashboard needs of one agent state, but the belief summary."""
    data = {
        "name": state.name,
        "agent_type": state.agent_type,
        "energy_level": state.energy_level,
        "status": state.status,
        "location_h3": state.location_h3,
        "lat": None,
        "lng": None,
        "version": state.version,
        "updated_at": state.updated_at.isoformat(),
    }
    if state.location_h3:
        data["lat"], data["lng"] = h3.cell_to_latlng(state.location_h3)
    return data
