"""Debian's Prometheus on a free loopback port, scraping the given targets every
second: the real scraper, for tests that check what it stores."""

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

START_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str]):
        self.binary = shutil.which("prometheus")
        if self.binary is None:
            pytest.fail(
                "prometheus is missing: these tests need Debian's 'prometheus' package "
                "(apt-get install prometheus; scripts/test.sh installs it when run as root)."
            )
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "freeagentics",
                            "scrape_timeout": "1s",
                            "static_configs": [{"targets": targets}],
                        }
                    ],
                }
            )
        )
        self.config = config
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self._log = log
        self.process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited: {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus did not start: {self.log()[-2000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")

    def query(self, expression: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expression: str) -> float | None:
        result = self.query(expression)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expression: str, expected: float, timeout: float = 30.0) -> float | None:
        """Polls until the expression equals expected (scrapes come every second);
        returns the last value seen either way, for the assertion to show."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.value(expression)
            if value == expected or time.monotonic() > deadline:
                return value
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self._log.close()
