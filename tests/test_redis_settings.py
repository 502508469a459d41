"""Where Redis is (settings.redis_config, docs/README-sentinel.md): one server's REDIS_URL,
or a Sentinel group's REDIS_SENTINELS and REDIS_SENTINEL_MASTER, resolved once and made
into the cache, both channel layers and freeagentics.redis_connection's answers; bad
values stop start-up naming the variable."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from freeagentics import redis_connection
from freeagentics.settings import redis_cache, redis_channel_host, redis_config

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = {
    "DEBUG": "0",
    "SECRET_KEY": "s",
    "DATABASE_URL": "postgres://u:p@db.example:5432/name",
    "FREEAGENTICS_ENCRYPTION_KEYS": "j0BikImprDHDLmqRY3Lwqh54e7y_J3kuTUJqAnpvd1M=",
}
SENTINELS = {"REDIS_SENTINELS": "s1:26379, s2:26380,s3", "REDIS_SENTINEL_MASTER": "mymaster"}
REDIS_NAMES = (
    "REDIS_URL",
    "REDIS_SENTINELS",
    "REDIS_SENTINEL_MASTER",
    "REDIS_DB",
    "REDIS_PASSWORD",
    "REDIS_SENTINEL_PASSWORD",
)


def load_settings(env: dict):
    """What freeagentics.settings makes of `env` in a fresh interpreter (JSON)."""
    clean = {k: v for k, v in os.environ.items() if k not in {*PRODUCTION, *REDIS_NAMES}}
    code = (
        "import json, freeagentics.settings as s; print(json.dumps({'caches': s.CACHES, "
        "'layers': s.CHANNEL_LAYERS, 'url': s.REDIS_URL, 'backup': s.BACKUP_REDIS_URL, "
        "'retry': s.REDIS_CACHE_RETRY_SECONDS}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, **PRODUCTION, **env},
        capture_output=True,
        text=True,
    )


def test_sentinel_variables_configure_the_cache_and_the_channel_layer_at_start_up():
    result = load_settings({**SENTINELS, "REDIS_DB": "2", "REDIS_PASSWORD": "pw"})
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    sentinels = [["s1", 26379], ["s2", 26380], ["s3", 26379]]
    cache = loaded["caches"]["default"]
    assert cache["LOCATION"] == "redis://mymaster/2"
    assert cache["OPTIONS"]["CLIENT_CLASS"] == "django_redis.client.SentinelClient"
    assert cache["OPTIONS"]["CONNECTION_FACTORY"] == "django_redis.pool.SentinelConnectionFactory"
    assert cache["OPTIONS"]["CONNECTION_POOL_CLASS"] == "redis.sentinel.SentinelConnectionPool"
    assert cache["OPTIONS"]["SENTINELS"] == sentinels
    assert cache["OPTIONS"]["PASSWORD"] == "pw"
    # One layer: agent updates travel on streams (realtime.history, redis_connection).
    assert list(loaded["layers"]) == ["default"]
    (host,) = loaded["layers"]["default"]["CONFIG"]["hosts"]
    assert (host["sentinels"], host["master_name"], host["db"]) == (sentinels, "mymaster", 2)
    assert host["password"] == "pw"
    assert host["sentinel_kwargs"]["socket_timeout"] > 0
    # No URL to parse anywhere: the backups ask the sentinels (backups.redisio.target).
    assert (loaded["url"], loaded["backup"], loaded["retry"]) == ("", "", 1.0)


def test_one_server_keeps_its_url_everywhere():
    result = load_settings({"REDIS_URL": "redis://cache.example:6380/4"})
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded["caches"]["default"]["LOCATION"] == "redis://cache.example:6380/4"
    assert loaded["caches"]["default"]["OPTIONS"]["CLIENT_CLASS"].endswith("DefaultClient")
    (host,) = loaded["layers"]["default"]["CONFIG"]["hosts"]
    assert host["address"] == "redis://cache.example:6380/4"
    assert loaded["backup"] == "redis://cache.example:6380/4"
    assert loaded["retry"] == 5.0


def test_without_redis_url_or_sentinels_production_start_up_names_both():
    result = load_settings({})
    assert result.returncode != 0
    assert "REDIS_URL must be set when DEBUG is off" in result.stderr
    assert "REDIS_SENTINELS" in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {**SENTINELS, "REDIS_URL": "redis://cache.example/0"},
            "REDIS_URL and REDIS_SENTINELS are both set",
        ),
        ({"REDIS_SENTINELS": "s1:26379"}, "REDIS_SENTINEL_MASTER must be set"),
        ({**SENTINELS, "REDIS_SENTINEL_MASTER": "MyMaster"}, "REDIS_SENTINEL_MASTER must be"),
        ({**SENTINELS, "REDIS_SENTINEL_MASTER": "my master"}, "REDIS_SENTINEL_MASTER must be"),
        ({**SENTINELS, "REDIS_SENTINELS": "s1:port"}, "REDIS_SENTINELS: 's1:port'"),
        ({**SENTINELS, "REDIS_SENTINELS": "s1:70000"}, "REDIS_SENTINELS: 's1:70000'"),
        ({**SENTINELS, "REDIS_SENTINELS": " , "}, "REDIS_SENTINELS names no sentinel"),
        ({**SENTINELS, "REDIS_DB": "one"}, "REDIS_DB must be a database number"),
        (
            {"REDIS_URL": "redis://c/0", "REDIS_SENTINEL_MASTER": "mymaster"},
            "REDIS_SENTINEL_MASTER is set but REDIS_SENTINELS is not",
        ),
        ({"REDIS_URL": "http://cache.example/0"}, "REDIS_URL must be a redis://"),
    ],
)
def test_a_bad_redis_variable_is_refused_naming_it(env, message):
    with pytest.raises(ImproperlyConfigured, match=message.replace("(", r"\(")):
        redis_config(env, debug=False)


def test_sentinel_addresses_take_default_ports_and_bracketed_ipv6():
    config = redis_config(
        {"REDIS_SENTINELS": "[fd00::1]:26380,[fd00::2],s3", "REDIS_SENTINEL_MASTER": "m-1.a_b"},
        debug=False,
    )
    assert config["sentinels"] == [("fd00::1", 26380), ("fd00::2", 26379), ("s3", 26379)]
    assert (config["master"], config["db"], config["url"]) == ("m-1.a_b", 0, "")


def test_the_sentinels_password_reaches_the_sentinel_connections_only():
    config = redis_config(
        {**SENTINELS, "REDIS_PASSWORD": "servers", "REDIS_SENTINEL_PASSWORD": "sentinels"},
        debug=False,
    )
    options = redis_cache(config, key_prefix="")["OPTIONS"]
    host = redis_channel_host(config, socket_timeout=15)
    assert options["PASSWORD"] == host["password"] == "servers"
    assert options["SENTINEL_KWARGS"]["password"] == "sentinels"
    assert host["sentinel_kwargs"]["password"] == "sentinels"


def test_debug_falls_back_to_a_local_redis():
    assert redis_config({}, debug=True)["url"] == "redis://127.0.0.1:6379/0"


def test_redis_connection_answers_from_redis_url_without_sentinels(settings):
    settings.REDIS = redis_config(
        {"REDIS_URL": "redis://:secret@cache.example:6390/3"}, debug=False
    )
    settings.REDIS_URL = settings.REDIS["url"]
    settings.REDIS_SENTINELS = []
    assert not redis_connection.uses_sentinel()
    assert redis_connection.master_address() == ("cache.example", 6390)
    assert redis_connection.master_url() == "redis://:secret@cache.example:6390/3"
    assert redis_connection.describe() == "cache.example:6390/3"


def test_redis_connection_describes_a_sentinel_group_without_credentials(settings):
    config = redis_config({**SENTINELS, "REDIS_PASSWORD": "secret"}, debug=False)
    settings.REDIS, settings.REDIS_URL = config, ""
    settings.REDIS_SENTINELS, settings.REDIS_SENTINEL_MASTER = config["sentinels"], "mymaster"
    assert redis_connection.uses_sentinel()
    description = redis_connection.describe()
    assert description == "master 'mymaster' of sentinels s1:26379,s2:26380,s3:26379, db 0"
    assert "secret" not in description
