from django.apps import AppConfig
from django.core import checks


class AgentsConfig(AppConfig):
    name = "agents"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        checks.register(master_keys_open_data_keys, checks.Tags.database)


def master_keys_open_data_keys(app_configs=None, databases=None, **kwargs):
    """`manage.py check --database default` (and migrate) report data keys no master
    key opens; the ASGI server refuses to start on them (freeagentics/asgi.py)."""
    from django.core.exceptions import ImproperlyConfigured

    from agents.data_keys import check_master_keys

    if not databases or "default" not in databases:
        return []
    try:
        check_master_keys()
    except ImproperlyConfigured as e:
        return [checks.Error(str(e), id="agents.E001")]
    return []
