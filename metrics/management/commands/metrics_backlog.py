from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand

from metrics.client import ping
from metrics.exceptions import MetricsError
from metrics.selectors import outbox_status
from metrics.services import outbox_recount


class Command(BaseCommand):
    help = "Report the metrics outbox: points waiting, oldest age, cap, dropped and rejected."

    def add_arguments(self, parser):
        parser.add_argument(
            "--exact",
            action="store_true",
            help="Also count the rows (reads them all) and compare with the running count.",
        )
        parser.add_argument(
            "--recount",
            action="store_true",
            help="Count the rows and correct the running count the cap uses.",
        )

    def handle(self, *args, **options):
        if options["recount"]:
            self.stdout.write(f"running count corrected by {outbox_recount():+d} point(s)")
        status = outbox_status(exact=options["exact"])
        age = status.oldest_age
        counted = " (rows counted)" if status.exact else ""
        self.stdout.write(f"pending: {status.pending} point(s){counted}")
        if status.count_drift:
            self.stdout.write(
                self.style.ERROR(
                    f"running count: {status.counted} point(s), off by {-status.count_drift:+d}; "
                    "the cap uses it: run metrics_backlog --recount"
                )
            )
        self.stdout.write(f"oldest: {'-' if age is None else f'{age.total_seconds():.0f} s ago'}")
        line = f"cap: {status.cap} ({status.fill:.1%} used)"
        self.stdout.write(
            self.style.ERROR(line + ", FULL: new points are dropped") if status.full else line
        )
        dropped = f"dropped (outbox full): {status.dropped_points} not acknowledged"
        if status.last_dropped_at:
            dropped += f", last at {status.last_dropped_at:%Y-%m-%d %H:%M:%S %Z}"
        dropped += f"; {status.dropped_acknowledged} acknowledged"
        self.stdout.write(self.style.WARNING(dropped) if status.dropped_points else dropped)
        rejected = f"rejected by InfluxDB: {status.rejected}"
        self.stdout.write(self.style.WARNING(rejected) if status.rejected else rejected)
        self.stdout.write(f"influxdb: {self._influxdb()}")

    def _influxdb(self) -> str:
        try:
            return f"reachable (version {ping(timeout_ms=settings.METRICS_CHART_TIMEOUT_MS)})"
        except ImproperlyConfigured as e:
            return str(e)
        except MetricsError as e:
            return self.style.ERROR(str(e))
