"""Real-time coalition events: member joined, member left, status changed.

They are rare next to agent updates, so each goes as one channel-layer message to the
coalition's group `coalition.<coalition_id>`, which the websocket connections of that
coalition join directly. Published after commit (agents.publish_frame_on_commit).
"""

import uuid

from coalitions.models import Coalition, CoalitionMember
from realtime.publisher import publish_frame_on_commit

EVENT_MEMBER_JOINED = "coalition.member_joined"
EVENT_MEMBER_LEFT = "coalition.member_left"
EVENT_STATUS_CHANGED = "coalition.status_changed"


def coalition_group(coalition_id) -> str:
    return f"coalition.{coalition_id}"


def _publish(coalition_id, event: str, data: dict) -> None:
    coalition = str(coalition_id)
    publish_frame_on_commit(
        coalition_group(coalition),
        lambda timestamp: {
            "coalition_id": coalition,
            "type": event,
            "data": data,
            "timestamp": timestamp,
        },
    )


def publish_member_joined(member: CoalitionMember) -> None:
    _publish(
        member.coalition_id,
        EVENT_MEMBER_JOINED,
        {
            "agent_id": str(member.agent_id),
            "role": member.role,
            "contribution_score": str(member.contribution_score),
        },
    )


def publish_member_left(*, coalition_id, agent_id) -> None:
    _publish(coalition_id, EVENT_MEMBER_LEFT, {"agent_id": str(agent_id)})


def publish_status_changed(coalition: Coalition) -> None:
    _publish(
        coalition.id,
        EVENT_STATUS_CHANGED,
        {
            "status": coalition.status,
            "dissolved_at": coalition.dissolved_at.isoformat() if coalition.dissolved_at else None,
        },
    )


def coalition_tenant(coalition_id: uuid.UUID) -> uuid.UUID | None:
    """The coalition's tenant id, or None if there is no such coalition."""
    return Coalition.objects.filter(pk=coalition_id).values_list("tenant_id", flat=True).first()
