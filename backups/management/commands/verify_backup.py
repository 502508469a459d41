from django.core.management.base import BaseCommand, CommandError

from backups.exceptions import DrillFailedError
from backups.management.base import progress_for
from backups.management.operator import (
    SCRATCH_REMOVED,
    add_accept_unsigned_argument,
    operator_errors,
)
from backups.services import backup_verify


class Command(BaseCommand):
    help = (
        "Restore drill: restore a backup (or 'latest', or a partition archive) into a scratch "
        "database, check row counts, schema objects and that every belief state decrypts, "
        "then drop the scratch database and report."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="Backup or archive name, or 'latest'.")
        parser.add_argument(
            "--database", default="default", help="Database alias whose server hosts the drill."
        )
        add_accept_unsigned_argument(parser)

    def handle(self, *args, **options):
        try:
            with operator_errors(SCRATCH_REMOVED):
                report = backup_verify(
                    name=options["name"],
                    alias=options["database"],
                    allow_unsigned=options["accept_unsigned_backup"],
                    progress=progress_for(self, options),
                )
        except CommandError as e:
            if isinstance(e.__cause__, DrillFailedError) and e.__cause__.report:
                self._print(e.__cause__.report)
            raise
        self._print(report)
        self.stdout.write(
            self.style.SUCCESS(f"{report.name} restores and checks out ({report.seconds:.1f}s).")
        )

    def _print(self, report):
        for label, ok, detail in report.checks:
            mark = self.style.SUCCESS("ok  ") if ok else self.style.ERROR("FAIL")
            self.stdout.write(f"{mark} {label}: {detail}")
