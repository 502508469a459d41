from django.apps import AppConfig


class BackupsConfig(AppConfig):
    name = "backups"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from agents.shredding import tenant_shredded

        tenant_shredded.connect(_forget_shredded_keys, dispatch_uid="backups.keystore")


def _forget_shredded_keys(sender, *, tenant_id, shredded_at, key_ids, **kwargs):
    from backups.keystore import tenant_keys_forget

    tenant_keys_forget(tenant_id=tenant_id, shredded_at=shredded_at, key_ids=key_ids)
