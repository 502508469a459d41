"""Can this process serve? PostgreSQL and Redis must each answer within
READINESS_TIMEOUT_SECONDS. Probes run on a small thread pool, and a probe still waiting
on a hung server is joined by the next request instead of started again, so a load
balancer calling every second cannot pile up threads or connections."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connection
from django_redis import get_redis_connection

NO_ANSWER = "no answer within {timeout:g} s"


def _postgresql() -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        # Back to the pool (or closed): the probe thread holds nothing between calls.
        connection.close()


def _redis() -> None:
    get_redis_connection("default").ping()


PROBES = {"postgresql": _postgresql, "redis": _redis}

_executor = ThreadPoolExecutor(max_workers=len(PROBES), thread_name_prefix="readyz")
_lock = threading.Lock()
_inflight: dict = {}


@dataclass
class Readiness:
    checks: dict[str, dict] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(check["ok"] for check in self.checks.values())

    def as_json(self) -> dict:
        failed = sorted(name for name, check in self.checks.items() if not check["ok"])
        return {"status": "failed" if failed else "ok", "failed": failed, "checks": self.checks}


def _future(name: str):
    with _lock:
        future = _inflight.get(name)
        if future is None or future.done():
            future = _inflight[name] = _executor.submit(PROBES[name])
        return future


def readiness() -> Readiness:
    timeout = settings.READINESS_TIMEOUT_SECONDS
    start = time.monotonic()
    futures = {name: _future(name) for name in PROBES}
    report = Readiness()
    for name, future in futures.items():
        left = max(0.0, timeout - (time.monotonic() - start))
        try:
            future.result(left)
        except FutureTimeout:
            report.checks[name] = {"ok": False, "error": NO_ANSWER.format(timeout=timeout)}
        except Exception as e:
            report.checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
        else:
            report.checks[name] = {"ok": True, "ms": round((time.monotonic() - start) * 1000, 1)}
    return report
