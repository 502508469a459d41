"""Several `manage.py flush_metrics` processes (flushers on several hosts) sharing one
outbox and one InfluxDB: every point lands exactly once, also when one is SIGKILLed
while it holds a batch.

"Exactly once" is counted by InfluxDB: each point of the test has a series and timestamp
of its own, so InfluxDB's count equals N only if every point arrived, and a point sent
twice (a killed flusher's batch, shipped again by another) overwrites itself instead of
adding one; test_a_resent_point_overwrites_itself_in_influxdb shows that."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest
from django.conf import settings
from django.db import connection

from metrics.services import outbox_add
from tests.processes import stop_process

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
POINTS = 20_000
BATCH = 500
FLUSHERS = 3
MEASUREMENT, FIELD = "flush_many", "value"
# 2026-01-01T00:00:00Z in ns; point i is at BASE + i µs.
BASE_NS = 1_767_225_600_000_000_000
WAIT = 90.0
SENT = re.compile(r"(\d+) point\(s\) sent in (\d+) batch\(es\)")


def lines(count: int, *, first: int = 0, offset_ns: int = 0) -> list[str]:
    return [
        f"{MEASUREMENT},series=s{i % 50} {FIELD}={i}i {BASE_NS + offset_ns + i * 1000}"
        for i in range(first, first + count)
    ]


@contextlib.contextmanager
def hung_influxdb():
    """The URL of an "InfluxDB" that accepts connections, reads requests and never
    answers (a server stuck mid-write), held open until the block ends."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def flusher_env(database: str) -> dict:
    db = settings.DATABASES["default"]
    credentials = quote(db["USER"]) + (f":{quote(db['PASSWORD'])}" if db["PASSWORD"] else "")
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": f"postgres://{credentials}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "INFLUXDB_URL": settings.INFLUXDB_URL,
        "INFLUXDB_API": "v1",
        "INFLUXDB_TOKEN": "",
        "INFLUXDB_DATABASE": database,
        "INFLUXDB_RETENTION_POLICY": "",
        "INFLUXDB_QUERY_LANGUAGE": "influxql",
        "METRICS_FLUSH_BACKOFF_BASE_MS": "10",
        "METRICS_FLUSH_BACKOFF_MAX_MS": "100",
    }


def start_flushers(
    database: str, *options: str, count: int = FLUSHERS, influxdb_url: str | None = None
) -> list[subprocess.Popen]:
    command = [sys.executable, "manage.py", "flush_metrics", "-v", "0", "--batch-size", str(BATCH)]
    env = flusher_env(database)
    if influxdb_url is not None:
        # Its post must outlast the test, not fail at the default 10 s read timeout.
        env.update(INFLUXDB_URL=influxdb_url, INFLUXDB_TIMEOUT_MS="120000")
    return [
        subprocess.Popen(
            [*command, *options],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(count)
    ]


def finished(procs: list[subprocess.Popen]) -> list[tuple[int, int]]:
    """(exit status, points the flusher reported sent) of each, once it has exited."""
    results = []
    for proc in procs:
        output, _ = proc.communicate(timeout=WAIT)
        sent = SENT.search(output)
        assert proc.returncode == 0 and sent, output
        results.append((proc.returncode, int(sent.group(1))))
    return results


def outbox_rows() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM metrics_outbox")
        return cursor.fetchone()[0]


def influx_sum(influxd, database: str) -> int:
    rows = influxd.select(f'SELECT sum("{FIELD}") FROM "{MEASUREMENT}"', database)
    return rows[0]["sum"] if rows else 0


def wait_for(check, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def backend_ports(pid: int) -> list[int]:
    """Local ports of the process's connections to PostgreSQL (pg_stat_activity.client_port)."""
    port = int(settings.DATABASES["default"]["PORT"] or 5432)
    return [
        c.laddr.port
        for c in psutil.Process(pid).net_connections("tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    ]


def holds_a_batch(pid: int) -> bool:
    """Whether the process's transaction has taken rows FOR UPDATE (it has a transaction
    id) and waits for its client: the flusher is between its SELECT and its DELETE,
    i.e. posting the batch to InfluxDB."""
    ports = backend_ports(pid)
    if not ports:
        return False
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE client_port = ANY(%s) "
            "AND state = 'idle in transaction' AND backend_xid IS NOT NULL",
            [ports],
        )
        return cursor.fetchone()[0] > 0


def test_three_flushers_share_the_outbox_and_send_each_point_once(influxd, influx_v1):
    outbox_add(lines(POINTS))
    results = finished(start_flushers(influx_v1))

    assert outbox_rows() == 0
    assert influxd.count(influx_v1, MEASUREMENT, FIELD) == POINTS
    assert influx_sum(influxd, influx_v1) == sum(range(POINTS))
    # SKIP LOCKED: no row was in two flushers' batches, so the reports add up to N.
    assert sum(sent for _, sent in results) == POINTS


def test_a_flusher_killed_holding_a_batch_loses_nothing_and_duplicates_nothing(influxd, influx_v1):
    follow = ("--follow", "--interval", "0.05")
    with hung_influxdb() as hung:
        # The victim's InfluxDB never answers, and the survivors start once it holds a
        # batch: it is caught mid-post every time, instead of when polling happened to
        # see it between its SELECT and its DELETE (fast survivors once emptied the
        # outbox before the victim took a batch).
        (victim,) = start_flushers(influx_v1, *follow, count=1, influxdb_url=hung)
        procs = [victim]
        try:
            wait_for(lambda: backend_ports(victim.pid), "the victim to connect")
            outbox_add(lines(POINTS))
            wait_for(lambda: holds_a_batch(victim.pid), "the victim to hold a batch", timeout=30)
            survivors = start_flushers(influx_v1, *follow, count=FLUSHERS - 1)
            procs += survivors
            # Midway: some batches are in, and the victim is still posting its own.
            wait_for(lambda: outbox_rows() < POINTS, "the survivors' first batches")
            assert holds_a_batch(victim.pid)
            killed = _kill_and_drain(victim, survivors, influxd, influx_v1)
        finally:
            for proc in procs:
                stop_process(proc, 10)
    left_at_kill, results = killed
    assert victim.returncode == -signal.SIGKILL
    # The victim's batch (at least) was still in the outbox when it died.
    assert 0 < left_at_kill < POINTS
    assert sum(sent for _, sent in results) >= left_at_kill
    assert influxd.count(influx_v1, MEASUREMENT, FIELD) == POINTS
    assert influx_sum(influxd, influx_v1) == sum(range(POINTS))


def _kill_and_drain(victim, survivors, influxd, influx_v1):
    """SIGKILL the victim; let the survivors empty the outbox, then stop them.
    (rows left in the outbox at the kill, the survivors' results)."""
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    left_at_kill = outbox_rows()
    wait_for(lambda: outbox_rows() == 0, "the survivors to empty the outbox")
    wait_for(
        lambda: influxd.count(influx_v1, MEASUREMENT, FIELD) == POINTS,
        "InfluxDB to hold every point",
    )
    for proc in survivors:
        proc.send_signal(signal.SIGTERM)
    return left_at_kill, finished(survivors)


def test_a_resent_point_overwrites_itself_in_influxdb(influxd, influx_v1):
    count = 2_000
    outbox_add(lines(count))
    finished(start_flushers(influx_v1))
    # The same points again, as a batch is re-sent after a flusher dies between
    # InfluxDB's acknowledgement and its DELETE: same measurement, tags and timestamps.
    outbox_add(lines(count))
    again = finished(start_flushers(influx_v1))
    assert sum(sent for _, sent in again) == count
    assert influxd.count(influx_v1, MEASUREMENT, FIELD) == count
    assert influx_sum(influxd, influx_v1) == sum(range(count))
    # The count does see distinct points: the same series half a microsecond later are new points.
    outbox_add(lines(10, offset_ns=500))
    finished(start_flushers(influx_v1, count=1))
    assert influxd.count(influx_v1, MEASUREMENT, FIELD) == count + 10
