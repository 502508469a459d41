"""The one module that talks to InfluxDB, and the only one that imports influxdb_client.

Writes: INFLUXDB_API=v2 posts through influxdb-client's synchronous write API to
/api/v2/write (InfluxDB 1.8+, 2.x, 3.x and look-alikes such as VictoriaMetrics);
INFLUXDB_API=v1 posts the same body to /write for InfluxDB 1.x before 1.8. Both go
through one InfluxDBClient, so timeouts, TLS and proxies are configured once.

Queries: InfluxQL over /query (1.x, 2.x with a DBRP mapping, 3.x), or Flux for 2.x
when INFLUXDB_QUERY_LANGUAGE=flux.

Errors: transport failures, timeouts, 429 and 5xx raise InfluxDBUnavailable (retry);
400/413/422 raise InfluxDBRejected (the body itself is refused); credentials or targets
InfluxDB refuses (401/403/404) and bad settings raise ImproperlyConfigured naming the
variable to fix.
"""

import atexit
import contextlib
import json
import re
import threading
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace
from urllib.parse import urlsplit

import urllib3
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from metrics.exceptions import InfluxDBQueryError, InfluxDBRejected, InfluxDBUnavailable

NOT_CONFIGURED = "INFLUXDB_URL is not set: metrics wait in the PostgreSQL outbox."
BAD_URL = "INFLUXDB_URL must be an http:// or https:// URL with a host, got {value!r}."
BAD_API = "INFLUXDB_API must be v1 or v2, got {value!r}."
BAD_LANGUAGE = "INFLUXDB_QUERY_LANGUAGE must be influxql or flux, got {value!r}."
FLUX_NEEDS_V2 = (
    "INFLUXDB_QUERY_LANGUAGE=flux needs INFLUXDB_API=v2 (Flux exists only in InfluxDB 2.x)."
)
V1_TOKEN_FORMAT = (
    "INFLUXDB_TOKEN must be username:password (or empty) with INFLUXDB_API=v1, "
    "got a value without ':'."
)
NO_BUCKET = "INFLUXDB_BUCKET must be set with INFLUXDB_API=v2."
NO_DATABASE = "INFLUXDB_DATABASE (or INFLUXDB_BUCKET) must name the InfluxQL database."
CREDENTIALS_REFUSED = (
    "InfluxDB at {url} refused the credentials (HTTP {status}: {message}); check INFLUXDB_TOKEN."
)
TARGET_NOT_FOUND = "InfluxDB at {url} answered HTTP 404 for {path} ({message}); check {variables}."

# InfluxDB 1.x and 2.x end a partial write's message with the count of points the
# storage refused; lines that did not parse are listed before it, one "unable to parse".
_DROPPED = re.compile(r"\bdropped=(\d+)\s*$")
_UNPARSED = "unable to parse '"
_RETRYABLE_STATUSES = frozenset({408, 425, 429})
_REJECTED_STATUSES = frozenset({400, 413, 422})


@dataclass(frozen=True, slots=True)
class Config:
    url: str
    api: str
    token: str
    org: str
    bucket: str
    database: str
    retention_policy: str
    query_language: str
    timeout_ms: int
    verify_ssl: bool


def is_configured() -> bool:
    return bool(settings.INFLUXDB_URL)


def load_config(*, timeout_ms: int | None = None) -> Config:
    """The validated settings. Raises ImproperlyConfigured naming the variable to fix."""
    url = settings.INFLUXDB_URL
    if not url:
        raise ImproperlyConfigured(NOT_CONFIGURED)
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ImproperlyConfigured(BAD_URL.format(value=url))
    api = settings.INFLUXDB_API.strip().lower()
    if api not in {"v1", "v2"}:
        raise ImproperlyConfigured(BAD_API.format(value=settings.INFLUXDB_API))
    language = settings.INFLUXDB_QUERY_LANGUAGE.strip().lower()
    if language not in {"influxql", "flux"}:
        raise ImproperlyConfigured(BAD_LANGUAGE.format(value=settings.INFLUXDB_QUERY_LANGUAGE))
    if language == "flux" and api != "v2":
        raise ImproperlyConfigured(FLUX_NEEDS_V2)
    token = settings.INFLUXDB_TOKEN
    if api == "v1" and token and ":" not in token:
        raise ImproperlyConfigured(V1_TOKEN_FORMAT)
    bucket = settings.INFLUXDB_BUCKET
    if api == "v2" and not bucket:
        raise ImproperlyConfigured(NO_BUCKET)
    # InfluxDB 1.8's v2 write API takes "database/retention_policy" as the bucket.
    bucket_db, _, bucket_rp = bucket.partition("/")
    database = settings.INFLUXDB_DATABASE or bucket_db
    if not database:
        raise ImproperlyConfigured(NO_DATABASE)
    return Config(
        url=url.rstrip("/"),
        api=api,
        token=token,
        org=settings.INFLUXDB_ORG,
        bucket=bucket,
        database=database,
        retention_policy=settings.INFLUXDB_RETENTION_POLICY or bucket_rp,
        query_language=language,
        timeout_ms=timeout_ms or settings.INFLUXDB_TIMEOUT_MS,
        verify_ssl=settings.INFLUXDB_VERIFY_SSL,
    )


@cache
def _lib() -> SimpleNamespace:
    """influxdb_client, imported on first use: it takes ~0.5 s to import, and every
    process that only records points into the outbox (all of them, via the agent
    services and the admin) would otherwise pay for it at start."""
    from influxdb_client import InfluxDBClient, WritePrecision
    from influxdb_client.client.write_api import SYNCHRONOUS
    from influxdb_client.rest import ApiException

    return SimpleNamespace(
        InfluxDBClient=InfluxDBClient,
        WritePrecision=WritePrecision,
        SYNCHRONOUS=SYNCHRONOUS,
        ApiException=ApiException,
    )


_clients: dict[Config, tuple] = {}
_clients_lock = threading.RLock()
_MAX_CLIENTS = 8


def _client(config: Config):
    """(InfluxDBClient, synchronous WriteApi), created on first use per configuration."""
    pair = _clients.get(config)
    if pair is None:
        with _clients_lock:
            pair = _clients.get(config)
            if pair is None:
                options = {}
                if config.api == "v1" and config.token:
                    # InfluxDB 1.x before 1.8 knows HTTP Basic but not "Token user:password".
                    options["auth_basic"] = True
                client = _lib().InfluxDBClient(
                    url=config.url,
                    token=config.token or None,
                    org=config.org or None,
                    # (connect, read): a dead host fails fast even with a long read timeout.
                    timeout=(min(config.timeout_ms, 3_000), config.timeout_ms),
                    verify_ssl=config.verify_ssl,
                    **options,
                )
                pair = (client, client.write_api(write_options=_lib().SYNCHRONOUS))
                if len(_clients) >= _MAX_CLIENTS:
                    # Settings rarely change outside tests; keep the pool count bounded.
                    close_clients()
                _clients[config] = pair
    return pair


def prepare(config: Config | None = None) -> None:
    """Import influxdb-client and create the client for `config` now rather than at the
    first write: a command's start-up then holds that cost (~0.5 s), not its first batch.
    Sends nothing. Raises ImproperlyConfigured like load_config."""
    _client(config or load_config())


@atexit.register
def close_clients() -> None:
    """Close every client. Registered at exit because influxdb-client's __del__ fails
    noisily when it first runs during interpreter shutdown."""
    with _clients_lock:
        pairs = list(_clients.values())
        _clients.clear()
    for client, _ in pairs:
        client.close()


def write_lines(body: bytes, *, config: Config | None = None) -> None:
    """POST newline-separated line protocol with nanosecond timestamps. Returns once
    InfluxDB acknowledged every point. Raises InfluxDBUnavailable, InfluxDBRejected
    or ImproperlyConfigured (see the module docstring)."""
    config = config or load_config()
    client, write_api = _client(config)
    with _errors_translated(config, "/api/v2/write" if config.api == "v2" else "/write"):
        if config.api == "v2":
            write_api.write(
                bucket=config.bucket,
                org=config.org or None,
                record=body,
                write_precision=_lib().WritePrecision.NS,
            )
        else:
            _call_v1(
                client,
                config,
                "/write",
                "POST",
                {"precision": "ns"},
                {"Content-Type": "text/plain; charset=utf-8"},
                body=body,
            )


def query_influxql(query: str, *, config: Config | None = None) -> list[dict]:
    """Run one InfluxQL statement over /query; return its series (name, columns,
    values), timestamps as epoch seconds. Raises InfluxDBUnavailable,
    InfluxDBQueryError or ImproperlyConfigured."""
    config = config or load_config()
    client, _ = _client(config)
    with _errors_translated(config, "/query"):
        response = _call_v1(
            client,
            config,
            "/query",
            "GET",
            {"q": query, "epoch": "s"},
            {"Accept": "application/json"},
            _preload_content=False,
        )
    try:
        payload = json.loads(response.data)
    except ValueError as e:
        raise InfluxDBQueryError(f"InfluxDB at {config.url} answered /query with non-JSON") from e
    if payload.get("error"):
        raise InfluxDBQueryError(f"InfluxDB at {config.url}: {payload['error']}")
    results = payload.get("results") or [{}]
    error = results[0].get("error")
    if error:
        if error.startswith("database not found"):
            raise ImproperlyConfigured(
                f"InfluxDB at {config.url}: {error}; check INFLUXDB_DATABASE (or INFLUXDB_BUCKET)."
            )
        raise InfluxDBQueryError(f"InfluxDB at {config.url}: {error}")
    return results[0].get("series", [])


def _call_v1(client, config: Config, path: str, method: str, params: dict, headers: dict, **kw):
    """Call one of the 1.x endpoints that act on a database (/write, /query): the database
    and, when set, the retention policy join params."""
    params = {"db": config.database, **params}
    if config.retention_policy:
        params["rp"] = config.retention_policy
    return client.api_client.call_api(
        path,
        method,
        query_params=params,
        header_params=headers,
        _return_http_data_only=True,
        **kw,
    )


def query_flux(query: str, params: dict, *, config: Config | None = None) -> list[dict]:
    """Run a Flux query (InfluxDB 2.x) with `params` bound as Flux parameters; return
    records as dicts with _time, _field and _value."""
    config = config or load_config()
    client, _ = _client(config)
    with _errors_translated(config, "/api/v2/query"):
        tables = client.query_api().query(query, org=config.org or None, params=params)
    return flux_records(tables)


def flux_records(tables) -> list[dict]:
    """influxdb-client's FluxTables as plain dicts, one per record, with its columns
    (_time as an aware datetime, _field, _value, the group keys...)."""
    return [dict(record.values) for table in tables for record in table.records]


def ping(*, timeout_ms: int | None = None) -> str:
    """The server's version header (or "unknown") if /ping answers; raises
    InfluxDBUnavailable otherwise."""
    config = load_config(timeout_ms=timeout_ms)
    client, _ = _client(config)
    with _errors_translated(config, "/ping"):
        _, _, headers = client.api_client.call_api("/ping", "GET", _preload_content=False)
    return headers.get("X-Influxdb-Version", "unknown")


@contextlib.contextmanager
def _errors_translated(config: Config, path: str):
    """The one translation of influxdb-client's and urllib3's errors (module docstring)."""
    try:
        yield
    except _lib().ApiException as e:
        raise _translate(e, config, path) from e
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise _unreachable(config, e) from e


def _unreachable(config: Config, error: Exception) -> InfluxDBUnavailable:
    reason = getattr(error, "reason", None) or error
    return InfluxDBUnavailable(f"InfluxDB at {config.url} is unreachable: {reason}")


def _full_message(error) -> str:
    body = error.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if body:
        try:
            decoded = json.loads(body)
        except ValueError:
            return body.strip()
        if isinstance(decoded, dict):
            return str(decoded.get("error") or decoded.get("message") or decoded)
    return str(error.reason or "no details")


def _refused_count(message: str) -> int | None:
    """How many points of the request InfluxDB says it did not store, or None when its
    answer does not say (not a partial write, or another server)."""
    match = _DROPPED.search(message)
    if match is None:
        return None
    return int(match.group(1)) + message.count(_UNPARSED)


def _translate(error, config: Config, path: str) -> Exception:
    status = error.status or 0
    full = _full_message(error)
    message = full[:300]
    if status in (401, 403):
        return ImproperlyConfigured(
            CREDENTIALS_REFUSED.format(url=config.url, status=status, message=message)
        )
    if status == 404:
        if "database" in message:
            variables = "INFLUXDB_DATABASE (or INFLUXDB_BUCKET); create the database"
        elif "bucket" in message or "organization" in message:
            variables = "INFLUXDB_BUCKET and INFLUXDB_ORG"
        else:
            variables = "INFLUXDB_URL and INFLUXDB_API (v1 for InfluxDB 1.x before 1.8)"
        return ImproperlyConfigured(
            TARGET_NOT_FOUND.format(url=config.url, path=path, message=message, variables=variables)
        )
    if status in _REJECTED_STATUSES:
        return InfluxDBRejected(
            f"InfluxDB refused the points (HTTP {status}): {message}",
            status=status,
            refused=_refused_count(full),
        )
    if status == 0 or status >= 500 or status in _RETRYABLE_STATUSES:
        return InfluxDBUnavailable(f"InfluxDB at {config.url} failed (HTTP {status}): {message}")
    return ImproperlyConfigured(
        f"InfluxDB at {config.url} answered HTTP {status} for {path} ({message}); "
        "check INFLUXDB_URL and INFLUXDB_API."
    )
