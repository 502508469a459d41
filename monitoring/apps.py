from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    """Prometheus `/metrics`, `/healthz`, `/readyz` and the admin's System health page:
    the top layer, reading every other app's figures."""

    name = "monitoring"

    def ready(self):
        from monitoring import collectors, hooks

        hooks.install()
        collectors.register()
