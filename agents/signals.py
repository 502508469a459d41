"""What happens to agents, for the layers that build on them (metrics, real-time).

The services send these inside the writing transaction and never know who listens:
metrics writes its outbox rows there (so they commit or roll back with the change), and
real-time registers its publishing with transaction.on_commit. The receivers are
connected in those apps' AppConfig.ready(); see docs/ARCHITECTURE.md.
"""

from django.dispatch import Signal

# states: list[AgentState]; updates: the AgentStateUpdates (None when not from updates);
# tokens: the stored belief tokens where the change set them, else None.
agent_states_changed = Signal()
# state: the new agent's AgentState.
agent_created = Signal()
# tenant_id, agent_id.
agent_deleted = Signal()
