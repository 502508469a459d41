"""What happens to coalitions, for the layers that build on them (metrics, real-time).
Sent inside the writing transaction, as agents.signals."""

from django.dispatch import Signal

# member: the new CoalitionMember; coalition.
member_joined = Signal()
# coalition, agent_id.
member_left = Signal()
# coalition, after its status changed.
coalition_status_changed = Signal()
