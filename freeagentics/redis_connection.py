"""The project's Redis, for what is neither the cache nor a channel layer: raw clients,
and the current master's address for tools that take host:port (`redis-cli --rdb`).

settings.redis_config() resolved where Redis is: one server (REDIS_URL), or a Sentinel
group (REDIS_SENTINELS, REDIS_SENTINEL_MASTER). The cache (django-redis' SentinelClient)
and the channel layers (channels-redis' sentinel hosts) are configured from the same
result in settings; this module covers the rest, so nothing else parses REDIS_URL or
asks the sentinels itself. Nothing connects at import: every call asks anew, so a
failover between two calls is followed.
"""

from urllib.parse import quote, urlsplit

import redis
from django.conf import settings
from redis.sentinel import Sentinel

Address = tuple[str, int]


def uses_sentinel() -> bool:
    return bool(settings.REDIS_SENTINELS)


def sentinel() -> Sentinel:
    """A redis-py Sentinel client of the configured group (2 s timeouts on the
    sentinels; the servers' password on the connections it makes to them)."""
    config = settings.REDIS
    sentinel_kwargs = {"socket_timeout": 2, "socket_connect_timeout": 2}
    if config["sentinel_password"]:
        sentinel_kwargs["password"] = config["sentinel_password"]
    servers = {"password": config["password"]} if config["password"] else {}
    return Sentinel(config["sentinels"], sentinel_kwargs=sentinel_kwargs, **servers)


def master_address() -> Address:
    """(host, port) of the master: as the sentinels name it now, or REDIS_URL's server.
    Raises redis.sentinel.MasterNotFoundError (a redis ConnectionError) when no sentinel
    names a master that is up (a failover under way)."""
    if uses_sentinel():
        host, port = sentinel().discover_master(settings.REDIS_SENTINEL_MASTER)
        return host, int(port)
    parts = urlsplit(settings.REDIS_URL)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def master_url() -> str:
    """A redis:// URL of the server that is the master now (REDIS_URL itself without
    sentinels), with the database and password: for work that must stay on one server
    from start to end (a backup's key export and RDB snapshot), and for tools that take
    a host and a port."""
    if not uses_sentinel():
        return settings.REDIS_URL
    host, port = master_address()
    password = settings.REDIS["password"]
    credentials = f":{quote(password, safe='')}@" if password else ""
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"redis://{credentials}{netloc}/{settings.REDIS['db']}"


def client(**options) -> redis.Redis:
    """A redis-py client of the configured database that follows the master: through
    the sentinels (each new connection asks them) or to REDIS_URL's server."""
    if uses_sentinel():
        return sentinel().master_for(
            settings.REDIS_SENTINEL_MASTER, db=settings.REDIS["db"], **options
        )
    return redis.Redis.from_url(settings.REDIS_URL, **options)


def describe() -> str:
    """Where Redis is, without credentials, for messages."""
    if uses_sentinel():
        sentinels = ",".join(f"{host}:{port}" for host, port in settings.REDIS_SENTINELS)
        return (
            f"master {settings.REDIS_SENTINEL_MASTER!r} of sentinels {sentinels}, "
            f"db {settings.REDIS['db']}"
        )
    parts = urlsplit(settings.REDIS_URL)
    return f"{parts.hostname}:{parts.port or 6379}/{parts.path.lstrip('/') or '0'}"


def connected_master(client: redis.Redis) -> Address | None:
    """The master a sentinel-managed client's pool connected to last (it asks the
    sentinels on every new connection); None for a client of one server, or before its
    first connection. Lets the cache notice that a failover moved it to another server
    even when no command failed on the way."""
    pool = client.connection_pool
    # redis-py 5.1+ keeps it on the pool's proxy; older versions on the pool itself.
    holder = getattr(pool, "proxy", pool)
    address = getattr(holder, "master_address", None)
    return None if address is None else (address[0], int(address[1]))


def async_client(**options) -> "redis.asyncio.Redis":
    """The asyncio twin of client(): follows the master through the sentinels (each new
    connection asks them) or connects to REDIS_URL's server."""
    from redis.asyncio import Redis
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    if not uses_sentinel():
        return Redis.from_url(settings.REDIS_URL, **options)
    config = settings.REDIS
    sentinel_kwargs = {"socket_timeout": 2, "socket_connect_timeout": 2}
    if config["sentinel_password"]:
        sentinel_kwargs["password"] = config["sentinel_password"]
    servers = {"password": config["password"]} if config["password"] else {}
    group = AsyncSentinel(config["sentinels"], sentinel_kwargs=sentinel_kwargs, **servers)
    return group.master_for(settings.REDIS_SENTINEL_MASTER, db=config["db"], **options)
