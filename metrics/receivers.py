"""Metrics points recorded with the domain's state changes: connected in
MetricsConfig.ready() to agents.signals and coalitions.signals, which the services send
inside their transaction, so each outbox row commits or rolls back with its change."""

from metrics.services import agent_metrics_record, coalition_metrics_record


def on_agent_states_changed(sender, *, states, updates, **kwargs) -> None:
    agent_metrics_record(states=states, updates=updates)


def on_membership_changed(sender, *, coalition, **kwargs) -> None:
    coalition_metrics_record(coalition=coalition)
