from django.core.management.base import BaseCommand, CommandError

from agents.exceptions import BeliefStateError
from agents.key_rotation import beliefs_reencrypt, data_keys_rotate, master_keys_rotate
from agents.models import Tenant
from agents.selectors import count_encrypted_rows
from freeagentics.progress import Progress
from freeagentics.standby import refuse_standby


class Command(BaseCommand):
    help = (
        "Without options: rewrap every tenant's data keys under the first key in "
        "FREEAGENTICS_ENCRYPTION_KEYS (seconds at any data size; no belief is rewritten), "
        "after which the other master keys can be removed. --data-keys gives tenants new "
        "data keys and re-encrypts their beliefs online; --reencrypt only re-encrypts (to "
        "resume, or once to convert beliefs written before envelope encryption)."
    )

    def add_arguments(self, parser):
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument(
            "--data-keys",
            action="store_true",
            help="Retire the data keys of --tenant (default: every tenant), then re-encrypt.",
        )
        mode.add_argument(
            "--reencrypt",
            action="store_true",
            help="Move beliefs not under their tenant's active data key to it.",
        )
        parser.add_argument(
            "--tenant",
            action="append",
            metavar="SLUG",
            help="Limit --data-keys / --reencrypt to this tenant (repeatable).",
        )
        parser.add_argument("--batch-size", type=int, default=1000, help="Rows per transaction.")
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Count what would change; change nothing and take no row lock.",
        )

    def handle(self, *args, data_keys, reencrypt, tenant, batch_size, dry_run, **options):
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        if tenant and not (data_keys or reencrypt):
            raise CommandError("--tenant needs --data-keys or --reencrypt.")
        refuse_standby("rotate_encryption_keys")
        tenant_ids = self._tenant_ids(tenant)
        try:
            if not (data_keys or reencrypt):
                self._master(dry_run)
                return
            if data_keys and not dry_run:
                targets = tenant_ids or Tenant.objects.values_list("id", flat=True)
                new = data_keys_rotate(targets)
                self.stdout.write(f"{len(new)} tenant(s) got a new data key; re-encrypting.")
            self._reencrypt(tenant_ids, batch_size, dry_run, options["verbosity"])
        except BeliefStateError as e:
            raise CommandError(str(e)) from e

    def _tenant_ids(self, slugs):
        if not slugs:
            return None
        found = dict(Tenant.objects.filter(slug__in=slugs).values_list("slug", "id"))
        missing = sorted(set(slugs) - set(found))
        if missing:
            raise CommandError(f"No tenant with slug {', '.join(missing)}.")
        return list(found.values())

    def _master(self, dry_run: bool) -> None:
        if dry_run:
            self.stdout.write("Would rewrap every data key under the first master key.")
            return
        count = master_keys_rotate()
        self.stdout.write(
            self.style.SUCCESS(
                f"{count} data key(s) rewrapped under the first master key. Keys other than "
                "the first can leave FREEAGENTICS_ENCRYPTION_KEYS once no belief from before "
                "envelope encryption is left (rotate_encryption_keys --reencrypt --dry-run)."
            )
        )

    def _reencrypt(self, tenant_ids, batch_size, dry_run, verbosity) -> None:
        progress = Progress(self.stderr, verbosity=verbosity).task(
            "re-encrypting" if not dry_run else "checking", count_encrypted_rows(), unit="rows"
        )
        try:
            counts = beliefs_reencrypt(
                tenant_ids=tenant_ids,
                batch_size=batch_size,
                dry_run=dry_run,
                on_batch=progress.advance,
            )
        except KeyboardInterrupt:
            raise CommandError(
                f"Interrupted after {progress.done} rows; committed batches are kept. "
                "Run the command again to resume."
            ) from None
        progress.finish()
        verb = "would re-encrypt" if dry_run else "re-encrypted"
        tables = ", ".join(f"{t} {n}" for t, n in sorted(counts.by_table.items())) or "none"
        notes = []
        if counts.orphaned:
            notes.append(
                f"{counts.orphaned} from before envelope encryption whose agent is gone "
                "(still under a master key)"
            )
        if counts.shredded:
            notes.append(f"{counts.shredded} of shredded tenants (unreadable for good)")
        self.stdout.write(
            self.style.SUCCESS(
                f"{counts.scanned} scanned, {counts.reencrypted} {verb} ({tables}), "
                f"{counts.current} already under their tenant's active key"
                + "".join(f"; {note}" for note in notes)
                + "."
            )
        )
