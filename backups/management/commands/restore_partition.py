from django.core.management.base import BaseCommand

from backups.management.base import progress_for, service_errors
from backups.partitions import partition_restore


class Command(BaseCommand):
    help = (
        "Bring an archived agent_history partition (listbackups --archives) back into the "
        "database as a table, optionally attached again. Maintenance leaves it alone after."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="Archive name from `listbackups --archives`.")
        parser.add_argument(
            "--attach", action="store_true", help="Attach it to its parent table again."
        )

    def handle(self, *args, **options):
        with service_errors():
            result = partition_restore(
                name=options["name"], attach=options["attach"], progress=progress_for(self, options)
            )
        where = "attached to its parent" if result.attached else "as a standalone table"
        self.stdout.write(
            self.style.SUCCESS(f"Restored {result.table} ({result.rows:,} rows) {where}.")
        )
