from django.core.management.base import BaseCommand

from backups.management.base import progress_for
from backups.management.operator import (
    SCRATCH_REMOVED,
    add_accept_unsigned_argument,
    operator_errors,
)
from backups.services import backup_restore


class Command(BaseCommand):
    help = (
        "Restore a backup (or 'latest') into the configured database, or a named one, and "
        "Redis. Checksums are verified before anything is touched; the database is rebuilt "
        "aside and swapped in atomically. A non-empty target needs --yes."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="Backup name from listbackups, or 'latest'.")
        parser.add_argument(
            "--database", default="default", help="Database alias whose server to restore on."
        )
        parser.add_argument(
            "--database-name",
            help="Restore into this database on that server (created when missing) instead "
            "of the alias' own database.",
        )
        parser.add_argument("--skip-postgres", action="store_true", help="Leave PostgreSQL.")
        parser.add_argument("--skip-redis", action="store_true", help="Leave Redis.")
        parser.add_argument("--redis-url", help="Restore Redis here (default BACKUP_REDIS_URL).")
        parser.add_argument(
            "--yes", action="store_true", help="Overwrite a non-empty database and Redis."
        )
        parser.add_argument(
            "--disconnect",
            action="store_true",
            help="End other sessions connected to the target database instead of refusing.",
        )
        parser.add_argument(
            "--keep-previous",
            action="store_true",
            help="Keep the database this restore replaces, renamed to <name>__previous_<hex>, "
            "instead of dropping it (drop it yourself once the restore checks out).",
        )
        parser.add_argument(
            "--jobs",
            type=int,
            default=1,
            metavar="N",
            help="Run pg_restore with N parallel jobs (an unencrypted dump only; an "
            "encrypted one is piped to a single job and a warning says so).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Check the targets and verify the backup; restore nothing.",
        )
        add_accept_unsigned_argument(parser)

    def handle(self, *args, **options):
        with operator_errors(SCRATCH_REMOVED):
            result = backup_restore(
                name=options["name"],
                alias=options["database"],
                database_name=options["database_name"],
                include_postgres=not options["skip_postgres"],
                include_redis=not options["skip_redis"],
                redis_url=options["redis_url"],
                overwrite=options["yes"],
                disconnect=options["disconnect"],
                keep_previous=options["keep_previous"],
                jobs=options["jobs"],
                dry_run=options["dry_run"],
                allow_unsigned=options["accept_unsigned_backup"],
                progress=progress_for(self, options),
            )
        for warning in result.warnings:
            self.stderr.write(self.style.WARNING(warning))
        if result.dry_run:
            self.stdout.write(self.style.SUCCESS(f"{result.name} verified; nothing restored."))
            return
        done = []
        if result.postgres_target:
            done.append(f"{result.postgres_target} ({sum(result.tables.values()):,} rows)")
        if result.redis_target:
            done.append(f"Redis {result.redis_target} ({result.redis_keys:,} keys)")
        self.stdout.write(self.style.SUCCESS(f"Restored {result.name} into {' and '.join(done)}."))
        if result.previous_database:
            self.stdout.write(f"The replaced database was kept as {result.previous_database}.")
