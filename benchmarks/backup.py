"""Backup and restore of a large database: our commands against plain pg_dump/pg_restore.

    .venv/bin/python benchmarks/backup.py [--agents 100000] [--history 1000000]
        [--small 10] [--runs 3] [--out docs/BENCH-backup.md]

Builds a dedicated database (fa_bench_backup) at two sizes: full (--agents, --history)
and small (both divided by --small). History rows are written with COPY into the
default partition, then `maintain_partitions` moves them into monthly partitions (timed
too). Per size and round, interleaved so the noise hits every variant alike:

    baseline   pg_dump -Fc -Z1 -f FILE        | createdb + pg_restore -d DB FILE
    ours       manage.py backup --no-redis    | manage.py restore NAME --database-name DB
    ours+enc   the same with BACKUP_ENCRYPTION_KEY set

Our commands run as child processes (Python start-up included in their time); each
reports its own peak RSS (VmHWM of the Python process; pg_dump/pg_restore are separate
processes in both variants; ru_maxrss would not do: Linux carries the forking parent's
RSS into it across exec). The baseline dumps with the same --compress as ours
(BACKUP_PG_COMPRESS); pg_dump at its default compression is timed once per size for
context. Targets: median ratio ours/baseline <= 1.3 for backup and restore, and peak RSS
that does not grow with the database.
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DB = "fa_bench_backup"
RESTORE_DB = "fa_bench_restore"
PG = "postgres://postgres@127.0.0.1:5432"
BACKUP_KEY = "2cvKoTSGhxbFqr4sJvQ8Yw7lQ6dR3Ti6ElvGEVRX6Bc="
ENV = {
    "DJANGO_SETTINGS_MODULE": "freeagentics.settings",
    "DEBUG": "0",
    "SECRET_KEY": "benchmark",
    "FREEAGENTICS_ENCRYPTION_KEYS": "j0BikImprDHDLmqRY3Lwqh54e7y_J3kuTUJqAnpvd1M=",
    "DATABASE_URL": f"{PG}/{DB}",
    "DATABASE_POOL_MAX_SIZE": "0",
    "REDIS_URL": "redis://127.0.0.1:6379/11",
    "BACKUP_DIR": str(ROOT / "var" / "bench-backups"),
    "PARTITION_RETENTION_MONTHS": "12",
    "BACKUP_PG_COMPRESS": "1",
}


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(argv: list[str]) -> None:
    """Run one management command in this process; print time and peak RSS as JSON."""
    import io

    import django

    django.setup()
    from django.core.management import call_command

    out = io.StringIO()
    started = time.perf_counter()
    call_command(*argv, stdout=out, stderr=out)
    seconds = time.perf_counter() - started
    lines = out.getvalue().strip().splitlines()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rss_mib": vm_hwm_mib(),
                "last": lines[-1] if lines else "",
            }
        )
    )


def run_child(argv: list[str], extra_env: dict | None = None) -> dict:
    env = {**os.environ, **ENV, **(extra_env or {})}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *argv], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def psql(sql: str, db: str = "postgres") -> None:
    subprocess.run(
        ["psql", f"{PG}/{db}", "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
        check=True,
        capture_output=True,
    )


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([str(a) for a in args], check=True, capture_output=True)
    return time.perf_counter() - started


def build(agents: int, history: int) -> dict:
    """Create, migrate and fill the benchmark database; returns load timings."""
    psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    psql(f"CREATE DATABASE {DB}")
    env = {**os.environ, **ENV}
    subprocess.run([sys.executable, str(ROOT / "manage.py"), "migrate", "-v0"], env=env, check=True)
    os.environ.update(ENV)
    import django

    django.setup()
    import numpy as np
    import psycopg

    from agents.encryption import encrypt_array

    rng = np.random.default_rng(7)
    arrays = [rng.random(16) for _ in range(64)]
    now = datetime.datetime.now(datetime.UTC)
    started = time.perf_counter()
    with psycopg.connect(f"{PG}/{DB}") as conn, conn.cursor() as cur:
        tenants = [uuid.uuid4() for _ in range(10)]
        with cur.copy("COPY tenants (id, name, slug) FROM STDIN") as copy:
            for i, tenant in enumerate(tenants):
                copy.write_row((tenant, f"Tenant {i}", f"tenant-{i}"))
        agent_ids = [uuid.uuid4() for _ in range(agents)]
        with cur.copy(
            "COPY agents (id, name, agent_type, tenant_id, belief_state, energy_level, "
            "location_h3) FROM STDIN"
        ) as copy:
            for i, agent in enumerate(agent_ids):
                copy.write_row(
                    (
                        agent,
                        f"agent-{i}",
                        "explorer",
                        tenants[i % 10],
                        encrypt_array(arrays[i % 64], tenant_id=tenants[i % 10]),
                        i % 101,
                        "891f1d48947ffff",
                    )
                )
        seconds = rng.integers(0, 330 * 86400, size=history)
        with cur.copy(
            "COPY agent_history (agent_id, recorded_at, belief_state, energy_level) FROM STDIN"
        ) as copy:
            for i in range(history):
                copy.write_row(
                    (
                        agent_ids[i % agents],
                        now - datetime.timedelta(seconds=int(seconds[i])),
                        encrypt_array(arrays[i % 64], tenant_id=tenants[(i % agents) % 10]),
                        i % 101,
                    )
                )
        conn.commit()
    load = time.perf_counter() - started
    maintain = run_child(["maintain_partitions", "--yes"])
    psql("VACUUM ANALYZE", DB)
    size = subprocess.run(
        ["psql", f"{PG}/{DB}", "-qAtc", f"SELECT pg_database_size('{DB}')"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return {"load": load, "maintain": maintain["wall"], "db_bytes": int(size)}


def pg_client(program: str) -> str:
    """The same client version our commands pick."""
    import django

    django.setup()
    from backups import pgtools

    version, number = pgtools.server_version("default")
    return str(pgtools.find_client(program, number // 10000, version).path)


def measure(label: str, agents: int, history: int, runs: int, work: Path) -> dict:
    print(f"[{label}] building: {agents:,} agents, {history:,} history rows", flush=True)
    info = build(agents, history)
    print(
        f"[{label}] loaded in {info['load']:.0f}s, partitioned in {info['maintain']:.0f}s, "
        f"database {info['db_bytes'] / 2**20:.0f} MiB",
        flush=True,
    )
    pg_dump, pg_restore = pg_client("pg_dump"), pg_client("pg_restore")
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGUSER": "postgres"}
    os.environ.update(env)
    dump = work / "baseline.dump"
    compress = f"--compress={ENV['BACKUP_PG_COMPRESS']}"
    info["pg_dump_default"] = timed([pg_dump, "-Fc", "-f", work / "default.dump", DB])
    info["default_dump_bytes"] = (work / "default.dump").stat().st_size
    (work / "default.dump").unlink()
    samples = {
        k: []
        for k in (
            "pg_dump",
            "backup",
            "backup_enc",
            "pg_restore",
            "restore",
            "restore_enc",
            "rss_backup",
            "rss_backup_enc",
            "rss_restore",
            "rss_restore_enc",
            "cmd_backup",
            "cmd_backup_enc",
            "cmd_restore",
            "cmd_restore_enc",
        )
    }
    for round_ in range(runs):
        dump.unlink(missing_ok=True)
        samples["pg_dump"].append(timed([pg_dump, "-Fc", compress, "-f", dump, DB]))
        ours = run_child(["backup", "--no-redis"])
        enc = run_child(["backup", "--no-redis"], {"BACKUP_ENCRYPTION_KEY": BACKUP_KEY})
        samples["backup"].append(ours["wall"])
        samples["backup_enc"].append(enc["wall"])
        samples["rss_backup"].append(ours["rss_mib"])
        samples["rss_backup_enc"].append(enc["rss_mib"])
        samples["cmd_backup"].append(ours["seconds"])
        samples["cmd_backup_enc"].append(enc["seconds"])

        psql(f"DROP DATABASE IF EXISTS {RESTORE_DB} WITH (FORCE)")
        started = time.perf_counter()
        psql(f"CREATE DATABASE {RESTORE_DB}")
        subprocess.run([pg_restore, "-d", RESTORE_DB, dump], check=True, capture_output=True)
        samples["pg_restore"].append(time.perf_counter() - started)
        for key, result, extra in (
            ("restore", ours, None),
            ("restore_enc", enc, {"BACKUP_ENCRYPTION_KEY": BACKUP_KEY}),
        ):
            psql(f"DROP DATABASE IF EXISTS {RESTORE_DB} WITH (FORCE)")
            restored = run_child(
                ["restore", result["last"], "--database-name", RESTORE_DB, "--skip-redis"],
                extra,
            )
            samples[key].append(restored["wall"])
            samples[f"rss_{key}"].append(restored["rss_mib"])
            samples[f"cmd_{key}"].append(restored["seconds"])
        shutil.rmtree(ENV["BACKUP_DIR"], ignore_errors=True)
        print(
            f"[{label}] round {round_ + 1}: "
            + ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples.items()),
            flush=True,
        )
    info["dump_bytes"] = dump.stat().st_size
    # Once, for context: the whole backup, Redis included (10,000 keys), while the
    # RDB transfer (redis-cli --rdb) runs concurrently with pg_dump.
    import redis

    client = redis.Redis.from_url(ENV["REDIS_URL"])
    client.flushdb()
    pipe = client.pipeline(transaction=False)
    for i in range(10_000):
        pipe.set(f"bench:{i}", os.urandom(200), ex=3600)
    pipe.execute()
    info["backup_with_redis"] = run_child(["backup"])["wall"]
    client.flushdb()
    shutil.rmtree(ENV["BACKUP_DIR"], ignore_errors=True)
    info["samples"] = samples
    info["startup"] = statistics.median(
        timed([sys.executable, "-c", "import django; django.setup()"]) for _ in range(3)
    )
    psql(f"DROP DATABASE IF EXISTS {RESTORE_DB} WITH (FORCE)")
    return info


def _against_baseline(samples: dict, baseline: str, step: str) -> str:
    """The rest of a table row: the medians of the baseline program, then of our process,
    command and +enc command for `step`, each with its ratio to the baseline."""
    s = {k: statistics.median(v) for k, v in samples.items()}
    base, process = s[baseline], s[step]
    command, encrypted = s[f"cmd_{step}"], s[f"cmd_{step}_enc"]
    return (
        f"| {base:.1f}s | {process:.1f}s | {process / base:.2f} "
        f"| {command:.1f}s | **{command / base:.2f}** "
        f"| {encrypted:.1f}s | {encrypted / base:.2f} |"
    )


def write_report(results: dict, args, path: Path) -> None:
    med = statistics.median
    lines = [
        "# Backup and restore benchmark",
        "",
        f"`benchmarks/backup.py --agents {args.agents} --history {args.history} "
        f"--small {args.small} --runs {args.runs}`, run {datetime.date.today()} on the shared "
        "2-core machine (PostgreSQL 15, local disk, local-filesystem backup storage), while "
        "other engineers' test suites and benchmarks ran. Medians of the rounds; every round "
        "runs every variant, interleaved.",
        "",
        "Baseline: `pg_dump -Fc -Z1 -f FILE` (the compression our backup uses, "
        "BACKUP_PG_COMPRESS=1) and `createdb` + `pg_restore -d DB FILE`, with the same client "
        "binaries our commands pick. Ours: `manage.py backup --no-redis` and "
        "`manage.py restore NAME --database-name DB --skip-redis` (+enc: with "
        "BACKUP_ENCRYPTION_KEY). Our backup also counts every table's rows inside the dump's "
        "snapshot and hashes the dump; our restore verifies the sha256 first, then restores "
        "into a scratch database, counts every table against the manifest and renames it "
        "into place. Neither side runs ANALYZE.",
        "",
        "*process* = the whole `manage.py` process, Python and Django start-up included; "
        "*command* = the command itself (what grows with the database).",
        "",
        "| size | DB | dump | pg_dump | backup process | ratio | backup command | ratio "
        "| +enc command | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, info in results.items():
        db_mib, dump_mib = info["db_bytes"] / 2**20, info["dump_bytes"] / 2**20
        lines.append(
            f"| {label} | {db_mib:.0f} MiB | {dump_mib:.0f} MiB "
            + _against_baseline(info["samples"], "pg_dump", "backup")
        )
    lines += [
        "",
        "| size | pg_restore | restore process | ratio | restore command | ratio "
        "| +enc command | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, info in results.items():
        lines.append(f"| {label} " + _against_baseline(info["samples"], "pg_restore", "restore"))
    lines += [
        "",
        "Python + Django start-up (`django.setup()`, median of 3): "
        + ", ".join(f"{k} {v['startup']:.1f}s" for k, v in results.items())
        + ". It is the same at any database size.",
        "",
        "Peak RSS of our command process (VmHWM, MiB, max over rounds):",
        "",
        "| size | backup | backup +enc | restore | restore +enc |",
        "|---|---|---|---|---|",
    ]
    for label, info in results.items():
        s = info["samples"]
        lines.append(
            f"| {label} | {max(s['rss_backup']):.0f} | {max(s['rss_backup_enc']):.0f} "
            f"| {max(s['rss_restore']):.0f} | {max(s['rss_restore_enc']):.0f} |"
        )
    lines += ["", "Context, measured once per size:", ""]
    for label, info in results.items():
        s = info["samples"]
        lines.append(
            f"- {label}: pg_dump at its default compression (zlib 6) "
            f"{info['pg_dump_default']:.1f}s for {info['default_dump_bytes'] / 2**20:.0f} MiB "
            f"(ours at level 1: {med(s['backup']):.1f}s, {info['dump_bytes'] / 2**20:.0f} MiB); "
            f"the whole `manage.py backup` with Redis (RDB + 10,000-key export) "
            f"{info['backup_with_redis']:.1f}s; set-up: COPY load {info['load']:.0f}s, "
            f"`maintain_partitions` moving every history row out of the default partition "
            f"into 12 monthly partitions {info['maintain']:.0f}s."
        )
    lines += [
        "",
        "(This Redis server has repl-diskless-sync-delay=5, so every RDB transfer waits 5 s; "
        "it runs concurrently with pg_dump.)",
        "",
        "All rounds (seconds; RSS in MiB):",
        "",
        "```",
    ]
    for label, info in results.items():
        for key, values in info["samples"].items():
            lines.append(f"{label:<6} {key:<16} " + " ".join(f"{v:7.1f}" for v in values))
    lines += ["```", ""]
    path.write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10, help="small size = full / this")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCH-backup.md"))
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    os.environ.update(ENV)
    work = ROOT / "var" / "bench-work"
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        sizes = [
            ("small", args.agents // args.small, args.history // args.small),
            ("full", args.agents, args.history),
        ]
        for label, agents, history in sizes:
            results[label] = measure(label, agents, history, args.runs, work)
        (ROOT / "var" / "bench-backup.json").write_text(json.dumps(results, indent=1))
        write_report(results, args, Path(args.out))
        print(Path(args.out).read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ENV["BACKUP_DIR"], ignore_errors=True)
        if not args.keep_db:
            psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
            psql(f"DROP DATABASE IF EXISTS {RESTORE_DB} WITH (FORCE)")


if __name__ == "__main__":
    main()
