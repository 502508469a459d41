from django.apps import AppConfig


class MetricsConfig(AppConfig):
    name = "metrics"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from agents.signals import agent_states_changed
        from coalitions.signals import member_joined, member_left
        from metrics import receivers

        agent_states_changed.connect(receivers.on_agent_states_changed, dispatch_uid="metrics")
        member_joined.connect(receivers.on_membership_changed, dispatch_uid="metrics")
        member_left.connect(receivers.on_membership_changed, dispatch_uid="metrics")
