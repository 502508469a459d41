"""Real-time updates end to end: a real ASGI server process, real websocket clients over
loopback, agent updates driven through the service layer.

    .venv/bin/python benchmarks/realtime.py [--scenarios publish,watchers,dashboards]
        [--servers uvicorn,daphne] [--watchers 500,1000,2000] [--rate 1000]
        [--dashboard-rates 100,200,300,500] [--conflate-ms 250] [--duration 15]
    .venv/bin/python benchmarks/realtime.py --scenarios watchers-spread,dashboards-max-rate
        [--spread-watchers 1000] [--spread-rounds 2] [--max-rate-steps 100,200,300,...]
        [--step-duration 10]

Scenarios (docs/BENCH-realtime.md records a run):
  publish     the publisher alone: time to publish one batch (1, 50, --publish-batch
              updates) with the replay history (the stream append) and without it (the
              pub/sub PUBLISH it replaced), alternating. Target: ratio <= 1.2x.
  watchers    N clients, each on /ws/agents/<its agent>/, while those agents get --rate
              updates/s in total. Targets: N=1,000 p99 <= 50 ms; N=2,000 held, no errors.
  dashboards  100 clients on the tenant stream /ws/agents/ at --rate updates/s; then the
              per-update stream at each of --dashboard-rates (highest with p99 <= 100 ms),
              then the conflated stream (?conflate=<ms>) at --rate.
  mix         the production mix of the soak: --mix-rate updates/s, --mix-watchers
              watchers, --mix-dashboards conflated dashboards, flush_metrics --follow into
              InfluxDB and a backup, against the same watchers alone. Target: p99 <= 100 ms.
  storm       --storm-clients clients (one agent each) while uvicorn is SIGKILLed and
              restarted: time until each has resumed and caught up, against fresh
              reconnects (no resume_after).
  watchers-spread
              --spread-watchers watchers (one agent each, --rate updates/s in total) on
              one uvicorn process, then spread evenly over two (same Redis, same
              database); --spread-rounds rounds, interleaved. p50/p99 side by side.
  dashboards-max-rate
              100 dashboards on the per-update tenant stream (no conflation), the rate
              stepped through --max-rate-steps (--step-duration s each) until p99 >
              100 ms, something is dropped or the driver falls short, then once halfway
              back: the highest rate held, with one uvicorn process and with two. Both
              set-ups stay connected (each on a tenant of its own) and are measured in
              turn at each rate.

Latency is commit -> receive: the message's timestamp is taken in transaction.on_commit,
the client subtracts it from its clock when the frame arrives (same machine, same clock).
Server CPU is the server process's user+system time over the measured window; memory per
connection is (server RSS with all clients connected - RSS before) / N. Client, server,
driver, PostgreSQL and Redis share the same (small) machine: read the figures with that.
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Its own database, Redis database and channel prefix: other benchmarks and test runs
# on this machine must not see these messages.
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/freeagentics_bench_rt")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/12")
os.environ.setdefault("CHANNEL_PREFIX", "bench-rt")
os.environ.setdefault("CACHE_KEY_PREFIX", "bench-rt")
os.environ.setdefault("DATABASE_POOL_MAX_SIZE", "8")

from common import median, percentile, report, setup  # noqa: E402

CONNECT_CONCURRENCY = 50
TIMESTAMP = re.compile(rb'"timestamp":([0-9.e+-]+)')
# A frame's seq is Redis' clock (µs) when its batch was appended: it splits commit ->
# receive into commit -> appended (the publisher) and appended -> received (the hub on).
SEQ = re.compile(rb'"seq":([0-9]+)')
OVERFLOW = b'{"type":"overflow"'
# One commit costs ~20 ms on this machine's disk (fsync), so 1,000 updates/s means
# batches of 50 every 50 ms. Latency is measured from each commit, not from the batch start.
BATCH_INTERVAL = 0.05
SETTLE_SECONDS = 3.0


# Client process --------------------------------------------------------------------------


async def run_clients(args) -> None:
    import uvloop  # noqa: F401  (the loop policy is set by the caller)
    from websockets.asyncio.client import connect

    urls = Path(args.urls_file).read_text().split()
    headers = {"Authorization": f"Bearer {args.token}"}
    state = {"recording": False, "closed": 0, "dropped": 0, "messages": 0, "frames": 0}
    latencies = array("d")
    published = array("d")
    sockets = []
    readers = []

    async def reader(ws) -> None:
        # Timestamps are found with a regex rather than json.loads: on this small machine
        # the load generator must not be what limits the measurement. A dashboard parses.
        try:
            while True:
                raw = await ws.recv(decode=False)
                if not state["recording"]:
                    continue
                now = time.time()
                state["frames"] += 1
                if raw.startswith(OVERFLOW):
                    state["dropped"] += json.loads(raw)["dropped"]
                    continue
                stamps = TIMESTAMP.findall(raw)
                latencies.extend([now - float(t) for t in stamps])
                seqs = SEQ.findall(raw)
                if len(seqs) == len(stamps):
                    published.extend(
                        [int(q) / 1e6 - float(t) for q, t in zip(seqs, stamps, strict=True)]
                    )
                state["messages"] += len(stamps)
        except Exception:
            pass
        if state["recording"]:
            state["closed"] += 1

    semaphore = asyncio.Semaphore(CONNECT_CONCURRENCY)
    failed = 0

    async def open_one(url: str):
        nonlocal failed
        async with semaphore:
            try:
                ws = await connect(
                    url,
                    additional_headers=headers,
                    proxy=None,
                    compression="deflate" if args.compression else None,
                    max_size=None,
                    open_timeout=60,
                    ping_interval=None,
                )
            except Exception:
                failed += 1
                return
            sockets.append(ws)
            readers.append(asyncio.ensure_future(reader(ws)))

    await asyncio.gather(*(open_one(u) for u in urls))
    loop = asyncio.get_running_loop()
    print(f"READY {len(sockets)} {failed}", flush=True)
    # One measured window per GO ... STOP; the connections stay up between windows.
    while True:
        while (line := (await loop.run_in_executor(None, sys.stdin.readline)).strip()) != "GO":
            if not line:
                break
        if line != "GO":
            break
        state.update(recording=True, closed=0, dropped=0, messages=0, frames=0)
        del latencies[:]
        del published[:]
        started = time.time()
        await loop.run_in_executor(None, sys.stdin.readline)
        state["recording"] = False
        elapsed = time.time() - started
        print(
            json.dumps(
                {
                    "connected": len(sockets),
                    "failed": failed,
                    "closed": state["closed"],
                    "dropped": state["dropped"],
                    "messages": state["messages"],
                    "frames": state["frames"],
                    "elapsed": elapsed,
                    "latencies": latencies.tolist(),
                    "published": published.tolist(),
                }
            ),
            flush=True,
        )
    for ws in sockets:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 2)


async def run_storm_clients(args) -> None:
    """The reconnect storm's clients: each resumes from its last sequence number
    whenever its connection ends. "RESTART <t>" on stdin marks the restart; "REPORT"
    prints, per client, the seconds from <t> until its `ready` frame (caught up)."""
    import uvloop  # noqa: F401  (the loop policy is set by the caller)
    from websockets.asyncio.client import connect

    urls = Path(args.urls_file).read_text().split()
    headers = {"Authorization": f"Bearer {args.token}"}
    last = [0] * len(urls)
    ready_at: list[float | None] = [None] * len(urls)
    counts = {"resyncs": 0, "replayed": 0, "connected": 0, "duplicates": 0}
    reasons: dict[str, int] = {}
    restart = {"t": None}
    first_round = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(i: int) -> None:
        initial = True
        while True:
            query = f"?resume_after={last[i]}" if last[i] and args.mode == "resume" else ""
            try:
                gate = first_round if initial else contextlib.nullcontext()
                async with gate:
                    ws = await connect(
                        urls[i] + query,
                        additional_headers=headers,
                        proxy=None,
                        max_size=None,
                        open_timeout=60,
                        ping_interval=None,
                    )
                if initial:
                    counts["connected"] += 1
                    initial = False
                elif args.mode == "fresh":
                    await ws.send('{"action":"ping"}')
                async for raw in ws:
                    frame = json.loads(raw)
                    kind = frame.get("type")
                    if kind == "pong" and restart["t"] is not None and ready_at[i] is None:
                        ready_at[i] = time.time() - restart["t"]
                    if kind == "ready" and restart["t"] is not None and ready_at[i] is None:
                        ready_at[i] = time.time() - restart["t"]
                        counts["replayed"] += frame["replayed"]
                    elif kind == "resync":
                        counts["resyncs"] += 1
                        reasons[frame["reason"][:60]] = reasons.get(frame["reason"][:60], 0) + 1
                    elif "seq" in frame and "agent_id" in frame:
                        if frame["seq"] <= last[i]:
                            counts["duplicates"] += 1
                        last[i] = frame["seq"]
            except Exception:
                pass
            await asyncio.sleep(0.02)

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(urls))]
    while counts["connected"] < len(urls):
        await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    print(f"READY {counts['connected']} 0", flush=True)
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        if line.startswith("RESTART"):
            restart["t"] = float(line.split()[1])
        elif line == "REPORT":
            print(json.dumps({**counts, "reasons": reasons, "ready_at": ready_at}), flush=True)
    for task in tasks:
        task.cancel()


def reconnect_storm(tenant, agent_ids, token, args, rng, mode: str) -> dict:
    """--storm-clients clients, one agent each, while agents get --storm-rate updates/s:
    uvicorn is SIGKILLed, stays down --storm-down s (updates go on), and starts again on
    the same port; every client resumes at once. Time from the restart until each client
    has caught up (its `ready` frame). The baseline, mode "fresh": the same clients
    reconnect without resume_after and are timed to the answer of a ping (served, with
    whatever they missed lost)."""
    import threading

    n = args.storm_clients
    port = free_port()
    log_dir = Path(args.tmp)
    urls_file = log_dir / "storm-urls.txt"

    def start() -> subprocess.Popen:
        log = open(log_dir / f"storm-{time.time():.0f}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            server_command("uvicorn", port, False),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return proc
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("uvicorn did not start for the storm")
            time.sleep(0.02)

    server = start()
    urls_file.write_text(
        "\n".join(
            f"ws://127.0.0.1:{port}/ws/agents/{agent_ids[i % len(agent_ids)]}/" for i in range(n)
        )
    )
    clients = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "storm-client",
            "--token",
            token,
            "--urls-file",
            str(urls_file),
            "--mode",
            mode,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        clients.stdout.readline()  # READY
        stop = threading.Event()

        def driving() -> None:
            while not stop.is_set():
                drive(tenant, agent_ids[:n], args.storm_rate, 1.0, rng)

        driver = threading.Thread(target=driving, daemon=True)
        driver.start()
        time.sleep(3)
        server.kill()
        server.wait()
        time.sleep(args.storm_down)
        server = start()
        clients.stdin.write(f"RESTART {time.time()}\n")
        clients.stdin.flush()
        time.sleep(args.storm_wait)
        stop.set()
        driver.join(30)
        clients.stdin.write("REPORT\n")
        clients.stdin.flush()
        result = json.loads(clients.stdout.readline())
    finally:
        clients.stdin.close()
        clients.wait(30)
        server.send_signal(signal.SIGINT)
        server.wait(15)
    times = sorted(t for t in result["ready_at"] if t is not None)
    return {
        "mode": mode,
        "clients": n,
        "caught_up": len(times),
        "p50_s": percentile(times, 50) if times else None,
        "p99_s": percentile(times, 99) if times else None,
        "max_s": times[-1] if times else None,
        "replayed": result["replayed"],
        "resyncs": result["resyncs"],
        "resync_reasons": result["reasons"],
        "duplicates": result["duplicates"],
    }


def production_mix(tenant, agent_ids, token, args, rng) -> list[dict]:
    """The soak's mix: --mix-rate updates/s, --mix-watchers watchers (one agent each),
    --mix-dashboards dashboards on the tenant stream (?conflate=250), the metrics flusher
    (flush_metrics --follow into a real InfluxDB) and a backup (manage.py backup) started
    in the window. The watchers' latency is measured alone (their own client process),
    against the same watchers at the same rate with nothing else (the baseline), in
    alternating rounds."""
    from tests.metrics.conftest import InfluxDB

    tmp = Path(args.tmp)
    watcher_paths = [f"/ws/agents/{a}/" for a in agent_ids[: args.mix_watchers]]
    workdir = tmp / f"mix-influxd-{time.time():.0f}"
    workdir.mkdir(parents=True)
    influxd = InfluxDB(workdir)
    influxd.start()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "INFLUXDB_URL": influxd.url,
        "INFLUXDB_API": "v1",
        "INFLUXDB_DATABASE": influxd.create_database(),
        "BACKUP_DIR": str(tmp / "mix-backups"),
    }
    rows = []
    try:
        for _ in range(args.rounds):
            for variant in ("watchers alone", "production mix"):
                with running_server("uvicorn", tmp) as (proc, url):
                    time.sleep(1.0)
                    watchers = Clients(token, [url + p for p in watcher_paths], 1, tmp, args)
                    extras: list = []
                    dashboards = None
                    if variant == "production mix":
                        dashboards = Clients(
                            token,
                            [f"{url}/ws/agents/?conflate=250"] * args.mix_dashboards,
                            1,
                            tmp,
                            args,
                        )
                        extras.append(
                            subprocess.Popen(
                                [sys.executable, "manage.py", "flush_metrics", "--follow"],
                                cwd=ROOT,
                                env=env,
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                            )
                        )
                    try:
                        if dashboards is not None:
                            dashboards.send("GO")
                            # The backup starts with the window and runs through it.
                            extras.append(
                                subprocess.Popen(
                                    [sys.executable, "manage.py", "backup", "--no-redis"],
                                    cwd=ROOT,
                                    env=env,
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL,
                                )
                            )
                        result = measure(
                            [proc], watchers, tenant, agent_ids, args.mix_rate, args, rng
                        )
                        if dashboards is not None:
                            dashboards.send("STOP")
                            dashboards.results()
                    finally:
                        for extra in extras:
                            extra.terminate()
                            with contextlib.suppress(subprocess.TimeoutExpired):
                                extra.wait(30)
                        watchers.close()
                        if dashboards is not None:
                            dashboards.close()
                result["variant"] = variant
                rows.append(result)
    finally:
        influxd.stop()
    return rows


# Orchestration ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(server: str, port: int, compression: bool) -> list[str]:
    if server == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", "freeagentics.asgi:application",
            "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--no-access-log",
            # Browsers offer permessage-deflate and uvicorn accepts it by default; it
            # compresses every frame once per connection (docs/BENCH-realtime.md).
            "--ws-per-message-deflate", "true" if compression else "false",
        ]  # fmt: skip
    if server == "daphne":
        return [
            sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
            "-v", "0", "freeagentics.asgi:application",
        ]  # fmt: skip
    raise SystemExit(f"unknown server {server!r}")


@contextlib.contextmanager
def running_servers(server: str, count: int, log_dir: Path, compression: bool = False):
    """`count` server processes, each on a port of its own: yields [(process, url)]."""
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(running_server(server, log_dir, compression)) for _ in range(count)
        ]


@contextlib.contextmanager
def running_server(server: str, log_dir: Path, compression: bool = False):
    port = free_port()
    log_path = log_dir / f"{server}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            server_command(server, port, compression),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{server} exited; see {log_path}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{server} did not start; see {log_path}")
            time.sleep(0.1)
        yield proc, f"ws://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_client_sets = itertools.count()


class Clients:
    """Client processes, each holding a share of the connections (full ws:// URLs)."""

    def __init__(self, token: str, urls: list[str], processes: int, tmp: Path, args):
        self.procs = []
        share = -(-len(urls) // processes)
        for n in range(processes):
            chunk = urls[n * share : (n + 1) * share]
            if not chunk:
                continue
            urls_file = tmp / f"urls-{next(_client_sets)}.txt"
            urls_file.write_text("\n".join(chunk))
            command = [
                sys.executable, __file__, "client", "--token", token,
                "--urls-file", str(urls_file),
            ] + (["--compression"] if args.compression else [])  # fmt: skip
            self.procs.append(
                subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
                )
            )
        self.connected = self.failed = 0
        for proc in self.procs:
            _, connected, failed = proc.stdout.readline().split()
            self.connected += int(connected)
            self.failed += int(failed)

    def send(self, line: str) -> None:
        for proc in self.procs:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()

    def results(self) -> dict:
        merged = {
            "latencies": [],
            "published": [],
            "messages": 0,
            "frames": 0,
            "closed": 0,
            "dropped": 0,
        }
        elapsed = []
        for proc in self.procs:
            result = json.loads(proc.stdout.readline())
            for key in ("messages", "frames", "closed", "dropped"):
                merged[key] += result[key]
            merged["latencies"] += result["latencies"]
            merged["published"] += result["published"]
            elapsed.append(result["elapsed"])
        merged["elapsed"] = max(elapsed)
        return merged

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.stdin.close()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def drive(tenant, agent_ids: list, rate: float, seconds: float, rng) -> tuple[int, float]:
    """Update agents round-robin at `rate` per second through the batched service, one
    batch every BATCH_INTERVAL. Returns (updates done, achieved rate)."""
    import h3
    import numpy as np

    from agents.services import agents_update_states
    from agents.types import AgentStateUpdate

    per_batch = max(1, round(rate * BATCH_INTERVAL))
    interval = per_batch / rate
    cells = [h3.latlng_to_cell(52.52 + d / 1000, 13.40 + d / 1000, 9) for d in range(64)]
    beliefs = [rng.dirichlet(np.ones(8)) for _ in range(64)]
    cursor = done = 0
    start = next_at = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = []
        for _ in range(per_batch):
            n = cursor % len(agent_ids)
            batch.append(
                AgentStateUpdate(
                    agent_ids[n],
                    energy_level=(cursor // len(agent_ids)) % 100,
                    location_h3=cells[cursor % 64],
                    beliefs=beliefs[cursor % 64],
                )
            )
            cursor += 1
        agents_update_states(tenant=tenant, updates=batch)
        done += len(batch)
        next_at += interval
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    return done, done / (time.perf_counter() - start)


def measure(
    server_procs, clients: Clients, tenant, agent_ids, rate, args, rng, duration=None
) -> dict:
    """Drive `rate` updates/s for `duration` s (default --duration) and measure. Server
    CPU and RSS are summed over the server processes."""
    import psutil

    from realtime.publisher import publisher

    servers = [psutil.Process(p.pid) for p in server_procs]
    drive(tenant, agent_ids, rate, SETTLE_SECONDS, rng)
    publisher.flush()
    time.sleep(0.5)
    clients.send("GO")
    cpu_before = [s.cpu_times() for s in servers]
    client_cpu_before = [psutil.Process(p.pid).cpu_times() for p in clients.procs]
    driver_cpu_before = psutil.Process().cpu_times()
    wall = time.perf_counter()
    driving = time.perf_counter()
    done, achieved = drive(tenant, agent_ids, rate, duration or args.duration, rng)
    driving = time.perf_counter() - driving
    backlog = publisher._backlog
    flushing = time.perf_counter()
    flushed = publisher.flush(timeout=60)
    flushing = time.perf_counter() - flushing
    time.sleep(1.0)  # let in-flight frames land before the clients stop counting
    wall = time.perf_counter() - wall
    cpu_after = [s.cpu_times() for s in servers]
    client_cpu_after = [psutil.Process(p.pid).cpu_times() for p in clients.procs]
    driver_cpu_after = psutil.Process().cpu_times()
    clients.send("STOP")
    result = clients.results()

    def busy(before, after) -> float:
        return (after.user - before.user + after.system - before.system) / wall

    latencies = result.pop("latencies")
    published = result.pop("published")
    return {
        **result,
        "updates": done,
        "achieved_rate": achieved,
        "server_cpu": sum(busy(b, a) for b, a in zip(cpu_before, cpu_after, strict=True)),
        "clients_cpu": sum(
            busy(b, a) for b, a in zip(client_cpu_before, client_cpu_after, strict=True)
        ),
        "driver_cpu": busy(driver_cpu_before, driver_cpu_after),
        "server_rss_mib": sum(s.memory_info().rss for s in servers) / 2**20,
        "publisher_backlog": backlog,
        "publisher_flush_s": flushing if flushed else float("inf"),
        "load_average": os.getloadavg()[0],
        "p50_ms": percentile(latencies, 50) * 1000,
        "p95_ms": percentile(latencies, 95) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000,
        # commit -> appended to the stream (the publisher thread), from each frame's seq.
        "published_p50_ms": percentile(published, 50) * 1000,
        "published_p99_ms": percentile(published, 99) * 1000,
        # Messages of the updates committed in the driving window, per second of it.
        "delivered_per_s": result["messages"] / driving,
    }


def spread(urls: list[str], paths: list[str]) -> list[str]:
    """Client i connects to server i mod len(urls): an even spread, and every client
    process holds connections to every server."""
    return [f"{urls[i % len(urls)]}{path}" for i, path in enumerate(paths)]


@contextlib.contextmanager
def connected(server: str, processes: int, paths: list[str], token, args):
    """Start `processes` servers and connect the clients, spread over them; yields
    (server processes, Clients, RSS growth per connection in KiB)."""
    import psutil

    tmp = Path(args.tmp)
    with running_servers(server, processes, tmp, args.compression) as started:
        procs = [proc for proc, _ in started]

        def rss() -> int:
            return sum(psutil.Process(p.pid).memory_info().rss for p in procs)

        time.sleep(1.0)
        rss_before = rss()
        clients = Clients(
            token, spread([url for _, url in started], paths), args.client_processes, tmp, args
        )
        try:
            time.sleep(1.0)
            per_connection = (rss() - rss_before) / 1024 / max(1, clients.connected)
            yield procs, clients, per_connection
        finally:
            clients.close()


def scenario(
    server: str, paths: list[str], rate: float, tenant, agent_ids, token, args, rng, processes=1
):
    """Start `processes` servers, connect len(paths) clients spread over them, drive
    `rate` updates/s, measure."""
    with connected(server, processes, paths, token, args) as (procs, clients, per_connection):
        result = measure(procs, clients, tenant, agent_ids, rate, args, rng)
    result.update(
        server=server if processes == 1 else f"{server} x{processes}",
        processes=processes,
        connections=clients.connected,
        connect_failures=clients.failed,
        rate=rate,
        kib_per_connection=per_connection,
    )
    return result


def holds(result: dict, p99_ms: float = 100) -> bool:
    """Kept up: p99 within the bound, nothing dropped or closed, the driver at rate."""
    return (
        result["p99_ms"] <= p99_ms
        and result["dropped"] == 0
        and result["closed"] == 0
        and result["achieved_rate"] >= 0.95 * result["rate"]
    )


def max_rates(server: str, configs: list, paths, args, rng) -> list[dict]:
    """For each config (processes, tenant, agent ids, token): step the per-update rate
    through --max-rate-steps until a step does not hold, then try once halfway between
    the last rate held and that one. All configs stay connected throughout, each on a
    tenant of its own (so only the measured one receives updates), and are measured in
    turn at each rate: the machine's load changes by the minute, and the comparison is
    what matters. Returns every step's result."""
    steps = []
    with contextlib.ExitStack() as stack:
        live = []
        for processes, tenant, agent_ids, token in configs:
            procs, clients, per_connection = stack.enter_context(
                connected(server, processes, paths, token, args)
            )
            live.append(
                {
                    "processes": processes,
                    "tenant": tenant,
                    "agent_ids": agent_ids,
                    "procs": procs,
                    "clients": clients,
                    "per_connection": per_connection,
                    "held": 0.0,
                    "done": False,
                }
            )

        def step(config: dict, rate: float) -> dict:
            result = measure(
                config["procs"],
                config["clients"],
                config["tenant"],
                config["agent_ids"],
                rate,
                args,
                rng,
                duration=args.step_duration,
            )
            processes = config["processes"]
            result.update(
                server=server if processes == 1 else f"{server} x{processes}",
                processes=processes,
                connections=config["clients"].connected,
                connect_failures=config["clients"].failed,
                rate=rate,
                kib_per_connection=config["per_connection"],
            )
            result["held"] = holds(result)
            steps.append(result)
            report(
                f"Dashboards, max rate: {len(paths)} on the per-update stream, "
                f"{rate:,.0f} updates/s, {processes} process(es)",
                describe(result),
            )
            return result

        for rate in (float(r) for r in args.max_rate_steps.split(",") if r):
            for config in live:
                if config["done"]:
                    continue
                if step(config, rate)["held"]:
                    config["held"] = rate
                    continue
                config["done"] = True
                middle = round((config["held"] + rate) / 2 / 50) * 50
                if config["held"] < middle < rate:
                    step(config, middle)
            if all(config["done"] for config in live):
                break
    return steps


def describe(result: dict) -> list[tuple[str, str]]:
    n = max(1, result["connections"])
    return [
        ("server", result["server"]),
        ("connections (failed)", f"{result['connections']} ({result['connect_failures']})"),
        ("updates/s asked, done", f"{result['rate']:,.0f}, {result['achieved_rate']:,.0f}"),
        (
            "messages delivered/s",
            f"{result['delivered_per_s']:,.0f} in {result['frames']:,} frames",
        ),
        (
            "commit->receive p50/p95/p99 (max)",
            f"{result['p50_ms']:.1f} / {result['p95_ms']:.1f} / {result['p99_ms']:.1f} ms "
            f"({result['max_ms']:.0f} ms)",
        ),
        (
            "of which commit->appended p50/p99",
            f"{result['published_p50_ms']:.1f} / {result['published_p99_ms']:.1f} ms",
        ),
        ("dropped (overflow) / closed", f"{result['dropped']:,} / {result['closed']}"),
        (
            "server CPU (per connection)",
            f"{result['server_cpu']:.0%} of a core ({result['server_cpu'] / n * 1e3:.2f} "
            "milli-core)",
        ),
        (
            "server RSS; per connection",
            f"{result['server_rss_mib']:.0f} MiB; {result['kib_per_connection']:.1f} KiB",
        ),
        (
            "publisher backlog at end; flush",
            f"{result['publisher_backlog']} jobs; {result['publisher_flush_s']:.2f} s",
        ),
        ("machine load average (1 min)", f"{result['load_average']:.1f}"),
        (
            "CPU: clients / driver",
            f"{result['clients_cpu']:.0%} / {result['driver_cpu']:.0%} of a core",
        ),
    ]


# The publishing path alone -----------------------------------------------------------------


def publish_path(tenant, agent_ids, args) -> list[dict]:
    """The publisher's cost for one batch, with the replay history (the Lua script that
    numbers the batch and appends it to the tenant's stream: what the publisher does)
    against without it (channels-redis' pub/sub layer, one PUBLISH per batch: the
    transport before the history). Same frames, same Redis; the variants alternate
    within each round, for batches of 1, 50 and --publish-batch updates."""
    import numpy as np
    from channels_redis.pubsub import RedisPubSubChannelLayer

    from agents.encryption import encrypt_array
    from agents.selectors import get_agent
    from realtime import history
    from realtime.protocol import EVENT_UPDATED, tenant_group
    from realtime.publisher import _state_batch

    sizes = sorted({1, 50, args.publish_batch})
    states = [get_agent(tenant=tenant, agent_id=a) for a in agent_ids[: max(sizes)]]
    beliefs = np.full(8, 1 / 8)
    token = encrypt_array(beliefs, tenant_id=tenant.id)
    repeats = {1: 400, 50: 100}

    async def run() -> list[dict]:
        layer = RedisPubSubChannelLayer(hosts=[os.environ["REDIS_URL"]], prefix="bench-rt.pubsub.")
        listener = await layer.new_channel()
        await layer.group_add(tenant_group(tenant.id), listener)
        appender = history.Appender()
        rows = []
        for size in sizes:
            (built,) = _state_batch(
                str(tenant.id),
                EVENT_UPDATED,
                [(s, beliefs, token) for s in states[:size]],
                time.time(),
            )
            message = built[1]
            n = repeats.get(size, 10)
            for _ in range(args.rounds):
                for variant in ("without history", "with history"):
                    start = time.perf_counter()
                    for _ in range(n):
                        if variant == "with history":
                            payload = history.pack(
                                message["agents"],
                                message["frames"],
                                message["tokens"],
                                message["timestamp"],
                            )
                            await appender.append(str(tenant.id), payload, size, gap=False)
                        else:
                            await layer.group_send(tenant_group(tenant.id), message)
                    per_batch = (time.perf_counter() - start) / n
                    rows.append({"variant": variant, "size": size, "ms": per_batch * 1000})
        await layer.flush()
        await appender.redis.aclose()
        return rows

    return asyncio.run(run())


# Main ---------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenarios",
        default="publish,watchers,dashboards,watchers-spread,dashboards-max-rate",
    )
    parser.add_argument("--servers", default="uvicorn,daphne")
    parser.add_argument("--watchers", default="500,1000,2000")
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--dashboards", type=int, default=100)
    parser.add_argument("--dashboard-agents", type=int, default=1000)
    parser.add_argument("--dashboard-rates", default="100,200,300,500")
    parser.add_argument(
        "--conflate-ms",
        default="250,50",
        help="conflation intervals; the first runs on every server, the others on the first",
    )
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument(
        "--spread-watchers", type=int, default=1000, help="watchers-spread: watchers in all"
    )
    parser.add_argument(
        "--spread-rounds", type=int, default=2, help="watchers-spread: rounds of (1, 2 processes)"
    )
    parser.add_argument(
        "--max-rate-steps",
        default="100,200,300,400,500,600,800",
        help="dashboards-max-rate: per-update rates tried in turn, until one does not hold",
    )
    parser.add_argument(
        "--step-duration",
        type=float,
        default=10,
        help="dashboards-max-rate: seconds measured per step",
    )
    parser.add_argument("--mix-rate", type=float, default=2000, help="mix: updates/s")
    parser.add_argument("--mix-watchers", type=int, default=310)
    parser.add_argument("--mix-dashboards", type=int, default=10)
    parser.add_argument("--storm-clients", type=int, default=1000)
    parser.add_argument("--storm-rate", type=float, default=200, help="storm: updates/s")
    parser.add_argument("--storm-down", type=float, default=2, help="storm: seconds down")
    parser.add_argument(
        "--storm-wait", type=float, default=20, help="storm: seconds given to catch up"
    )
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--compression", action="store_true", help="permessage-deflate")
    parser.add_argument("--publish-batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=str(ROOT / "var" / "bench-realtime.json"))
    parser.add_argument("--tmp", default=str(ROOT / "var" / "bench-realtime"))
    args = parser.parse_args()
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    setup()

    import numpy as np

    from agents.models import Agent, Tenant
    from agents.services import AgentSpec, agents_bulk_load
    from realtime.services import api_token_create

    rng = np.random.default_rng(0)
    scenarios = set(args.scenarios.split(","))
    servers = args.servers.split(",")
    watchers = [int(n) for n in args.watchers.split(",")]
    needed = max([*watchers, args.spread_watchers, args.dashboard_agents, args.publish_batch])

    def bench_tenant(slug: str, agents: int):
        """The tenant `slug` with exactly `agents` agents (loaded once), its agent ids and
        a new token that may read beliefs."""
        tenant, _ = Tenant.objects.get_or_create(slug=slug, defaults={"name": slug})
        if Agent.objects.filter(tenant=tenant).count() != agents:
            Agent.objects.filter(tenant=tenant).delete()
            agents_bulk_load(
                tenant=tenant,
                specs=(
                    AgentSpec(
                        name=f"rt{i:05d}", agent_type="bench", beliefs=rng.dirichlet(np.ones(8))
                    )
                    for i in range(agents)
                ),
            )
        agent_ids = list(
            Agent.objects.filter(tenant=tenant).order_by("name").values_list("id", flat=True)
        )
        _, token = api_token_create(tenant=tenant, name="benchmark", can_read_beliefs=True)
        return tenant, agent_ids, token

    tenant, agent_ids, token = bench_tenant("bench-realtime", needed)
    print(
        f"{os.cpu_count()} CPUs shared by server, clients, driver, PostgreSQL and Redis; "
        f"{args.duration:.0f} s measured per run after {SETTLE_SECONDS:.0f} s settling; "
        f"batches every {BATCH_INTERVAL * 1000:.0f} ms; compression "
        f"{'on' if args.compression else 'off'}"
    )
    results = {
        "publish": [],
        "watchers": [],
        "dashboards": [],
        "watchers-spread": [],
        "dashboards-max-rate": [],
        "storm": [],
        "mix": [],
    }

    if "publish" in scenarios:
        rows = publish_path(tenant, agent_ids, args)
        results["publish"] = rows
        lines = []
        for size in sorted({r["size"] for r in rows}):
            without, with_ = (
                median([r["ms"] for r in rows if r["size"] == size and r["variant"] == v])
                for v in ("without history", "with history")
            )
            lines.append(
                (
                    f"batch of {size:,}: without / with history",
                    f"{without:,.3f} / {with_:,.3f} ms per batch, ratio {with_ / without:.2f}x"
                    " (target <= 1.2x)",
                )
            )
        report(f"Publisher cost per batch (median of {args.rounds} rounds)", lines)

    if "storm" in scenarios:
        results["storm"] = [
            reconnect_storm(tenant, agent_ids, token, args, rng, mode)
            for _ in range(args.rounds if args.rounds < 3 else 1)
            for mode in ("fresh", "resume")
        ]
        lines = []
        for storm in results["storm"]:
            label = "resume_after" if storm["mode"] == "resume" else "fresh (baseline, no resume)"
            lines += [
                (f"{label}: caught up within the wait", f"{storm['caught_up']:,}"),
                (
                    f"{label}: restart to caught up p50 / p99 / max",
                    f"{storm['p50_s']:.2f} / {storm['p99_s']:.2f} / {storm['max_s']:.2f} s"
                    if storm["caught_up"]
                    else "none caught up",
                ),
            ]
            if storm["mode"] == "resume":
                lines.append(
                    (
                        f"{label}: replayed / resyncs / duplicates",
                        f"{storm['replayed']:,} / {storm['resyncs']} / {storm['duplicates']}",
                    )
                )
        report(
            f"Reconnect storm: {args.storm_clients:,} clients reconnect at once after a restart",
            lines,
        )

    if "mix" in scenarios:
        results["mix"] = production_mix(tenant, agent_ids, token, args, rng)
        lines = []
        for variant in ("watchers alone", "production mix"):
            runs = [r for r in results["mix"] if r["variant"] == variant]
            lines.append(
                (
                    f"{variant}: watchers p50 / p99 (median of {len(runs)})",
                    f"{median([r['p50_ms'] for r in runs]):.1f} / "
                    f"{median([r['p99_ms'] for r in runs]):.1f} ms (commit -> appended p50 / "
                    f"p99 {median([r['published_p50_ms'] for r in runs]):.1f} / "
                    f"{median([r['published_p99_ms'] for r in runs]):.1f} ms); updates/s done "
                    f"{median([r['achieved_rate'] for r in runs]):,.0f}; server CPU "
                    f"{median([r['server_cpu'] for r in runs]) * 100:.0f}% of a core; "
                    f"load {median([r['load_average'] for r in runs]):.1f}",
                )
            )
        report(
            f"Production mix: {args.mix_rate:,.0f} updates/s, {args.mix_watchers} watchers, "
            f"{args.mix_dashboards} dashboards (conflate 250 ms), flusher, backup",
            lines,
        )

    if "watchers" in scenarios:
        for server in servers:
            for n in watchers:
                paths = [f"/ws/agents/{agent_id}/" for agent_id in agent_ids[:n]]
                result = scenario(server, paths, args.rate, tenant, agent_ids[:n], token, args, rng)
                result["scenario"] = f"watchers N={n}"
                results["watchers"].append(result)
                report(f"Watchers: N={n}, {args.rate:,.0f} updates/s, {server}", describe(result))

    if "dashboards" in scenarios:
        dash_ids = agent_ids[: args.dashboard_agents]
        stream = ["/ws/agents/"] * args.dashboards
        runs = [(s, stream, args.rate, "per-update") for s in servers]
        runs += [
            (servers[0], stream, float(r), "per-update")
            for r in args.dashboard_rates.split(",")
            if r
        ]
        for n, ms in enumerate(int(m) for m in args.conflate_ms.split(",") if m):
            conflated = [f"/ws/agents/?conflate={ms}"] * args.dashboards
            runs += [
                (s, conflated, args.rate, f"conflate {ms} ms")
                for s in (servers if n == 0 else servers[:1])
            ]
        for server, paths, rate, mode in runs:
            result = scenario(server, paths, rate, tenant, dash_ids, token, args, rng)
            result["scenario"] = f"dashboards {mode}"
            results["dashboards"].append(result)
            report(
                f"Dashboards: {args.dashboards} on the tenant stream, {mode}, "
                f"{rate:,.0f} updates/s over {len(dash_ids)} agents, {server}",
                describe(result),
            )
        passing = [
            r["rate"]
            for r in results["dashboards"]
            if r["scenario"] == "dashboards per-update"
            and r["p99_ms"] <= 100
            and r["dropped"] == 0
            and r["achieved_rate"] >= 0.95 * r["rate"]
        ]
        print(
            "\nHighest per-update dashboard rate tried with p99 <= 100 ms and nothing dropped: "
            + (f"{max(passing):,.0f} updates/s" if passing else "none of those tried")
        )

    if "watchers-spread" in scenarios:
        n = args.spread_watchers
        paths = [f"/ws/agents/{agent_id}/" for agent_id in agent_ids[:n]]
        for _ in range(args.spread_rounds):
            for processes in (1, 2):
                result = scenario(
                    "uvicorn", paths, args.rate, tenant, agent_ids[:n], token, args, rng, processes
                )
                result["scenario"] = f"watchers-spread N={n}"
                results["watchers-spread"].append(result)
                report(
                    f"Watchers spread: N={n}, {args.rate:,.0f} updates/s, "
                    f"{processes} uvicorn process(es)",
                    describe(result),
                )
        by = {p: [r for r in results["watchers-spread"] if r["processes"] == p] for p in (1, 2)}

        def med(processes: int, key: str) -> float:
            return median([r[key] for r in by[processes]])

        rows = []
        for key, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")):
            one, two = med(1, key), med(2, key)
            rows.append(
                (
                    f"{label}: 1 process / 2 processes (ratio 2/1)",
                    f"{one:.1f} / {two:.1f} ms ({two / one:.2f}x)",
                )
            )
        rows.append(
            (
                "server CPU: 1 process / 2 processes (summed)",
                f"{med(1, 'server_cpu'):.0%} / {med(2, 'server_cpu'):.0%} of a core",
            )
        )
        rows.append(
            (
                "errors (failed + closed + dropped), all runs",
                str(
                    sum(
                        r["connect_failures"] + r["closed"] + r["dropped"]
                        for r in results["watchers-spread"]
                    )
                ),
            )
        )
        report(f"Watchers spread: N={n}, medians of {args.spread_rounds} round(s)", rows)

    if "dashboards-max-rate" in scenarios:
        stream = ["/ws/agents/"] * args.dashboards
        configs = [
            (1, tenant, agent_ids[: args.dashboard_agents], token),
            (2, *bench_tenant("bench-realtime-2", args.dashboard_agents)),
        ]
        steps = max_rates("uvicorn", configs, stream, args, rng)
        for step in steps:
            step["scenario"] = "dashboards-max-rate"
        results["dashboards-max-rate"] = steps
        best = {}
        for processes in (1, 2):
            held = [s for s in steps if s["held"] and s["processes"] == processes]
            failed = [s for s in steps if not s["held"] and s["processes"] == processes]
            best[processes] = (
                max(held, key=lambda s: s["rate"]) if held else None,
                min(failed, key=lambda s: s["rate"]) if failed else None,
            )
        rows = []
        for processes, (top, first_failed) in best.items():
            text = (
                f"{top['rate']:,.0f} updates/s held (p99 {top['p99_ms']:,.1f} ms)"
                if top
                else "no step held"
            )
            text += (
                f"; {first_failed['rate']:,.0f}/s did not (p99 {first_failed['p99_ms']:,.0f} ms, "
                f"{first_failed['dropped']:,} dropped, driver "
                f"{first_failed['achieved_rate']:,.0f}/s)"
                if first_failed
                else "; the highest step tried"
            )
            rows.append((f"{processes} process(es)", text))
        report(
            f"Dashboards: highest per-update rate with p99 <= 100 ms, {args.dashboards} "
            "clients, no conflation",
            rows,
        )

    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nFigures written to {args.json}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        import uvloop

        client_parser = argparse.ArgumentParser()
        client_parser.add_argument("role")
        client_parser.add_argument("--token", required=True)
        client_parser.add_argument("--urls-file", required=True)
        client_parser.add_argument("--compression", action="store_true")
        uvloop.run(run_clients(client_parser.parse_args()))
    elif len(sys.argv) > 1 and sys.argv[1] == "storm-client":
        import uvloop

        client_parser = argparse.ArgumentParser()
        client_parser.add_argument("role")
        client_parser.add_argument("--token", required=True)
        client_parser.add_argument("--urls-file", required=True)
        client_parser.add_argument("--mode", choices=("resume", "fresh"), default="resume")
        uvloop.run(run_storm_clients(client_parser.parse_args()))
    else:
        main()
