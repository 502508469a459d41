import json
from pathlib import Path

import numpy as np
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from agents.models import Tenant
from agents.services import AgentSpec, agents_bulk_load
from freeagentics.progress import Progress

FIELDS = {
    "name",
    "agent_type",
    "beliefs",
    "energy_level",
    "location_h3",
    "status",
    "personality_traits",
}


def _specs(path: Path):
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("expected a JSON object")
                unknown = set(record) - FIELDS
                if unknown:
                    raise ValueError(f"unknown fields {sorted(unknown)}")
                if record.get("beliefs") is not None:
                    record["beliefs"] = np.asarray(record["beliefs"], dtype=np.float64)
                yield AgentSpec(**record)
            except (ValueError, TypeError) as e:
                raise CommandError(f"{path}:{number}: {e}") from e


class Command(BaseCommand):
    help = (
        "Bulk-load agents from a JSON Lines file (one object per line with name, agent_type, "
        "beliefs, energy_level, location_h3, status, personality_traits). All or nothing."
    )

    def add_arguments(self, parser):
        parser.add_argument("path", type=Path, help="JSON Lines file.")
        parser.add_argument("--tenant", required=True, help="Slug of the tenant to load into.")
        parser.add_argument("--batch-size", type=int, default=5000)

    def handle(self, *args, path, tenant, batch_size, **options):
        try:
            owner = Tenant.objects.get(slug=tenant)
        except Tenant.DoesNotExist:
            raise CommandError(f"No tenant with slug {tenant!r}.") from None
        if not path.is_file():
            raise CommandError(f"{path} is not a readable file.")
        with path.open() as lines:
            total = sum(1 for line in lines if line.strip())
        progress = Progress(self.stderr, verbosity=options["verbosity"]).task(
            "loading agents", total, unit="agents"
        )
        try:
            loaded = agents_bulk_load(
                tenant=owner, specs=_specs(path), batch_size=batch_size, on_batch=progress.advance
            )
        except ValidationError as e:
            raise CommandError("; ".join(e.messages)) from e
        except KeyboardInterrupt:
            raise CommandError("Interrupted: nothing was loaded (one transaction).") from None
        progress.finish()
        self.stdout.write(self.style.SUCCESS(f"{loaded} agents loaded into {owner.slug}."))
