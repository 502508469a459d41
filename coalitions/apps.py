from django.apps import AppConfig


class CoalitionsConfig(AppConfig):
    name = "coalitions"
    default_auto_field = "django.db.models.BigAutoField"
