from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import DEFAULT_DB_ALIAS

from backups.management.base import progress_for, service_errors
from backups.partitions import DIRECT_ALIAS, partitions_maintain
from freeagentics.standby import refuse_standby


class Command(BaseCommand):
    help = (
        "Maintain monthly partitions of agent_history: premake future months, move rows out "
        "of the default partition (quarantining rows no month can hold), detach, archive and "
        "drop months past retention."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--premake",
            type=int,
            help=f"Future months to keep ready (PARTITION_PREMAKE_MONTHS, now "
            f"{settings.PARTITION_PREMAKE_MONTHS}).",
        )
        parser.add_argument(
            "--retention-months",
            type=int,
            help=f"Months of history kept before retiring a partition; 0 keeps all "
            f"(PARTITION_RETENTION_MONTHS, now {settings.PARTITION_RETENTION_MONTHS}).",
        )
        parser.add_argument(
            "--no-archive",
            action="store_true",
            help="Do not archive retired partitions to the backup storage (PARTITION_ARCHIVE).",
        )
        parser.add_argument(
            "--no-drop",
            action="store_true",
            help="Keep retired partitions as detached tables (PARTITION_DROP).",
        )
        parser.add_argument("--yes", action="store_true", help="Allow dropping tables.")
        parser.add_argument(
            "--dry-run", action="store_true", help="Print the plan; change nothing."
        )

    def handle(self, *args, **options):
        # Its DDL goes through default, its lock and pg_dump through direct when set.
        refuse_standby("maintain_partitions", using=(DEFAULT_DB_ALIAS, DIRECT_ALIAS))
        with service_errors():
            report = partitions_maintain(
                premake=options["premake"],
                retention_months=options["retention_months"],
                archive=False if options["no_archive"] else None,
                drop=False if options["no_drop"] else None,
                allow_drop=options["yes"],
                dry_run=options["dry_run"],
                progress=progress_for(self, options),
            )
        plan = report.plan
        for action in plan.actions:
            if action.kind == "skip":
                self.stderr.write(self.style.WARNING(action.describe()))
            elif report.dry_run:
                self.stdout.write("would " + action.describe())
        # Quarantined rows are data an operator has to look at: said on stderr too.
        for action in plan.actions if report.dry_run else report.done:
            if action.kind == "quarantine":
                prefix = "would " if report.dry_run else ""
                self.stderr.write(self.style.WARNING(prefix + action.describe()))
        if report.dry_run:
            self.stdout.write(f"Dry run: {len(plan.changes)} change(s) planned, none made.")
            return
        if not plan.changes:
            self.stdout.write(self.style.SUCCESS("Partitions are up to date; nothing to do."))
            return
        counts = ", ".join(
            f"{report.count(kind)} {word}"
            for kind, word in (
                ("create", "created"),
                ("detach", "detached"),
                ("archive", "archived"),
                ("drop", "dropped"),
            )
        )
        if report.quarantined:
            counts += f", {report.quarantined} rows quarantined"
        self.stdout.write(self.style.SUCCESS(counts))
