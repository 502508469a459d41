from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    """Prometheus `/metrics`, `/healthz`, `/readyz` and the admin's System health page:
    the top layer, reading every other app's figures."""

    name = "monitoring"

    def ready(self):
        from django.contrib import admin

        from monitoring import collectors, hooks

        hooks.install()
        collectors.register()
        # The index links to System health without a custom AdminSite, which every
        # app's @admin.register would then have to name.
        admin.site.index_template = "monitoring/admin_index.html"
