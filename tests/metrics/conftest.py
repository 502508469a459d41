"""Real InfluxDB 1.6.7 and VictoriaMetrics servers on loopback for the metrics tests.

Each server runs as a subprocess on a free 127.0.0.1 port with a temporary data
directory, and is stopped when its fixture ends. A missing binary fails the test with
the package to install: scripts/test.sh installs them on Debian.
"""

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from freeagentics.log_summary import SummaryLog
from metrics import charts, services

START_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str, package: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(
            f"{name} is not installed: the metrics tests need the Debian package {package!r} "
            f"(apt-get install {package}; scripts/test.sh does this when run as root)."
        )
    return path


def _http(method: str, url: str, *, data: bytes | None = None, auth: tuple | None = None):
    request = urllib.request.Request(url, data=data, method=method)
    if auth:
        import base64

        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


class _Server:
    """A subprocess that serves HTTP on `port` once `health_path` answers 2xx."""

    name = "server"
    health_path = "/"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = workdir / f"{self.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def new_ports(self) -> None:
        self.port = _free_port()

    def start(self, attempts: int = 3) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if attempts > 1 and "address already in use" in self.log_tail():
                    # Another process took the free port between choosing and binding.
                    self.new_ports()
                    return self.start(attempts - 1)
                pytest.fail(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                _http("GET", self.url + self.health_path)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"{self.name} did not answer within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class InfluxDB(_Server):
    """influxd 1.6.7 with only its HTTP API, bound to loopback, no reporting."""

    name = "influxd"
    health_path = "/ping"

    def __init__(self, workdir: Path, *, auth: bool = False):
        super().__init__(workdir)
        self.binary = _binary("influxd", "influxdb")
        self.rpc_port = _free_port()
        self.auth = auth
        self.admin = ("admin", "admin-password") if auth else None
        self.config_path = workdir / "influxdb.conf"

    def command(self) -> list[str]:
        self.config_path.write_text(
            f"""
reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"
[meta]
  dir = "{self.workdir}/meta"
  logging-enabled = false
[data]
  dir = "{self.workdir}/data"
  wal-dir = "{self.workdir}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[subscriber]
  enabled = false
[continuous_queries]
  enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{self.port}"
  auth-enabled = {"true" if self.auth else "false"}
  log-enabled = false
  pprof-enabled = false
[logging]
  level = "warn"
"""
        )
        return [self.binary, "run", "-config", str(self.config_path)]

    def new_ports(self) -> None:
        super().new_ports()
        self.rpc_port = _free_port()

    def start(self) -> None:
        super().start()
        if self.auth:
            # With auth on and no users yet, InfluxDB 1.x accepts exactly this statement.
            self.query(
                f"CREATE USER {self.admin[0]} WITH PASSWORD '{self.admin[1]}' WITH ALL PRIVILEGES",
                auth=False,
            )

    def query(self, q: str, *, db: str | None = None, auth: bool = True) -> dict:
        params = {"q": q, "epoch": "ns"}
        if db:
            params["db"] = db
        _, body = _http(
            "POST",
            f"{self.url}/query?{urllib.parse.urlencode(params)}",
            data=b"",
            auth=self.admin if auth else None,
        )
        return json.loads(body)

    def create_database(self) -> str:
        name = f"m_{uuid.uuid4().hex[:12]}"
        self.query(f'CREATE DATABASE "{name}"')
        return name

    def configure_v1(self, settings) -> str:
        """Point `settings` at a fresh database of this server through the v1 API (InfluxQL);
        return the database's name."""
        database = self.create_database()
        settings.INFLUXDB_URL = self.url
        settings.INFLUXDB_API = "v1"
        settings.INFLUXDB_TOKEN = ""
        settings.INFLUXDB_DATABASE = database
        settings.INFLUXDB_RETENTION_POLICY = ""
        settings.INFLUXDB_QUERY_LANGUAGE = "influxql"
        return database

    def count(self, db: str, measurement: str, field: str) -> int:
        """Points stored for `field`, counted by InfluxDB itself."""
        result = self.query(f'SELECT count("{field}") FROM "{measurement}"', db=db)
        series = result["results"][0].get("series")
        return series[0]["values"][0][1] if series else 0

    def select(self, q: str, db: str) -> list[dict]:
        series = self.query(q, db=db)["results"][0].get("series", [])
        return [
            dict(zip(s["columns"], values, strict=True)) | s.get("tags", {})
            for s in series
            for values in s["values"]
        ]


class VictoriaMetrics(_Server):
    """victoria-metrics single node, which accepts /api/v2/write."""

    name = "victoria-metrics"
    health_path = "/health"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.binary = _binary("victoria-metrics", "victoria-metrics")

    def command(self) -> list[str]:
        return [
            self.binary,
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.workdir}/data",
            "-loggerLevel=ERROR",
        ]

    def export(self, match: str) -> list[dict]:
        """Raw samples of the series matching `match`, through /api/v1/export."""
        # Makes samples still buffered in memory searchable now rather than in seconds.
        _http("GET", f"{self.url}/internal/force_flush")
        query = urllib.parse.urlencode({"match[]": match})
        _, body = _http("GET", f"{self.url}/api/v1/export?{query}")
        return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def influxd(tmp_path_factory):
    """One InfluxDB 1.6.7 for the session; each test uses its own database in it."""
    with InfluxDB(tmp_path_factory.mktemp("influxd")) as server:
        yield server


@pytest.fixture
def own_influxd(tmp_path):
    """An InfluxDB 1.6.7 this test may stop and restart."""
    with InfluxDB(tmp_path) as server:
        yield server


@pytest.fixture(scope="session")
def influxd_auth(tmp_path_factory):
    """An InfluxDB 1.6.7 with auth-enabled = true and an admin user."""
    with InfluxDB(tmp_path_factory.mktemp("influxd-auth"), auth=True) as server:
        yield server


@pytest.fixture(scope="session")
def victoria(tmp_path_factory):
    """One VictoriaMetrics for the session, the /api/v2/write target."""
    with VictoriaMetrics(tmp_path_factory.mktemp("victoria")) as server:
        yield server


@pytest.fixture
def fast_retries(settings):
    """Backoff short enough for tests, retries few."""
    settings.METRICS_FLUSH_BACKOFF_BASE_MS = 10
    settings.METRICS_FLUSH_BACKOFF_MAX_MS = 100
    settings.METRICS_FLUSH_RETRIES = 1


@pytest.fixture
def influx_v1(settings, influxd, fast_retries):
    """Settings pointing at the session InfluxDB in v1 mode, with a fresh database."""
    return influxd.configure_v1(settings)


@pytest.fixture
def influx_v2(settings, victoria, fast_retries):
    """Settings pointing at VictoriaMetrics through influxdb-client's v2 write API."""
    settings.INFLUXDB_URL = victoria.url
    settings.INFLUXDB_API = "v2"
    settings.INFLUXDB_TOKEN = "not-checked-by-victoria-metrics"
    settings.INFLUXDB_ORG = "freeagentics"
    settings.INFLUXDB_BUCKET = "freeagentics_metrics"


@pytest.fixture
def influx_unset(settings):
    """No InfluxDB configured, as in a fresh deployment."""
    settings.INFLUXDB_URL = ""


@pytest.fixture(autouse=True)
def _fresh_chart_outage(monkeypatch):
    """Each test starts with InfluxDB considered up by the charts."""
    monkeypatch.setattr(charts, "outage", charts._Outage())


@pytest.fixture(autouse=True)
def summary_logs(monkeypatch):
    """Each test starts with no episode going on in the metrics' SummaryLogs; a test that
    wants the timer's summaries replaces them with shorter intervals."""
    fresh = {}
    for module in (services, charts):
        for name in ("problems", "errors"):
            old = getattr(module, name)
            fresh[module.__name__, name] = new = SummaryLog(
                old.logger, interval=old.interval, level=old.level
            )
            monkeypatch.setattr(module, name, new)
    yield fresh
    for summary in fresh.values():
        summary.flush()
