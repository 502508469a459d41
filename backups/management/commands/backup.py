from django.core.management.base import BaseCommand, CommandError

from backups.exceptions import MAX_AGE_INVALID
from backups.management.base import progress_for
from backups.management.operator import operator_errors
from backups.selectors import parse_age
from backups.services import backup_create


class Command(BaseCommand):
    help = (
        "Back up PostgreSQL (pg_dump, custom format) and Redis (RDB snapshot and key export) "
        "into STORAGES['backups'], encrypted when BACKUP_ENCRYPTION_KEY is set; optionally "
        "delete old backups afterwards."
    )

    def add_arguments(self, parser):
        parser.add_argument("--database", default="default", help="Database alias to dump.")
        parser.add_argument("--no-redis", action="store_true", help="Leave Redis out.")
        parser.add_argument("--no-postgres", action="store_true", help="Leave PostgreSQL out.")
        parser.add_argument(
            "--keep", type=int, metavar="N", help="Afterwards, keep only the N newest backups."
        )
        parser.add_argument(
            "--max-age",
            metavar="AGE",
            help="Afterwards, delete backups older than AGE: 30d, 12h, 8w (a number is days).",
        )
        parser.add_argument(
            "--yes", action="store_true", help="Let --keep/--max-age delete backups."
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Print what would be backed up and which backups retention would delete.",
        )

    def handle(self, *args, **options):
        max_age = None
        if options["max_age"] is not None:
            max_age = parse_age(options["max_age"])
            if max_age is None:
                raise CommandError(MAX_AGE_INVALID.format(value=options["max_age"]))
        with operator_errors("the partial backup and its staging files were removed"):
            result = backup_create(
                alias=options["database"],
                include_postgres=not options["no_postgres"],
                include_redis=not options["no_redis"],
                keep=options["keep"],
                max_age=max_age,
                allow_prune=options["yes"],
                dry_run=options["dry_run"],
                progress=progress_for(self, options),
            )
        if result.dry_run:
            for name in result.pruned:
                self.stdout.write(f"Would delete {name}")
            return
        self.stdout.write(self.style.SUCCESS(f"{result.name}"))
        if result.pruned:
            self.stdout.write(f"Retention deleted {len(result.pruned)}: {', '.join(result.pruned)}")
