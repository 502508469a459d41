"""FreeAgentics settings, read from environment variables in this one module.

Defaults exist only for local development. With DEBUG off, the variables that
guard data (SECRET_KEY, FREEAGENTICS_ENCRYPTION_KEYS, DATABASE_URL) must be set.
"""

import base64
import os
import re
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {raw!r}.")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}.") from None


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def required(name: str, dev_default: str) -> str:
    """A variable that production must set; development falls back to dev_default."""
    value = os.environ.get(name, "")
    if value:
        return value
    if DEBUG:
        return dev_default
    raise ImproperlyConfigured(f"{name} must be set when DEBUG is off.")


_FERNET_KEY = re.compile(r"[A-Za-z0-9_-]{43}=")


def check_fernet_keys(name: str, keys: list[str]) -> None:
    """Fails start-up on a key Fernet cannot use, instead of the first page that decrypts.
    The message names the key's position, never the key."""
    for position, key in enumerate(keys, start=1):
        if not _FERNET_KEY.fullmatch(key) or len(base64.urlsafe_b64decode(key)) != 32:
            raise ImproperlyConfigured(
                f"{name}: key {position} of {len(keys)} is not a Fernet key (44 characters "
                "of url-safe base64 encoding 32 bytes, as Fernet.generate_key() makes)."
            )


def env_header(name: str) -> tuple[str, str] | None:
    """'HTTP_X_FORWARDED_PROTO,https' -> ("HTTP_X_FORWARDED_PROTO", "https")."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    header, _, value = (part.strip() for part in raw.partition(","))
    if not re.fullmatch(r"HTTP_[A-Z0-9_]+", header) or not value:
        raise ImproperlyConfigured(
            f"{name} must be 'HTTP_<HEADER>,<value>' (e.g. HTTP_X_FORWARDED_PROTO,https), "
            f"got {raw!r}."
        )
    return header, value


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}.") from None


def _hosts_and_ports(name: str, netloc: str) -> tuple[str, str]:
    """'h1:5432,h2:5433' -> ("h1,h2", "5432,5433"), libpq's multi-host lists; a host
    without a port gets 5432 when there are several."""
    hosts, ports = [], []
    for item in netloc.split(","):
        host, port = item, ""
        if item.startswith("["):  # [::1]:5432
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        elif item.count(":") == 1:
            host, port = item.split(":")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ImproperlyConfigured(
                f"{name}: port {port!r} of host {host!r} is not a port number (1-65535)."
            )
        hosts.append(unquote(host))
        ports.append(port)
    if len(hosts) > 1:
        ports = [port or "5432" for port in ports]
    return ",".join(hosts), ",".join(ports)


def database_from_url(url: str, *, name: str = "DATABASE_URL") -> dict:
    """A Django DATABASES entry from postgres://user:password@host:port/db?options.
    Several hosts (h1:5432,h2:5432) are tried in turn by libpq; with
    ?target_session_attrs=read-write it connects to whichever is the primary."""
    parts = urlsplit(url)
    if parts.scheme not in {"postgres", "postgresql"}:
        raise ImproperlyConfigured(
            f"{name} must be a postgres:// URL, got scheme {parts.scheme!r}."
        )
    userinfo, _, netloc = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    host, port = _hosts_and_ports(name, netloc)
    options = dict(parse_qsl(parts.query))
    pool_max = env_int("DATABASE_POOL_MAX_SIZE", 20)
    config = {
        # Django's backend, with a pool that drops every dead connection at the first one
        # found (after a failover), instead of checking them one by one with back-off.
        "ENGINE": "freeagentics.postgresql",
        "NAME": unquote(parts.path.lstrip("/")) or "postgres",
        "USER": unquote(user),
        "PASSWORD": unquote(password),
        "HOST": host,
        "PORT": port,
        "OPTIONS": options,
        "TEST": {"NAME": os.environ.get("DATABASE_TEST_NAME") or None},
        # The pool checks a connection before handing it out (one empty round trip), so
        # the connections a failover or restart killed are dropped, not given to a request.
        "CONN_HEALTH_CHECKS": env_bool("DATABASE_HEALTH_CHECKS", True),
    }
    if pool_max > 0:
        # Django's psycopg pool replaces per-request connects; CONN_MAX_AGE must stay 0.
        config["OPTIONS"]["pool"] = {
            "min_size": env_int("DATABASE_POOL_MIN_SIZE", 2),
            "max_size": pool_max,
            "timeout": env_int("DATABASE_POOL_TIMEOUT", 10),
        }
    return config


DEBUG = env_bool("DEBUG", False)

# Development-only secrets, so a fresh checkout runs; refused with DEBUG off.
DEV_SECRET_KEY = "dev-only-insecure-secret-key-do-not-use-in-production"
DEV_ENCRYPTION_KEY = "ZGV2LW9ubHkta2V5LWRvLW5vdC11c2UtMzItYnl0ZXM="

SECRET_KEY = required("SECRET_KEY", DEV_SECRET_KEY)
if not DEBUG and SECRET_KEY == DEV_SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY: the development key is refused when DEBUG is off.")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost" if DEBUG else "")

# Comma-separated Fernet keys: the first encrypts, every key decrypts (MultiFernet).
FREEAGENTICS_ENCRYPTION_KEYS = env_list(
    "FREEAGENTICS_ENCRYPTION_KEYS", DEV_ENCRYPTION_KEY if DEBUG else ""
)
if not FREEAGENTICS_ENCRYPTION_KEYS:
    raise ImproperlyConfigured("FREEAGENTICS_ENCRYPTION_KEYS must be set when DEBUG is off.")
check_fernet_keys("FREEAGENTICS_ENCRYPTION_KEYS", FREEAGENTICS_ENCRYPTION_KEYS)
# How long a process keeps using a tenant's data key before re-reading which is active:
# after a data-key rotation, every process writes with the new key within this time.
ENCRYPTION_ACTIVE_KEY_SECONDS = env_int("ENCRYPTION_ACTIVE_KEY_SECONDS", 5)
if not DEBUG and DEV_ENCRYPTION_KEY in FREEAGENTICS_ENCRYPTION_KEYS:
    raise ImproperlyConfigured(
        "FREEAGENTICS_ENCRYPTION_KEYS: the development key is refused when DEBUG is off."
    )

DATABASES = {
    "default": database_from_url(
        required("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/freeagentics")
    )
}
# Behind PgBouncer in transaction pooling mode consecutive transactions may run on
# different server connections: nothing may outlive a transaction. Django's psycopg 3
# backend already sends no named prepared statements (prepare_threshold None); its
# server-side cursors (QuerySet.iterator) would, so they are turned off.
DATABASE_PGBOUNCER = env_bool("DATABASE_PGBOUNCER", False)
if DATABASE_PGBOUNCER:
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True
    DATABASES["default"]["OPTIONS"]["prepare_threshold"] = None
# A direct connection to the primary, bypassing a pooler, for what needs a session of
# its own (pg_dump, pg_restore, partition maintenance's advisory lock). Unset: "default".
if _direct := os.environ.get("DATABASE_DIRECT_URL", ""):
    DATABASES["direct"] = database_from_url(_direct, name="DATABASE_DIRECT_URL")
    DATABASES["direct"]["TEST"] = {"MIRROR": "default"}
# Streaming replicas for reads (freeagentics.replicas routes them); none: nothing changes.
DATABASE_REPLICAS = []
for _number, _url in enumerate(env_list("DATABASE_REPLICA_URLS"), start=1):
    _alias = f"replica{_number}"
    DATABASES[_alias] = database_from_url(_url, name="DATABASE_REPLICA_URLS")
    DATABASES[_alias]["TEST"] = {"MIRROR": "default"}
    # A replica that cannot give a connection within 2 s is skipped for the primary,
    # rather than holding the read for libpq's or the pool's own (longer) wait.
    DATABASES[_alias]["OPTIONS"].setdefault("connect_timeout", "2")
    if "pool" in DATABASES[_alias]["OPTIONS"]:
        _pool = DATABASES[_alias]["OPTIONS"]["pool"]
        _pool["timeout"] = min(_pool["timeout"], 2)
    DATABASE_REPLICAS.append(_alias)
# A replica further behind than this (seconds of replay) gets no reads.
DATABASE_REPLICA_MAX_LAG = env_float("DATABASE_REPLICA_MAX_LAG", 5.0)
# How long a replica's replay position and lag are trusted before asking it again.
DATABASE_REPLICA_CHECK_SECONDS = env_float("DATABASE_REPLICA_CHECK_SECONDS", 0.5)
DATABASE_ROUTERS = ["freeagentics.replicas.ReplicaRouter"] if DATABASE_REPLICAS else []
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis ---
# One server (REDIS_URL) or a Sentinel group (REDIS_SENTINELS, REDIS_SENTINEL_MASTER);
# docs/README-sentinel.md. redis_config() is the one place that reads where Redis is: the
# cache, both channel layers and freeagentics.redis_connection (backups, raw clients)
# are built from what it returns.
SENTINEL_PORT = 26379
# What `sentinel monitor` takes as a name. Lowercase only: django-redis reads the name
# back from a URL's host part, which urllib lowercases.
_SENTINEL_MASTER = re.compile(r"[a-z0-9_.-]{1,64}")


def _sentinel_addresses(raw: str) -> list[tuple[str, int]]:
    """'s1:26379,s2,[fd00::1]:26380' -> [("s1", 26379), ("s2", 26379), ("fd00::1", 26380)]."""
    addresses = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        host, port = item, ""
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        elif item.count(":") == 1:
            host, port = item.split(":")
        if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
            raise ImproperlyConfigured(
                f"REDIS_SENTINELS: {item!r} is not host:port (e.g. sentinel1:26379)."
            )
        addresses.append((host, int(port or SENTINEL_PORT)))
    return addresses


def redis_config(environ, *, debug: bool) -> dict:
    """Where the project's Redis is, from the environment `environ`.

    One server: REDIS_URL (redis://, rediss:// or unix://). A Sentinel group: REDIS_SENTINELS
    ("host:port,host:port", port 26379 by default) and REDIS_SENTINEL_MASTER, with
    REDIS_DB (0), REDIS_PASSWORD (the servers') and REDIS_SENTINEL_PASSWORD (the
    sentinels') optional; REDIS_URL must then be unset. Returns {"url", "sentinels",
    "master", "db", "password", "sentinel_password"} ("url" empty with sentinels, the
    sentinel fields empty without). Raises ImproperlyConfigured naming the variable."""
    url = environ.get("REDIS_URL", "")
    raw_sentinels = environ.get("REDIS_SENTINELS", "").strip()
    master = environ.get("REDIS_SENTINEL_MASTER", "").strip()
    config = {"url": url, "sentinels": [], "master": "", "db": 0, "password": ""}
    config["sentinel_password"] = ""
    if not raw_sentinels:
        for name in ("REDIS_SENTINEL_MASTER", "REDIS_SENTINEL_PASSWORD", "REDIS_DB"):
            if environ.get(name):
                raise ImproperlyConfigured(f"{name} is set but REDIS_SENTINELS is not.")
        if not url:
            if not debug:
                raise ImproperlyConfigured(
                    "REDIS_URL must be set when DEBUG is off (or REDIS_SENTINELS and "
                    "REDIS_SENTINEL_MASTER, for a Sentinel group)."
                )
            config["url"] = "redis://127.0.0.1:6379/0"
        if urlsplit(config["url"]).scheme not in {"redis", "rediss", "unix"}:
            raise ImproperlyConfigured(
                f"REDIS_URL must be a redis://, rediss:// or unix:// URL, got "
                f"scheme {urlsplit(config['url']).scheme!r}."
            )
        return config
    if url:
        raise ImproperlyConfigured(
            "REDIS_URL and REDIS_SENTINELS are both set: unset REDIS_URL to use the "
            "Sentinel group (REDIS_DB and REDIS_PASSWORD replace its database and password)."
        )
    config["sentinels"] = _sentinel_addresses(raw_sentinels)
    if not config["sentinels"]:
        raise ImproperlyConfigured("REDIS_SENTINELS names no sentinel.")
    if not master:
        raise ImproperlyConfigured("REDIS_SENTINEL_MASTER must be set with REDIS_SENTINELS.")
    if not _SENTINEL_MASTER.fullmatch(master):
        raise ImproperlyConfigured(
            f"REDIS_SENTINEL_MASTER must be the name the sentinels monitor, in lowercase "
            f"letters, digits, '.', '_' or '-'; got {master!r}."
        )
    db = environ.get("REDIS_DB", "") or "0"
    if not db.isdigit():
        raise ImproperlyConfigured(f"REDIS_DB must be a database number, got {db!r}.")
    config.update(
        master=master,
        db=int(db),
        password=environ.get("REDIS_PASSWORD", ""),
        sentinel_password=environ.get("REDIS_SENTINEL_PASSWORD", ""),
    )
    return config


def redis_cache(config: dict, *, key_prefix: str) -> dict:
    """The CACHES entry of django-redis on `config` (redis_config()): with sentinels, its
    SentinelClient, whose pool asks the sentinels for the master on every new connection."""
    options = {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1}
    entry = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": config["url"],
        "KEY_PREFIX": key_prefix,
        "KEY_FUNCTION": "freeagentics.cache_keys.make_key",
        "OPTIONS": options,
    }
    if not config["sentinels"]:
        options["CLIENT_CLASS"] = "django_redis.client.DefaultClient"
        return entry
    entry["LOCATION"] = f"redis://{config['master']}/{config['db']}"
    options.update(
        CLIENT_CLASS="django_redis.client.SentinelClient",
        CONNECTION_FACTORY="django_redis.pool.SentinelConnectionFactory",
        CONNECTION_POOL_CLASS="redis.sentinel.SentinelConnectionPool",
        SENTINELS=config["sentinels"],
        SENTINEL_KWARGS=_sentinel_kwargs(config, timeout=1),
    )
    if config["password"]:
        options["PASSWORD"] = config["password"]
    return entry


def redis_channel_host(config: dict, *, socket_timeout: int) -> dict:
    """A channels-redis `hosts` entry on `config` (both layers take the same form)."""
    if not config["sentinels"]:
        return {"address": config["url"], "socket_timeout": socket_timeout}
    host = {
        "sentinels": config["sentinels"],
        "master_name": config["master"],
        "db": config["db"],
        "socket_timeout": socket_timeout,
        # Without them channels-redis asks the sentinels with no timeout at all.
        "sentinel_kwargs": _sentinel_kwargs(config, timeout=2),
    }
    if config["password"]:
        host["password"] = config["password"]
    return host


def _sentinel_kwargs(config: dict, *, timeout: float) -> dict:
    kwargs = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if config["sentinel_password"]:
        kwargs["password"] = config["sentinel_password"]
    return kwargs


REDIS = redis_config(os.environ, debug=DEBUG)
# One server's URL; empty with a Sentinel group (freeagentics.redis_connection asks it).
REDIS_URL = REDIS["url"]
REDIS_SENTINELS = REDIS["sentinels"]
REDIS_SENTINEL_MASTER = REDIS["master"]
CACHES = {"default": redis_cache(REDIS, key_prefix=os.environ.get("CACHE_KEY_PREFIX", ""))}
# After a Redis failure the cache leaves Redis alone this long (agents.cache's guard), so
# an outage costs neither a timeout nor a log line per call. A Sentinel group refuses
# quickly while it fails over (no master yet), so it is asked again sooner.
REDIS_CACHE_RETRY_SECONDS = env_float("REDIS_CACHE_RETRY_SECONDS", 1.0 if REDIS_SENTINELS else 5.0)
# --- end Redis ---

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "channels",
    "agents",
    "coalitions",
    "metrics",
    "realtime",
    "backups",
    "monitoring",
]

MIDDLEWARE = [
    "monitoring.middleware.RequestTimingMiddleware",
    "monitoring.middleware.ProbeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
if DATABASE_REPLICAS:
    # freeagentics.replicas: its app notes the primary's WAL position after each write;
    # its middleware keeps an admin's in the session (after SessionMiddleware, before
    # anything reads).
    INSTALLED_APPS.append("freeagentics.replicas.ReplicasConfig")
    MIDDLEWARE.insert(
        MIDDLEWARE.index("django.contrib.sessions.middleware.SessionMiddleware") + 1,
        "freeagentics.replicas.ReadPositionMiddleware",
    )

# --- HTTPS ---
# Production defaults pass `manage.py check --deploy`. Behind a TLS-terminating proxy set
# SECURE_PROXY_SSL_HEADER=HTTP_X_FORWARDED_PROTO,https, and only if the proxy always sets
# that header itself (a client could otherwise claim HTTPS).
SECURE_PROXY_SSL_HEADER = env_header("SECURE_PROXY_SSL_HEADER")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
# A promise to browsers' preload lists that is hard to take back: the operator opts in.
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")
# --- end HTTPS ---

ROOT_URLCONF = "freeagentics.urls"
WSGI_APPLICATION = "freeagentics.wsgi.application"
ASGI_APPLICATION = "freeagentics.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", BASE_DIR / "var" / "static"))

SILENCED_SYSTEM_CHECKS = [
    # PostgreSQL scopes CHECK constraint names per table, and ADR-012 names the
    # constraints on agents and coalitions identically (valid_status).
    "models.E032",
    # The 30-character index name limit exists for Oracle; PostgreSQL allows 63 and
    # ADR-012 names idx_coalition_members_performance.
    "models.E034",
]

# Agent validation bounds (issue: services).
H3_MIN_RESOLUTION = env_int("H3_MIN_RESOLUTION", 0)
H3_MAX_RESOLUTION = env_int("H3_MAX_RESOLUTION", 15)
BELIEF_MAX_ELEMENTS = env_int("BELIEF_MAX_ELEMENTS", 65_536)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}

# --- Backups and partitions ---
# Owned by the backups app; README "Operations" documents every variable.
BACKUP_DIR = Path(os.environ.get("BACKUP_DIR") or BASE_DIR / "var" / "backups")
BACKUP_S3_BUCKET = os.environ.get("BACKUP_S3_BUCKET", "")
if BACKUP_S3_BUCKET:
    _backup_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": BACKUP_S3_BUCKET,
            "location": os.environ.get("BACKUP_S3_PREFIX", "backups"),
            # Unset values fall back to boto3's own chain (env, profile, instance role).
            "endpoint_url": os.environ.get("AWS_S3_ENDPOINT_URL") or None,
            "region_name": os.environ.get("AWS_S3_REGION_NAME") or None,
            "access_key": os.environ.get("AWS_ACCESS_KEY_ID") or None,
            "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
            "file_overwrite": False,
            "default_acl": "private",
            # S3File keeps reads in memory below this size and spools to disk above it.
            "max_memory_size": 16 * 1024 * 1024,
        },
    }
else:
    _backup_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        # Backups hold every tenant's data: readable by the service user only.
        "OPTIONS": {
            "location": BACKUP_DIR,
            "file_permissions_mode": 0o600,
            "directory_permissions_mode": 0o700,
        },
    }
# Merged, not assigned, so STORAGES set earlier in this module keeps its entries.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    **globals().get("STORAGES", {}),
    "backups": _backup_storage,
}
# Comma-separated Fernet-format keys: the first encrypts, every key decrypts. Unset: no
# encryption. Must differ from FREEAGENTICS_ENCRYPTION_KEYS (checked when used).
BACKUP_ENCRYPTION_KEY = env_list("BACKUP_ENCRYPTION_KEY")
BACKUP_TEMP_DIR = os.environ.get("BACKUP_TEMP_DIR") or None
BACKUP_PG_BIN_DIR = os.environ.get("BACKUP_PG_BIN_DIR", "")
# pg_dump --compress. Level 1 is ~5x faster than pg_dump's default 6 on this data (mostly
# ciphertext) for a ~9% larger dump; "6", "9", or "lz4"/"zstd" with pg_dump 16+ also work.
BACKUP_PG_COMPRESS = os.environ.get("BACKUP_PG_COMPRESS", "1")
BACKUP_MAINTENANCE_DB = os.environ.get("BACKUP_MAINTENANCE_DB", "postgres")
BACKUP_NAME_PREFIX = os.environ.get("BACKUP_NAME_PREFIX", "freeagentics")
BACKUP_REDIS_URL = os.environ.get("BACKUP_REDIS_URL") or REDIS_URL
BACKUP_REDIS_RDB = env_bool("BACKUP_REDIS_RDB", True)
BACKUP_REDIS_CLI = os.environ.get("BACKUP_REDIS_CLI", "redis-cli")

PARTITION_PREMAKE_MONTHS = env_int("PARTITION_PREMAKE_MONTHS", 3)
PARTITION_RETENTION_MONTHS = env_int("PARTITION_RETENTION_MONTHS", 12)
PARTITION_ARCHIVE = env_bool("PARTITION_ARCHIVE", True)
PARTITION_DROP = env_bool("PARTITION_DROP", True)
# --- end Backups and partitions ---

# --- Metrics (InfluxDB) ---
# Owned by the metrics app; docs/README-metrics.md documents every variable with
# examples for InfluxDB 1.x, 2.x and 3.x. Points always go to the PostgreSQL outbox
# first; with INFLUXDB_URL unset they wait there (bounded by the cap below).
INFLUXDB_URL = os.environ.get("INFLUXDB_URL", "")
# v2: writes to /api/v2/write (InfluxDB 1.8+, 2.x, 3.x); v1: /write (InfluxDB 1.x).
INFLUXDB_API = os.environ.get("INFLUXDB_API", "v2")
# v2: an API token; v1: "username:password" (sent as HTTP Basic), or empty without auth.
INFLUXDB_TOKEN = os.environ.get("INFLUXDB_TOKEN", "")
INFLUXDB_ORG = os.environ.get("INFLUXDB_ORG", "freeagentics")
INFLUXDB_BUCKET = os.environ.get("INFLUXDB_BUCKET", "freeagentics_metrics")
# InfluxQL's database and retention policy; empty: derived from INFLUXDB_BUCKET.
INFLUXDB_DATABASE = os.environ.get("INFLUXDB_DATABASE", "")
INFLUXDB_RETENTION_POLICY = os.environ.get("INFLUXDB_RETENTION_POLICY", "")
# influxql (every version) or flux (InfluxDB 2.x only).
INFLUXDB_QUERY_LANGUAGE = os.environ.get("INFLUXDB_QUERY_LANGUAGE", "influxql")
INFLUXDB_TIMEOUT_MS = env_int("INFLUXDB_TIMEOUT_MS", 10_000)
INFLUXDB_VERIFY_SSL = env_bool("INFLUXDB_VERIFY_SSL", True)

METRICS_RECORD = env_bool("METRICS_RECORD", True)
# Per-dimension belief_<i> fields copy belief values, which are encrypted at rest, into
# the outbox and InfluxDB in plaintext: off unless an operator chooses otherwise.
METRICS_BELIEF_DIMENSIONS = env_bool("METRICS_BELIEF_DIMENSIONS", False)
METRICS_BELIEF_DIMENSIONS_MAX = env_int("METRICS_BELIEF_DIMENSIONS_MAX", 64)
# When the outbox holds this many points, new points are dropped and counted.
METRICS_OUTBOX_MAX_POINTS = env_int("METRICS_OUTBOX_MAX_POINTS", 5_000_000)
METRICS_FLUSH_BATCH_SIZE = env_int("METRICS_FLUSH_BATCH_SIZE", 5_000)
METRICS_FLUSH_RETRIES = env_int("METRICS_FLUSH_RETRIES", 5)
METRICS_FLUSH_BACKOFF_BASE_MS = env_int("METRICS_FLUSH_BACKOFF_BASE_MS", 500)
# Longest wait between flush attempts: a --follow flusher resumes within this of
# InfluxDB's return.
METRICS_FLUSH_BACKOFF_MAX_MS = env_int("METRICS_FLUSH_BACKOFF_MAX_MS", 5_000)
METRICS_CHART_TIMEOUT_MS = env_int("METRICS_CHART_TIMEOUT_MS", 2_000)
# --- end Metrics (InfluxDB) ---

# --- Realtime ---
# Websocket updates (the realtime app); README "Real-time updates".
# Origins a browser may open websockets from; empty means ALLOWED_HOSTS. A handshake
# without an Origin header (non-browser clients) is not checked.
WS_ALLOWED_ORIGINS = env_list("WS_ALLOWED_ORIGINS")
# Update frames queued per connection before the oldest is dropped.
WS_QUEUE_SIZE = env_int("WS_QUEUE_SIZE", 1000)
WS_MAX_SUBSCRIPTIONS = env_int("WS_MAX_SUBSCRIPTIONS", 10_000)
WS_CONFLATE_MIN_MS = env_int("WS_CONFLATE_MIN_MS", 50)
WS_CONFLATE_MAX_MS = env_int("WS_CONFLATE_MAX_MS", 60_000)
# Accept the token in the query string (it then shows in access logs).
WS_TOKEN_QUERY_PARAM = env_bool("WS_TOKEN_QUERY_PARAM", True)
# Backstop to the revocation notice: how often each process re-reads its tokens.
WS_TOKEN_RECHECK_SECONDS = env_int("WS_TOKEN_RECHECK_SECONDS", 60)
# channels-redis forgets group members after a day (group_expiry); renew well before.
WS_GROUP_REFRESH_SECONDS = env_int("WS_GROUP_REFRESH_SECONDS", 3600)
# A frame larger than this closes the socket with 1009; deeper JSON gets an error frame.
WS_MAX_FRAME_BYTES = env_int("WS_MAX_FRAME_BYTES", 512 * 1024)
WS_MAX_NESTING = env_int("WS_MAX_NESTING", 8)
# Channel-layer group joins/leaves one process runs at once (500 sockets closing together).
WS_GROUP_OPS_CONCURRENCY = env_int("WS_GROUP_OPS_CONCURRENCY", 8)
# Repeated problems (dropped frames, refusals) are logged once, then counted per interval.
LOG_SUMMARY_SECONDS = env_int("LOG_SUMMARY_SECONDS", 60)
REALTIME_PUBLISH = env_bool("REALTIME_PUBLISH", True)
# Agents per channel-layer message; a batch of 5,000 updates is 5 messages.
REALTIME_PUBLISH_CHUNK = env_int("REALTIME_PUBLISH_CHUNK", 1000)
# Jobs the publisher thread may hold while Redis is slow, before new ones are dropped.
REALTIME_PUBLISH_BACKLOG = env_int("REALTIME_PUBLISH_BACKLOG", 10_000)
# redis-py 8 times socket reads out after 5 s by default, exactly channels-redis' BZPOPMIN
# wait, so idle consumers crashed every ~5 s (channels_redis#422). Keep a timeout (a dead
# connection must not hang forever), but above the 5 s blocking pop.
_CHANNEL_HOSTS = [
    redis_channel_host(REDIS, socket_timeout=env_int("CHANNEL_LAYER_SOCKET_TIMEOUT", 15))
]
_CHANNEL_PREFIX = os.environ.get("CHANNEL_PREFIX", "asgi")
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": _CHANNEL_HOSTS,
            "prefix": _CHANNEL_PREFIX,
            # A crashed process's memberships lapse after three missed refreshes.
            "group_expiry": 3 * WS_GROUP_REFRESH_SECONDS,
        },
    },
}
# Agent updates do not travel on a channel layer: each tenant's batches are appended to
# a Redis Stream that every server process reads (realtime.history). Its retention, as
# entries (one per committed batch of at most REALTIME_PUBLISH_CHUNK updates) and as age:
# a client can resume a stream it left within both.
REALTIME_HISTORY_MAX_ENTRIES = env_int("REALTIME_HISTORY_MAX_ENTRIES", 10_000)
REALTIME_HISTORY_SECONDS = env_int("REALTIME_HISTORY_SECONDS", 300)
# A stream nobody appends to expires after this (its counter with it).
REALTIME_HISTORY_IDLE_SECONDS = env_int("REALTIME_HISTORY_IDLE_SECONDS", 86_400)
# How long a hub's read of the streams blocks in Redis before it asks again.
REALTIME_READ_BLOCK_MS = env_int("REALTIME_READ_BLOCK_MS", 5_000)
# Entries one replay read fetches; a resuming connection is paced by its queue.
REALTIME_REPLAY_BATCH = env_int("REALTIME_REPLAY_BATCH", 50)
# Stream reads one process's connections run at once (a storm of resumes shares them).
REALTIME_REDIS_CONCURRENCY = env_int("REALTIME_REDIS_CONCURRENCY", 16)
# --- end Realtime ---

# --- Monitoring (README "Monitoring") ---
# Prometheus instruments in every process; off makes each a no-op (overhead measured in
# benchmarks/README.md).
PROMETHEUS_METRICS_ENABLED = env_bool("PROMETHEUS_METRICS_ENABLED", True)
# /metrics answers a request from these networks, or one carrying this bearer token;
# everyone else gets 403. Behind a proxy REMOTE_ADDR is the proxy's: use the token.
PROMETHEUS_METRICS_TOKEN = os.environ.get("PROMETHEUS_METRICS_TOKEN", "")
PROMETHEUS_METRICS_ALLOWED_NETWORKS = env_list(
    "PROMETHEUS_METRICS_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128"
)
# /readyz: how long PostgreSQL and Redis each get to answer before the check fails.
READINESS_TIMEOUT_SECONDS = float(os.environ.get("READINESS_TIMEOUT_SECONDS", "1.0"))
# Figures read from the database at scrape time (outbox, partitions, backups) are reused
# for this long, so a scrape every second costs one set of queries per interval.
MONITORING_FIGURES_CACHE_SECONDS = env_int("MONITORING_FIGURES_CACHE_SECONDS", 10)
# --- end Monitoring ---
