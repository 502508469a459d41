import contextlib
import signal
import threading
import time

from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.management.base import BaseCommand, CommandError

from freeagentics.progress import Progress
from freeagentics.standby import refuse_standby
from freeagentics.telemetry import serve_on_port
from metrics import client
from metrics.exceptions import InfluxDBUnavailable
from metrics.selectors import outbox_status
from metrics.services import outbox_flush, outbox_requeue_rejected


class Command(BaseCommand):
    help = "Ship metrics points from the outbox to InfluxDB; delete them once acknowledged."

    def add_arguments(self, parser):
        parser.add_argument(
            "--follow", action="store_true", help="Keep running; retry outages with backoff."
        )
        parser.add_argument("--batch-size", type=int, help="Points per request (default setting).")
        parser.add_argument(
            "--retries",
            type=int,
            help="One-shot: attempts before giving up (default METRICS_FLUSH_RETRIES).",
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=1,
            help="Batches in flight at once, each with two database connections of its own.",
        )
        parser.add_argument(
            "--interval", type=float, default=1.0, help="--follow: seconds between empty polls."
        )
        parser.add_argument(
            "--prometheus-port",
            type=int,
            help="--follow: serve this process's flusher figures for Prometheus on "
            "127.0.0.1:PORT/metrics.",
        )
        parser.add_argument(
            "--requeue-rejected",
            action="store_true",
            help="First move points InfluxDB rejected back into the outbox.",
        )

    def handle(self, *args, **options):
        refuse_standby("flush_metrics")
        if options["prometheus_port"] is not None:
            self._serve_prometheus(options["prometheus_port"])
        if options["requeue_rejected"]:
            self.stdout.write(f"{outbox_requeue_rejected()} rejected point(s) requeued")
        stop = threading.Event()
        if options["follow"] and threading.current_thread() is threading.main_thread():
            # Finish the batch in flight, then exit: nothing is sent twice needlessly.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
        progress = Progress(self.stdout, verbosity=options["verbosity"]).task(
            "metrics points",
            None if options["follow"] else outbox_status().pending,
            unit="points",
        )
        with contextlib.suppress(ImproperlyConfigured):
            # Start-up (the client library's import) before the flush is timed; a bad
            # setting is reported by outbox_flush, after the options it checks first.
            client.prepare()
        started = time.perf_counter()
        try:
            report = outbox_flush(
                follow=options["follow"],
                batch_size=options["batch_size"],
                retries=options["retries"],
                workers=options["workers"],
                poll_interval=options["interval"],
                stop=stop,
                on_batch=progress.advance,
            )
        except (ImproperlyConfigured, InfluxDBUnavailable) as e:
            raise CommandError(f"{e} {self._waiting()}") from e
        except ValidationError as e:
            raise CommandError("; ".join(e.messages)) from e
        elapsed = time.perf_counter() - started
        progress.finish()
        if options["verbosity"] >= 2:
            # The flush alone, without the interpreter's and Django's start-up (what
            # benchmarks/metrics.py compares with plain HTTP batches).
            rate = f" ({report.sent / elapsed:,.0f} points/s)" if elapsed > 0 else ""
            self.stdout.write(f"Flushed in {elapsed:.3f} s{rate}")
        self.stdout.write(
            self.style.SUCCESS(
                f"{report.sent} point(s) sent in {report.batches} batch(es), "
                f"{report.rejected} rejected; {outbox_status().pending} wait in the outbox"
            )
        )

    def _serve_prometheus(self, port: int) -> None:
        if not 0 < port < 65536:
            raise CommandError(f"--prometheus-port: {port} is not a TCP port (1-65535)")
        try:
            serve_on_port(port)
        except OSError as e:
            raise CommandError(f"--prometheus-port: cannot listen on 127.0.0.1:{port}: {e}") from e
        self.stdout.write(f"Prometheus figures on http://127.0.0.1:{port}/metrics")

    def _waiting(self) -> str:
        return f"({outbox_status().pending} point(s) wait in the outbox, intact.)"
