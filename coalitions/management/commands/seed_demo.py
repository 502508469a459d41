from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from coalitions.demo import demo_load


class Command(BaseCommand):
    help = (
        "Load the demo tenant: agents spread over H3 cells of Berlin, with coalitions. "
        "Idempotent: rows that exist are left alone."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tenant-slug", default="demo-city", help="Slug of the demo tenant.")
        parser.add_argument("--agents", type=int, default=200, help="How many agents to load.")
        parser.add_argument("--seed", type=int, default=42, help="Random seed for the data.")

    def handle(self, *args, **options):
        try:
            counts = demo_load(
                tenant_slug=options["tenant_slug"], agents=options["agents"], seed=options["seed"]
            )
        except ValidationError as e:
            raise CommandError("; ".join(e.messages)) from e
        self.stdout.write(
            self.style.SUCCESS(
                f"{counts.tenant.name}: {counts.agents} agents ({counts.agents_created} new), "
                f"{counts.coalitions} coalitions ({counts.coalitions_created} new), "
                f"{counts.members} coalition members ({counts.members_created} new)"
            )
        )
