import signal
import threading

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from coalitions.simulation import TICKS_PER_SECOND, simulation_prepare
from freeagentics.progress import Progress


class Command(BaseCommand):
    help = (
        "Move a tenant's agents to neighbouring H3 cells, change their energy and beliefs, "
        "and drift its coalition members' scores, through the services, one transaction "
        "per tick. Ctrl-C stops after the current tick."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tenant", default="demo-city", help="Tenant slug (demo-city).")
        parser.add_argument(
            "--rate", type=float, default=50.0, help="Agent updates per second (50)."
        )
        parser.add_argument(
            "--ticks", type=int, help="Stop after this many ticks (default: never)."
        )
        parser.add_argument(
            "--duration", type=float, help="Stop after this many seconds (default: never)."
        )
        parser.add_argument("--seed", type=int, help="Random seed, to repeat a run exactly.")

    def handle(self, *args, **options):
        try:
            simulation = simulation_prepare(
                tenant_slug=options["tenant"], rate=options["rate"], seed=options["seed"]
            )
        except ValidationError as e:
            raise CommandError("; ".join(e.messages)) from e
        self.stdout.write(
            f"Simulating {simulation.tenant.slug}: {len(simulation.walkers)} agents, "
            f"{len(simulation.coalitions)} coalitions with members; {simulation.batch_size} "
            f"updates every {simulation.interval:.3f} s ({simulation.rate:g}/s, up to "
            f"{TICKS_PER_SECOND} ticks/s); seed {simulation.seed}. Ctrl-C stops after the "
            "current tick."
        )
        stop = threading.Event()
        previous = self._stop_on_signals(stop)
        try:
            report = simulation.run(
                ticks=options["ticks"],
                duration=options["duration"],
                stop=stop,
                progress=Progress(self.stdout, verbosity=options["verbosity"]),
            )
        except ValidationError as e:
            raise CommandError("; ".join(e.messages)) from e
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        how = "stopped" if report.stopped else "done"
        self.stdout.write(
            self.style.SUCCESS(
                f"{how}: {report.ticks} ticks, {report.updates} agent updates ({report.moved} "
                f"moves), {report.scores} score changes in {report.seconds:.1f} s "
                f"({report.rate:.0f} updates/s)"
            )
        )

    def _stop_on_signals(self, stop: threading.Event) -> dict:
        # Only the main thread may set handlers (call_command from a worker thread may not).
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if stop.is_set():
                # A second Ctrl-C: leave now; the tick's transaction rolls back whole.
                raise KeyboardInterrupt
            stop.set()

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
