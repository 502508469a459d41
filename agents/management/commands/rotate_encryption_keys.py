from django.core.management.base import BaseCommand, CommandError

from agents.exceptions import BeliefStateError
from agents.key_rotation import count_encrypted_rows, encryption_keys_rotate
from freeagentics.progress import Progress


class Command(BaseCommand):
    help = (
        "Re-encrypt every belief state under the first key in FREEAGENTICS_ENCRYPTION_KEYS. "
        "Safe to interrupt and rerun: finished batches stay done."
    )

    def add_arguments(self, parser):
        parser.add_argument("--batch-size", type=int, default=1000, help="Rows per transaction.")
        parser.add_argument(
            "--dry-run", action="store_true", help="Count rows that need rotation; change nothing."
        )

    def handle(self, *args, batch_size, dry_run, **options):
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        progress = Progress(self.stderr, verbosity=options["verbosity"]).task(
            "rotating", count_encrypted_rows(), unit="rows"
        )
        try:
            counts = encryption_keys_rotate(
                batch_size=batch_size, dry_run=dry_run, on_batch=progress.advance
            )
        except KeyboardInterrupt:
            raise CommandError(
                f"Interrupted after {progress.done} rows; committed batches are kept. "
                "Run the command again to resume."
            ) from None
        except BeliefStateError as e:
            raise CommandError(str(e)) from e
        progress.finish()
        verb = "would rotate" if dry_run else "rotated"
        tables = ", ".join(f"{table} {n}" for table, n in counts.by_table.items())
        self.stdout.write(
            self.style.SUCCESS(
                f"{counts.scanned} scanned, {counts.rotated} {verb} ({tables}), "
                f"{counts.current} already under the primary key."
            )
        )
