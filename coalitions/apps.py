from django.apps import AppConfig


class CoalitionsConfig(AppConfig):
    name = "coalitions"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from django.db.models.signals import post_delete

        from coalitions.models import CoalitionMember

        post_delete.connect(
            _member_deleted, sender=CoalitionMember, dispatch_uid="coalitions.cache"
        )


def _member_deleted(sender, *, instance, **kwargs) -> None:
    # Any removal (a service, or a cascade from a deleted agent or tenant): the cached
    # set is dropped once the deletion commits.
    from django.db import transaction

    from coalitions.cache import membership_invalidate

    coalition_id = instance.coalition_id
    transaction.on_commit(lambda: membership_invalidate([coalition_id]))
