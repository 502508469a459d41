from django.core.management.base import BaseCommand, CommandError

from agents.models import Tenant
from agents.shredding import tenant_shred


class Command(BaseCommand):
    help = (
        "Erase a tenant for good: destroy its data keys (every belief it ever wrote becomes "
        "unreadable, in the database, the cache and backups), then delete its rows. "
        "There is no undo. See README 'Crypto-shredding' for what it does not reach."
    )

    def add_arguments(self, parser):
        parser.add_argument("slug", help="The tenant's slug.")
        parser.add_argument(
            "--yes-destroy-every-belief",
            action="store_true",
            help="Required: confirms that the tenant's data cannot be recovered afterwards.",
        )

    def handle(self, *args, slug, yes_destroy_every_belief, **options):
        tenant = Tenant.objects.filter(slug=slug).first()
        if tenant is None:
            raise CommandError(f"No tenant with slug {slug}.")
        if not yes_destroy_every_belief:
            raise CommandError(
                f"Shredding {slug} cannot be undone: pass --yes-destroy-every-belief."
            )
        try:
            report = tenant_shred(tenant=tenant)
        except Exception as e:
            raise CommandError(
                f"{slug}: its data keys are destroyed, but a later step failed ({e}). Its "
                "beliefs are unreadable in the database; older backups stay readable until "
                f"the key store's file keys/{tenant.id}.json* is deleted."
            ) from e
        self.stdout.write(
            self.style.SUCCESS(
                f"Tenant {slug} ({report.tenant_id}) shredded: {report.keys_destroyed} data "
                f"key(s) destroyed; {report.agents} agents, {report.coalitions} coalitions and "
                f"{report.history_rows} history rows deleted."
            )
        )
