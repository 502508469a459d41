from django.apps import AppConfig


class RealtimeConfig(AppConfig):
    name = "realtime"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from agents import signals as agents
        from coalitions import signals as coalitions
        from realtime import receivers

        for signal, receiver in (
            (agents.agent_states_changed, receivers.on_agent_states_changed),
            (agents.agent_created, receivers.on_agent_created),
            (agents.agent_deleted, receivers.on_agent_deleted),
            (coalitions.member_joined, receivers.on_member_joined),
            (coalitions.member_left, receivers.on_member_left),
            (coalitions.coalition_status_changed, receivers.on_status_changed),
        ):
            signal.connect(receiver, dispatch_uid="realtime")
