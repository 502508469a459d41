"""What the Prometheus instruments cost: benchmarks/agent_writes.py and the 1,000-watcher
scenario of benchmarks/realtime.py, each run with PROMETHEUS_METRICS_ENABLED on and off,
alternating (on/off, then off/on) so drift on a shared machine hits both alike.

    .venv/bin/python benchmarks/monitoring_overhead.py [--pairs 3] [--watchers 1000]

Target: on/off >= 0.95 for write rates, and watcher p99 on/off <= 1.05 (noise on this
2-core machine is larger than that for p99; the medians over pairs are reported).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import median, report

HERE = Path(__file__).resolve().parent
RATE = re.compile(r"^\s+(\(b\+?\)) [^\d]*?([\d,]+) updates/s", re.M)


def _run(script: str, enabled: bool, *args: str) -> str:
    env = {**os.environ, "PROMETHEUS_METRICS_ENABLED": "1" if enabled else "0"}
    done = subprocess.run(
        [sys.executable, str(HERE / script), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def writes(enabled: bool, updates: int) -> dict[str, float]:
    out = _run("agent_writes.py", enabled, "--updates", str(updates), "--rounds", "1")
    rates = {name: float(value.replace(",", "")) for name, value in RATE.findall(out)}
    if set(rates) != {"(b)", "(b+)"}:
        raise SystemExit(f"could not read the rates of agent_writes.py:\n{out}")
    return rates


def watchers(enabled: bool, n: int, duration: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "realtime.json"
        _run(
            "realtime.py",
            enabled,
            "--scenarios",
            "watchers",
            "--servers",
            "uvicorn",
            "--watchers",
            str(n),
            "--duration",
            str(duration),
            "--rounds",
            "1",
            "--json",
            str(path),
        )
        result = json.loads(path.read_text())["watchers"][0]
    return {"p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"], "cpu": result["server_cpu"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--updates", type=int, default=20_000)
    parser.add_argument("--watchers", type=int, default=1_000)
    parser.add_argument("--duration", type=float, default=10)
    args = parser.parse_args()

    runs = {True: [], False: []}
    watch = {True: [], False: []}
    for pair in range(args.pairs):
        for enabled in (True, False) if pair % 2 == 0 else (False, True):
            runs[enabled].append(writes(enabled, args.updates))
            watch[enabled].append(watchers(enabled, args.watchers, args.duration))
            print(
                f"pair {pair + 1}/{args.pairs}, instruments {'on' if enabled else 'off'}: "
                f"{runs[enabled][-1]} {watch[enabled][-1]}",
                flush=True,
            )

    def med(table, enabled, key):
        return median([row[key] for row in table[enabled]])

    rows = []
    for key in ("(b)", "(b+)"):
        on, off = med(runs, True, key), med(runs, False, key)
        rows.append(
            (f"writes {key} on / off", f"{on:,.0f} / {off:,.0f} updates/s = {on / off:.3f}")
        )
    for key in ("p50_ms", "p99_ms", "cpu"):
        on, off = med(watch, True, key), med(watch, False, key)
        rows.append(
            (f"{args.watchers} watchers {key} on / off", f"{on:.2f} / {off:.2f} = {on / off:.3f}")
        )
    report(f"Prometheus instruments on vs off (medians of {args.pairs} pairs)", rows)


if __name__ == "__main__":
    main()
