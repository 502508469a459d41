from django.core.management.base import BaseCommand

from backups.management.operator import operator_errors
from backups.selectors import backup_list
from freeagentics.progress import human_bytes


class Command(BaseCommand):
    help = "List the backups in STORAGES['backups'], newest first (or the partition archives)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--archives", action="store_true", help="List partition archives instead."
        )

    def handle(self, *args, **options):
        with operator_errors("nothing was changed"):
            summaries = backup_list(archives=options["archives"])
        if not summaries:
            self.stdout.write("No archives." if options["archives"] else "No backups.")
            return
        width = max(len(s.name) for s in summaries)
        self.stdout.write(
            f"{'NAME':<{width}}  {'CREATED (UTC)':<19}  {'SIZE':>10}  ENC  {'CONTENTS':<32}  STATUS"
        )
        for s in summaries:
            created = f"{s.created_at:%Y-%m-%d %H:%M:%S}" if s.created_at else "?"
            size = human_bytes(s.size) if s.size is not None else "-"
            contents = ",".join(s.parts) or "-"
            encrypted = "yes" if s.encrypted else "no"
            line = (
                f"{s.name:<{width}}  {created:<19}  {size:>10}  {encrypted:<3}  {contents:<32}"
                f"  {s.status}"
            )
            self.stdout.write(line if s.status == "complete" else self.style.WARNING(line))
        for s in summaries:
            if s.error and s.status != "incomplete":
                self.stdout.write(self.style.WARNING(f"{s.name} is {s.status}: {s.error}"))
