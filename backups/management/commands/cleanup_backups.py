from django.core.management.base import BaseCommand

from backups.management.base import progress_for
from backups.management.operator import operator_errors
from backups.services import backups_cleanup


class Command(BaseCommand):
    help = (
        "Drop the scratch databases and remove the staging folders left by restores, drills "
        "and backups that were killed (restore and verify_backup also do this first)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--database", default="default", help="Database alias whose server to clean."
        )
        parser.add_argument("--dry-run", action="store_true", help="List them; remove nothing.")

    def handle(self, *args, **options):
        with operator_errors("nothing more was removed"):
            report = backups_cleanup(
                alias=options["database"],
                dry_run=options["dry_run"],
                progress=progress_for(self, options),
            )
        found = len(report.databases) + len(report.staging)
        verb = "would be removed" if report.dry_run else "removed"
        self.stdout.write(self.style.SUCCESS(f"{found} leftover(s) {verb}."))
