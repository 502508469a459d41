"""Real-time publishing of the domain's state changes: connected in
RealtimeConfig.ready() to agents.signals and coalitions.signals. Each registers its
publish with transaction.on_commit, so a rolled-back change publishes nothing."""

from realtime import coalition_events, publisher
from realtime.protocol import EVENT_CREATED


def on_agent_states_changed(sender, *, tenant_id, states, tokens, **kwargs) -> None:
    publisher.publish_agent_states(tenant_id=tenant_id, states=states, tokens=tokens)


def on_agent_created(sender, *, state, **kwargs) -> None:
    publisher.publish_agent_states(tenant_id=state.tenant_id, states=[state], event=EVENT_CREATED)


def on_agent_deleted(sender, *, tenant_id, agent_id, **kwargs) -> None:
    publisher.publish_agent_deleted(tenant_id=tenant_id, agent_id=agent_id)


def on_member_joined(sender, *, member, **kwargs) -> None:
    coalition_events.publish_member_joined(member)


def on_member_left(sender, *, coalition, agent_id, **kwargs) -> None:
    coalition_events.publish_member_left(coalition_id=coalition.id, agent_id=agent_id)


def on_status_changed(sender, *, coalition, **kwargs) -> None:
    coalition_events.publish_status_changed(coalition)
